"""Adapters on disk: PEFT's layout both ways, loralib ``.pt`` checkpoints, atomic writes.

A saved adapter is a directory with ``adapter_config.json`` (PEFT's fields) and
``adapter_model.safetensors`` (keys ``base_model.model.<module>.lora_A.weight`` (r, in) and
``.lora_B.weight`` (out, r); ``lora_embedding_A/B`` for embeddings), which
``peft.PeftModel.from_pretrained`` loads. lorakit's own config rides along in the safetensors
metadata so that a round trip keeps what PEFT cannot express (fused q/k/v slices).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from . import param_targets as _params
from . import tokens as _tokens
from .atomic import atomic_dir
from .checks import check_finite, require_path
from .config import LoraConfig
from .errors import (
    AdapterFormatError,
    AdapterMismatchError,
    AdapterNotFoundError,
    AlreadyInjectedError,
    LoraConfigError,
    LoraError,
    TargetNotFoundError,
    UnsupportedModuleError,
)
from .inject import _set_module, apply_trainable, build_layers, lora_layers, resolve
from .layers import Embedding, LoraLayer, MergedLinear
from .peft_layout import PREFIX, dense_to_fused, peft_name, peft_tensors, split_key, to_layer_layout
from .variants import attach, is_weight_init

_split_key = split_key  # lorakit.adapters.named_io reads formats._split_key
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_REQUIRED = ("r", "lora_alpha", "target_modules")


# --- save -----------------------------------------------------------------------------------------
def adapter_state(model: nn.Module, config: LoraConfig) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and PEFT config fields that :func:`save_adapter` writes."""
    tensors: dict[str, Tensor] = {}
    ranks, alphas, names, fifo, params = {}, {}, [], False, []
    for name, layer in lora_layers(model):
        if not layer.has_lora:
            continue
        pname = peft_name(model, name)
        pkey = _params.param_key(layer, name)  # target_parameters: rank/alpha patterns use the parameter's name
        if pkey is not None:
            params.append(pkey)
        elif pname == name:  # an MHA's out_proj is adapted by targeting the MHA, as in PEFT
            names.append(name)
        fifo = fifo or bool(getattr(layer, "fan_in_fan_out", False))
        for suffix, t in peft_tensors(layer).items():
            tensors[f"{PREFIX}{pname}.{suffix}"] = t.contiguous()
        a_key = "lora_embedding_A" if isinstance(layer, Embedding) else "lora_A.weight"
        r_file = layer.r if pkey else tensors[f"{PREFIX}{pname}.{a_key}"].shape[0]  # a parameter's A: r * experts
        alpha = layer.lora_alpha * (r_file / layer.r if not layer.use_rslora else math.sqrt(r_file / layer.r))
        if r_file != config.r:
            ranks[pkey or name] = r_file
        if alpha != config.alpha:
            alphas[pkey or name] = alpha
        if config.bias == "lora_only" and layer._bias_param() is not None:
            tensors[f"{PREFIX}{name}.base_layer.bias"] = layer._bias_param().detach()
    if not names and not params:
        raise LoraError("the model has no LoRA layers to save; call lorakit.inject(model, config) first")
    sd = model.state_dict()
    if config.bias == "all":
        for k, v in sd.items():
            if k.endswith("bias"):
                mod = k.rpartition(".")[0]
                key = f"{PREFIX}{mod}.base_layer.bias" if mod in names else PREFIX + k
                tensors[key] = v
    modules = [n for n, _ in model.named_modules() if n]
    for t in config.trainable:
        for mod in (n for n in modules if n == t or n.endswith("." + t)):
            for k, v in sd.items():
                if k.startswith(mod + ".") and "lora_" not in k:
                    tensors[PREFIX + k] = v
    token_idx = {}
    for mod_name, m in _tokens.token_modules(model).items():  # trainable tokens, PEFT's key
        tensors[f"{PREFIX}{mod_name}.{_tokens.PEFT_SUFFIX}"] = m._parameters[_tokens.DELTA].detach()
        token_idx[mod_name] = _tokens.indices_of(m)
    peft = config.to_peft_dict(fan_in_fan_out=fifo, ranks=ranks)
    peft["trainable_token_indices"] = token_idx or None
    peft["target_modules"] = names  # explicit names: PEFT then adapts exactly what we did
    peft["target_parameters"] = params or None
    peft["exclude_modules"] = None
    peft["alpha_pattern"] = alphas
    return tensors, peft


