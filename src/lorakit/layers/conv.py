"""LoRA on convolutions: loralib's ``ConvLoRA`` / ``Conv1d/2d/3d`` shells (the kernel in ``.conv``)
and the injected ``LoraConv1d/2d/3d`` that subclass torch's own convolutions.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from .. import functional as LF
from .base import LoraLayer, _adopt, _reject_fan_in_fan_out

_CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
               "transposed", "output_padding", "groups", "padding_mode", "_reversed_padding_repeated_twice")


class _ConvLoraMixin(LoraLayer):
    """Shared forward/update of convolution layers; ``_conv()`` is the module holding the kernel."""

    def _conv(self) -> nn.modules.conv._ConvNd:
        raise NotImplementedError

    def _weight_param(self) -> nn.Parameter:
        return self._conv().weight

    def _bias_param(self) -> nn.Parameter | None:
        return self._conv().bias

    def delta_weight(self) -> Tensor:
        w = self._weight_param()
        return LF.lora_delta(self.lora_A, self.lora_B, self.scaling).view(w.shape)

    def forward(self, x: Tensor) -> Tensor:
        conv = self._conv()
        if not self.lora_active:
            return conv._conv_forward(x, conv.weight, conv.bias)
        variant = self.__dict__.get("lora_variant")  # lorakit.variants (DoRA, LoRA bias)
        if variant is not None:
            return variant.forward(self, x, self.lora_A, self.lora_B)
        delta = self.delta_weight().to(conv.weight.dtype)
        if isinstance(self.lora_dropout, nn.Identity):
            return conv._conv_forward(x, conv.weight + delta, conv.bias)
        # Dropout acts on the LoRA path's input only, as in the Linear layer.
        return conv._conv_forward(x, conv.weight, conv.bias) + conv._conv_forward(
            self.lora_dropout(x), delta, None)


class ConvLoRA(_ConvLoraMixin, nn.Module):
    """loralib's convolution layout: the kernel lives in ``self.conv``; A (r*k, in*k^(n-1)),
    B (out/groups*k, r*k) with k the first kernel size, so ``(B A).view(weight.shape)`` holds for
    1-d, 2-d and 3-d kernels (loralib's view breaks for 1-d and 3-d kernels larger than 1)."""

    conv_cls: type[nn.modules.conv._ConvNd] = nn.Conv2d
    _weight_key = "conv.weight"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, ...], r: int = 0,
                 lora_alpha: float = 1, lora_dropout: float = 0.0, merge_weights: bool = True,
                 **kwargs: Any) -> None:
        _reject_fan_in_fan_out(type(self).__name__, kwargs)
        nn.Module.__init__(self)
        self.conv = self.conv_cls(in_channels, out_channels, kernel_size, **kwargs)
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights)
        if r > 0:
            ks = self.conv.kernel_size
            k, rest = ks[0], math.prod(ks[1:])
            self._new_lora_params((r * k, in_channels * rest),
                                  (out_channels // self.conv.groups * k, r * k))
        self.reset_parameters()

    def _conv(self) -> nn.modules.conv._ConvNd:
        return self.conv

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        self.reset_lora_parameters()

    def _build_plain(self) -> nn.Module:
        return self.conv


class Conv1d(ConvLoRA):
    conv_cls = nn.Conv1d


class Conv2d(ConvLoRA):
    conv_cls = nn.Conv2d


class Conv3d(ConvLoRA):
    conv_cls = nn.Conv3d


class _InjectedConv(_ConvLoraMixin):
    """A convolution wrapped in place (keys unchanged): A (r, in/groups*prod(k)), B (out, r),
    the layout PEFT uses (its A is this reshaped to (r, in, *k), its B to (out, r, 1, ...))."""

    def _conv(self) -> nn.modules.conv._ConvNd:
        return self  # type: ignore[return-value]

    @classmethod
    def from_module(cls, base: nn.modules.conv._ConvNd, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    *, use_rslora: bool = False, init: str = "kaiming") -> _InjectedConv:
        new = cls.__new__(cls)
        _adopt(new, base, _CONV_ATTRS)
        new._init_lora(r, lora_alpha, lora_dropout, merge_weights=False, use_rslora=use_rslora)
        fan_in = base.weight[0].numel()  # in/groups * prod(kernel)
        new._new_lora_params((r, fan_in), (base.out_channels, r), freeze=False)
        new.reset_lora_parameters(init)
        return new


class LoraConv1d(_InjectedConv, nn.Conv1d):
    pass


class LoraConv2d(_InjectedConv, nn.Conv2d):
    pass


class LoraConv3d(_InjectedConv, nn.Conv3d):
    pass
