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
layer then reads a rank concatenation, computed on access).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import formats
from .config import ALL_LINEAR, LoraConfig
from .errors import (
    ActiveAdapterError,
    AdapterFormatError,
    AdapterMismatchError,
    DuplicateAdapterError,
    LoraConfigError,
    TargetNotFoundError,
    UnknownAdapterError,
    UnsupportedModuleError,
)
from .inject import (
    LayerSpec,
    _output_head,
    _set_module,
    factory_for,
    is_linear_like,
    lora_layers,
    name_matches,
)
from .layers import ConvLoRA, Embedding, LoraLayer, MergedLinear, _InjectedConv
from .layers import Linear as LoraLinear

DEFAULT = "default"
#: Row name meaning "no adapter" in a mixed batch.
BASE = "base"
_ABSENT = (None, None)
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")

__all__ = [
    "BASE", "DEFAULT", "Slot", "active_adapters", "add_adapter",
    "delete_adapter", "disable_adapters", "list_adapters", "load_named_adapter", "save_named_adapter",
    "set_adapter", "use_adapter",
]


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


class _Concat:
    """``_lora_sel`` for several active adapters: the rank concatenation, built on access.

    ``A = [A_1; A_2; ...]`` and ``B = [s_1 B_1, s_2 B_2, ...]`` with scaling 1, so the layer adds
    ``sum_i s_i B_i A_i`` in its forward and merge; gradients reach every active adapter.
    """

    def __init__(self, slots: Sequence[Slot]) -> None:
        self.slots = list(slots)

    def __getitem__(self, i: int) -> Tensor:
        if i == 0:
            return torch.cat([s.A for s in self.slots], 0)
        return torch.cat([s.B * s.scaling for s in self.slots], 1)


def _slots(layer: LoraLayer) -> dict[str, Slot]:
    return layer.__dict__.setdefault("_lora_slots", {})


def _default_slot(layer: LoraLayer) -> Slot | None:
    A = layer._parameters.get("lora_A")  # type: ignore[attr-defined]
    if A is None or layer.r <= 0:
        return None
    return Slot(A, layer._parameters["lora_B"], layer.r, layer.lora_alpha, layer.scaling,  # type: ignore[attr-defined]
                getattr(layer, "use_rslora", False), layer.lora_dropout)


def _point(layer: LoraLayer, names: Sequence[str]) -> None:
    """Make ``layer`` use ``names`` (its forward, merge and save then see them): attribute writes only."""
    slots = _slots(layer)
    present = [slots[n] for n in names if n in slots]
    d = layer.__dict__
    if not present:
        d["_lora_sel"] = _ABSENT
        return
    if len(present) == 1:
        s = present[0]
        own = layer._parameters.get("lora_A") is s.A  # type: ignore[attr-defined]
        d["_lora_sel"] = None if own else (s.A, s.B)
        d["r"], d["lora_alpha"], d["scaling"], d["use_rslora"] = s.r, s.alpha, s.scaling, s.use_rslora
        layer._modules["lora_dropout"] = s.dropout  # type: ignore[attr-defined]
        return
    d["_lora_sel"] = _Concat(present)
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
        from .mixed import install_kwarg_hooks

        install_kwarg_hooks(model, reg)
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


def list_adapters(model: nn.Module) -> list[str]:
    """Names of the model's adapters, in the order they were added."""
    return list(_registry(model).configs)


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the adapters the model's forward currently uses."""
    return list(_registry(model).active)


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
    changed = set(old) | set(new)
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
                s.A.requires_grad = flag
                s.B.requires_grad = flag
    reg.active = new


