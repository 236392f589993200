"""``merge_and_unload(model, dtype=...)``: plain float layers from LoRA layers, with one rounding.

For a quantized base, ``W = dequant(W0)`` is exact in fp32 (each element ``code * absmax``), the
fp32 update is added, and the sum is rounded once into ``dtype``: the result is the
once-rounded exact sum, element for element. A float base does the same from ``W0.float()``.
Variants merge with their own arithmetic before the one rounding (DoRA in float64, LoRA bias adds
``s b_B`` to the bias in fp32).
Quantized layers that carry no LoRA are dequantized (one rounding) so the model is all float.
"""

from __future__ import annotations

import torch
from torch import nn

from ..variants.bias import LoraBias
from . import backend as QB
from . import weights as QW
from .layer import is_quant_lora


def default_dtype(module: nn.Module) -> torch.dtype:
    """The float dtype a quantized layer came from (4-bit records it; int8: float32)."""
    if QB.is_4bit(module):
        dt = QB.quant_state(module).dtype
        return dt if dt in QB.COMPUTE_DTYPES else torch.float32
    return torch.float32


def _plain_linear(w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, training: bool) -> nn.Linear:
    out_f, in_f = w.shape
    lin = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(lin)
    lin.in_features, lin.out_features = in_f, out_f
    lin.weight = nn.Parameter(w.to(dtype), requires_grad=False)
    lin.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    lin.train(training)
    return lin


def _merged(layer: nn.Module, w0: torch.Tensor, use_delta: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of the merged layer, unrounded: ``W0 + s B A`` or the variant's merged weight
    (DoRA: float64) from ``w0`` (fp32, exact); LoRA bias: ``b0 + s b_B`` in fp32."""
    variant = layer.__dict__.get("lora_variant")
    bias = layer._bias_param()
    if variant is not None:
        bias = variant.unmerged_state(layer).get("bias", bias)  # a merged LoRA bias keeps b0 aside
    if not use_delta:
        return w0, bias
    delta = layer.delta_weight()
    if variant is None:
        return w0 + delta, bias
    if isinstance(variant, LoraBias) and bias is not None:
        bias = bias.detach().float() + variant.bias(layer).detach().float() * layer.scaling
    return variant.merged_weight(layer, w0, delta), bias


def merged_plain(layer: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """The plain module equivalent to ``layer`` with its active update folded in, rounded once
    (variants too: DoRA's ``m (W0 + s B A) / ‖W0 + s B A‖``, LoRA bias's ``b0 + s b_B``)."""
    with torch.no_grad():
        use_delta = layer.has_lora and not layer.lora_disabled
        if is_quant_lora(layer):
            q = layer.quant_base
            dt = dtype or default_dtype(q)
            w, bias = _merged(layer, layer.dense_base_weight(torch.float32), use_delta)  # W0 exact in fp32
            return _plain_linear(w, bias, dt, layer.training)
        dt = dtype or layer._weight_param().dtype
        w0, bias = _merged(layer, layer.unmerged_weight().float(), use_delta)  # float base: W0 in fp32 (exact)
        if bias is not None:
            bias = bias.detach().clone()
        layer.unmerge()
        plain = layer.to_plain()
        if plain.weight.shape != w0.shape:  # a loralib fan_in_fan_out layer becomes an (out, in) nn.Linear
            w0 = w0.transpose(0, 1)
        plain.weight = nn.Parameter(w0.to(dt).contiguous(), requires_grad=plain.weight.requires_grad)
        if bias is not None and "bias" in plain._parameters:
            plain.bias = nn.Parameter(bias.to(dt), requires_grad=plain.bias.requires_grad)
        return plain


def dequantize_rest(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Replace the quantized layers left in ``model`` (no LoRA on them) by float ``nn.Linear``."""
    from ..inject import _set_module

    todo = [(n, m) for n, m in model.named_modules() if n and QB.is_quantized(m)]
    for name, m in todo:
        QW.ensure_unpacked(m)  # a bare bitsandbytes forward in eval may have repacked it for bf16 inference
        dt = dtype or default_dtype(m)
        _set_module(model, name, _plain_linear(QW.dequantize(m, torch.float32), m.bias, dt, m.training))
