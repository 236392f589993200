"""Resumable checkpoints of an FSDP2 run through ``torch.distributed.checkpoint`` (DCP).

Layout in the run directory::

    checkpoint.pt            rank 0, atomic: step, fingerprint, best, RNG states, scheduler, "dcp": name
    checkpoint-00000050.dcp/ the trainable weights and AdamW state: each rank writes its shards
                             (LORAKIT_FSDP_LORA=sharded); replicated tensors are written once (DCP dedup)

Commit protocol: the new step's DCP directory is written completely by every rank (``dcp.save``
ends with a collective that finishes its metadata), then rank 0 atomically replaces ``checkpoint.pt``
to point at it, and only then removes the previous directory. A crash at any moment leaves a
``checkpoint.pt`` that names a complete directory. Only trainable state is saved (the frozen base is
reloaded from the model), so a checkpoint is the size of the adapter plus its optimizer state.

DCP reshards on load, so a run checkpointed on N ranks resumes on M (the same global batch:
``--batch-size`` x ``--grad-accum`` x ranks); the fingerprint therefore records the global batch
instead of the per-rank batch and the number of ranks.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.train import checkpoint as ckpt
from lorakit.train import distributed as dd
from lorakit.train.errors import ResumeError

# Options that may differ between an FSDP run and its resumption: the split of the global batch.
RESHARD_KEYS = frozenset({"world_size", "batch_size", "grad_accum", "fsdp_offload"})


def _fingerprint(config: dict[str, Any], global_batch: int) -> tuple[str, dict[str, Any]]:
    keep = {k: v for k, v in config.items() if k not in RESHARD_KEYS}
    return ckpt.fingerprint({**keep, "global_batch": global_batch})


def check_resumable(state: dict[str, Any], config: dict[str, Any], global_batch: int, path: Path) -> None:
    """Raise :class:`ResumeError` unless ``state`` is an FSDP checkpoint of the same run (any rank count)."""
    if "dcp" not in state:
        raise ResumeError(
            f"cannot --resume --fsdp from {path}: it was written by a run without --fsdp "
            "(resume it without --fsdp, or start over with --overwrite)"
        )
    digest, keep = _fingerprint(config, global_batch)
    ckpt.require_same_config(state, digest, keep, path)


def _state_dicts(model: nn.Module, opt: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))


def save(
    run_dir: Path,
    step: int,
    best: dict[str, Any],
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    config: dict[str, Any],
    global_batch: int,
    ctx: dd.DistContext,
) -> None:
    """Write the step's sharded checkpoint (every rank), then commit it (rank 0). Collective."""
    import torch.distributed.checkpoint as dcp

    name = f"checkpoint-{step:08d}.dcp"
    target = run_dir / name
    if ctx.is_main and target.exists():  # a torn directory of an earlier crash at this very step
        shutil.rmtree(target)
    dd.barrier(ctx)
    msd, osd = _state_dicts(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(target))
    rngs = dd.gather_objects(ctx, ckpt.rng_state())
    if ctx.is_main:
        position = ckpt.run_position(step, best, _fingerprint(config, global_batch), rngs, sched)
        ckpt.atomic_save({**position, "dcp": name, "world_size": ctx.world_size}, run_dir / ckpt.CHECKPOINT)
        for old in run_dir.glob("checkpoint-*.dcp"):  # the previous step's, and any torn one
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    dd.barrier(ctx)


def restore(
    run_dir: Path, state: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer, sched: Any,
    ctx: dd.DistContext,
) -> None:
    """Load the trainable shards and optimizer state (resharded to this world size), scheduler and RNG."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    target = run_dir / state["dcp"]
    if not (target / ".metadata").is_file():
        raise ResumeError(f"{run_dir / ckpt.CHECKPOINT} names {target}, which is missing or incomplete")
    msd, osd = _state_dicts(model, opt)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=str(target))
    set_state_dict(
        model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )
    sched.load_state_dict(state["scheduler"])
    rngs = state["rng"]
    ckpt.set_rng_state(rngs[ctx.rank % len(rngs)])


def cleanup(run_dir: Path) -> None:
    """Remove every DCP directory of a finished run (rank 0, after ``checkpoint.pt`` is gone)."""
    for d in run_dir.glob("checkpoint-*.dcp"):
        shutil.rmtree(d, ignore_errors=True)
