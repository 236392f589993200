"""Which parameters train, and what a LoRA checkpoint holds (loralib's ``utils``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .checks import takes_model
from .errors import LoraConfigError
from .layers import LoraLayer

_BIAS_MODES = ("none", "all", "lora_only")


def _check_bias(bias: str) -> None:
    if bias not in _BIAS_MODES:
        raise LoraConfigError(f"bias={bias!r}: expected one of {_BIAS_MODES}")


@takes_model
def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> None:
    """Freeze all but ``lora_`` parameters; ``bias='all'`` or ``'lora_only'`` also trains biases."""
    _check_bias(bias)
    for n, p in model.named_parameters():
        p.requires_grad = "lora_" in n
    if bias == "all":
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.requires_grad = True
    elif bias == "lora_only":
        for m in model.modules():
            if isinstance(m, LoraLayer) and m.has_lora:
                b = m._bias_param()
                if b is not None:
                    b.requires_grad = True


@takes_model
def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """The LoRA part of ``model.state_dict()`` (plus biases per ``bias``), loralib's checkpoint."""
    _check_bias(bias)
    sd = model.state_dict()
    if bias == "none":
        return {k: v for k, v in sd.items() if "lora_" in k}
    if bias == "all":
        return {k: v for k, v in sd.items() if "lora_" in k or k.endswith("bias")}
    out = {}
    for k, v in sd.items():
        if "lora_" in k:
            out[k] = v
            b = k.split("lora_")[0] + "bias"
            if b in sd:
                out[b] = sd[b]
    return out


@dataclass(frozen=True)
class ParamCount:
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} of {self.total:,} parameters ({100 * self.fraction:.4f}%)"


@takes_model
def trainable_parameters(model: nn.Module) -> ParamCount:
    """Count trainable and total parameters (shared tensors counted once)."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    return ParamCount(sum(p.numel() for p in seen.values() if p.requires_grad),
                      sum(p.numel() for p in seen.values()))
