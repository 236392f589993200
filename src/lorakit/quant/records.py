"""The base's quantization as adapter metadata: written into ``adapter_config.json``, compared on load
(a warning) and before a merge (an error).

An adapter trained on a quantized base learned an update against that base's rounding; on a base
quantized differently it still runs, but a merge would fold it into weights it was not fitted to.
``adapter_config.json`` gets one extra key that PEFT ignores (it drops unknown fields)::

    "lorakit_quantization": {"backend": "bitsandbytes", "quant_type": "nf4", "blocksize": 64,
                             "double_quant": true, "modules": 210}

Adapters without the key (PEFT's, or lorakit's on a float base) are not checked.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import QuantMismatchError, QuantMismatchWarning
from . import backend as QB
from . import weights as QW
from .planning import base_module

KEY = "lorakit_quantization"
_COMPARED = ("quant_type", "blocksize", "double_quant")


def describe(model: nn.Module) -> dict[str, Any] | None:
    """The quantization of the adapted layers' bases, or None when none is quantized."""
    from ..inject import lora_layers

    per: dict[str, dict[str, Any]] = {}
    floats: list[str] = []
    for name, layer in lora_layers(model):
        base = base_module(layer)
        if QB.is_quantized(base):
            d = QW.info(base).to_dict()
            d.pop("compute_dtype", None)  # a runtime choice, not the stored weights
            per[name] = d
        elif layer.has_lora:
            floats.append(name)
    if not per:
        return None
    kinds = {json.dumps(v, sort_keys=True) for v in per.values()}
    out: dict[str, Any] = dict(next(iter(per.values()))) if len(kinds) == 1 else {"layers": per}
    out["modules"] = len(per)
    if floats:
        out["float_modules"] = floats
    return out


def record(model: nn.Module, peft_config: dict[str, Any]) -> None:
    """Add :data:`KEY` to a PEFT config dict being saved, when the base is quantized."""
    d = describe(model)
    if d is not None:
        peft_config[KEY] = d


def read(path: str | Path) -> dict[str, Any] | None:
    """The record in an adapter directory's ``adapter_config.json``, or None."""
    try:
        raw = json.loads((Path(path) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    rec = raw.get(KEY) if isinstance(raw, dict) else None
    return rec if isinstance(rec, dict) else None


def differences(rec: dict[str, Any] | None, now: dict[str, Any] | None) -> list[str]:
    """What differs between an adapter's record and the model's quantization (empty: compatible)."""
    if rec is None:
        return []
    if now is None:
        return [f"the adapter was trained on a {rec.get('quant_type', 'quantized')} base, this base is float"]
    if "layers" in rec or "layers" in now:
        a, b = rec.get("layers"), now.get("layers")
        return [] if a == b else [f"per-layer quantization differs: recorded {a or rec}, now {b or now}"]
    return [f"{k}: recorded {rec.get(k)!r}, this base has {now.get(k)!r}"
            for k in _COMPARED if rec.get(k) != now.get(k)]


def after_load(model: nn.Module, path: str | Path, name: str = "default") -> None:
    """Keep the adapter's record on the model and warn when the base is quantized differently."""
    rec = read(path)
    records = dict(getattr(model, "_lorakit_quant_records", {}))
    records[name] = rec
    model._lorakit_quant_records = records
    diffs = differences(rec, describe(model))
    if diffs:
        warnings.warn(QuantMismatchWarning(
            f"adapter {str(path)!r} was trained on a base quantized differently from this model's: "
            + "; ".join(diffs) + ". It runs, but outputs differ from training; merging it raises QuantMismatchError"),
            stacklevel=3)


def check_merge(model: nn.Module, what: str) -> None:
    """Raise :class:`QuantMismatchError` before ``what`` (merge) when a loaded adapter's record and
    the base's quantization differ. Nothing has changed when it raises."""
    records = getattr(model, "_lorakit_quant_records", None)
    if not records:
        return
    now = describe(model)
    for name, rec in records.items():
        diffs = differences(rec, now)
        if diffs:
            raise QuantMismatchError(
                f"{what}: adapter {name!r} was recorded on a base quantized differently from this model's: "
                + "; ".join(diffs) + ". Load the adapter onto the base it was trained on, or call "
                "lorakit.quant.forget_records(model) to merge anyway")


def forget_records(model: nn.Module) -> None:
    """Drop the adapters' quantization records (merging then skips the check)."""
    if hasattr(model, "_lorakit_quant_records"):
        del model._lorakit_quant_records
