"""Many adapters in one model: registry, O(#layers) switching, combination, mixed-adapter batches.

::

    lorakit.inject(model, cfg)                        # the first adapter, named "default"
    lorakit.add_adapter(model, "sql", cfg2)           # a second one (rank, alpha, targets may differ)
    lorakit.load_adapter(model, "adapters/chat", name="chat")
    lorakit.set_adapter(model, "sql")                 # pointer swap, no allocation
    with lorakit.use_adapter(model, "chat"): ...
    with lorakit.disable_adapters(model): ...         # the base model, bit for bit
    with lorakit.batch_adapters(model, ["sql", "chat", "base", "sql"]):
        model.generate(...)                           # each row its own adapter, one forward

Layout. Every LoRA layer keeps the first adapter where the core puts it (``<module>.lora_A`` /
``lora_B``, keys unchanged); other adapters live in ``<module>.lora_named_A.<name>`` /
``lora_named_B.<name>`` (``nn.ParameterDict``), so all stay registered, an optimizer built over
``model.parameters()`` keeps working, and switching never touches their optimizer state. Each
layer holds ``_lora_slots`` ``{name: Slot}`` (the Parameters plus rank, alpha, scaling, dropout);
switching writes the layer's ``_lora_sel`` pointer (read by ``LoraLayer.lora_A``/``lora_B``) and its
``r``/``lora_alpha``/``scaling``/``lora_dropout`` - a few attribute writes per layer. A layer that
lacks the active adapter acts as the base layer for it.

Only active adapters have ``requires_grad=True``. Several active adapters add their updates (the
layer then reads a rank concatenation, computed on access). A DoRA adapter's slot carries its own
variant object and magnitude (:mod:`lorakit.variants.named`); switching points the layer's
``lora_variant`` at it. Several active adapters with a DoRA one among them follow PEFT's sequential
rule (:class:`lorakit.variants.named.SummedVariants`, unmerged only).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..checks import takes_model
from ..config import LoraConfig
from ..errors import (
    DuplicateAdapterError,
    LoraConfigError,
    UnknownAdapterError,
    UnsupportedModuleError,
)
from ..inject import (
    lora_layers,
)
from ..layers import LoraLayer
from ..sharded_inject import reshard
from ..variants.named import SummedVariants

DEFAULT = "default"
#: Row name meaning "no adapter" in a mixed batch.
BASE = "base"
_ABSENT = (None, None)
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")

__all__ = ["BASE", "DEFAULT", "Slot", "active_adapters", "disable_adapters", "list_adapters", "set_adapter",
           "use_adapter"]

#: Called with ``(model, registry)`` when a model's adapter registry is first made (the mixed-batch
#: kwarg hooks register themselves here, so this module never imports :mod:`.mixed`).
ON_NEW_REGISTRY: list[Callable[[nn.Module, Any], None]] = []


# --- per-layer slots -----------------------------------------------------------------------------
@dataclass(eq=False)
class Slot:
    """One adapter on one layer: its Parameters and hyper-parameters."""

    A: nn.Parameter
    B: nn.Parameter
    r: int
    alpha: float
    scaling: float
    use_rslora: bool
    dropout: nn.Module
    #: the adapter's LoRA variant on this layer (DoRA: its own magnitude vector), None: plain LoRA
    variant: Any = None

    def tensors(self, layer: nn.Module) -> list[Tensor]:
        """Every trainable tensor of this adapter on ``layer`` (A, B and the variant's own)."""
        return [self.A, self.B, *(self.variant.trainable(layer) if self.variant is not None else ())]


class _Concat:
    """``_lora_sel`` for several active adapters: the rank concatenation, built on access.

    ``A = [A_1; A_2; ...]`` and ``B = [s_1 B_1, s_2 B_2, ...]`` with scaling 1, so the layer adds
    ``sum_i s_i B_i A_i`` in its forward and merge; gradients reach every active adapter.
    """

    def __init__(self, slots: Sequence[Slot], experts: int = 1) -> None:
        self.slots = list(slots)
        self.experts = experts  # a 3-D parameter's pairs (lorakit.layers.param): concatenated per expert

    def __getitem__(self, i: int) -> Tensor:
        e = self.experts
        if i == 0:  # A (r*E, a), rows expert-major
            return torch.cat([s.A.reshape(e, -1, s.A.shape[-1]) for s in self.slots], 1).flatten(0, 1)
        # B (b, r*E), columns expert-minor
        return torch.cat([(s.B * s.scaling).reshape(s.B.shape[0], -1, e) for s in self.slots], 1).flatten(1)


def _slots(layer: LoraLayer) -> dict[str, Slot]:
    return layer.__dict__.setdefault("_lora_slots", {})


def _default_slot(layer: LoraLayer) -> Slot | None:
    A = layer._parameters.get("lora_A")  # type: ignore[attr-defined]
    if A is None or layer.r <= 0:
        return None
    return Slot(A, layer._parameters["lora_B"], layer.r, layer.lora_alpha, layer.scaling,  # type: ignore[attr-defined]
                getattr(layer, "use_rslora", False), layer.lora_dropout, layer.__dict__.get("lora_variant"))


def _point_slot(layer: LoraLayer, s: Slot) -> None:
    """Make ``layer`` use the one adapter ``s`` (its pair, hyper-parameters, dropout and variant)."""
    d = layer.__dict__
    own = layer._parameters.get("lora_A") is s.A  # type: ignore[attr-defined]
    d["_lora_sel"] = None if own else (s.A, s.B)
    d["r"], d["lora_alpha"], d["scaling"], d["use_rslora"] = s.r, s.alpha, s.scaling, s.use_rslora
    layer._modules["lora_dropout"] = s.dropout  # type: ignore[attr-defined]
    _set_variant(layer, s.variant)


def _set_variant(layer: LoraLayer, variant: Any) -> None:
    if variant is None:
        layer.__dict__.pop("lora_variant", None)
    else:
        layer.__dict__["lora_variant"] = variant


def _point(layer: LoraLayer, names: Sequence[str]) -> None:
    """Make ``layer`` use ``names`` (its forward, merge and save then see them): attribute writes only."""
    slots = _slots(layer)
    present = [slots[n] for n in names if n in slots]
    d = layer.__dict__
    if not present:
        d["_lora_sel"] = _ABSENT
        return
    if len(present) == 1:
        _point_slot(layer, present[0])
        return
    # several active: the rank concatenation; with a DoRA adapter among them, PEFT's sum of each
    # adapter's own update (lorakit.variants.named.SummedVariants; merging it is refused)
    summed = any(s.variant is not None for s in present)
    _set_variant(layer, SummedVariants(present, _point_slot) if summed else None)
    d["_lora_sel"] = _Concat(present, getattr(layer, "num_experts", 1))
    total = sum(s.r for s in present)
    d["r"], d["lora_alpha"], d["scaling"], d["use_rslora"] = total, float(total), 1.0, False
    layer._modules["lora_dropout"] = present[0].dropout  # type: ignore[attr-defined]


# --- registry ------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Registry:
    configs: dict[str, LoraConfig]
    active: tuple[str, ...]
    layers: list[tuple[str, LoraLayer]] = field(default_factory=list)
    kw_stack: list[Any] = field(default_factory=list)
    hooks: list[Any] = field(default_factory=list)
    #: per layer, the last no-grad stack of mixed-batch weights (reused across blocks / generate calls)
    stacks: dict[tuple[int, tuple[str, ...]], tuple[Any, ...]] = field(default_factory=dict)


def _registry(model: nn.Module) -> _Registry:
    reg = model.__dict__.get("_lorakit_registry")
    if reg is None:
        configs = model.__dict__.get("_lorakit_configs")
        if configs is None:
            configs = {}
            model._lorakit_configs = configs
        reg = _Registry(configs, (DEFAULT,) if DEFAULT in configs else ())
        model.__dict__["_lorakit_registry"] = reg
        for hook in ON_NEW_REGISTRY:
            hook(model, reg)
    else:  # the core (inject / load_adapter) may have replaced the dict
        reg.configs = model.__dict__.setdefault("_lorakit_configs", reg.configs)
    if not reg.layers:
        _refresh(model, reg)
    return reg


def _refresh(model: nn.Module, reg: _Registry) -> None:
    """Rescan the LoRA layers; give layers the registry has not seen their default slot."""
    reg.layers = list(lora_layers(model))
    for _, layer in reg.layers:
        if "_lora_slots" not in layer.__dict__:
            slots = _slots(layer)
            s = _default_slot(layer)
            if s is not None:
                slots[DEFAULT] = s
            if reg.active and reg.active != (DEFAULT,):
                _point(layer, reg.active)


def _check_known(reg: _Registry, names: Sequence[str], allow_base: bool = False) -> None:
    for n in names:
        if n in reg.configs or (allow_base and n == BASE):
            continue
        known = list(reg.configs) + ([BASE] if allow_base else [])
        raise UnknownAdapterError(f"no adapter named {n!r}; known adapters: {known}")


@takes_model
def list_adapters(model: nn.Module) -> list[str]:
    """Names of the model's adapters, in the order they were added."""
    return list(_registry(model).configs)


@takes_model
def active_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters the model's forward currently uses."""
    return list(_registry(model).active)


@takes_model
def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` (one adapter, or several whose updates add up) the active adapter(s).

    A pointer swap on every layer (no re-allocation); only the active adapters get
    ``requires_grad=True``, the others keep their Parameters and optimizer state untouched.
    Layers that are merged are unmerged bit-exactly first and merged with the new adapter after.
    """
    reg = _registry(model)
    new = (names,) if isinstance(names, str) else tuple(names)
    if not new:
        raise LoraConfigError("set_adapter: name at least one adapter (disable_adapters is the base)")
    _check_known(reg, new)
    if len(set(new)) != len(new):
        raise LoraConfigError(f"set_adapter: {list(new)} names an adapter twice")
    old = reg.active
    if new == old:
        return
    if len(new) > 1:
        _refuse_variants_summed(reg, new)
    changed = set(old) | set(new)
    reshard(model)  # FSDP2: merged layers are re-merged into the shards (lorakit.sharded_inject)
    for _, layer in reg.layers:
        merged = layer.merged
        if merged:
            layer.unmerge()
        _point(layer, new)
        if merged:
            layer.merge()
        slots = layer.__dict__["_lora_slots"]
        for n in changed:
            s = slots.get(n)
            if s is not None:
                flag = n in new
                for t in s.tensors(layer):
                    t.requires_grad = flag
    reg.active = new


def _refuse_variants_summed(reg: _Registry, names: tuple[str, ...]) -> None:
    """Several active adapters with a variant (DoRA) among them sum their updates unmerged only."""
    for mod_name, layer in reg.layers:
        slots = _slots(layer)
        for n in names:
            v = slots[n].variant if n in slots else None
            if v is not None and not hasattr(v, "output_factor"):
                raise UnsupportedModuleError(
                    f"set_adapter({list(names)}): adapter {n!r} is a {v.describe()} adapter on {mod_name!r}; "
                    "several active adapters are supported beside float-base DoRA adapters only")
            if v is not None and layer.merged:
                raise UnsupportedModuleError(
                    f"set_adapter({list(names)}): adapter {n!r} is a {v.describe()} adapter on {mod_name!r}, "
                    "which is merged; several active adapters with a variant cannot be merged: unmerge first")


@contextlib.contextmanager
@takes_model
def use_adapter(model: nn.Module, names: str | Sequence[str]) -> Iterator[None]:
    """Run the block with ``names`` active, then restore the previous active adapter(s)."""
    reg = _registry(model)
    old = reg.active
    set_adapter(model, names)
    try:
        yield
    finally:
        if old:
            set_adapter(model, old)
        else:
            _deactivate(model, reg)


def _deactivate(model: nn.Module, reg: _Registry) -> None:
    """No active adapter: every layer acts as its base layer."""
    for _, layer in reg.layers:
        layer.unmerge()
        layer.__dict__["_lora_sel"] = _ABSENT
        for s in _slots(layer).values():
            for t in s.tensors(layer):
                t.requires_grad = False
    reg.active = ()


@contextlib.contextmanager
@takes_model
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the block as the base model, exactly: merged layers are unmerged bit-exactly, re-merged after."""
    layers = [layer for _, layer in lora_layers(model)]
    state = [(layer, layer.merged, layer.lora_disabled) for layer in layers]
    try:
        reshard(model)  # FSDP2: unmerge / re-merge write the shards, not a gathered copy (lorakit.sharded_inject)
        for layer in layers:
            layer.unmerge()
            layer.lora_disabled = True
        yield
    finally:
        reshard(model)
        for layer, merged, disabled in state:
            layer.lora_disabled = disabled
            if merged:
                layer.merge()


@contextlib.contextmanager
def _pointed(reg: _Registry, name: str) -> Iterator[None]:
    """Point every layer at ``name`` without touching merges or grads (for reading it)."""
    try:
        for _, layer in reg.layers:
            _point(layer, (name,))
        yield
    finally:
        for _, layer in reg.layers:
            if reg.active:
                _point(layer, reg.active)
            else:
                layer.__dict__["_lora_sel"] = _ABSENT



# --- adding adapters -----------------------------------------------------------------------------
def _check_new_name(reg: _Registry, name: Any) -> None:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name == BASE:
        raise LoraConfigError(f"adapter name {name!r}: use letters, digits, '_' or '-' (not starting with a "
                              f"digit), and not {BASE!r}, which mixed batches use for 'no adapter'")
    if name in reg.configs:
        raise DuplicateAdapterError(f"an adapter named {name!r} exists already; adapters: {list(reg.configs)}"
                                    " (delete_adapter it first, or pick another name)")

