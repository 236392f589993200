"""`LoraConfig`: what to adapt and how, as a frozen, validated dataclass.

It reads and writes PEFT's `adapter_config.json` one to one, and accepts PEFT's field names
(`lora_alpha`, `lora_dropout`, `target_modules`, `modules_to_save`, `exclude_modules`) as aliases::

    cfg = LoraConfig(r=8, alpha=16, targets=["query", "value"], trainable=["classifier"])
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])      # same thing
    cfg = dataclasses.replace(cfg, r=4)                                               # never mutate
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import LoraConfigError

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = ("kaiming", "gaussian", "random", "pissa", "pissa_niter_<K>", "olora", "loftq", "loftq_iter_<T>")
_INIT_RE = re.compile(r"kaiming|gaussian|random|pissa|pissa_niter_[1-9][0-9]*|olora|loftq|loftq_iter_[1-9][0-9]*")

#: PEFT name -> lorakit name.
ALIASES = {
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "targets",
    "modules_to_save": "trainable",
    "exclude_modules": "exclude",
    "init_lora_weights": "init",
    "trainable_token_indices": "trainable_tokens",
}

# PEFT `LoraConfig` fields that carry no weight semantics: read and ignored.
_PEFT_METADATA = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
    "revision", "inference_mode", "fan_in_fan_out",
}
# PEFT features lorakit does not implement: accepted only at their "off" value.
_PEFT_UNSUPPORTED = {
    "megatron_config", "megatron_core",
    "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "velora_config", "alora_invocation_tokens", "use_qalora", "qalora_group_size",
    "monteclora_config", "layer_replication", "runtime_config",
    "use_bdlora", "arrow_config", "kasa_config", "ensure_weight_tying",
}
_OFF_VALUES = (None, False, {}, [], "megatron.core", 16, {"ephemeral_gpu_offload": False})


def _loftq_init(cfg: Any) -> str:
    """PEFT's ``loftq_config`` as a lorakit init string (the bit width is chosen by ``quantize_base``)."""
    if not isinstance(cfg, Mapping) or set(cfg) - {"loftq_bits", "loftq_iter"}:
        raise LoraConfigError(f"loftq_config: expected {{'loftq_bits': 4 | 8, 'loftq_iter': T}}, got {cfg!r}")
    bits, it = cfg.get("loftq_bits", 4), cfg.get("loftq_iter", 1)
    if bits not in (4, 8) or not _is_int(it) or it < 1:
        raise LoraConfigError(f"loftq_config: loftq_bits must be 4 or 8 and loftq_iter >= 1, got {cfg!r}")
    return "loftq" if it == 1 else f"loftq_iter_{it}"


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_pos_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@dataclass(frozen=True)
class LoraConfig:
    """Where LoRA goes and how it is shaped (paper Section 4.1).

    Args:
        r: rank of the update BA; the paper finds 1-8 enough (Section 7.2).
        alpha: the update is scaled by ``alpha / r`` (or ``alpha / sqrt(r)`` with ``use_rslora``),
            so changing ``r`` does not force re-tuning the learning rate.
        dropout: dropout on the LoRA path's input, in [0, 1).
        targets: module names to adapt: a list of exact names or dotted suffixes
            (``"query"`` matches ``encoder.layer.0.attention.self.query``), a regular expression
            string matched against the whole name, or ``"all-linear"`` (every Linear-like layer
            except the output head).
        exclude: names (same syntax as ``targets``) never adapted.
        bias: ``"none"``, ``"all"`` (train every bias) or ``"lora_only"`` (biases of adapted layers).
        trainable: modules trained fully and saved with the adapter (a classifier head).
        rank_pattern: ``{name or regex: r}`` per-module rank overrides.
        alpha_pattern: ``{name or regex: alpha}`` per-module alpha overrides.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        init: ``"kaiming"`` (A Kaiming-uniform, B zero: the paper's choice), ``"gaussian"``
            (A normal with std 1/r, B zero), ``"random"`` (B random too: the adapter does not start
            at the base model; for tests), or ``"pissa"`` / ``"pissa_niter_<K>"`` / ``"olora"``
            (principal part of W0 into A, B; the residual stays in W0: :mod:`lorakit.variants.init`),
            or ``"loftq"`` / ``"loftq_iter_<T>"`` (LoftQ: :func:`lorakit.quantize_base` fits the
            quantized base and A, B together, :mod:`lorakit.quant.loftq`).
        fused: ``{name: [bool, ...]}`` for fused projections (one Linear holding q, k, v): only the
            enabled equal slices of the output get LoRA, as loralib's ``MergedLinear``.
        use_dora: DoRA (arXiv:2402.09353), a trainable magnitude per output: :mod:`lorakit.variants.dora`.
        lora_bias: a trainable bias on B (PEFT's ``lora_bias``), merged into the base bias.
        layers_to_transform: only modules in these layer indices (PEFT's rule: the first ``.<n>.``
            in the name, or the one after ``layers_pattern``); applies to list ``targets`` matched by suffix.
        layers_pattern: the name of the layer list (``"layers"``, ``"h"``), a string or a list of them.
        trainable_tokens: embedding rows to train (PEFT's ``trainable_token_indices``): a list for the
            input embedding, or ``{module name: [indices]}`` (:mod:`lorakit.tokens`).
        target_parameters: bare 2-D / 3-D parameters to adapt (PEFT's field: full names or dotted
            suffixes, ``["experts.gate_up_proj"]``): Mixture-of-Experts weights stored as one tensor
            (:mod:`lorakit.layers.param`). Given without ``targets``, no module is targeted. As in PEFT,
            not with dropout > 0, DoRA, LoRA bias or a weight-rewriting init.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: str | tuple[str, ...] = ("q_proj", "v_proj")
    exclude: str | tuple[str, ...] = ()
    bias: str = "none"
    trainable: tuple[str, ...] = ()
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    init: str = "kaiming"
    fused: Mapping[str, tuple[bool, ...]] = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    trainable_tokens: tuple[int, ...] | Mapping[str, tuple[int, ...]] | None = None
    target_parameters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if isinstance(self.targets, str):
            pass
        elif isinstance(self.targets, Sequence):
            set_(self, "targets", tuple(self.targets))
        else:
            raise LoraConfigError(f"targets: expected a list of names, a regex or 'all-linear', got {self.targets!r}")
        if isinstance(self.exclude, str) or self.exclude is None:
            set_(self, "exclude", self.exclude or ())
        else:
            set_(self, "exclude", tuple(self.exclude))
        set_(self, "trainable", tuple(self.trainable or ()))
        tp = self.target_parameters
        if isinstance(tp, str) or not isinstance(tp, Sequence | None):
            raise LoraConfigError(f"target_parameters: expected a list of parameter names, got {tp!r}")
        set_(self, "target_parameters", tuple(tp or ()))
        set_(self, "rank_pattern", dict(self.rank_pattern or {}))
        set_(self, "alpha_pattern", dict(self.alpha_pattern or {}))
        set_(self, "fused", {k: tuple(bool(b) for b in v) for k, v in (self.fused or {}).items()})
        if isinstance(self.layers_to_transform, Sequence) and not isinstance(self.layers_to_transform, str):
            set_(self, "layers_to_transform", tuple(self.layers_to_transform) or None)
        tt = self.trainable_tokens
        if isinstance(tt, Mapping):
            set_(self, "trainable_tokens", {str(k): tuple(v) for k, v in tt.items()} or None)
        elif isinstance(tt, Sequence) and not isinstance(tt, str):
            set_(self, "trainable_tokens", tuple(tt) or None)
        elif tt is not None:
            raise LoraConfigError(f"trainable_tokens: expected a list of token ids or {{module: [ids]}}, got {tt!r}")
        if isinstance(self.layers_pattern, Sequence) and not isinstance(self.layers_pattern, str):
            set_(self, "layers_pattern", tuple(self.layers_pattern) or None)
        if self.init is True:
            set_(self, "init", "kaiming")
        elif self.init is False:
            set_(self, "init", "random")
        self.validate()

    def validate(self) -> None:
        """Raise :class:`LoraConfigError` naming the first bad field."""
        check_rank(self.r, "r")
        check_alpha(self.alpha, "alpha")
        check_dropout(self.dropout, "dropout")
        if not self.targets and not self.target_parameters:
            raise LoraConfigError("targets: empty; name at least one module, a regex, or 'all-linear' "
                                  "(or parameters in target_parameters)")
        self._check_target_parameters()
        if isinstance(self.targets, tuple):
            for t in self.targets:
                if not isinstance(t, str) or not t:
                    raise LoraConfigError(f"targets: every entry must be a non-empty string, got {t!r}")
        if isinstance(self.targets, str) and self.targets != ALL_LINEAR:
            _check_regex(self.targets, "targets")
        if isinstance(self.exclude, str):
            _check_regex(self.exclude, "exclude")
        if self.bias not in BIAS_MODES:
            raise LoraConfigError(f"bias: {self.bias!r} is not one of {BIAS_MODES}")
        if not isinstance(self.init, str) or not _INIT_RE.fullmatch(self.init):
            raise LoraConfigError(f"init: {self.init!r} is not one of {INIT_MODES}")
        for flag in ("use_dora", "lora_bias"):
            if not isinstance(getattr(self, flag), bool):
                raise LoraConfigError(f"{flag}: expected True or False, got {getattr(self, flag)!r}")
        lt, lp = self.layers_to_transform, self.layers_pattern
        if lt is not None and not (_is_int(lt) or all(_is_int(i) for i in lt)):
            raise LoraConfigError(f"layers_to_transform: expected an int or a list of ints, got {lt!r}")
        if lp is not None and not (isinstance(lp, str) or all(isinstance(p, str) and p for p in lp)):
            raise LoraConfigError(f"layers_pattern: expected a name or a list of names, got {lp!r}")
        if lp and lt is None:
            raise LoraConfigError("layers_pattern needs layers_to_transform (as in PEFT)")
        if lt is not None and isinstance(self.targets, str):
            raise LoraConfigError("layers_to_transform cannot be used when targets is a regex or 'all-linear' "
                                  "(as in PEFT); put the layer index in the regex instead")
        if self.use_dora and self.lora_bias:
            raise LoraConfigError("use_dora=True with lora_bias=True: DoRA has no LoRA bias (PEFT refuses it too)")
        if self.use_dora and self.init.startswith("loftq"):
            raise LoraConfigError(f"use_dora=True with init={self.init!r}: DoRA's magnitude is the norm of W0 at "
                                  "inject, and LoftQ replaces W0 later in quantize_base; use one of them")
        if self.lora_bias and self.init not in ("kaiming", "random"):
            raise LoraConfigError(f"lora_bias=True works with init 'kaiming' or 'random' (as PEFT), got {self.init!r}")
        if not isinstance(self.use_rslora, bool):
            raise LoraConfigError(f"use_rslora: expected True or False, got {self.use_rslora!r}")
        for k, v in self.rank_pattern.items():
            check_rank(v, f"rank_pattern[{k!r}]")
        for k, v in self.alpha_pattern.items():
            check_alpha(v, f"alpha_pattern[{k!r}]")
        for k, v in self.fused.items():
            if not v or not any(v):
                raise LoraConfigError(f"fused[{k!r}]: needs at least one True slice, got {list(v)}")

    def _check_target_parameters(self) -> None:
        """PEFT's limits for parameter targets (its ParamWrapper refuses the same, for the whole config)."""
        for t in self.target_parameters:
            if not isinstance(t, str) or not t:
                raise LoraConfigError(f"target_parameters: every entry must be a non-empty string, got {t!r}")
        if not self.target_parameters:
            return
        refused = {"dropout": self.dropout > 0, "use_dora": self.use_dora, "lora_bias": self.lora_bias,
                   "init": self.init not in ("kaiming", "gaussian", "random")}
        bad = [k for k, v in refused.items() if v]
        if bad:
            raise LoraConfigError(f"{bad[0]}={getattr(self, bad[0])!r} with target_parameters: LoRA on a bare "
                                  "parameter is a weight update, so it takes no dropout, DoRA, LoRA bias or "
                                  "pissa/olora init (PEFT refuses these too)")

    # --- alias-aware construction -------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LoraConfig:
        """Build from lorakit or PEFT field names; unknown fields raise, naming them."""
        kw: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, loftq = [], None
        for k, v in d.items():
            key = ALIASES.get(k, k)
            if key in names:
                if key in kw:
                    raise LoraConfigError(f"field {key!r} given twice (as {k!r} and its alias)")
                kw[key] = v
            elif k in _PEFT_METADATA:
                if k == "peft_type" and v not in (None, "LORA"):
                    raise LoraConfigError(f"peft_type: lorakit reads LORA adapters, got {v!r}")
            elif k == "loftq_config" and v:
                loftq = _loftq_init(v)
            elif k in _PEFT_UNSUPPORTED:
                if not any(v == off and type(v) is type(off) for off in _OFF_VALUES):
                    raise LoraConfigError(f"{k}={v!r}: this PEFT feature is not supported by lorakit")
            else:
                unknown.append(k)
        if unknown:
            valid = sorted(names | set(ALIASES) | _PEFT_METADATA)
            raise LoraConfigError(f"unknown config field(s) {unknown}; valid fields: {valid}")
        if kw.get("targets") is None and "targets" in kw and kw.get("target_parameters"):
            kw["targets"] = ()  # PEFT: parameters only
        if kw.get("targets") is None and "targets" in kw:
            raise LoraConfigError("targets/target_modules: missing (null); name the modules to adapt")
        if loftq is not None or kw.get("init") == "loftq":
            if kw.get("init") != "loftq":
                raise LoraConfigError("loftq_config is given but init_lora_weights is not 'loftq'")
            kw["init"] = loftq or "loftq"
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = self.targets if isinstance(self.targets, str) else list(self.targets)
        d["exclude"] = self.exclude if isinstance(self.exclude, str) else list(self.exclude)
        d["trainable"] = list(self.trainable)
        d["target_parameters"] = list(self.target_parameters)
        d["fused"] = {k: list(v) for k, v in self.fused.items()}
        tt = self.trainable_tokens
        d["trainable_tokens"] = {k: list(v) for k, v in tt.items()} if isinstance(tt, Mapping) else _listed(tt)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LoraConfig:
        return cls.from_dict(json.loads(text))

    def to_peft_dict(self, *, fan_in_fan_out: bool = False, base_model: str | None = None,
                     task_type: str | None = None, ranks: Mapping[str, int] | None = None) -> dict[str, Any]:
        """PEFT's `adapter_config.json` fields for this config."""
        init: Any = {"kaiming": True, "random": False}.get(self.init, self.init)
        if isinstance(init, str) and init.startswith("loftq"):
            init = True  # trained LoftQ factors are a plain adapter on the quantized base (PEFT would re-fit them)
        return {
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": base_model,
            "inference_mode": True,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.targets if isinstance(self.targets, str) else list(self.targets),
            "exclude_modules": (self.exclude if isinstance(self.exclude, str) else list(self.exclude)) or None,
            "bias": self.bias,
            "fan_in_fan_out": fan_in_fan_out,
            "modules_to_save": list(self.trainable) or None,
            "rank_pattern": dict(ranks if ranks is not None else self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "use_rslora": self.use_rslora,
            "init_lora_weights": init,
            "use_dora": self.use_dora,
            "lora_bias": self.lora_bias,
            "layers_to_transform": _listed(self.layers_to_transform),
            "layers_pattern": _listed(self.layers_pattern),
            "trainable_token_indices": self.to_dict()["trainable_tokens"],
            "target_parameters": list(self.target_parameters) or None,
        }

    # --- per-module resolution -----------------------------------------------------------------
    def rank_for(self, name: str) -> int:
        return int(_pattern_lookup(self.rank_pattern, name, self.r))

    def alpha_for(self, name: str) -> float:
        return _pattern_lookup(self.alpha_pattern, name, self.alpha)

    def in_layers(self, name: str) -> bool:
        """PEFT's ``layers_to_transform`` rule for a module name (True when no layer filter is set)."""
        if self.layers_to_transform is None:
            return True
        if not self.layers_pattern:
            m = re.match(r".*?\.[^.]*\.(\d+)\.", name)
        else:
            pats = (self.layers_pattern,) if isinstance(self.layers_pattern, str) else self.layers_pattern
            m = next((mm for p in pats if (mm := re.match(rf"(?:^|.*?\.){p}\.(\d+)\.", name))), None)
        if m is None:
            return False
        idx = int(m.group(1))
        lt = self.layers_to_transform
        return idx == lt if _is_int(lt) else idx in lt

    def fused_for(self, name: str) -> tuple[bool, ...] | None:
        return _pattern_lookup(self.fused, name, None)


def _init_with_aliases(self: LoraConfig, *args: Any, **kwargs: Any) -> None:
    for alias, key in ALIASES.items():
        if alias in kwargs:
            if key in kwargs:
                raise LoraConfigError(f"field {key!r} given twice (as {alias!r} and {key!r})")
            kwargs[key] = kwargs.pop(alias)
    if kwargs.get("target_parameters") and "targets" not in kwargs and len(args) < 4:
        kwargs["targets"] = ()  # parameters only (PEFT users write target_modules=[] for this)
    try:
        _dataclass_init(self, *args, **kwargs)
    except TypeError as e:
        valid = sorted({f.name for f in dataclasses.fields(LoraConfig)} | set(ALIASES))
        raise LoraConfigError(f"{e}; valid fields: {valid}") from None


_dataclass_init = LoraConfig.__init__
LoraConfig.__init__ = _init_with_aliases  # type: ignore[method-assign]


def _listed(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _pattern_lookup(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """PEFT semantics: a key matches a module whose name ends with it (as a dotted suffix or regex)."""
    for key, value in patterns.items():
        if name == key or name.endswith("." + key) or re.fullmatch(rf"(.*\.)?(?:{key})", name):
            return value
    return default


def _check_regex(pattern: str, field_name: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        raise LoraConfigError(f"{field_name}: {pattern!r} is not a valid regular expression ({e})") from None


def check_rank(r: Any, what: str = "r") -> None:
    if not _is_int(r) or r <= 0:
        raise LoraConfigError(f"{what}: the rank must be a positive int, got {r!r}")


def check_alpha(alpha: Any, what: str = "alpha") -> None:
    if not _is_pos_number(alpha):
        raise LoraConfigError(f"{what}: lora_alpha must be a positive finite number, got {alpha!r}")


def check_dropout(p: Any, what: str = "dropout") -> None:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p < 1.0:
        raise LoraConfigError(f"{what}: lora_dropout must be a number in [0, 1), got {p!r}")
