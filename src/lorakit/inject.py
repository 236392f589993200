"""Put LoRA into an existing model, in place: ``inject``, ``plan``, ``unwrap``.

One path: match names -> ``factory(module, spec)`` from a registry ``{module type: factory}``
-> ``setattr(parent, name, new)``. Wrapped layers share the original Parameters, so the model's
state-dict keys do not move; LoRA only adds ``<module>.lora_A`` / ``<module>.lora_B``.

    model = lorakit.inject(model, LoraConfig(r=8, alpha=16, targets=["query", "value"]))
    print(lorakit.plan(model_copy, cfg))   # dry run: what would be adapted, and what it costs
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import nn

from . import param_targets as _params
from . import tokens as _tokens
from .checks import require_config, takes_model
from .config import ALL_LINEAR, LoraConfig
from .errors import (
    AlreadyInjectedError,
    ArgumentTypeError,
    NotAModuleError,
    TargetNotFoundError,
    UnsupportedModuleError,
)
from .layers import Embedding, LoraConv1d, LoraConv2d, LoraConv3d, LoraLayer, MergedLinear, is_conv1d_like
from .layers import Linear as LoraLinear
from .layers.mha import LoraMultiheadAttention
from .planning import Plan, PlanRow, plan  # noqa: F401 - lorakit.inject.plan stays importable
from .quant import backend as _quant


@dataclass(frozen=True)
class LayerSpec:
    """The resolved LoRA settings of one module."""

    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    init: str
    enable: tuple[bool, ...] | None = None  # fused projection slices
    use_dora: bool = False  # variants (lorakit.variants), applied by build_layers
    lora_bias: bool = False


Factory = Callable[[nn.Module, LayerSpec], LoraLayer]


def _linear_factory(m: nn.Module, s: LayerSpec) -> LoraLayer:
    if s.enable is not None:
        return MergedLinear.from_module(m, s.r, s.alpha, s.dropout, enable_lora=s.enable,
                                        use_rslora=s.use_rslora, init=s.init)
    return LoraLinear.from_module(m, s.r, s.alpha, s.dropout, use_rslora=s.use_rslora, init=s.init)


def _simple(cls: type) -> Factory:
    def make(m: nn.Module, s: LayerSpec) -> LoraLayer:
        if s.enable is not None:
            raise UnsupportedModuleError(f"fused slices need a Linear-like module, not {type(m).__name__}")
        return cls.from_module(m, s.r, s.alpha, s.dropout, use_rslora=s.use_rslora, init=s.init)
    return make


#: Module type -> LoRA factory. Extend with :func:`register_layer`.
REGISTRY: dict[type, Factory] = {
    nn.Linear: _linear_factory,
    nn.Embedding: _simple(Embedding),
    nn.Conv1d: _simple(LoraConv1d),
    nn.Conv2d: _simple(LoraConv2d),
    nn.Conv3d: _simple(LoraConv3d),
    nn.MultiheadAttention: _simple(LoraMultiheadAttention),
}
_CONV1D_NAME = "transformers Conv1D"


def register_layer(module_type: type, factory: Factory) -> None:
    """Teach :func:`inject` a new module type: ``factory(module, spec) -> LoraLayer``."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise NotAModuleError(f"register_layer: expected module_type as a torch.nn.Module subclass "
                              f"(e.g. nn.Linear), got {module_type!r}")
    if not callable(factory):
        raise ArgumentTypeError(f"register_layer: expected factory as a callable (module, spec) -> LoraLayer, "
                                f"got {type(factory).__name__}")
    REGISTRY[module_type] = factory


def supported_types() -> list[str]:
    return [t.__name__ for t in REGISTRY] + [_CONV1D_NAME]


def factory_for(module: nn.Module) -> Factory | None:
    if is_conv1d_like(module):
        return _linear_factory
    if type(module) not in REGISTRY and _quant.is_quantized(module):  # bitsandbytes; subclasses nn.Linear
        from .quant.layer import factory
        return factory
    for t in type(module).__mro__:
        if t in REGISTRY:
            return REGISTRY[t]
    return None


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d_like(module)