def save_adapter_dir(model: nn.Module, path: str | os.PathLike, config: LoraConfig | None = None,
                     base_model_name: str | None = None) -> Path:
    """Write the model's current adapter (the layers' ``lora_A`` / ``lora_B``) as a PEFT directory,
    atomically (a crash leaves the old one intact). Names are :func:`lorakit.save_adapter`'s concern.
    """
    config = config or _model_config(model)
    tensors, peft = adapter_state(model, config)
    peft["base_model_name_or_path"] = base_model_name
    from .quant import records as QR

    QR.record(model, peft)  # "lorakit_quantization" when the base is quantized (PEFT ignores the key)
    meta = {"format": "pt", "lorakit_config": config.to_json()}
    path = Path(path)

    def fill(tmp: Path) -> None:
        (tmp / CONFIG_NAME).write_text(json.dumps(peft, indent=2, sort_keys=True))
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_NAME), meta)

    atomic_dir(path, fill)
    return path


def _model_config(model: nn.Module) -> LoraConfig:
    configs = getattr(model, "_lorakit_configs", None)
    if configs and "default" in configs:
        return configs["default"]
    layers = [(n, l) for n, l in lora_layers(model) if l.has_lora]
    if not layers:
        raise LoraError("the model has no LoRA layers to save; call lorakit.inject(model, config) first")
    _, first = layers[0]
    return LoraConfig(r=first.r, alpha=first.lora_alpha, targets=tuple(n for n, _ in layers))


