"""``target_parameters``: which bare parameters a config adapts, and their place in PEFT's files.

::

    cfg = LoraConfig(r=4, alpha=8, target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    lorakit.inject(moe_model, cfg)        # LoraParameter layers as <owner>.lora_gate_up_proj, ...

Matching is PEFT's: every parameter registered directly on a module (registration order) whose
full name equals an entry or ends with ``.<entry>``. PEFT wraps the owner once per adapted
parameter, the first-registered innermost, so its file keys are ``<owner>.lora_A.weight`` for the
owner's last adapted parameter and one ``.base_layer`` more for each one before it
(``<owner>.base_layer.lora_A.weight``): :func:`peft_path` gives that path for a layer, and
:func:`take_from_file` reads the tensors back from it. The layers themselves: :mod:`lorakit.layers.param`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import LoraConfig
from .errors import AlreadyInjectedError, TargetNotFoundError, UnsupportedParameterError
from .layers import LoraLayer
from .layers.param import LoraParameter, param_pair_shapes

__all__ = ["ParamMatch", "build", "install", "layer_for", "param_key", "peft_path", "read_pairs", "resolve_parameters",
           "take_from_file"]


@dataclass
class ParamMatch:
    """One parameter to adapt: its full name, owner module and settings."""

    key: str  # "model.layers.0.mlp.experts.gate_up_proj"
    owner_name: str
    owner: nn.Module
    param_name: str
    r: int
    alpha: float


def _matches(key: str, targets: tuple[str, ...]) -> str | None:
    return next((t for t in targets if key == t or key.endswith("." + t)), None)


def resolve_parameters(model: nn.Module, config: LoraConfig, module_targets: tuple[str, ...] = (), *,
                       allow_existing: bool = False) -> list[ParamMatch]:
    """The parameters ``config.target_parameters`` names, validated; never touches the model.

    ``module_targets``: names of modules the same config wraps (a parameter of one of them is refused).
    ``allow_existing``: a parameter that already has its layer matches (loading into it) instead of raising.
    Raises :class:`TargetNotFoundError` for an entry matching no parameter, :class:`UnsupportedParameterError`
    for one that is not a 2-D / 3-D floating tensor or sits on the top-level module, and
    :class:`AlreadyInjectedError` for a parameter already adapted or inside a LoRA layer.
    """
    targets = tuple(config.target_parameters)
    if not targets:
        return []
    found: list[ParamMatch] = []
    hits: set[str] = set()
    all_keys: list[str] = []
    for mod_name, module in model.named_modules():
        if isinstance(module, LoraParameter):
            continue
        for pname, p in module._parameters.items():
            if p is None:
                continue
            key = f"{mod_name}.{pname}" if mod_name else pname
            all_keys.append(key)
            t = _matches(key, targets)
            if t is None:
                continue
            hits.add(t)
            if not mod_name:
                raise UnsupportedParameterError(f"target_parameters: {key!r} is registered on the top-level model; "
                                                "adapt a parameter of a submodule (PEFT refuses this too)")
            if isinstance(module, LoraLayer) or mod_name in module_targets:
                raise AlreadyInjectedError(f"target_parameters: {key!r} belongs to the LoRA-adapted module "
                                           f"{mod_name!r}; target either the module or its parameter")
            if isinstance(module._modules.get("lora_" + pname), LoraParameter):
                if allow_existing:
                    found.append(ParamMatch(key, mod_name, module, pname, config.rank_for(key), config.alpha_for(key)))
                    continue
                raise AlreadyInjectedError(f"target_parameters: {key!r} already has LoRA; unwrap(model) first")
            if "lora_" + pname in module.__dict__ or "lora_" + pname in module._modules:
                raise UnsupportedParameterError(f"target_parameters: {key!r}: its owner already has an "
                                                f"attribute 'lora_{pname}', where the LoRA layer would go")
            if p.dim() not in (2, 3) or not p.is_floating_point():
                raise UnsupportedParameterError(
                    f"target_parameters: {key!r} has shape {tuple(p.shape)} and dtype {p.dtype}; LoRA on a "
                    "parameter needs a 2-D (out, in) or 3-D (experts, ., .) floating-point tensor")
            found.append(ParamMatch(key, mod_name, module, pname, config.rank_for(key), config.alpha_for(key)))
    missing = [t for t in targets if t not in hits]
    if missing:
        hints = {t: difflib.get_close_matches(t, all_keys + sorted({k.rsplit(".", 1)[-1] for k in all_keys}),
                                              n=4, cutoff=0.3) for t in missing}
        raise TargetNotFoundError(f"target_parameters {missing} match no parameter of the model; closest: {hints}")
    return found


def build(matches: list[ParamMatch], config: LoraConfig) -> list[tuple[str, LoraParameter]]:
    """The layers for ``matches`` (not installed), named ``<owner>.lora_<param>``."""
    out = []
    for m in matches:
        layer = LoraParameter.from_parameter(m.owner, m.param_name, m.r, m.alpha, use_rslora=config.use_rslora,
                                             init=config.init, where=m.key)
        out.append((f"{m.owner_name}.{layer.child_name}", layer))
    return out


def install(layers: list[tuple[str, LoraParameter]]) -> None:
    for _, layer in layers:
        layer.install()


# --- PEFT's file layout --------------------------------------------------------------------------
def param_key(layer: LoraLayer, name: str) -> str | None:
    """The full parameter name a LoRA layer adapts (``None`` for module layers)."""
    if not isinstance(layer, LoraParameter):
        return None
    return name[: -len(layer.child_name)] + layer.param_name


def _depth(owner: nn.Module, param_name: str, adapted: set[str]) -> int:
    order = [n for n in owner._parameters if n in adapted]
    return len(order) - 1 - order.index(param_name)


def peft_path(owner_name: str, owner: nn.Module, param_name: str, adapted: set[str] | None = None) -> str:
    """PEFT's module path for the LoRA of ``owner.<param_name>`` (``adapted``: the owner's adapted
    parameters; default: those whose installed layer has the selected adapter)."""
    if adapted is None:
        adapted = {n for n in owner._parameters if isinstance(lay := owner._modules.get("lora_" + n), LoraParameter)
                   and lay.has_lora}  # a named adapter's file: the parameters that adapter adapts
    return owner_name + ".base_layer" * _depth(owner, param_name, adapted)


def layer_peft_path(name: str, layer: LoraParameter) -> str:
    owner_name = name[: -len(layer.child_name) - 1]
    return peft_path(owner_name, layer.owner, layer.param_name)


def _tensor(tensors: dict[str, Tensor], prefix: str, path: str, which: str) -> tuple[str, Tensor] | None:
    for key in (f"{prefix}{path}.lora_{which}.weight", f"{prefix}{path}.lora_{which}.default.weight"):
        if key in tensors:
            return key, tensors[key]
    return None


def read_pairs(model: nn.Module, config: LoraConfig, tensors: dict[str, Tensor], prefix: str,
               problems: list[str]) -> list[tuple[ParamMatch, Tensor, Tensor]]:
    """Pop the parameter targets' A and B out of a file's ``tensors``, checked against ``config``'s ranks.

    Problems (missing or misshapen tensors) are appended to ``problems``; an entry that matches no
    adaptable parameter raises :func:`resolve_parameters`'s error. The model is not touched.
    """
    if not config.target_parameters:
        return []
    matches = resolve_parameters(model, config, allow_existing=True)  # the caller reports its errors
    by_owner: dict[int, set[str]] = {}
    for m in matches:
        by_owner.setdefault(id(m.owner), set()).add(m.param_name)
    out = []
    for m in matches:
        path = peft_path(m.owner_name, m.owner, m.param_name, by_owner[id(m.owner)])
        a, b = _tensor(tensors, prefix, path, "A"), _tensor(tensors, prefix, path, "B")
        for found in (a, b):  # taken even when its partner is missing: it is no module's tensor
            if found is not None:
                tensors.pop(found[0])
        if a is None or b is None:
            problems.append(f"{m.key}: no {prefix}{path}.lora_A.weight / lora_B.weight in the file "
                            "(PEFT's key for this parameter)")
            continue
        w = m.owner._parameters[m.param_name]
        transposed = w.dim() == 3 and bool(getattr(m.owner, "is_transposed", False))
        a_shape, b_shape = param_pair_shapes(tuple(w.shape), m.r, transposed)
        ok = True
        for which, t, want in (("lora_A", a[1], a_shape), ("lora_B", b[1], b_shape)):
            if tuple(t.shape) != want:
                problems.append(f"{m.key}.{which}: shape {tuple(t.shape)} in the file, the model needs {want}")
                ok = False
            elif not t.is_floating_point():
                problems.append(f"{m.key}.{which}: dtype {t.dtype} is not a floating-point type")
                ok = False
        if ok:
            out.append((m, a[1], b[1]))
    return out


def layer_for(m: ParamMatch, config: LoraConfig) -> tuple[LoraParameter, bool]:
    """The parameter's installed layer, or a new one (built, not installed): ``(layer, is_new)``."""
    layer = m.owner._modules.get("lora_" + m.param_name)
    if isinstance(layer, LoraParameter):
        return layer, False
    return LoraParameter.from_parameter(m.owner, m.param_name, m.r, m.alpha, use_rslora=config.use_rslora,
                                        where=m.key), True