@takes_model
def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Every LoRA layer of ``model`` with its qualified name."""
    for name, m in model.named_modules():
        if isinstance(m, LoraLayer):
            yield name, m


# --- matching ----------------------------------------------------------------------------------
def name_matches(name: str, spec: str | tuple[str, ...]) -> bool:
    """PEFT's rule: a string is a regex on the whole name; a list holds exact names or dotted suffixes."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def _closest(names: list[str], target: str, n: int = 5) -> list[str]:
    leaves = sorted({nm.rsplit(".", 1)[-1] for nm in names} | set(names))
    return difflib.get_close_matches(target, leaves, n=n, cutoff=0.3)


@dataclass
class Match:
    name: str
    module: nn.Module
    spec: LayerSpec


def resolve(model: nn.Module, config: LoraConfig) -> list[Match]:
    """The modules ``config`` adapts, with their settings. Validates; never touches the model."""
    names = [n for n, _ in model.named_modules() if n]
    trainable = _resolve_trainable(model, config, names)
    head = _output_head(model)
    skip: list[str] = []
    found: list[Match] = []
    hits: dict[str, int] = {}
    for name, m in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in skip):
            continue
        if isinstance(m, LoraLayer):
            skip.append(name)
        if name in trainable:
            skip.append(name)
            continue
        if config.exclude and name_matches(name, config.exclude):
            continue
        if config.targets == ALL_LINEAR:
            if not is_linear_like(m) or m is head or isinstance(m, LoraLayer):
                continue
        else:
            if not name_matches(name, config.targets):
                continue
            if isinstance(config.targets, tuple):
                for t in config.targets:
                    if name == t or name.endswith("." + t):
                        hits[t] = hits.get(t, 0) + 1  # the target exists (a typo check), even if filtered below
                if name not in config.targets and not config.in_layers(name):
                    continue  # PEFT's layers_to_transform / layers_pattern (suffix matches only)
        if isinstance(m, LoraLayer):
            raise AlreadyInjectedError(f"module {name!r} already has LoRA; unwrap(model) first, or use "
                                       "add_adapter for a second adapter")
        if factory_for(m) is None:
            raise UnsupportedModuleError(f"module {name!r} matches the targets but its type "
                                         f"{type(m).__name__} is not supported; supported: {supported_types()}")
        enable = config.fused_for(name)
        if enable is not None and is_linear_like(m):
            out = m.weight.shape[1] if is_conv1d_like(m) else m.weight.shape[0]
            if out % len(enable):
                from .errors import LoraConfigError
                raise LoraConfigError(f"fused[{name!r}]: {len(enable)} slices do not divide out_features={out}")
        spec = LayerSpec(config.rank_for(name), config.alpha_for(name), config.dropout, config.use_rslora,
                         config.init, enable, config.use_dora, config.lora_bias)
        found.append(Match(name, m, spec))
    _check_coverage(config, names, found, hits)
    return found


def _resolve_trainable(model: nn.Module, config: LoraConfig, names: list[str]) -> set[str]:
    out = set()
    for t in config.trainable:
        got = [n for n in names if n == t or n.endswith("." + t)]
        if not got:
            raise TargetNotFoundError(f"trainable module {t!r} matches no module; closest: {_closest(names, t)}")
        out.update(got)
    return out


def _check_coverage(config: LoraConfig, names: list[str], found: list[Match], hits: dict[str, int]) -> None:
    if isinstance(config.targets, tuple):
        missing = [t for t in config.targets if t not in hits]
        if missing:
            hints = {t: _closest(names, t) for t in missing}
            raise TargetNotFoundError(f"target(s) {missing} match no module of the model; closest names: {hints}")
    elif not found:
        what = "no Linear-like layer" if config.targets == ALL_LINEAR else f"regex {config.targets!r} matches nothing"
        raise TargetNotFoundError(f"{what} in the model; module names look like: {names[:8]}")


# --- inject / unwrap ---------------------------------------------------------------------------
def _set_module(model: nn.Module, name: str, new: nn.Module | None) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if new is None:  # a LoraParameter's to_plain: it removed itself, nothing takes its place
        parent._modules.pop(child, None)
        return
    setattr(parent, child, new)


