"""LoRA bias (PEFT's ``lora_bias=True``): a trainable bias on B, for Linear and Conv layers.

::

    h = W0 x + b0 + s (B A dropout(x) + b_B)          merged: W0 + s B A,  b0 + s b_B

``b_B`` starts at zero (the adapter starts at the base model), lives on the layer as
``lora_B_bias`` (out,) and is saved under PEFT's key ``<module>.lora_B.bias``. Merging adds
``s b_B`` to the base bias (fp32 sum, one rounding; unmerge restores its bits), so the base layer
must have a bias: a bias-less target is refused when the adapter is built (PEFT warns and then
cannot merge).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from .base import LoraVariant, register_variant

BIAS = "lora_B_bias"
PEFT_KEY = "lora_B.bias"

__all__ = ["BIAS", "LoraBias", "lora_bias_for"]


class LoraBias(LoraVariant):
    """The bias-on-B variant; ``conv`` selects the convolution forward."""

    name = "lora_bias"

    def __init__(self, conv: bool) -> None:
        self.conv = conv
        self._b0: Tensor | None = None

    def bias(self, layer: nn.Module) -> Tensor:
        return layer._parameters[BIAS]

    def attach(self, layer: nn.Module) -> None:
        B = layer.lora_B
        out = layer._weight_param().shape[0] if self.conv or not layer.fan_in_fan_out \
            else layer._weight_param().shape[1]
        layer.register_parameter(BIAS, nn.Parameter(B.new_zeros(out), requires_grad=B.requires_grad))

    def detach(self, layer: nn.Module) -> None:
        layer._parameters.pop(BIAS, None)

    def peft_tensors(self, layer: nn.Module) -> dict[str, Tensor]:
        return {PEFT_KEY: self.bias(layer).detach()}

    def load_peft_tensors(self, layer: nn.Module, tensors: dict[str, Tensor]) -> None:
        self.bias(layer).copy_(tensors[PEFT_KEY])

    def forward(self, layer: nn.Module, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        s, b_lora = layer.scaling, self.bias(layer)
        if self.conv:
            conv = layer._conv()
            w = conv.weight
            delta = ((B @ A) * s).view(w.shape).to(w.dtype)
            shape = (1, -1, *([1] * (w.dim() - 2)))
            out = conv._conv_forward(x, w, conv.bias) + conv._conv_forward(layer.lora_dropout(x), delta, None)
            return out + (b_lora * s).to(out.dtype).view(shape)
        w = layer._weight_param()
        W = w.transpose(0, 1) if layer.fan_in_fan_out else w  # (out, in)
        out = F.linear(x, W, layer._bias_param())
        d = layer.lora_dropout(x).to(A.dtype)
        lora = F.linear(d @ A.transpose(0, 1), B, b_lora)  # (..., r) -> (..., out), + b_B
        return out + (lora * s).to(out.dtype)

    def after_merge(self, layer: nn.Module, keep_original: bool) -> None:
        b = layer._bias_param()
        with torch.no_grad():
            self._b0 = b.detach().clone()  # a bias is small: always kept, so unmerge is bit-exact
            b.copy_((b.float() + self.bias(layer).float() * layer.scaling).to(b.dtype))

    def after_unmerge(self, layer: nn.Module) -> None:
        with torch.no_grad():
            layer._bias_param().copy_(self._b0)
        self._b0 = None

    def unmerged_state(self, layer: nn.Module) -> dict[str, Tensor]:
        return {"bias": self._b0.clone()} if self._b0 is not None else {}

    def describe(self) -> str:
        return "LoRA bias"


def lora_bias_for(layer: nn.Module) -> LoraBias:
    if isinstance(layer, nn.Embedding):
        raise UnsupportedModuleError("lora_bias is not supported for Embedding layers (nor by PEFT)")
    if getattr(layer, "enable_lora", None) is not None:
        raise UnsupportedModuleError("lora_bias on a fused projection (MergedLinear slices) is not supported")
    conv = getattr(layer, "_conv", None)
    is_conv = conv is not None and isinstance(conv(), nn.modules.conv._ConvNd)
    if not is_conv and not hasattr(layer, "fan_in_fan_out"):
        raise UnsupportedModuleError(f"lora_bias is defined for Linear and Conv layers, not {type(layer).__name__}")
    if layer._bias_param() is None:
        raise UnsupportedModuleError("lora_bias=True needs a base layer with a bias (it merges into it); "
                                     "this layer has bias=None")
    if is_conv and conv().groups != 1:
        raise UnsupportedModuleError("lora_bias on a grouped convolution (groups > 1) is not supported yet")
    return LoraBias(conv=is_conv)


register_variant("lora_bias", lora_bias_for)
