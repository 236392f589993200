"""The one owner of the server's adapters: names, paths, residency (LRU) and pins.

::

    pool = AdapterPool(model, adapter_dir="adapters", max_loaded=8)
    pool.register("sql", "adapters/sql")          # or found on demand: adapters/<name>/
    pool.pin("sql")                                # a request queued / running on it (API thread)
    slot = pool.ensure_resident("sql")             # engine thread: loads, evicting the LRU unused one
    pool.unpin("sql")

API names map to internal lorakit adapter names (``lk1``, ``lk2``...), so any ``lora_name`` works.
Paths from the API must lie under ``--adapter-dir`` after resolving ``..`` and symlinks (the
directory and the files read from it), else :class:`AdapterPathError` (403); files are read by
:func:`lorakit.load_adapter` (safetensors or tensors-only checkpoints, every shape checked, NaN
refused). At most ``max_loaded`` adapters sit on the model; the least recently used one with no
running row is deleted when another must load, and loads again when asked for. Model changes
(load, delete) happen on the engine thread only; the bookkeeping is guarded by one lock.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import lorakit

from .errors import (
    AdapterExistsError,
    AdapterInUseError,
    AdapterLoadError,
    AdapterPathError,
    InvalidRequestError,
    ModelNotFoundError,
)

#: Files :func:`lorakit.load_adapter` may read inside an adapter directory.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
_COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")


@dataclass
class AdapterEntry:
    """A known adapter: where it comes from and whether / as what it sits on the model."""

    name: str
    path: Path
    source: str                  # "startup", "api" or "dir" (found under --adapter-dir on demand)
    internal: str | None = None  # lorakit adapter name while resident
    pins: int = 0                # requests queued or running on it
    rows: int = 0                # rows of the running batch using it


class AdapterPool:
    """Adapter registry + LRU residency on one model (see the module docstring)."""

    def __init__(self, model: nn.Module, adapter_dir: str | os.PathLike | None = None, max_loaded: int = 8,
                 on_change: Callable[[str, float], None] | None = None) -> None:
        if max_loaded < 1:
            raise InvalidRequestError(f"max_loaded must be >= 1, got {max_loaded}", param="max_loaded")
        self.model = model
        self.root = Path(adapter_dir).resolve() if adapter_dir is not None else None
        self.max_loaded = max_loaded
        self.entries: dict[str, AdapterEntry] = {}
        self.resident: OrderedDict[str, AdapterEntry] = OrderedDict()  # LRU order, oldest first
        self.lock = threading.RLock()
        self.on_change = on_change or (lambda event, seconds: None)
        self._counter = 0

    # --- names and paths (any thread) ---------------------------------------------------------
    def _inside(self, p: Path) -> bool:
        assert self.root is not None
        real = Path(os.path.realpath(p))
        return real == self.root or self.root in real.parents

    def check_path(self, path: str | os.PathLike) -> Path:
        """``path`` (relative: to ``--adapter-dir``) resolved, refused with 403 if it leads outside."""
        if self.root is None:
            raise AdapterPathError("loading adapters through the API needs the server started with --adapter-dir",
                                   param="lora_path")
        p = Path(path)
        p = p if p.is_absolute() else self.root / p
        if not self._inside(p):
            raise AdapterPathError(f"lora_path {str(path)!r} is outside the adapter directory {str(self.root)!r}",
                                   param="lora_path")
        for f in ADAPTER_FILES:
            if (p / f).exists() and not self._inside(p / f):
                raise AdapterPathError(f"lora_path {str(path)!r}: {f} links outside the adapter directory",
                                       param="lora_path")
        if not (p / "adapter_config.json").is_file():
            raise ModelNotFoundError(f"lora_path {str(path)!r}: no adapter directory (adapter_config.json) there",
                                     param="lora_path")
        if not (p / "adapter_model.safetensors").is_file():
            raise AdapterLoadError(f"lora_path {str(path)!r}: the server loads adapter_model.safetensors only "
                                   "(no pickled .bin files)", param="lora_path")
        return Path(os.path.realpath(p))

    def register(self, name: str, path: str | os.PathLike, *, trusted: bool = False, source: str = "api") -> None:
        """Make ``name`` known (not loaded yet); ``trusted`` paths (start-up flags) skip the directory check."""
        if not isinstance(name, str) or not name or len(name) > 256:
            raise InvalidRequestError("lora_name must be a non-empty string of at most 256 characters",
                                      param="lora_name")
        p = Path(path).resolve() if trusted else self.check_path(path)
        with self.lock:
            if name in self.entries:
                raise AdapterExistsError(f"adapter {name!r} is already known (unload it first)", param="lora_name")
            self.entries[name] = AdapterEntry(name, p, source)

    def lookup(self, name: str) -> AdapterEntry:
        """The entry for a request's ``model``; an adapter under ``--adapter-dir`` is registered on demand."""
        with self.lock:
            e = self.entries.get(name)
            if e is not None:
                return e
            if self.root is not None and _COMPONENT.fullmatch(name) and ".." not in name:
                cand = self.root / name
                try:
                    path = self.check_path(cand)
                except (AdapterPathError, ModelNotFoundError):
                    path = None
                if path is not None:
                    e = self.entries[name] = AdapterEntry(name, path, "dir")
                    return e
        raise ModelNotFoundError(f"the model {name!r} does not exist; adapters: {self.available()}", param="model")

    def names(self) -> list[str]:
        with self.lock:
            return list(self.entries)

    def available(self) -> list[str]:
        """Known adapters plus the not yet registered ones under ``--adapter-dir``."""
        out = self.names()
        if self.root is not None and self.root.is_dir():
            for d in sorted(self.root.iterdir()):
                if d.name not in out and (d / "adapter_config.json").is_file() and _COMPONENT.fullmatch(d.name):
                    out.append(d.name)
        return out

    # --- pins (any thread) --------------------------------------------------------------------
    def pin(self, name: str) -> AdapterEntry:
        with self.lock:
            e = self.lookup(name)
            e.pins += 1
            return e

    def unpin(self, e: AdapterEntry) -> None:
        with self.lock:
            e.pins -= 1

    # --- the model (engine thread only) -------------------------------------------------------
    def ensure_resident(self, e: AdapterEntry) -> str | None:
        """The internal name of ``e`` on the model, loading it (and evicting) if needed.

        None when every resident adapter has running rows and none can make room (retry later).
        Raises :class:`AdapterLoadError` when the files do not load (:func:`lorakit.load_adapter` checks
        shapes and refuses NaN/inf before the model changes); the entry is then forgotten.
        """
        with self.lock:
            if e.internal is not None:
                self.resident.move_to_end(e.name)
                return e.internal
            if len(self.resident) >= self.max_loaded:
                victim = next((v for v in self.resident.values() if v.rows == 0), None)
                if victim is None:
                    return None
                self._delete(victim)
                self.on_change("evict", 0.0)
            self._counter += 1
            internal = f"lk{self._counter}"
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    lorakit.load_adapter(self.model, e.path, name=internal)
            except lorakit.LoraError as exc:
                self.entries.pop(e.name, None)
                raise AdapterLoadError(f"adapter {e.name!r} at {str(e.path)!r} does not load: {exc}",
                                       param="model") from None
            e.internal = internal
            self.resident[e.name] = e
            self.on_change("load", time.perf_counter() - t0)
            return internal

    def _drop_active(self, internal: str) -> None:
        others = [v.internal for v in self.resident.values() if v.internal and v.internal != internal]
        if others:
            lorakit.set_adapter(self.model, others[0])
        else:
            _deactivate(self.model)
        lorakit.delete_adapter(self.model, internal)

    def _delete(self, e: AdapterEntry) -> None:
        assert e.internal is not None
        if e.internal in lorakit.active_adapters(self.model):
            self._drop_active(e.internal)
        else:
            lorakit.delete_adapter(self.model, e.internal)
        e.internal = None
        self.resident.pop(e.name, None)

    def unload(self, name: str) -> None:
        """Forget ``name`` and delete it from the model; 409 while requests use it (engine thread)."""
        with self.lock:
            e = self.entries.get(name)
            if e is None:
                raise ModelNotFoundError(f"no adapter named {name!r}; known: {self.names()}", param="lora_name")
            if e.pins or e.rows:
                raise AdapterInUseError(f"adapter {name!r} is used by {e.pins} queued or running request(s); "
                                        "retry when they have finished", param="lora_name", retry_after=1.0)
            if e.internal is not None:
                self._delete(e)
                self.on_change("unload", 0.0)
            del self.entries[name]

    def resident_names(self) -> list[str]:
        with self.lock:
            return list(self.resident)


def _deactivate(model: nn.Module) -> None:
    """No active adapter (lorakit keeps the last loaded one active; delete_adapter refuses the active one)."""
    try:
        from lorakit.adapters import _deactivate as deact
        from lorakit.adapters import _registry
    except ImportError:  # after the package split
        from lorakit.adapters.registry import _deactivate as deact  # type: ignore[no-redef]
        from lorakit.adapters.registry import _registry
    deact(model, _registry(model))