# --- read -----------------------------------------------------------------------------------------
def read_adapter(path: str | os.PathLike, *, allow_nonfinite: bool = False) -> tuple[LoraConfig, dict[str, Tensor]]:
    """Read and validate an adapter directory: its config and tensors (PEFT keys).

    Tensors holding NaN or inf raise :class:`~lorakit.errors.NonFiniteTensorError` naming each
    one, unless ``allow_nonfinite=True``.
    """
    path = require_path(path, "read_adapter", "the adapter directory")
    if not path.exists():
        raise AdapterNotFoundError(f"adapter path {str(path)!r} does not exist")
    if path.is_file():
        raise AdapterFormatError(f"{path}: expected an adapter directory holding {CONFIG_NAME} and {WEIGHTS_NAME}"
                                 " (for a loralib .pt checkpoint use load_loralib_checkpoint)")
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise AdapterFormatError(f"{path}: no {CONFIG_NAME}; an adapter directory holds "
                                 f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise AdapterFormatError(f"{cfg_path}: expected a JSON object of PEFT LoraConfig fields")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise AdapterFormatError(f"{cfg_path}: missing required field(s) {missing}")
    tensors, meta = _read_tensors(path)
    try:
        config = LoraConfig.from_dict({k: v for k, v in raw.items() if k != "lorakit_quantization"})
        if meta.get("lorakit_config"):
            config = LoraConfig.from_json(meta["lorakit_config"])
    except LoraConfigError as e:
        raise AdapterFormatError(f"{cfg_path}: {e}") from None
    if not allow_nonfinite:
        check_finite(tensors, path)
    return config, tensors


def _read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    st = path / WEIGHTS_NAME
    if st.is_file():
        try:
            with safe_open(str(st), framework="pt") as f:
                meta = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise AdapterFormatError(f"{st}: truncated or corrupt safetensors file ({e})") from None
    binf = path / "adapter_model.bin"
    if binf.is_file():
        try:
            sd = torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a format error
            raise AdapterFormatError(f"{binf}: not a tensors-only checkpoint ({e})") from None
        return dict(sd), {}
    raise AdapterFormatError(f"{path}: no {WEIGHTS_NAME} (or adapter_model.bin) next to {CONFIG_NAME}")


# --- load -----------------------------------------------------------------------------------------
def load_adapter_dir(model: nn.Module, path: str | os.PathLike, *, allow_nonfinite: bool = False) -> nn.Module:
    """Load a PEFT or lorakit adapter directory into ``model`` as its first ("default") adapter,
    injecting LoRA as needed. Everything is validated (modules exist, shapes and ranks fit, no
    unexpected keys, finite values unless ``allow_nonfinite``) before the model is touched; every
    problem is reported at once. Named adapters and loralib ``.pt`` files: :func:`lorakit.load_adapter`."""
    config, tensors = read_adapter(path, allow_nonfinite=allow_nonfinite)
    problems: list[str] = []
    try:
        params = _params.take_from_file(model, config, tensors, PREFIX, problems)  # pops target_parameters' keys
    except (TargetNotFoundError, UnsupportedModuleError, AlreadyInjectedError) as e:
        raise AdapterMismatchError(f"{path}: the adapter does not fit this model: {e}") from None
    token_rows = {split_key(k)[0].removesuffix("." + _tokens.PEFT_SUFFIX): tensors.pop(k)
                  for k in [k for k in tensors if k.endswith(_tokens.PEFT_SUFFIX)]}
    per_module: dict[str, dict[str, Tensor]] = {}
    extras: dict[str, Tensor] = {}
    for key, t in tensors.items():
        mod, kind = split_key(key)
        if kind:
            per_module.setdefault(mod, {})[kind] = t
        else:
            extras[mod] = t
    if not per_module and not params and not problems:
        raise AdapterFormatError(f"{path}: holds no LoRA tensors (keys like {PREFIX}<module>.lora_A.weight)")
    existing = dict(lora_layers(model))
    new_layers: dict[str, LoraLayer] = {}
    to_inject = [m for m in per_module if m not in existing]
    if to_inject:
        ranks = {}
        for m in to_inject:
            a = per_module[m].get("lora_A.weight", per_module[m].get("lora_embedding_A"))
            if a is None:
                problems.append(f"{m}: has lora_B but no lora_A")
                continue
            ranks[m] = a.shape[0] // max(1, sum(config.fused_for(m) or (True,)))
        specs = LoraConfig(
            r=config.r, alpha=config.alpha, dropout=config.dropout, targets=tuple(ranks), bias=config.bias,
            trainable=config.trainable, rank_pattern={rf"{_escape(m)}": r for m, r in ranks.items()},
            alpha_pattern={_escape(m): _alpha_at(config, m, r) for m, r in ranks.items()}, use_rslora=config.use_rslora,
            init="kaiming" if is_weight_init(config.init) or "loftq" in config.init else config.init,  # keep W0
            fused={_escape(m): v for m, v in config.fused.items() if _any_match(m, ranks)},
            use_dora=config.use_dora, lora_bias=config.lora_bias)
        try:
            matches = resolve(model, specs) if ranks else []
        except (TargetNotFoundError, LoraConfigError) as e:
            raise AdapterMismatchError(f"{path}: the adapter does not fit this model: {e}") from None
        try:
            new_layers.update(build_layers([mt for mt in matches if mt.name in ranks]))
            for name, layer in new_layers.items():  # PEFT writes grouped convolutions in its own layout
                if isinstance(layer, nn.modules.conv._ConvNd) and layer.groups != 1:
                    attach(layer, "peft_groups", name)
        except LoraError as e:
            raise AdapterMismatchError(f"{path}: the adapter does not fit this model: {e}") from None
    layers = {**{m: existing[m] for m in per_module if m in existing}, **new_layers}
    for m, ts in per_module.items():
        layer = layers.get(m)
        if layer is None:
            if not any(p.startswith(m) for p in problems):
                problems.append(f"{m}: no such module in the model")
            continue
        want = peft_tensors(layer)
        for kind, t in ts.items():
            if kind not in want:
                problems.append(f"{m}.{kind}: unexpected for a {type(layer).__name__} (expects {sorted(want)})")
            elif tuple(t.shape) != tuple(want[kind].shape):
                problems.append(f"{m}.{kind}: shape {tuple(t.shape)} in the file, "
                                f"the model needs {tuple(want[kind].shape)}")
            elif not t.is_floating_point():
                problems.append(f"{m}.{kind}: dtype {t.dtype} is not a floating-point type")
        for kind in want:
            if kind not in ts:
                problems.append(f"{m}.{kind}: missing from the file")
    sd_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k, t in extras.items():
        if k not in sd_shapes:
            problems.append(f"{k}: unexpected key, the model has no such parameter")
        elif tuple(t.shape) != sd_shapes[k]:
            problems.append(f"{k}: shape {tuple(t.shape)} in the file, the model has {sd_shapes[k]}")
    tokens = _check_tokens(model, config, token_rows, problems)
    if problems:
        raise AdapterMismatchError(f"{path}: adapter does not fit the model:\n  " + "\n  ".join(problems))
    # --- all checks passed: now change the model -------------------------------------------------
    if new_layers or params:
        if not hasattr(model, "_lorakit_requires_grad"):
            model._lorakit_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for name, layer in new_layers.items():
            _set_module(model, name, layer)
    _params.copy_loaded(params)
    with torch.no_grad():
        for m, ts in per_module.items():
            layer = layers[m]
            was_merged = layer.merged
            layer.unmerge()
            a = ts.get("lora_A.weight", ts.get("lora_embedding_A"))
            b = ts.get("lora_B.weight", ts.get("lora_embedding_B"))
            if isinstance(layer, MergedLinear):
                a, b = dense_to_fused(layer, a, b)
            layer.lora_A.copy_(to_layer_layout(layer, "A", a))
            layer.lora_B.copy_(to_layer_layout(layer, "B", b))
            variant = layer.__dict__.get("lora_variant")
            if variant is not None:
                variant.load_peft_tensors(layer, ts)
            if was_merged:
                layer.merge()
        _tokens.apply(model, tokens)
        for m, t in token_rows.items():
            model.get_submodule(m)._parameters[_tokens.DELTA].copy_(t)
        if extras:
            params = dict(model.named_parameters())
            bufs = dict(model.named_buffers())
            for k, t in extras.items():
                (params.get(k) if k in params else bufs[k]).copy_(t)
    configs = dict(getattr(model, "_lorakit_configs", {}))
    configs.setdefault("default", config)
    model._lorakit_configs = configs
    if new_layers or any(is_new for _, is_new, _, _ in params.values()):
        apply_trainable(model, config)
    from .quant import records as QR

    QR.after_load(model, path)  # warns when the adapter was trained on a differently quantized base
    return model


def _check_tokens(model: nn.Module, config: LoraConfig, rows: dict[str, Tensor],
                  problems: list[str]) -> dict[str, tuple[int, ...]]:
    """Trainable-token rows in the file against ``config.trainable_tokens`` and the model."""
    try:
        tokens = _tokens.resolve_tokens(model, config.trainable_tokens)
    except LoraError as e:
        problems.append(f"trainable_token_indices: {e}")
        return {}
    for m, t in rows.items():
        if m not in tokens:
            problems.append(f"{m}.{_tokens.PEFT_SUFFIX}: no trainable_token_indices entry for {m!r} in the config")
        elif tuple(t.shape) != (len(tokens[m]), model.get_submodule(m).weight.shape[1]):
            problems.append(f"{m}.{_tokens.PEFT_SUFFIX}: shape {tuple(t.shape)}, the model needs "
                            f"({len(tokens[m])}, {model.get_submodule(m).weight.shape[1]})")
    problems.extend(f"{m}.{_tokens.PEFT_SUFFIX}: missing from the file" for m in tokens if m not in rows)
    return tokens


def _alpha_at(config: LoraConfig, module: str, r_file: int) -> float:
    """The alpha that keeps ``config``'s scaling at the file's rank (a grouped conv is written at rank r * groups)."""
    r_cfg, alpha = config.rank_for(module), config.alpha_for(module)
    if r_file == r_cfg:
        return alpha
    return alpha * (math.sqrt(r_file / r_cfg) if config.use_rslora else r_file / r_cfg)


def _escape(name: str) -> str:
    import re

    return re.escape(name)


def _any_match(pattern: str, names: Mapping[str, int]) -> bool:
    return any(n == pattern or n.endswith("." + pattern) for n in names)
