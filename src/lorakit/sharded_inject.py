"""``lorakit.inject`` into a model already sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 tracks every parameter it shards by ``(owning module, name)`` and, around each forward, swaps
that module's Parameter between the rank's DTensor shard and the all-gathered full tensor. A LoRA
layer put in the module's place shares the DTensor Parameter but is not the module FSDP2 swaps, so
its forward would see the shard (torch: "mixed torch.Tensor and DTensor"). :func:`rebind` points
FSDP2's record at the LoRA layer and keeps the wrapped base module as a *shared* module (what
:func:`lorakit.train.fsdp_alias.visible_bases` arranges when LoRA comes first): both see the
gathered weight inside forward and the shard outside it; ``unwrap`` puts the base back and it keeps
being swapped.

The new LoRA factors are plain tensors outside FSDP (the *replicated* placement that
``lorakit.train.fsdp.shard`` uses by default: whole on every rank, their gradients averaged by
:class:`lorakit.train.fsdp.Sharded`). :func:`broadcast_new` copies rank 0's initial values to every
rank, so the adapter starts identical everywhere whatever each rank's RNG state was (before the model
changes: a failed broadcast leaves it as it was). ``inject`` is then a collective: call it on every rank
with the same config. :func:`reshard` (:mod:`lorakit.fsdp_reshard`) is what ``lorakit.merge`` / ``unmerge``
run first on any model.

Not supported after sharding (typed refusal, model unchanged; inject before ``fully_shard`` instead):
weight-reading inits (PiSSA / OLoRA / EVA / LoftQ) and variants (DoRA, LoRA bias), which need the full
W0; ``target_parameters`` and ``trainable_tokens``, which wrap the sharded Parameters themselves; a
target that is itself a ``fully_shard`` unit (FSDP2's hooks sit on that module object); and a model in
the middle of a forward (parameters unsharded).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .errors import UnsupportedModuleError
from .fsdp_reshard import fsdp_params as _fsdp_params
from .fsdp_reshard import reshard as reshard  # re-exported: lorakit.merge and the registry run it first

PLAIN_INITS = ("kaiming", "gaussian", "random")  # the ones that never read W0
AFTER = "inject LoRA before fully_shard (lorakit.train.fsdp.shard does so), or into an unsharded copy"


def _dtensor_names(module: nn.Module) -> list[str]:
    import torch.distributed as dist

    if not dist.is_available():
        return []
    from torch.distributed.tensor import DTensor

    return [n for n, p in module.named_parameters(recurse=False) if isinstance(p, DTensor)]


def is_sharded(matches: Sequence[Any]) -> bool:
    """Whether any matched module holds FSDP2 (DTensor) parameters."""
    return any(_dtensor_names(m.module) for m in matches)


def check(model: nn.Module, matches: Sequence[Any], n_param_targets: int, tokens: Any) -> None:
    """Raise :class:`UnsupportedModuleError` (naming the module and what works) if this inject cannot run
    on the sharded model; changes nothing."""
    from torch.distributed.fsdp import FSDPModule

    if n_param_targets or tokens:
        raise UnsupportedModuleError(
            "inject on a sharded model: target_parameters / trainable_tokens wrap the sharded Parameters "
            f"themselves; {AFTER}")
    owners = set()  # the modules FSDP2 swaps parameters on; after an unwrap the base is a shared one
    for fp in _fsdp_params(model):
        owners.add(id(fp._module_info.module))
        owners.update(id(s) for s in fp._module_info.shared_modules)
    for m in matches:
        s = m.spec
        if isinstance(m.module, FSDPModule):
            raise UnsupportedModuleError(
                f"module {m.name!r} is itself a fully_shard unit (FSDP2's hooks are on that module); shard its "
                f"parent block instead, or {AFTER}")
        if s.use_dora or s.lora_bias or s.init not in PLAIN_INITS:
            raise UnsupportedModuleError(
                f"module {m.name!r}: init={s.init!r} use_dora={s.use_dora} lora_bias={s.lora_bias} read or change "
                f"the full base weight, which a sharded model does not hold; after fully_shard only plain LoRA "
                f"with init 'kaiming', 'gaussian' or 'random' works; {AFTER}")
        sharded = _dtensor_names(m.module)
        if sharded and id(m.module) not in owners:
            raise UnsupportedModuleError(
                f"module {m.name!r} has DTensor parameters {sharded} that no fully_shard unit of this model "
                f"manages; {AFTER}")
    targets = {id(m.module): m.name for m in matches}
    for fp in _fsdp_params(model):
        name = targets.get(id(fp._module_info.module))
        if name is not None and fp.sharded_state.name != "SHARDED":  # e.g. the root unit after a forward
            raise UnsupportedModuleError(
                f"module {name!r}: its {fp._module_info.param_name!r} is {fp.sharded_state.name} (inside a "
                "forward/backward, or a root unit left unsharded after one); call model.reshard() first")


def rebind(model: nn.Module, built: Sequence[tuple[str, nn.Module]], bases: dict[str, nn.Module]) -> int:
    """Point FSDP2's parameter records from each replaced base module (``bases[name]``) to its LoRA layer,
    keeping the base as a shared module. Returns how many records moved."""
    layer_of = {id(bases[name]): layer for name, layer in built}
    moved = 0
    for fp in _fsdp_params(model):
        info = fp._module_info
        layer = layer_of.get(id(info.module))
        if layer is not None:
            info.shared_modules.append(info.module)
            info.shared_param_names.append(info.param_name)
            info.module = layer
            moved += 1
        for i, shared in enumerate(list(info.shared_modules)):  # a tied weight shared with a replaced module
            lay = layer_of.get(id(shared))
            if lay is not None and lay is not info.module:
                info.shared_modules.append(lay)
                info.shared_param_names.append(info.shared_param_names[i])
    return moved


def broadcast_new(built: Sequence[tuple[str, nn.Module]]) -> None:
    """Rank 0's initial LoRA factors on every rank (a collective over the default process group)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    with torch.no_grad():
        for _, layer in built:
            for name in ("lora_A", "lora_B"):
                p = layer._parameters.get(name)
                if p is not None:
                    dist.broadcast(p.data, src=0)