@takes_model
def inject(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Wrap every module ``config`` targets with a LoRA layer, in place; freeze the rest.

    Trains: LoRA parameters, the modules in ``config.trainable``, and biases per ``config.bias``.
    Raises before changing anything when a target matches nothing, a type is unsupported, or a
    module already has LoRA.
    """
    require_config(config, "inject")
    matches = resolve(model, config)
    pmatches = _params.resolve_parameters(model, config, tuple(m.name for m in matches))  # target_parameters
    tokens = _tokens.resolve_tokens(model, config.trainable_tokens)  # validated before any change
    from . import sharded_inject as _sharded

    sharded = _sharded.is_sharded(matches)  # FSDP2 already ran: lorakit.sharded_inject
    if sharded:
        _sharded.check(model, matches, len(pmatches), tokens)
    built = build_layers(matches, sharded=sharded)  # every layer checked before a weight-rewriting init runs
    if sharded:  # the collective before any change: a rank that fails (timeout) leaves its model as it was
        _sharded.broadcast_new(built)
    pbuilt = _params.build(pmatches, config)
    if not hasattr(model, "_lorakit_requires_grad"):
        model._lorakit_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for name, layer in built:
        _set_module(model, name, layer)
    if sharded:
        _sharded.rebind(model, built, {m.name: m.module for m in matches})
    _params.install(pbuilt)
    _tokens.apply(model, tokens)
    configs = dict(getattr(model, "_lorakit_configs", {}))
    configs["default"] = config
    model._lorakit_configs = configs
    apply_trainable(model, config)
    return model


def _refuse_sharded(matches: list[Match]) -> None:
    """Paths other than :func:`inject` (loading a PEFT directory into a model) do not rebind FSDP2's
    parameter records (:mod:`lorakit.sharded_inject`): refuse a sharded module, naming it, before any change."""
    from .sharded_inject import _dtensor_names

    for m in matches:
        if _dtensor_names(m.module):
            raise UnsupportedModuleError(
                f"module {m.name!r} has DTensor parameters (the model was sharded with fully_shard / FSDP2); "
                "lorakit.inject works on a sharded model, this path does not: inject first, or use an "
                "unsharded copy")


def build_layers(matches: list[Match], sharded: bool = False) -> list[tuple[str, LoraLayer]]:
    """The LoRA layers for ``matches`` (not installed), with their spec's variant and init
    (:func:`lorakit.variants.apply_spec`). Every layer is checked first, so a refusal leaves the
    model's weights untouched (PiSSA / OLoRA rewrite W0). ``sharded``: :func:`inject` checked the
    FSDP2 case itself (:mod:`lorakit.sharded_inject`)."""
    from .variants import apply_spec, check_spec

    if not sharded:
        _refuse_sharded(matches)
    built = [(m.name, factory_for(m.module)(m.module, m.spec), m.spec) for m in matches]
    for name, layer, s in built:
        check_spec(layer, use_dora=s.use_dora, lora_bias=s.lora_bias, init=s.init, where=name)
    for name, layer, s in built:
        apply_spec(layer, use_dora=s.use_dora, lora_bias=s.lora_bias, init=s.init, where=name)
    return [(name, layer) for name, layer, _ in built]


def apply_trainable(model: nn.Module, config: LoraConfig) -> None:
    """Freeze everything but LoRA parameters, ``config.trainable`` modules and biases per ``bias``."""
    from .state import mark_only_lora_as_trainable

    mark_only_lora_as_trainable(model, bias=config.bias)
    names = [n for n, _ in model.named_modules() if n]
    for t in _resolve_trainable(model, config, names):
        for p in model.get_submodule(t).parameters():
            p.requires_grad = True


@takes_model
def unwrap(model: nn.Module) -> nn.Module:
    """Remove every LoRA layer, restoring the original modules (unmerged, bit-exact weights)."""
    for name, layer in list(lora_layers(model)):
        if not name:
            raise UnsupportedModuleError("the model itself is a LoRA layer; call layer.to_plain() instead")
        _set_module(model, name, layer.to_plain())
    _tokens.bake(model, write=False)  # trainable tokens: hooks and rows removed, W0 untouched
    forget_injection(model)
    return model


def forget_injection(model: nn.Module) -> None:
    """Restore the ``requires_grad`` flags recorded by :func:`inject` and drop its bookkeeping."""
    flags = getattr(model, "_lorakit_requires_grad", None)
    if flags is not None:
        for n, p in model.named_parameters():
            if n in flags:
                p.requires_grad = flags[n]
        del model._lorakit_requires_grad
    if hasattr(model, "_lorakit_configs"):
        del model._lorakit_configs
