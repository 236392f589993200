"""DoRA for named adapters: each adapter's own magnitude vector on a layer.

The first ("default") adapter keeps its magnitude where :mod:`.dora` puts it
(``<module>.lora_magnitude_vector``); a further adapter ``name`` gets its own :class:`~.dora._Dora`
object (its own cached norm) holding its magnitude, registered as
``<module>.lora_named_magnitude.<name>`` (beside ``lora_named_A`` / ``lora_named_B``) and stored on
the adapter's :class:`~lorakit.adapters.registry.Slot`. Switching adapters points the layer's
``lora_variant`` at the slot's object, so the forward, merge and PEFT save read that adapter's
magnitude (PEFT's file key stays ``<module>.lora_magnitude_vector``, one file per adapter).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModuleError
from .dora import _Dora, dora_for

NAMED = "lora_named_magnitude"

__all__ = ["NAMED", "dora_slot", "drop_magnitude", "register_magnitude"]


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
