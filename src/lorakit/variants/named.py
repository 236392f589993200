"""DoRA for named adapters: each adapter's own magnitude vector on a layer.

The first ("default") adapter keeps its magnitude where :mod:`.dora` puts it
(``<module>.lora_magnitude_vector``); a further adapter ``name`` gets its own :class:`~.dora._Dora`
object (its own cached norm) holding its magnitude, registered as
``<module>.lora_named_magnitude.<name>`` (beside ``lora_named_A`` / ``lora_named_B``) and stored on
the adapter's :class:`~lorakit.adapters.registry.Slot`. Switching adapters points the layer's
``lora_variant`` at the slot's object, so the forward, merge and PEFT save read that adapter's
magnitude (PEFT's file key stays ``<module>.lora_magnitude_vector``, one file per adapter).
Several active adapters with a DoRA one among them: :class:`SummedVariants` (PEFT's sum of updates).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UnsupportedModuleError
from .base import LoraVariant
from .dora import _Dora, dora_for

NAMED = "lora_named_magnitude"

__all__ = ["NAMED", "SummedVariants", "dora_slot", "drop_magnitude", "register_magnitude"]


def dora_slot(layer: nn.Module, slot: Any, where: str) -> _Dora:
    """A DoRA object for adapter ``slot`` on ``layer`` whose magnitude is the norm of
    ``W0 + s B A`` with the slot's (initialised) A, B and scaling, PEFT's initial value."""
    try:
        if getattr(layer, "quant_base", None) is not None:  # bitsandbytes base: norm from W0 dequantized per call
            from ..quant.variants import quant_variant

            v = quant_variant(layer, "use_dora")
        else:
            v = dora_for(layer)
    except UnsupportedModuleError as e:
        raise UnsupportedModuleError(f"{where}: {e}") from None
    w = layer._weight_param()  # type: ignore[operator]
    with torch.no_grad():
        n = v.norm(layer, slot.A, slot.B, slot.scaling)
        m = n.to(slot.A.dtype).reshape(v._magnitude_shape(layer, w)).clone()
    v.param = nn.Parameter(m, requires_grad=False)
    return v


def register_magnitude(layer: nn.Module, name: str, variant: Any) -> None:
    """Register a named adapter's magnitude on the layer (state dict, ``parameters()``)."""
    param = getattr(variant, "param", None)
    if param is None:
        return
    if NAMED not in layer._modules:
        layer.add_module(NAMED, nn.ParameterDict())
    layer._modules[NAMED][name] = param  # type: ignore[index]


def drop_magnitude(layer: nn.Module, name: str) -> None:
    """Remove a deleted adapter's magnitude (no-op when it had none)."""
    d = layer._modules.get(NAMED)
    if d is not None and name in d:
        del d[name]


class SummedVariants(LoraVariant):
    """Several active adapters on a layer where one of them is DoRA: PEFT's rule (its eval forward),
    the adapters applied in the order they were activated, a DoRA adapter rescaling what came before::

        u_1 = h_1 - y0,    u_i = (h_i - y0) + f_i ⊙ u_{i-1}  (f_i = 1 for a plain adapter),  h = y0 + u_n

    ``y0`` the base layer, ``h_i`` the layer with adapter i alone, ``f_i = m_i / ‖W0 + s_i B_i A_i‖``:
    PEFT's ``result = f ⊙ (result - b) + b + f ⊙ s B A x`` per DoRA adapter. (PEFT's training forward
    with dropout uses ``W0 x`` instead of ``result``; lorakit keeps the eval rule in both.) One forward
    per active adapter plus the base; merging is refused (not one weight)."""

    name = "summed"

    def __init__(self, slots: list[Any], point: Callable[[nn.Module, Any], None]) -> None:
        self.slots, self.point = slots, point

    def forward(self, layer: nn.Module, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        d, mods = layer.__dict__, layer._modules
        saved = {k: d.get(k) for k in ("_lora_sel", "r", "lora_alpha", "scaling", "use_rslora")}
        dropout = mods.get("lora_dropout")
        forward = type(layer).forward
        try:
            d["_lora_sel"] = (None, None)  # the base layer
            d.pop("lora_variant", None)
            y0 = forward(layer, x)
            u: Tensor | None = None
            for s in self.slots:
                self.point(layer, s)
                du = forward(layer, x) - y0
                if u is not None and s.variant is not None:  # DoRA rescales the updates before it
                    f = s.variant.output_factor(layer, s.A, s.B, s.scaling)
                    u = (f * u.to(f.dtype)).to(du.dtype)
                u = du if u is None else du + u
            out = y0 if u is None else y0 + u
        finally:
            d.update(saved)
            mods["lora_dropout"] = dropout
            d["lora_variant"] = self
        return out

    def check_merge(self, layer: nn.Module) -> None:
        raise UnsupportedModuleError(f"{type(layer).__name__}: several active adapters including "
                                     f"{self.describe_members()} cannot be merged; set_adapter one of them first")

    def merged_weight(self, layer: nn.Module, w0: Tensor, delta: Tensor) -> Tensor:
        self.check_merge(layer)
        return w0

    def describe_members(self) -> str:
        return ", ".join(sorted({s.variant.describe() for s in self.slots if s.variant is not None}))

    def describe(self) -> str:
        return f"summed ({self.describe_members()})"
