"""The flag / config-file machinery behind every subcommand's config dataclass.

A field declared with :func:`opt` *is* a command-line flag (``max_len`` <-> ``--max-len``) and a key
of a ``--config`` TOML/YAML/JSON file; :class:`BaseConfig` registers the flags, reads the file,
coerces values to the field types and checks declared choices and bounds (precedence: defaults <
file < command-line flags). The configs themselves are in :mod:`lorakit.train.config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, TypeVar

from lorakit.train.errors import TrainConfigError

C = TypeVar("C", bound="BaseConfig")


def opt(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
) -> Any:
    """A config field: default, help text, optional choices and numeric bounds (checked by validate)."""
    meta = {"help": help, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag(name: str) -> str:
    """Field name -> command-line flag."""
    return "--" + name.replace("_", "-")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of an annotation such as ``int | None`` or ``list[str]``."""
    args = typing.get_args(tp)
    if type(None) in args:
        inner = [a for a in args if a is not type(None)][0]
        return inner, True
    return tp, False


class BaseConfig:
    """Shared behaviour: argparse registration, file loading, coercion and validation."""

    @classmethod
    def hints(cls) -> dict[str, Any]:
        return typing.get_type_hints(cls)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Register one flag per field (default SUPPRESS, so only given flags reach the namespace)."""
        parser.add_argument(
            "--config",
            metavar="FILE",
            default=argparse.SUPPRESS,
            help="TOML (.toml) or YAML (.yaml/.yml) file whose keys are these flags' names "
            "(dashes or underscores); flags given on the command line override it",
        )
        hints = cls.hints()
        own = set(vars(cls).get("__annotations__", {}))
        fields = sorted(dataclasses.fields(cls), key=lambda f: f.name not in own)  # type: ignore[arg-type]
        for f in fields:
            tp, _ = _base_type(hints[f.name])
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            text = f.metadata["help"] + (f" (default: {default})" if default not in (None, [], "") else "")
            kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": text, "dest": f.name}
            if tp is bool:
                kw["action"] = argparse.BooleanOptionalAction
            elif typing.get_origin(tp) is list:
                kw.update(nargs="+", metavar="X")
            else:
                kw["type"] = tp
                if f.metadata["choices"]:
                    kw["choices"] = f.metadata["choices"]
            parser.add_argument(flag(f.name), **kw)

    @classmethod
    def from_sources(cls: type[C], args: argparse.Namespace) -> C:
        """Build from defaults, then ``--config`` file, then explicit flags; validate the result."""
        values: dict[str, Any] = {}
        cfg_file = getattr(args, "config", None)
        if cfg_file:
            values.update(cls.read_file(cfg_file))
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        values.update({k: v for k, v in vars(args).items() if k in names})
        return cls.build(values)

    @classmethod
    def read_file(cls, path: str | Path) -> dict[str, Any]:
        """Read a TOML/YAML config; unknown keys raise naming the key and the file."""
        p = Path(path)
        if not p.is_file():
            raise TrainConfigError(f"--config: file not found: {p}")
        try:
            if p.suffix == ".toml":
                import tomllib

                raw = tomllib.loads(p.read_text(encoding="utf-8"))
            elif p.suffix in (".yaml", ".yml"):
                import yaml

                raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
            elif p.suffix == ".json":
                raw = json.loads(p.read_text(encoding="utf-8"))
            else:
                raise TrainConfigError(f"--config: {p} must end in .toml, .yaml, .yml or .json")
        except TrainConfigError:
            raise
        except Exception as exc:
            raise TrainConfigError(f"--config: cannot parse {p}: {exc}") from exc
        if not isinstance(raw, dict):
            raise TrainConfigError(f"--config: {p} must hold a table / mapping of flag names to values")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        out: dict[str, Any] = {}
        for key, val in raw.items():
            name = str(key).replace("-", "_")
            if name not in names:
                raise TrainConfigError(f"{p}: unknown key {key!r}; valid keys: {', '.join(sorted(names))}")
            out[name] = val
        return out

    @classmethod
    def build(cls: type[C], values: dict[str, Any]) -> C:
        """Coerce values to the field types and validate (errors name the flag)."""
        hints = cls.hints()
        kw = {k: _coerce(k, v, hints[k]) for k, v in values.items()}
        obj = cls(**kw)
        obj.validate()
        return obj

    def validate(self) -> None:
        """Check choices and numeric bounds declared on the fields; subclasses add cross-field checks."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            val, m = getattr(self, f.name), f.metadata
            if val is None:
                continue
            if m["choices"] and val not in m["choices"]:
                raise TrainConfigError(f"{flag(f.name)}: {val!r} is not one of {', '.join(m['choices'])}")
            if m["lo"] is not None and (val < m["lo"] or (m["lo_open"] and val == m["lo"])):
                rel = ">" if m["lo_open"] else ">="
                raise TrainConfigError(f"{flag(f.name)}: must be {rel} {m['lo']}, got {val}")
            if m["hi"] is not None and val > m["hi"]:
                raise TrainConfigError(f"{flag(f.name)}: must be <= {m['hi']}, got {val}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


def _coerce(name: str, val: Any, tp: Any) -> Any:
    inner, optional = _base_type(tp)
    if val is None:
        if optional:
            return None
        raise TrainConfigError(f"{flag(name)}: a value is required")
    try:
        if inner is bool:
            if isinstance(val, bool):
                return val
            if str(val).lower() in ("true", "1", "yes", "false", "0", "no"):
                return str(val).lower() in ("true", "1", "yes")
            raise ValueError
        if typing.get_origin(inner) is list:
            items = val.split(",") if isinstance(val, str) else list(val)
            return [str(x).strip() for x in items if str(x).strip()]
        if inner is int:
            if isinstance(val, float) and not val.is_integer():
                raise ValueError
            return int(val)
        if inner is float:
            return float(val)
        return str(val)
    except (TypeError, ValueError):
        tname = getattr(inner, "__name__", str(inner))
        raise TrainConfigError(f"{flag(name)}: expected {tname}, got {val!r}") from None
