"""Atomic, resumable checkpoints: trainable weights, optimizer, scheduler, RNG states and position.

Files are written to a temporary name in the same directory, fsync'ed, then renamed over the old
one (and the directory fsync'ed), so a kill -9 at any moment leaves either the old or the new
checkpoint, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lorakit.atomic import atomic_write
from lorakit.checks import check_finite
from lorakit.train import distributed as dd
from lorakit.train.errors import ResumeError, UnsafeCheckpointError

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
# Options that may change between a run and its resumption without changing its results.
NON_RESULT_KEYS = frozenset(
    {"resume", "overwrite", "progress", "output_dir", "eval_batch_size", "gen_max_mrs", "save_every", "log_every"}
)


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` with the atomic protocol."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_json(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write pretty JSON atomically."""
    atomic_write(path, lambda fh: fh.write(json.dumps(obj, indent=2, sort_keys=True, default=str)), mode="w")


def fingerprint(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Hash of the options that determine a run's results, and those options."""
    keep = {k: v for k, v in sorted(config.items()) if k not in NON_RESULT_KEYS}
    digest = hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return digest, keep


def check_resumable(state: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """Raise :class:`ResumeError` naming the differing options if ``state`` came from another config."""
    digest, keep = fingerprint(config)
    require_same_config(state, digest, keep, path)


def require_same_config(state: dict[str, Any], digest: str, keep: dict[str, Any], path: Path) -> None:
    """Raise :class:`ResumeError` listing each option whose value differs, unless the fingerprints agree."""
    if state.get("fingerprint") == digest:
        return
    old = state.get("config", {})
    diffs = [
        f"--{k.replace('_', '-')}: checkpoint {old.get(k)!r} vs now {keep.get(k)!r}"
        for k in sorted((set(old) | set(keep)) - NON_RESULT_KEYS)
        if old.get(k) != keep.get(k)
    ]
    if old and not diffs:  # a checkpoint that hashed an option now known not to change results
        return
    raise ResumeError(
        f"cannot --resume from {path}: it was written by a different config ("
        + ("; ".join(diffs) or "unknown difference")
        + ")"
    )


def run_position(
    step: int, best: dict[str, Any], config_key: tuple[str, dict[str, Any]], rngs: list[Any], sched: Any
) -> dict[str, Any]:
    """What every checkpoint (plain or DCP) records besides the weights: the step, the config it
    belongs to (``config_key``: :func:`fingerprint`'s pair), the best eval, each rank's RNG, the schedule."""
    digest, keep = config_key
    return {
        "step": step,
        "fingerprint": digest,
        "config": keep,
        "best": best,
        "rng": rngs,
        "scheduler": sched.state_dict(),
    }


def save(
    run_dir: Path, step: int, best: dict[str, Any], model: torch.nn.Module, opt: torch.optim.Optimizer,
    sched: Any, config: dict[str, Any], ctx: dd.DistContext,
) -> None:
    """Write ``checkpoint.pt`` (rank 0: trainable weights, AdamW state, position). Collective: a failure on
    rank 0 raises :class:`~lorakit.train.errors.SaveError` on every rank (the previous file is intact)."""
    rngs = dd.gather_objects(ctx, rng_state())
    dest = run_dir / CHECKPOINT
    dd.rank0_save(ctx, lambda: atomic_save(
        {
            **run_position(step, best, fingerprint(config), rngs, sched),
            "trainable": trainable_state(model),
            "optimizer": opt.state_dict(),
        },
        dest,
    ), f"writing the checkpoint {dest}", dest)


def restore(state: dict[str, Any], model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any,
            rank: int) -> None:
    """Put a loaded ``checkpoint.pt`` back: weights, AdamW state, schedule and this rank's RNG."""
    load_trainable_state(model, state["trainable"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][rank])


def save_best(path: Path, step: int, metrics: dict[str, Any], trainable: dict[str, torch.Tensor]) -> None:
    """Write ``best.pt``: the step, its eval metrics and the trainable weights (plain or gathered FSDP)."""
    atomic_save({"step": step, "metrics": metrics, "trainable": trainable}, path)


def load(path: Path) -> dict[str, Any]:
    """Load a checkpoint file (``checkpoint.pt``, ``best.pt``) as CPU tensors and plain data only
    (``weights_only=True``: a file whose pickle would build other objects or call code raises
    :class:`UnsafeCheckpointError` and nothing of it runs); NaN or inf in its weights or optimizer
    state raise :class:`ResumeError` naming each tensor (resuming would train on from a diverged state)."""
    if not path.is_file():
        raise ResumeError(f"no checkpoint at {path}; start the run without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            raise ResumeError(f"checkpoint {path} is unreadable: {exc}") from exc
        raise UnsafeCheckpointError(
            f"checkpoint {path} holds Python objects other than tensors and plain data, refused "
            f"(torch.load weights_only=True; lorakit never writes such objects): {str(exc).splitlines()[-1]}"
        ) from None
    except Exception as exc:
        raise ResumeError(f"checkpoint {path} is unreadable: {exc}") from exc
    check_finite(_tensors(state), path, ResumeError,
                 hint="the run diverged before this checkpoint was written; start over with --overwrite")
    return state


def _tensors(state: Any) -> dict[str, torch.Tensor]:
    """A checkpoint's weights and optimizer-state tensors, by readable names."""
    out: dict[str, torch.Tensor] = {}
    if not isinstance(state, dict):
        return out
    out.update({f"trainable.{k}": v for k, v in (state.get("trainable") or {}).items()})
    for i, slots in ((state.get("optimizer") or {}).get("state") or {}).items():
        out.update({f"optimizer.state.{i}.{k}": v for k, v in slots.items() if isinstance(v, torch.Tensor)})
    return out


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of every parameter with ``requires_grad``."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def copy_into_parameters(model: torch.nn.Module, state: dict[str, torch.Tensor],
                         unknown_error: Callable[[list[str]], Exception]) -> None:
    """Copy ``state`` into the model's parameters of the same names (cast to their dtype and device).

    Checks every name first and raises ``unknown_error(names)`` for any the model lacks, so a bad
    file leaves the model unchanged.
    """
    params = dict(model.named_parameters())
    unknown = [n for n in state if n not in params]
    if unknown:
        raise unknown_error(unknown[:5])
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable tensors back into the model (names must match exactly)."""
    copy_into_parameters(model, state, lambda names: ResumeError(
        f"checkpoint has parameters the model lacks: {names}"))


def rng_state() -> dict[str, Any]:
    """Python and torch (CPU + CUDA) RNG states."""
    out: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
