"""Exact merge (paper Section 4.1: no inference latency once BA is folded into W).

``merge`` computes ``W + scale * B A`` in fp32 and rounds once to the weight's dtype, so a bf16 or
fp16 weight is within one rounding of the exact sum. It keeps a copy of each adapted weight, which
is what lets ``unmerge`` restore the original bits in every dtype (cost: one extra copy of the
adapted weights while merged). ``merge_and_unload`` keeps no copy: it returns a plain model.
"""

from __future__ import annotations

from torch import nn

from .inject import _set_module, forget_injection, lora_layers


def merge(model: nn.Module, keep_original: bool = True) -> nn.Module:
    """Fold every active LoRA update into its weight. Merging twice is a no-op."""
    for _, layer in lora_layers(model):
        if not layer.lora_disabled:
            layer.merge(keep_original=keep_original)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`, restoring the original weights bit for bit. No-op when not merged."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge and replace every LoRA layer by its plain module; returns the plain model."""
    for name, layer in list(lora_layers(model)):
        if not layer.merged and not layer.lora_disabled:
            layer.merge(keep_original=False)
        layer._lora_w0 = None
        layer.merged = False  # the merged weight now *is* the plain module's weight
        plain = layer.to_plain()
        if not name:
            return plain
        _set_module(model, name, plain)
    forget_injection(model)
    return model
