"""Saving and loading adapters by name: the public ``save_adapter`` / ``load_adapter``.

A model with one adapter ("default") reads and writes through :mod:`lorakit.formats` directly;
further named adapters are staged and committed through :mod:`.manage`, checked before the model
changes. :mod:`lorakit.formats` itself knows nothing of names (no import cycle).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import formats
from .. import param_targets as _params
from ..checks import require_path, takes_model
from ..config import LoraConfig
from ..errors import (
    AdapterFormatError,
    AdapterMismatchError,
    AlreadyInjectedError,
    LoraConfigError,
    TargetNotFoundError,
    UnsupportedModuleError,
)
from ..inject import (
    LayerSpec,
)
from ..layers import MergedLinear
from ..loralib_io import load_loralib_checkpoint
from .manage import _commit, _stage
from .registry import DEFAULT, Slot, _check_known, _check_new_name, _pointed, _refresh, _registry

__all__ = ["load_adapter", "load_named_adapter", "save_adapter", "save_named_adapter"]


@takes_model
def save_adapter(model: nn.Module, path: str | os.PathLike, config: LoraConfig | None = None,
                 base_model_name: str | None = None, *, name: str | None = None) -> Path:
    """Write the model's adapter as a PEFT directory, atomically (a crash leaves the old one intact).

    ``name`` picks one of several adapters (:mod:`lorakit.adapters`); default: the active one. An
    existing directory at ``path`` is replaced; an existing regular file raises
    :class:`~lorakit.errors.OutputPathError` and is left as it was.
    """
    require_path(path, "save_adapter", "the adapter directory")
    reg = model.__dict__.get("_lorakit_registry")
    if name is not None or (reg is not None and tuple(reg.active) != (DEFAULT,)):
        return save_named_adapter(model, path, name=name, base_model_name=base_model_name)
    return formats.save_adapter_dir(model, path, config, base_model_name)


@takes_model
def load_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None, *,
                 allow_nonfinite: bool = False) -> nn.Module:
    """Load a PEFT or lorakit adapter directory into ``model``, injecting LoRA as needed.

    Everything is validated (modules exist, shapes and ranks fit, no unexpected keys, no NaN or inf
    unless ``allow_nonfinite=True``) before the model is touched; every problem is reported at once.
    ``name`` loads it as a further named adapter (:mod:`lorakit.adapters`) instead of the first,
    "default" one. A ``.pt`` / ``.pth`` file is read as a loralib checkpoint
    (:func:`lorakit.load_loralib_checkpoint`).
    """
    p = require_path(path, "load_adapter", "the adapter path")
    if name is None and p.suffix in (".pt", ".pth") and p.is_file():
        return load_loralib_checkpoint(model, path, allow_nonfinite=allow_nonfinite)
    if name is not None or "_lorakit_registry" in model.__dict__:
        return load_named_adapter(model, path, name=name, allow_nonfinite=allow_nonfinite)
    return formats.load_adapter_dir(model, path, allow_nonfinite=allow_nonfinite)


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
        return formats.save_adapter_dir(model, path, reg.configs[name], base_model_name)


def load_named_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None, *,
                       allow_nonfinite: bool = False) -> nn.Module:
    """Load a PEFT/lorakit adapter directory as adapter ``name`` (None or "default": the core's load).

    Every module, shape and dtype is checked before the model changes; a file written for a base
    model of other shapes raises :class:`AdapterMismatchError`.
    """
    if name is None or name == DEFAULT:
        reg = model.__dict__.get("_lorakit_registry")
        if reg is None:
            return formats.load_adapter_dir(model, path, allow_nonfinite=allow_nonfinite)
        with _pointed(reg, DEFAULT):
            formats.load_adapter_dir(model, path, allow_nonfinite=allow_nonfinite)
        reg.configs = model.__dict__["_lorakit_configs"]
        _refresh(model, reg)
        return model
    reg = _registry(model)
    _check_new_name(reg, name)
    config, tensors = formats.read_adapter(path, allow_nonfinite=allow_nonfinite)
    problems: list[str] = []
    try:  # target_parameters: PEFT's nested base_layer keys, taken out first
        params = _params.read_pairs(model, config, tensors, formats.PREFIX, problems)
    except (TargetNotFoundError, UnsupportedModuleError, AlreadyInjectedError) as e:
        raise AdapterMismatchError(f"{path}: the adapter does not fit this model: {e}") from None
    per_module: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        mod, kind = formats._split_key(key)
        if not kind:
            raise AdapterFormatError(f"{path}: {key}: named adapters hold LoRA tensors only")
        per_module.setdefault(mod, {})[kind] = t
    if not per_module and not params and not problems:
        raise AdapterFormatError(f"{path}: holds no LoRA tensors")
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
        staged = _stage(model, name, config, init=False, exact=(specs, modules), params=params)
    except (TargetNotFoundError, LoraConfigError, UnsupportedModuleError) as e:
        raise AdapterMismatchError(f"{path}: the adapter does not fit this model: {e}") from None
    values: dict[str, tuple[Tensor, Tensor]] = {}
    for m, (layer, slot) in staged.slots.items():
        if m not in per_module:  # a parameter's slot: filled from the file by _stage
            continue
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
        _check_extras(m, layer, slot, ts, problems)
    if problems:
        raise AdapterMismatchError(f"{path}: adapter does not fit the model:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for m, (a, b) in values.items():
            layer, slot = staged.slots[m]
            slot.A.copy_(a.reshape(slot.A.shape))
            slot.B.copy_(b.reshape(slot.B.shape))
            if slot.variant is not None:
                slot.variant.load_peft_tensors(layer, per_module[m])
    staged.config = config
    _commit(model, reg, staged)
    return model


_PAIR_KINDS = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")


def _check_extras(m: str, layer: nn.Module, slot: Slot, ts: dict[str, Tensor], problems: list[str]) -> None:
    """A named adapter's tensors beyond A/B: DoRA's magnitude exactly when the config says use_dora."""
    want = slot.variant.peft_tensors(layer) if slot.variant is not None else {}
    for kind, t in ts.items():
        if kind in _PAIR_KINDS:
            continue
        if kind not in want:
            problems.append(f"{m}.{kind}: unexpected for a named adapter (expects {sorted(want) or 'A/B only'}; "
                            "a DoRA magnitude needs use_dora=true in adapter_config.json)")
        elif t.numel() != want[kind].numel() or not t.is_floating_point():
            problems.append(f"{m}.{kind}: {tuple(t.shape)} {t.dtype} in the file, the model needs "
                            f"{tuple(want[kind].shape)} floating point")
    for kind in want:
        if kind not in ts:
            problems.append(f"{m}.{kind}: missing from the file (use_dora=true)")


def _dense_to_fused_pair(layer: MergedLinear, r: int, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    rows = layer.out_features // len(layer.enable_lora)
    parts = [B[s * rows:(s + 1) * rows, j * r:(j + 1) * r]
             for j, s in enumerate(i for i, e in enumerate(layer.enable_lora) if e)]
    return A, torch.cat(parts, 0)
