"""What :func:`lorakit.plan` reports for quantized bases: true shapes, LoRA sizes, resident bytes.

A bitsandbytes 4-bit weight is a packed ``(out*in/2, 1)`` uint8 tensor, so the float rules
(``weight.shape``, ``numel``) would misstate the layer; these helpers read the layer's own
``in_features`` / ``out_features`` and the bytes its codes and scales take.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from . import backend as QB
from . import weights as QW


def lora_params(module: nn.Module, r: int, enable: tuple[bool, ...] | None) -> int:
    """LoRA parameters on a quantized layer (``enable``: fused slices, as ``MergedLinear``)."""
    in_f, out_f = QB.features(module)
    if enable is None:
        return r * (in_f + out_f)
    k = sum(enable)
    return r * k * in_f + out_f // len(enable) * k * r


def row_kind(module: nn.Module) -> str:
    return f"{type(module).__name__}({QB.kind_of(module)})"


def shape(module: nn.Module) -> tuple[int, int]:
    in_f, out_f = QB.features(module)
    return (out_f, in_f)


def base_module(m: nn.Module) -> nn.Module:
    """The quantized module behind a LoRA layer on a quantized base, else ``m``."""
    orig = getattr(m, "_lora_original", None)
    if orig and QB.is_quantized(orig[0]):
        return orig[0]
    return m


def annotate(model: nn.Module, modules: list[nn.Module], plan: Any) -> None:
    """Fill ``plan.base_weight_bytes`` (resident bytes of the adapted layers' base weights),
    count 4-bit weights as weights rather than packed bytes, and note the layers
    ``quantize_base`` left in float."""
    plan.base_weight_bytes = sum(QW.weight_nbytes(base_module(m)) for m in modules)
    for m in model.modules():
        if QB.is_4bit(m) and m.weight.numel() * 2 >= QB.features(m)[0] * QB.features(m)[1]:
            in_f, out_f = QB.features(m)
            plan.total_params += in_f * out_f - m.weight.numel()  # packed: two weights per stored byte
    kinds = sorted({QB.kind_of(base_module(m)) or "float" for m in modules})
    if kinds != ["float"]:
        plan.notes.append(f"adapted base weights quantized as {', '.join(kinds)}; the forward dequantizes "
                          "one layer at a time (no dense copy kept)")
    for name, why in getattr(model, "_lorakit_quant_skipped", {}).items():
        plan.notes.append(f"{name}: left in float by quantize_base ({why})")