@contextlib.contextmanager
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
            s.A.requires_grad = s.B.requires_grad = False
    reg.active = ()


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the block as the base model, exactly: merged layers are unmerged bit-exactly, re-merged after."""
    layers = [layer for _, layer in lora_layers(model)]
    state = [(layer, layer.merged, layer.lora_disabled) for layer in layers]
    try:
        for layer in layers:
            layer.unmerge()
            layer.lora_disabled = True
        yield
    finally:
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


def _pair_shapes(layer: LoraLayer, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if isinstance(layer, MergedLinear):
        return layer._lora_shapes(r, layer.in_features, layer.out_features)
    if isinstance(layer, LoraLinear):
        return (r, layer.in_features), (layer.out_features, r)
    if isinstance(layer, Embedding):
        return (r, layer.num_embeddings), (layer.embedding_dim, r)
    if isinstance(layer, _InjectedConv):
        w = layer._weight_param()
        return (r, w[0].numel()), (w.shape[0], r)
    if isinstance(layer, ConvLoRA):
        ks = layer.conv.kernel_size
        k, rest = ks[0], math.prod(ks[1:])
        conv = layer.conv
        return (r * k, conv.in_channels * rest), (conv.out_channels // conv.groups * k, r * k)
    raise UnsupportedModuleError(f"{type(layer).__name__}: lorakit.adapters does not know its LoRA shapes")


def _new_slot(layer: LoraLayer, spec: LayerSpec, values: tuple[Tensor, Tensor] | None = None) -> Slot:
    a_shape, b_shape = _pair_shapes(layer, spec.r)
    w = layer._weight_param()
    dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
    if values is None:
        A = nn.Parameter(torch.zeros(a_shape, dtype=dtype, device=w.device))
        B = nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=w.device))
    else:
        A = nn.Parameter(values[0].detach().to(dtype=dtype, device=w.device).reshape(a_shape).contiguous())
        B = nn.Parameter(values[1].detach().to(dtype=dtype, device=w.device).reshape(b_shape).contiguous())
    scaling = spec.alpha / math.sqrt(spec.r) if spec.use_rslora else spec.alpha / spec.r
    dropout: nn.Module = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
    return Slot(A, B, spec.r, spec.alpha, scaling, spec.use_rslora, dropout)


def _init_slot(layer: LoraLayer, slot: Slot, init: str) -> None:
    """Initialise a slot with the layer's own rule (Kaiming A / zero B, or the embedding's)."""
    d = layer.__dict__
    saved = (d.get("_lora_sel"), d["r"])
    d["_lora_sel"], d["r"] = (slot.A, slot.B), slot.r
    try:
        layer.reset_lora_parameters(init)
    finally:
        d["_lora_sel"], d["r"] = saved


@dataclass
class _Staged:
    """Everything an add/load will change, built before anything is changed."""

    name: str
    config: LoraConfig
    wrap: dict[str, LoraLayer]  # module name -> new layer to set (not yet in the model)
    slots: dict[str, tuple[LoraLayer, Slot]]


def _match(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module, LayerSpec]]:
    """The modules ``config`` adapts, LoRA layers included (as their base module)."""
    if config.trainable or config.bias != "none":
        raise LoraConfigError("named adapters share the base model, so they cannot train whole modules "
                              "(trainable/modules_to_save) or biases; put LoRA on those layers instead "
                              f"(got trainable={list(config.trainable)}, bias={config.bias!r})")
    head = _output_head(model)
    found: list[tuple[str, nn.Module, LayerSpec]] = []
    hits: set[str] = set()
    inside: list[str] = []
    names = []
    for name, m in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        names.append(name)
        base = m
        if isinstance(m, LoraLayer):
            inside.append(name)
            base = m._lora_original[0] if getattr(m, "_lora_original", None) else m
        if config.exclude and name_matches(name, config.exclude):
            continue
        if config.targets == ALL_LINEAR:
            if not is_linear_like(m) or m is head or base is head:
                continue
        else:
            if not name_matches(name, config.targets):
                continue
            if isinstance(config.targets, tuple):
                hits.update(t for t in config.targets if name == t or name.endswith("." + t))
        if not isinstance(m, LoraLayer) and factory_for(m) is None:
            raise UnsupportedModuleError(f"module {name!r} matches the targets but its type "
                                         f"{type(m).__name__} is not supported")
        enable = m.enable_lora if isinstance(m, MergedLinear) else config.fused_for(name)
        found.append((name, m, LayerSpec(config.rank_for(name), config.alpha_for(name), config.dropout,
                                         config.use_rslora, config.init, enable)))
    if isinstance(config.targets, tuple):
        missing = [t for t in config.targets if t not in hits]
        if missing:
            raise TargetNotFoundError(f"target(s) {missing} match no module of the model")
    elif not found:
        raise TargetNotFoundError(f"targets {config.targets!r} match no module; names look like {names[:8]}")
    return found


def _exact(specs: dict[str, LayerSpec],
           modules: dict[str, nn.Module]) -> list[tuple[str, nn.Module, LayerSpec]]:
    """Targets given as full module names with their specs (a loaded file): direct lookups."""
    out = []
    for name, spec in specs.items():
        m = modules[name]
        if isinstance(m, MergedLinear):
            spec = replace(spec, enable=m.enable_lora)
        elif not isinstance(m, LoraLayer) and factory_for(m) is None:
            raise UnsupportedModuleError(f"module {name!r}: type {type(m).__name__} is not supported")
        out.append((name, m, spec))
    return out


def _stage(model: nn.Module, name: str, config: LoraConfig, init: bool,
           exact: tuple[dict[str, LayerSpec], dict[str, nn.Module]] | None = None) -> _Staged:
    staged = _Staged(name, config, {}, {})
    found = _exact(*exact) if exact is not None else _match(model, config)
    for mod_name, m, spec in found:
        if isinstance(m, LoraLayer):
            layer = m
            slot = _new_slot(layer, spec)
            if init:
                _init_slot(layer, slot, spec.init)
        else:
            factory = factory_for(m)
            assert factory is not None
            layer = factory(m, spec)  # a fresh layer: its own pair becomes the slot
            slot = Slot(layer._parameters["lora_A"], layer._parameters["lora_B"], layer.r,  # type: ignore[attr-defined]
                        layer.lora_alpha, layer.scaling, spec.use_rslora, layer.lora_dropout)
            staged.wrap[mod_name] = layer
        staged.slots[mod_name] = (layer, slot)
    return staged


def _commit(model: nn.Module, reg: _Registry, staged: _Staged) -> None:
    for mod_name, layer in staged.wrap.items():
        layer.lora_A = None  # type: ignore[assignment]  # no default adapter on this layer
        layer.lora_B = None  # type: ignore[assignment]
        layer.__dict__["_lora_slots"] = {}
        layer.__dict__["_lora_sel"] = _ABSENT
        _set_module(model, mod_name, layer)
    activate = not reg.active
    for layer, slot in staged.slots.values():
        if "lora_named_A" not in layer._modules:  # type: ignore[attr-defined]
            layer.lora_named_A = nn.ParameterDict()  # type: ignore[attr-defined]
            layer.lora_named_B = nn.ParameterDict()  # type: ignore[attr-defined]
        layer.lora_named_A[staged.name] = slot.A  # type: ignore[attr-defined,index]
        layer.lora_named_B[staged.name] = slot.B  # type: ignore[attr-defined,index]
        slot.A.requires_grad = slot.B.requires_grad = activate
        _slots(layer)[staged.name] = slot
    reg.configs[staged.name] = staged.config
    _refresh(model, reg)
    if activate:
        reg.active = ()
        set_adapter(model, staged.name)


def add_adapter(model: nn.Module, name: str, config: LoraConfig) -> None:
    """Add a new adapter ``name`` shaped by ``config`` (its own rank, alpha and targets).

    Targets already wrapped get a new pair; others are wrapped (acting as base for the other
    adapters). The new adapter is inactive unless the model had no active adapter.
    """
    reg = _registry(model)
    _check_new_name(reg, name)
    _commit(model, reg, _stage(model, name, config, init=True))


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` and its Parameters; the active adapter cannot be deleted."""
    reg = _registry(model)
    _check_known(reg, [name])
    if name in reg.active:
        raise ActiveAdapterError(f"adapter {name!r} is active ({list(reg.active)}); set_adapter to another "
                                 "one before deleting it")
    for _, layer in reg.layers:
        slot = _slots(layer).pop(name, None)
        if slot is None:
            continue
        if name == DEFAULT and layer._parameters.get("lora_A") is slot.A:  # type: ignore[attr-defined]
            layer.lora_A = None  # type: ignore[assignment]
            layer.lora_B = None  # type: ignore[assignment]
        else:
            del layer.lora_named_A[name]  # type: ignore[attr-defined]
            del layer.lora_named_B[name]  # type: ignore[attr-defined]
    del reg.configs[name]
    reg.stacks.clear()


