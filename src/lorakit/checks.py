"""Argument checks shared by the public entry points, so that bad input fails at the door.

* :func:`takes_model` decorates every public function whose first argument is the model: anything
  that is not an ``nn.Module`` instance raises :class:`~lorakit.errors.NotAModuleError` naming the
  function and what it got, instead of an ``AttributeError`` from deep inside.
* :func:`require_path` / :func:`require_config` do the same for a path and a :class:`LoraConfig`.
* :func:`check_finite` refuses tensors holding NaN or inf (read from an adapter, a loralib ``.pt``
  or a training checkpoint), naming each one; ``allow_nonfinite=True`` at the entry point skips it.

Example::

    >>> lorakit.inject("not a model", cfg)
    lorakit.errors.NotAModuleError: inject: expected the model as a torch.nn.Module instance, got str ('not a model')
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import torch
from torch import Tensor, nn

from .errors import ArgumentTypeError, LoraConfigError, NonFiniteTensorError, NotAModuleError

P = ParamSpec("P")
R = TypeVar("R")

__all__ = ["check_finite", "describe_nonfinite", "require_config", "require_module", "require_path", "takes_model"]


def _got(obj: Any) -> str:
    if isinstance(obj, type):
        return f"the class {obj.__name__} itself (pass an instance: {obj.__name__}(...))"
    text = repr(obj)
    return f"{type(obj).__name__} ({text[:60] + '...' if len(text) > 60 else text})"


def require_module(obj: Any, where: str, what: str = "the model") -> None:
    """Raise :class:`NotAModuleError` unless ``obj`` is an ``nn.Module`` instance."""
    if not isinstance(obj, nn.Module):
        raise NotAModuleError(f"{where}: expected {what} as a torch.nn.Module instance, got {_got(obj)}")


def takes_model(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator: check that the first argument (``model``) is an ``nn.Module`` before ``fn`` runs.

    The check runs when the function is called, also for generators and context managers (put it
    below ``@contextlib.contextmanager``); it costs one ``isinstance``.
    """
    where = fn.__name__

    @functools.wraps(fn)
    def checked(*args: P.args, **kwargs: P.kwargs) -> R:
        model = args[0] if args else kwargs.get("model")
        if not isinstance(model, nn.Module):
            require_module(model, where)
        return fn(*args, **kwargs)

    return checked


def require_path(path: Any, where: str, what: str = "path") -> Path:
    """``path`` as a :class:`Path`; a typed error (a ``TypeError``) if it is not a str or ``os.PathLike``."""
    if isinstance(path, (str, os.PathLike)) and not isinstance(path, bytes):
        return Path(path)
    raise ArgumentTypeError(f"{where}: expected {what} as a str or os.PathLike (a file system path), got {_got(path)}")


def require_config(config: Any, where: str) -> None:
    """Raise :class:`LoraConfigError` unless ``config`` is a :class:`lorakit.LoraConfig`."""
    from .config import LoraConfig

    if not isinstance(config, LoraConfig):
        hint = " (build one with lorakit.LoraConfig.from_dict(...))" if isinstance(config, Mapping) else ""
        raise LoraConfigError(f"{where}: expected a lorakit.LoraConfig, got {_got(config)}{hint}")


# --- non-finite tensors ---------------------------------------------------------------------------
def describe_nonfinite(tensors: Mapping[str, Tensor]) -> list[str]:
    """One line per floating-point tensor holding NaN or inf: its name, how many, the first index."""
    lines = []
    for name, t in tensors.items():
        if not isinstance(t, Tensor) or not (t.is_floating_point() or t.is_complex()):
            continue
        bad = ~torch.isfinite(t)
        if not bool(bad.any()):
            continue
        n = int(bad.sum())
        first = [int(i) for i in bad.nonzero()[0]] if t.dim() else []
        value = t[tuple(first)].item() if t.dim() else t.item()
        lines.append(f"{name}: {n} of {t.numel()} values are not finite (first: {value} at {first})")
    return lines


def check_finite(tensors: Mapping[str, Tensor], source: object,
                 error: Callable[[str], Exception] = NonFiniteTensorError,
                 hint: str = "pass allow_nonfinite=True to load them anyway") -> None:
    """Raise ``error`` naming every tensor of ``tensors`` (read from ``source``) that holds NaN or inf."""
    lines = describe_nonfinite(tensors)
    if lines:
        raise error(f"{source}: holds non-finite weights, which would poison the model:\n  " + "\n  ".join(lines)
                    + f"\n({hint})")
