"""PEFT's grouped-convolution LoRA layout (a convolution with ``groups > 1``), read and written.

lorakit's own grouped layout is mergeable: ``A`` (r, in/g·k) shared by the groups, ``B`` (out, r),
``ΔW = (B A).view(W.shape)``. PEFT instead runs ``B_g(A(x))``: ``A`` a full (ungrouped) convolution
in → r (stride and padding of the base, dilation 1), ``B`` a grouped 1×1 convolution r → out with
the base's ``groups``. Its update reads every input channel, so it is not a grouped kernel and PEFT
cannot merge it either.

* Writing: lorakit's layout converts exactly (:func:`to_peft_pair`): rank r·g, each group's copy
  of ``A`` placed on its own input channels (zeros elsewhere), ``B`` unchanged.
* Reading: a PEFT grouped adapter becomes this variant (:class:`PeftGroupedConv`): PEFT's forward,
  ``lora_A`` (r, in·k) and ``lora_B`` (out, r/g) in PEFT's order; merging is refused (typed error).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from .base import LoraVariant, register_variant

__all__ = ["PeftGroupedConv", "peft_grouped_for", "to_peft_pair"]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def to_peft_pair(A: Tensor, B: Tensor, weight: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """lorakit's grouped pair (A (r, in/g·k), B (out, r)) as PEFT's (A' (r·g, in, *k), B' (out, r, 1, ...))."""
    r, out = A.shape[0], weight.shape[0]
    cin_g, ks = weight.shape[1], weight.shape[2:]
    a = A.reshape(r, cin_g, *ks)
    full = A.new_zeros((groups * r, groups * cin_g, *ks))
    for g in range(groups):
        full[g * r:(g + 1) * r, g * cin_g:(g + 1) * cin_g] = a
    return full, B.reshape(out, r, *([1] * len(ks)))


class PeftGroupedConv(LoraVariant):
    """PEFT's ``B_g(A(x))`` for a grouped convolution; ``lora_A`` (r, in·k), ``lora_B`` (out, r/g)."""

    name = "peft_groups"
    owns_layout = True

    def attach(self, layer: nn.Module) -> None:
        conv = layer._conv()
        r, g = layer.r, conv.groups
        A0, w = layer.lora_A, conv.weight
        layer.lora_A = nn.Parameter(A0.new_empty((r, conv.in_channels * math.prod(conv.kernel_size))),
                                    requires_grad=A0.requires_grad)
        layer.lora_B = nn.Parameter(A0.new_zeros((w.shape[0], r // g)), requires_grad=A0.requires_grad)
        nn.init.kaiming_uniform_(layer.lora_A, a=math.sqrt(5))

    def _shapes(self, layer: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
        conv = layer._conv()
        nd = conv.weight.dim() - 2
        return (layer.r, conv.in_channels, *conv.kernel_size), (conv.out_channels, layer.r // conv.groups, *[1] * nd)

    def peft_tensors(self, layer: nn.Module) -> dict[str, Tensor]:
        a_shape, b_shape = self._shapes(layer)
        return {"lora_A.weight": layer.lora_A.detach().view(a_shape),
                "lora_B.weight": layer.lora_B.detach().view(b_shape)}

    def forward(self, layer: nn.Module, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        conv = layer._conv()
        a_shape, b_shape = self._shapes(layer)
        fn = _CONV_FN[conv.weight.dim() - 2]
        out = conv._conv_forward(x, conv.weight, conv.bias)
        d = layer.lora_dropout(x).to(A.dtype)
        t = fn(d, A.view(a_shape), None, conv.stride, conv.padding)  # (N, r, ...): PEFT's A has dilation 1
        y = fn(t, B.view(b_shape), None, groups=conv.groups)  # (N, out, ...)
        return out + (y * layer.scaling).to(out.dtype)

    def check_merge(self, layer: nn.Module) -> None:
        raise UnsupportedModuleError("a grouped convolution in PEFT's LoRA layout cannot be merged (its update "
                                     "reads every input channel; PEFT cannot merge it either)")

    def describe(self) -> str:
        return "PEFT grouped-conv layout"


def peft_grouped_for(layer: nn.Module) -> PeftGroupedConv:
    conv = getattr(layer, "_conv", None)
    if conv is None or not isinstance(conv(), nn.modules.conv._ConvNd) or conv().groups == 1:
        raise UnsupportedModuleError("PEFT's grouped layout applies to convolutions with groups > 1")
    if layer.r % conv().groups:
        raise UnsupportedModuleError(f"PEFT's grouped layout needs the rank ({layer.r}) divisible by "
                                     f"groups ({conv().groups})")
    return PeftGroupedConv()


register_variant("peft_groups", peft_grouped_for)
