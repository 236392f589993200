"""FSDP2 units back to their shards before lorakit writes a base weight (merge, unmerge, re-merge).

Outside a forward FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps each rank's DTensor shard of a
parameter; inside one it swaps in the all-gathered full tensor and frees it again at the reshard. A
forward under ``no_grad`` skips the root unit's reshard (and ``reshard_after_forward=False`` units skip
theirs), so the module then holds the *gathered copy*: a merge written there changes the output until the
next reshard and is then lost, the shards still holding W0.

Every path that writes a LoRA layer's base weight goes through :meth:`LoraLayer.merge` /
:meth:`LoraLayer.unmerge` (``lorakit.layers.base``) or the quantized layer's (``lorakit.quant.layer``),
and both call :func:`reshard_for` first: the public ``merge`` / ``unmerge`` / ``disable_adapters`` /
``set_adapter``, a direct ``layer.merge()``, ``load_adapter`` into a merged model, a mixed-adapter batch
re-merging on exit, ``target_parameters`` loads. :func:`reshard` is the whole-model form those public
functions run once up front. Both are local (no collective) and no-ops without FSDP2.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn


def _loaded() -> bool:
    return "torch.distributed.fsdp" in sys.modules  # nothing can have been sharded otherwise


def unit_params(unit: nn.Module) -> list[Any]:
    """The ``FSDPParam`` records of one ``fully_shard`` unit."""
    state = unit._get_fsdp_state()  # type: ignore[operator]
    groups = getattr(state, "_fsdp_param_groups", None)  # newer torch: a list; older: one group or None
    if groups is None:
        groups = [g for g in (state._fsdp_param_group,) if g is not None]
    return [fp for group in groups for fp in group.fsdp_params]


def fsdp_params(model: nn.Module) -> list[Any]:
    """The ``FSDPParam`` records of every ``fully_shard`` unit inside ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return [fp for mod in model.modules() if isinstance(mod, FSDPModule) for fp in unit_params(mod)]


def reshard(model: nn.Module) -> None:
    """Every FSDP2 unit of ``model`` back to its sharded parameters."""
    if not _loaded():
        return
    from torch.distributed.fsdp import FSDPModule

    for mod in model.modules():
        if isinstance(mod, FSDPModule):
            mod.reshard()


def _units() -> list[nn.Module]:
    """Every live ``fully_shard`` unit of this process (torch's registry of composable states)."""
    from torch.distributed import _composable_state as cs
    from torch.distributed.fsdp import FSDPModule

    return [m for m in list(getattr(cs, "_module_state_mapping", {})) if isinstance(m, FSDPModule)]


def reshard_for(layer: nn.Module, weight: Any) -> None:
    """Reshard the FSDP2 unit(s) managing ``weight`` of ``layer`` (the tensor about to be written) when they
    hold a gathered copy. A DTensor ``weight`` is already the shard: nothing to do (the common case)."""
    if not _loaded() or type(weight).__name__ == "DTensor":
        return
    d = layer.__dict__
    mine = {id(m) for m in layer.modules()}  # the layer, its children (a conv's ``conv``, the FSDP alias)
    mine.update(id(m) for m in d.get("_lora_original") or ())  # the wrapped base (a shared module of FSDP2's)
    owner = d.get("_lora_owner")  # target_parameters: the module holding the Parameter
    if owner is not None:
        mine.add(id(owner))
    for unit in _units():
        for fp in unit_params(unit):
            info = fp._module_info
            if fp.sharded_state.name != "SHARDED" and (
                    id(info.module) in mine or any(id(s) in mine for s in info.shared_modules)):
                unit.reshard()
                break
