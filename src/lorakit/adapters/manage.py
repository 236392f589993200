"""Adding and deleting named adapters: stage every slot first (all checks), then commit at once."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .. import param_targets as _params
from ..checks import require_config, takes_model
from ..config import ALL_LINEAR, LoraConfig
from ..errors import (
    ActiveAdapterError,
    LoraConfigError,
    TargetNotFoundError,
    UnsupportedModuleError,
)
from ..inject import (
    LayerSpec,
    _output_head,
    _set_module,
    factory_for,
    is_linear_like,
    name_matches,
)
from ..layers import ConvLoRA, Embedding, LoraLayer, MergedLinear, _InjectedConv
from ..layers import Linear as LoraLinear
from ..layers.param import LoraParameter, param_pair_shapes
from ..variants.base import refuse_named
from ..variants.named import dora_slot, drop_magnitude, register_magnitude
from .registry import (
    _ABSENT,
    DEFAULT,
    Slot,
    _check_known,
    _check_new_name,
    _refresh,
    _Registry,
    _registry,
    _slots,
    set_adapter,
)

__all__ = ["add_adapter", "delete_adapter"]


def _pair_shapes(layer: LoraLayer, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if isinstance(layer, LoraParameter):  # target_parameters: PEFT's (r*E, a) / (b, r*E)
        return param_pair_shapes(tuple(layer._weight_param().shape), r, layer.transposed)
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
    dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) or not w.is_floating_point() else w.dtype
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
                if name not in config.targets and not config.in_layers(name):
                    continue  # layers_to_transform / layers_pattern
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
           exact: tuple[dict[str, LayerSpec], dict[str, nn.Module]] | None = None,
           params: list[tuple[_params.ParamMatch, Tensor, Tensor]] | None = None) -> _Staged:
    """``params``: a file's target_parameters pairs (:func:`lorakit.param_targets.read_pairs`)."""
    refuse_named(model, config, f"adapter {name!r}")  # LoRA bias / trainable tokens: the first adapter only
    staged = _Staged(name, config, {}, {})
    found = _exact(*exact) if exact is not None else _match(model, config)
    if params is None:
        params = [(m, None, None) for m in _params.resolve_parameters(  # type: ignore[misc]
            model, config, tuple(n for n, _, _ in found), allow_existing=True)]
    if config.use_dora and params:
        raise UnsupportedModuleError(f"adapter {name!r}: use_dora with target_parameters "
                                     f"({params[0][0].owner_name}): DoRA is defined for modules, not bare "
                                     "parameters (PEFT refuses it too); drop use_dora or target_parameters")
    for pm, a, b in params:  # target_parameters: a slot on the parameter's layer (a new layer if none)
        layer, is_new = _params.layer_for(pm, config)
        spec = LayerSpec(pm.r, pm.alpha, 0.0, config.use_rslora, config.init, None)
        slot = _new_slot(layer, spec, None if a is None else (a, b))
        if init:
            _init_slot(layer, slot, spec.init)
        mod_name = f"{pm.owner_name}.{layer.child_name}"
        if is_new:
            staged.wrap[mod_name] = layer
        staged.slots[mod_name] = (layer, slot)
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
        if config.use_dora:
            slot.variant = dora_slot(layer, slot, mod_name)
        staged.slots[mod_name] = (layer, slot)
    return staged


def _commit(model: nn.Module, reg: _Registry, staged: _Staged) -> None:
    for mod_name, layer in staged.wrap.items():
        layer.lora_A = None  # type: ignore[assignment]  # no default adapter on this layer
        layer.lora_B = None  # type: ignore[assignment]
        layer.__dict__["_lora_slots"] = {}
        layer.__dict__["_lora_sel"] = _ABSENT
        if isinstance(layer, LoraParameter):
            layer.install()  # registers itself on the parameter's owner
        else:
            _set_module(model, mod_name, layer)
    activate = not reg.active
    for layer, slot in staged.slots.values():
        if "lora_named_A" not in layer._modules:  # type: ignore[attr-defined]
            layer.lora_named_A = nn.ParameterDict()  # type: ignore[attr-defined]
            layer.lora_named_B = nn.ParameterDict()  # type: ignore[attr-defined]
        layer.lora_named_A[staged.name] = slot.A  # type: ignore[attr-defined,index]
        layer.lora_named_B[staged.name] = slot.B  # type: ignore[attr-defined,index]
        if slot.variant is not None:
            register_magnitude(layer, staged.name, slot.variant)
        for t in slot.tensors(layer):
            t.requires_grad = activate
        _slots(layer)[staged.name] = slot
    reg.configs[staged.name] = staged.config
    _refresh(model, reg)
    if activate:
        reg.active = ()
        set_adapter(model, staged.name)


@takes_model
def add_adapter(model: nn.Module, name: str, config: LoraConfig) -> None:
    """Add a new adapter ``name`` shaped by ``config`` (its own rank, alpha and targets).

    Targets already wrapped get a new pair; others are wrapped (acting as base for the other
    adapters). The new adapter is inactive unless the model had no active adapter.
    """
    require_config(config, "add_adapter")
    reg = _registry(model)
    _check_new_name(reg, name)
    _commit(model, reg, _stage(model, name, config, init=True))


@takes_model
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
            drop_magnitude(layer, name)
    del reg.configs[name]
    reg.stacks.clear()