# --- save / load ---------------------------------------------------------------------------------
def save_named_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None,
                       base_model_name: str | None = None) -> Path:
    """Write adapter ``name`` (default: the active one) as a PEFT directory."""
    reg = _registry(model)
    if name is None:
        if len(reg.active) != 1:
            raise LoraConfigError(f"save_adapter: {len(reg.active)} adapters are active; pass name=")
        name = reg.active[0]
    _check_known(reg, [name])
    with _pointed(reg, name):
        return formats.save_adapter(model, path, config=reg.configs[name], base_model_name=base_model_name)


def load_named_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> nn.Module:
    """Load a PEFT/lorakit adapter directory as adapter ``name`` (None or "default": the core's load).

    Every module, shape and dtype is checked before the model changes; a file written for a base
    model of other shapes raises :class:`AdapterMismatchError`.
    """
    if name is None or name == DEFAULT:
        reg = model.__dict__.get("_lorakit_registry")
        if reg is None:
            return formats.load_adapter(model, path, _core=True)
        with _pointed(reg, DEFAULT):
            formats.load_adapter(model, path, _core=True)
        reg.configs = model.__dict__["_lorakit_configs"]
        _refresh(model, reg)
        return model
    reg = _registry(model)
    _check_new_name(reg, name)
    config, tensors = formats.read_adapter(path)
    per_module: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        mod, kind = formats._split_key(key)
        if not kind:
            raise AdapterFormatError(f"{path}: {key}: named adapters hold LoRA tensors only")
        per_module.setdefault(mod, {})[kind] = t
    if not per_module:
        raise AdapterFormatError(f"{path}: holds no LoRA tensors")
    problems: list[str] = []
    ranks: dict[str, int] = {}
    modules = dict(model.named_modules())
    for m, ts in per_module.items():
        a = ts.get("lora_A.weight", ts.get("lora_embedding_A"))
        if m not in modules:
            problems.append(f"{m}: no such module in the model")
        elif a is None or ("lora_B.weight" not in ts and "lora_embedding_B" not in ts):
            problems.append(f"{m}: needs both lora_A and lora_B")
        else:
            fused = config.fused_for(m)
            ranks[m] = a.shape[0] // max(1, sum(fused or (True,)))
    if problems:
        raise AdapterMismatchError(f"{path}: adapter does not fit the model:\n  " + "\n  ".join(problems))
    specs = {m: LayerSpec(r, config.alpha_for(m), config.dropout, config.use_rslora, config.init,
                          config.fused_for(m)) for m, r in ranks.items()}
    try:
        staged = _stage(model, name, config, init=False, exact=(specs, modules))
    except (TargetNotFoundError, LoraConfigError, UnsupportedModuleError) as e:
        raise AdapterMismatchError(f"{path}: the adapter does not fit this model: {e}") from None
    values: dict[str, tuple[Tensor, Tensor]] = {}
    for m, (layer, slot) in staged.slots.items():
        ts = per_module[m]
        a = ts.get("lora_A.weight", ts.get("lora_embedding_A"))
        b = ts.get("lora_B.weight", ts.get("lora_embedding_B"))
        assert a is not None and b is not None
        if not (a.is_floating_point() and b.is_floating_point()):
            problems.append(f"{m}: LoRA tensors must be floating point, got {a.dtype}/{b.dtype}")
            continue
        if isinstance(layer, MergedLinear):
            a, b = _dense_to_fused_pair(layer, slot.r, a, b)
        if a.numel() != slot.A.numel() or b.numel() != slot.B.numel() or a.shape[0] != slot.A.shape[0]:
            problems.append(f"{m}: A {tuple(a.shape)} / B {tuple(b.shape)} in the file, the model needs "
                            f"{tuple(slot.A.shape)} / {tuple(slot.B.shape)}")
            continue
        values[m] = (a, b)
    if problems:
        raise AdapterMismatchError(f"{path}: adapter does not fit the model:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for m, (a, b) in values.items():
            _, slot = staged.slots[m]
            slot.A.copy_(a.reshape(slot.A.shape))
            slot.B.copy_(b.reshape(slot.B.shape))
    staged.config = config
    _commit(model, reg, staged)
    return model


def _dense_to_fused_pair(layer: MergedLinear, r: int, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    rows = layer.out_features // len(layer.enable_lora)
    parts = [B[s * rows:(s + 1) * rows, j * r:(j + 1) * r]
             for j, s in enumerate(i for i, e in enumerate(layer.enable_lora) if e)]
    return A, torch.cat(parts, 0)
