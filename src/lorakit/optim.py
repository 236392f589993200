"""Optimizer parameter groups for LoRA variants of the training recipe.

LoRA+ (Hayou et al. 2024, arXiv 2402.12354): B learns ``ratio`` times faster than A (the paper
finds ratio ≈ 16 best for most tasks), which fixes plain LoRA's inefficient feature learning at
large widths at no extra cost::

    groups = lorakit.loraplus_param_groups(model, lr=2e-4, ratio=16, weight_decay=0.01)
    opt = torch.optim.AdamW(groups)          # every group carries its own lr and weight_decay

The groups are PEFT's (``peft.optimizers.create_loraplus_optimizer``), so a PEFT user gets the same
optimizer: ``lora_A`` and every other trainable matrix at ``lr``; LoRA parameters of embedding layers
at ``embedding_lr``; ``lora_B`` (also of named adapters) and every trainable 1-D tensor at
``lr * ratio``, with no weight decay for biases and norm weights.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from .checks import takes_model
from .errors import LoraConfigError
from .inject import lora_layers
from .layers import Embedding

__all__ = ["loraplus_param_groups"]

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d,
          nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm)


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise LoraConfigError(f"loraplus_param_groups: {name} must be a positive number, got {value!r}")
    return float(value)


def _no_decay_names(model: nn.Module) -> set[str]:
    """Biases and the parameters of normalisation layers (incl. RMSNorm-like modules by name)."""
    out: set[str] = set()
    for mod_name, mod in model.named_modules():
        is_norm = isinstance(mod, _NORMS) or "norm" in type(mod).__name__.lower()
        for p_name, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if is_norm or "bias" in full:
                out.add(full)
    return out


@takes_model
def loraplus_param_groups(model: nn.Module, lr: float, ratio: float = 16.0, *, weight_decay: float = 0.0,
                          embedding_lr: float = 1e-6) -> list[dict[str, Any]]:
    """Parameter groups for LoRA+ (``lr`` for A, ``lr * ratio`` for B), for any ``torch.optim`` optimizer.

    Only parameters with ``requires_grad`` are included; empty groups are left out. Each group has a
    ``"name"`` (``lora_A``, ``lora_embedding``, ``lora_B``, ``lora_B_no_decay``) for logging.
    """
    lr, ratio, embedding_lr = _positive("lr", lr), _positive("ratio", ratio), _positive("embedding_lr", embedding_lr)
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise LoraConfigError(f"loraplus_param_groups: weight_decay must be >= 0, got {weight_decay!r}")
    embedding_params = {id(p) for _, layer in lora_layers(model) if isinstance(layer, Embedding)
                        for n, p in layer.named_parameters() if "lora_" in n}
    no_decay = _no_decay_names(model)
    groups: dict[str, list[nn.Parameter]] = {"lora_A": [], "lora_embedding": [], "lora_B": [], "lora_B_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.split(".")
        is_b = "lora_B" in leaf or "lora_named_B" in leaf or "lora_embedding_B" in leaf
        if id(p) in embedding_params:
            groups["lora_embedding"].append(p)
        elif is_b or p.ndim == 1:
            groups["lora_B_no_decay" if name in no_decay else "lora_B"].append(p)
        else:
            groups["lora_A"].append(p)
    settings = {"lora_A": (lr, weight_decay), "lora_embedding": (embedding_lr, weight_decay),
                "lora_B": (lr * ratio, weight_decay), "lora_B_no_decay": (lr * ratio, 0.0)}
    out = [{"params": ps, "lr": settings[g][0], "weight_decay": settings[g][1], "name": g}
           for g, ps in groups.items() if ps]
    if not out:
        raise LoraConfigError("loraplus_param_groups: the model has no trainable parameters "
                              "(inject LoRA first, or mark the parameters to train)")
    return out