def take_from_file(model: nn.Module, config: LoraConfig, tensors: dict[str, Tensor], prefix: str,
                   problems: list[str]) -> dict[str, tuple[LoraParameter, bool, Tensor, Tensor]]:
    """:func:`read_pairs` for the model's first adapter: ``{parameter name: (layer, is_new, A, B)}``;
    new layers are built but not installed, an installed one must have the file's shapes."""
    out: dict[str, tuple[LoraParameter, bool, Tensor, Tensor]] = {}
    for m, a, b in read_pairs(model, config, tensors, prefix, problems):
        layer, is_new = layer_for(m, config)
        if not is_new and (layer.lora_A is None or tuple(layer.lora_A.shape) != tuple(a.shape)):
            have = None if layer.lora_A is None else tuple(layer.lora_A.shape)
            problems.append(f"{m.key}.lora_A: shape {tuple(a.shape)} in the file, the installed layer has {have}")
            continue
        out[m.key] = (layer, is_new, a, b)
    return out


def copy_loaded(loaded: dict[str, tuple[LoraParameter, bool, Tensor, Tensor]]) -> None:
    """Install the new layers and copy the file's A and B (after every check passed)."""
    with torch.no_grad():
        for layer, is_new, a, b in loaded.values():
            if is_new:
                layer.install()
            was_merged = layer.merged
            layer.unmerge()
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
            if was_merged:
                layer.merge()
