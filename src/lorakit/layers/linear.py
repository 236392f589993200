"""LoRA on linear layers: loralib's ``Linear`` and ``MergedLinear`` (fused qkv), which also wrap
``nn.Linear`` and GPT-2's ``Conv1D`` for :func:`lorakit.inject`. Their forward goes through the fast
path (:mod:`lorakit.kernels.dispatch`) and falls back to :mod:`lorakit.functional`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as LF
from ..errors import LoraConfigError
from ..kernels import dispatch as FU
from .base import LoraLayer, _adopt, is_conv1d_like


# --- Linear ------------------------------------------------------------------------------------
class _LinearLoraMixin(LoraLayer):
    """What Linear and MergedLinear share: the (in, out) weight layout of ``fan_in_fan_out`` and
    adopting an ``nn.Linear`` or GPT-2 ``Conv1D``."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    fan_in_fan_out: bool

    def _adopt_linear(self, base: nn.Module, r: int, lora_alpha: float, lora_dropout: float,
                      use_rslora: bool) -> tuple[int, int]:
        """Share ``base``'s Parameters (fan_in_fan_out detected); returns (in_features, out_features)."""
        fifo = is_conv1d_like(base)
        in_f, out_f = base.weight.shape if fifo else base.weight.shape[::-1]
        _adopt(self, base, ())
        self.in_features, self.out_features, self.fan_in_fan_out = in_f, out_f, fifo
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights=False, use_rslora=use_rslora)
        return in_f, out_f

    def _weight_layout(self, delta: Tensor) -> Tensor:
        """An (out, in) update in the stored weight's layout."""
        return delta.transpose(0, 1) if self.fan_in_fan_out else delta

    def _base_forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self._weight_layout(self.weight), self.bias)

    def reset_parameters(self) -> None:
        nn.Linear.reset_parameters(self)  # type: ignore[arg-type]
        if hasattr(self, "lora_A"):
            self.reset_lora_parameters()

    #: Output column ranges that carry a rank-r block (None: all of them, a plain ``Linear``).
    _lora_slices: FU.Slices | None = None

    def _plain_forward(self, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        # The hot path of every adapted projection (210 calls per SmolLM2 token): attributes are read
        # from the instance dicts directly (nn.Module.__getattr__ and the lora_A/lora_B properties
        # cost more than the small matmuls in token-by-token decoding). Same logic as ``lora_active``.
        d = self.__dict__
        params = d["_parameters"]
        sel = d.get("_lora_sel")
        if sel is not None:
            A, B = sel[0], sel[1]
        elif "lora_A" in params:
            A, B = params["lora_A"], params["lora_B"]
        else:  # no adapter, or a parametrization moved the tensors: the general lookup
            A, B = getattr(self, "lora_A", None), getattr(self, "lora_B", None)
        weight = params["weight"] if "weight" in params else self.weight
        bias = params["bias"] if "bias" in params else self.bias
        if A is None or d["merged"] or d["lora_disabled"] or d["r"] <= 0:
            w = weight.transpose(0, 1) if d["fan_in_fan_out"] else weight
            if d["merged"] and not d["lora_disabled"] and self.lora_fused:  # decoding: the C++ kernel
                return FU.merged_linear(x, w, bias)
            return F.linear(x, w, bias)  # no adapter or disabled: exactly the base layer
        variant = d.get("lora_variant")  # DoRA / LoRA bias: its own forward, never the fused LoRA path
        if variant is not None:
            return variant.forward(self, x, A, B)
        if self.lora_fused:
            out = FU.linear_forward(x, weight, bias, A, B, d["scaling"], d["_modules"]["lora_dropout"],
                                    d["fan_in_fan_out"], self._lora_slices)
            if out is not None:
                return out
        return self._plain_forward(x, A, B)

    def _build_plain(self) -> nn.Module:
        plain = nn.Linear.__new__(nn.Linear)
        _adopt(plain, self, ("in_features", "out_features"))
        if self.fan_in_fan_out:
            plain.weight = nn.Parameter(self.weight.detach().transpose(0, 1).contiguous(),
                                        requires_grad=self.weight.requires_grad)
        del plain._lora_original
        return plain


class Linear(_LinearLoraMixin, nn.Linear):
    """``nn.Linear`` with LoRA; ``fan_in_fan_out`` stores the weight as (in, out) like GPT-2."""

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False, merge_weights: bool = True,
                 **kwargs: Any) -> None:
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights)
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0:
            self._new_lora_params((r, in_features), (out_features, r))
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)

    @classmethod
    def from_module(cls, base: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0, *,
                    use_rslora: bool = False, init: str = "kaiming") -> Linear:
        """Wrap an ``nn.Linear`` or a GPT-2 ``Conv1D`` (fan_in_fan_out detected), sharing its weights."""
        new = cls.__new__(cls)
        in_f, out_f = new._adopt_linear(base, r, lora_alpha, lora_dropout, use_rslora)
        new._new_lora_params((r, in_f), (out_f, r), freeze=False)
        new.reset_lora_parameters(init)
        return new

    def delta_weight(self) -> Tensor:
        return self._weight_layout(LF.lora_delta(self.lora_A, self.lora_B, self.scaling))  # (out, in)

    def _plain_forward(self, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        return LF.lora_linear(x, self.weight, self.bias, A, B, self.scaling, self.lora_dropout,
                              self.fan_in_fan_out)


# --- MergedLinear ------------------------------------------------------------------------------
class MergedLinear(_LinearLoraMixin, nn.Linear):
    """One Linear holding several projections (q, k, v); LoRA on the slices ``enable_lora`` marks."""

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, enable_lora: Sequence[bool] = (False,),
                 fan_in_fan_out: bool = False, merge_weights: bool = True, **kwargs: Any) -> None:
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        self._init_lora(r, lora_alpha, lora_dropout, merge_weights)
        self._setup_slices(enable_lora, out_features)
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0 and any(self.enable_lora):
            self._new_lora_params(*self._lora_shapes(r, in_features, out_features))
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)

    def _setup_slices(self, enable_lora: Sequence[bool], out_features: int) -> None:
        enable = tuple(bool(e) for e in enable_lora)
        if not enable or out_features % len(enable) != 0:
            raise LoraConfigError(f"{type(self).__name__}: enable_lora has {len(enable)} entries, which "
                                  f"must divide out_features={out_features} into equal slices")
        self.enable_lora = enable
        self.register_buffer("_lora_cols", LF.enabled_columns(enable, out_features), persistent=False)

    def _lora_shapes(self, r: int, in_f: int, out_f: int) -> tuple[tuple[int, int], tuple[int, int]]:
        k = sum(self.enable_lora)
        return (r * k, in_f), (out_f // len(self.enable_lora) * k, r)

    @property
    def has_lora(self) -> bool:
        return super().has_lora and any(self.enable_lora)

    @property
    def _lora_slices(self) -> FU.Slices:  # type: ignore[override]
        return FU.merged_slices(tuple(self.enable_lora), self.out_features)  # cached per shape

    @classmethod
    def from_module(cls, base: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0, *,
                    enable_lora: Sequence[bool], use_rslora: bool = False, init: str = "kaiming") -> MergedLinear:
        """Wrap a fused projection (``nn.Linear`` or GPT-2 ``Conv1D``), sharing its weights."""
        new = cls.__new__(cls)
        in_f, out_f = new._adopt_linear(base, r, lora_alpha, lora_dropout, use_rslora)
        new._setup_slices(enable_lora, out_f)
        new._new_lora_params(*new._lora_shapes(r, in_f, out_f), freeze=False)
        new.reset_lora_parameters(init)
        return new

    def delta_weight(self) -> Tensor:
        return self._weight_layout(LF.grouped_delta(self.lora_A, self.lora_B, self.scaling, self.enable_lora))

    def _plain_forward(self, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        return LF.fused_linear(x, self.weight, self.bias, A, B, self.scaling, self.enable_lora, self._lora_cols,
                               self.lora_dropout, self.fan_in_fan_out)



