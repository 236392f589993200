"""LoRA variants (DoRA, LoRA bias) on a quantized base: what changes when W0 is NF4/FP4/int8 codes.

The variants of :mod:`lorakit.variants` read W0 as a dense float tensor; here W0 is the
bitsandbytes layer's packed codes, so the two hooks that read it are redone on top of the
quantized layer's own path (:meth:`lorakit.quant.layer._QuantLoraMixin._lora_forward`, which
dequantizes per call and frees the dense weight right after its GEMM):

* DoRA's norm ``‖W0 + s B A‖`` (per output row, fp32, detached, PEFT's definition) dequantizes W0
  into a transient fp32 (out, in) tensor, takes the factored row norm of
  :func:`lorakit.variants.dora_ops.factored_row_sq` (``‖W0‖²`` per row kept: ``out`` floats) and
  lets the dense tensor go. The norm is cached until W0's bytes, A, B or the scaling change, so
  generation with nothing training dequantizes for it once; training dequantizes once per step.
* DoRA's forward is ``f ⊙ (x W0ᵀ + s (d Aᵀ) Bᵀ) + b`` with ``f = m / ‖W0 + s B A‖``: the quantized
  LoRA node with no bias, times ``f``, plus the bias (``"peft"`` dropout form:
  ``x W0ᵀ + b + (f - 1) ⊙ d W0ᵀ + f ⊙ s (d Aᵀ) Bᵀ``, two base GEMMs, as PEFT's).
* LoRA bias adds ``s b_B`` to the quantized LoRA output.

Merging uses the float variants' arithmetic on the dequantized W0 (fp32, exact) and requantizes
the result once (:meth:`~lorakit.quant.layer._QuantLoraMixin.merge`), or rounds it once into a
float dtype (:func:`lorakit.quant.merging.merged_plain`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from ..variants.base import LoraVariant, dropout_active
from ..variants.bias import LoraBias
from ..variants.dora import DoraLinear, _Dora
from ..variants.dora_ops import factored_row_sq
from . import weights as QW

__all__ = ["QuantDora", "QuantLoraBias", "convert", "quant_variant"]


def _base_key(q: nn.Module) -> tuple:
    """Identity of the quantized layer's current bytes and state (requantizing replaces both)."""
    snap = QW.snapshot(q)
    st = snap.state
    return (snap.data.data_ptr(), snap.data._version, id(st), st.data_ptr() if isinstance(st, Tensor) else 0)


def _ab_key(A: Tensor, B: Tensor) -> tuple:
    return (A._version, A.data_ptr(), A.dtype, B._version, B.data_ptr(), B.dtype)


class QuantDora(DoraLinear):
    """DoRA on a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` base (a :class:`QuantLinear`)."""

    def _magnitude_shape(self, layer: nn.Module, w: Tensor) -> tuple[int, ...]:
        return (int(layer.out_features),)  # the stored weight is packed codes, not (out, in)

    def norm(self, layer: nn.Module, A: Tensor, B: Tensor, scaling: float | None = None) -> Tensor:
        """‖dequant(W0) + s B A‖ per output row, fp32, detached, shape (out, 1)."""
        q = layer.quant_base
        s = layer.scaling if scaling is None else scaling
        wkey = _base_key(q)
        key = (wkey, *_ab_key(A, B), s)
        if key != self._norm_key or self._norm is None:
            with torch.no_grad():
                W = QW.dequantize(q, torch.float32)  # (out, in), transient: freed on return
                if wkey != self._w_sq_key or self._w_sq is None:
                    self._w_sq = W.square().sum(1)
                    self._w_sq_key = wkey
                sq = factored_row_sq(W, self._w_sq, A.detach(), B.detach(), s, W.shape[0])
                del W
                self._norm = sq.sqrt_().view(-1, 1)
            self._norm_key = key
        return self._norm

    def _forget(self) -> None:
        self._norm_key = self._w_sq_key = None
        self._norm = self._w_sq = None

    def forward(self, layer: nn.Module, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        bias = layer._bias_param()
        s = layer.scaling
        factor = self._factor(layer, self.norm(layer, A, B)).view(-1)  # (out,), differentiable in m
        if dropout_active(layer) and self.dropout_form == "peft":
            d = layer.lora_dropout(x)
            out = layer._lora_forward(x, bias, None, None)  # x W0ᵀ + b
            y = layer._lora_forward(d, None, None, None)  # d W0ᵀ
            lora = (d.to(A.dtype) @ A.transpose(0, 1)) @ B.transpose(0, 1)
            return out + ((factor - 1) * y.to(factor.dtype) + factor * lora.to(factor.dtype) * s).to(out.dtype)
        y = layer._lora_forward(x, None, A, B)  # x W0ᵀ + s (d Aᵀ) Bᵀ, d: dropout(x) on the LoRA branch
        out = (factor * y.to(factor.dtype)).to(y.dtype)
        return out + bias.to(out.dtype) if bias is not None else out

    def after_merge(self, layer: nn.Module, keep_original: bool) -> None:
        self._forget()

    def after_unmerge(self, layer: nn.Module) -> None:
        self._forget()


class QuantLoraBias(LoraBias):
    """LoRA bias on a quantized base: ``x W0ᵀ + b0 + s (B A d + b_B)``."""

    def __init__(self) -> None:
        super().__init__(conv=False)

    def attach(self, layer: nn.Module) -> None:
        B = layer.lora_B
        layer.register_parameter("lora_B_bias", nn.Parameter(B.new_zeros(int(layer.out_features)),
                                                              requires_grad=B.requires_grad))

    def forward(self, layer: nn.Module, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        out = layer._lora_forward(x, layer._bias_param(), A, B)
        return out + (self.bias(layer) * layer.scaling).to(out.dtype)


def quant_variant(layer: nn.Module, name: str) -> LoraVariant:
    """The variant ``name`` (``"use_dora"`` / ``"lora_bias"``) for a LoRA layer on a quantized base;
    raises :class:`UnsupportedModuleError` (without the module name: the caller adds it)."""
    if getattr(layer, "enable_lora", None) is not None:
        raise UnsupportedModuleError(f"{name}=True on a fused quantized projection (MergedLinear slices) is not "
                                     "supported (PEFT has no equivalent); target the unfused projections instead")
    if name == "use_dora":
        return QuantDora()
    if name == "lora_bias":
        if layer._bias_param() is None:
            raise UnsupportedModuleError("lora_bias=True needs a base layer with a bias (it merges into it); "
                                         "this quantized layer has bias=None")
        return QuantLoraBias()
    raise UnsupportedModuleError(f"{name} is not defined on a quantized base; valid there: use_dora, lora_bias")


def convert(layer: nn.Module, variant: LoraVariant) -> LoraVariant:
    """The quantized-base counterpart of a float layer's variant (``quantize_base`` after ``inject``):
    its tensors stay on the layer, its caches start afresh."""
    if isinstance(variant, (QuantDora, QuantLoraBias)):
        return variant
    if isinstance(variant, _Dora):
        new: LoraVariant = quant_variant(layer, "use_dora")
        for k in ("dropout_form", "param"):
            if k in variant.__dict__:
                new.__dict__[k] = variant.__dict__[k]
        return new
    if isinstance(variant, LoraBias):
        return quant_variant(layer, "lora_bias")
    raise UnsupportedModuleError(f"{variant.describe()} has no quantized-base form; valid there: DoRA, LoRA bias")
