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

Reading is as strict as :func:`lorakit.train.checkpoint.load`: DCP's own reader unpickles
``.metadata`` and the non-tensor entries with the plain unpickler (code in a hostile file would
run); here ``.metadata`` may only build DCP's metadata classes, torch dtypes, sizes and paths, and
the other entries load with ``weights_only=True`` (else :class:`UnsafeCheckpointError`); NaN or
inf in the loaded weights or AdamW state raise :class:`ResumeError` on every rank, naming each
tensor, before the model is touched.
"""

from __future__ import annotations

import io
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.checks import describe_nonfinite
from lorakit.train import checkpoint as ckpt
from lorakit.train import distributed as dd
from lorakit.train.errors import ResumeError, UnsafeCheckpointError

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

    def commit() -> None:  # rank 0; a failure (checkpoint.pt unwritable) keeps the previous step's pair
        position = ckpt.run_position(step, best, _fingerprint(config, global_batch), rngs, sched)
        ckpt.atomic_save({**position, "dcp": name, "world_size": ctx.world_size}, run_dir / ckpt.CHECKPOINT)
        for old in run_dir.glob("checkpoint-*.dcp"):  # the previous step's, and any torn one
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    dest = run_dir / ckpt.CHECKPOINT
    dd.rank0_save(ctx, commit, f"committing the checkpoint {dest}", dest)  # SaveError on every rank


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
    from torch.utils._pytree import tree_map

    # DCP loads in place; into copies (the adapter's size), so that a refused checkpoint changes nothing
    msd, osd = _state_dicts(model, opt)
    sd = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, {"model": msd, "optim": osd})
    _read_metadata(target / ".metadata")  # refused here, by name (DCP would fold the error into its own)
    try:
        dcp.load(sd, storage_reader=_safe_reader(target), planner=_safe_planner())
    except dcp.api.CheckpointException as exc:
        unsafe = [e for e, _ in exc.failures.values() if isinstance(e, UnsafeCheckpointError)]
        if unsafe:
            raise unsafe[0] from None
        raise
    bad = [line for lines in dd.gather_objects(ctx, describe_nonfinite(_local_tensors(sd))) for line in lines]
    if bad:
        raise ResumeError(f"{target}: holds non-finite weights, which would poison the model:\n  "
                          + "\n  ".join(dict.fromkeys(bad))
                          + "\n(the run diverged before this checkpoint was written; start over with --overwrite)")
    set_state_dict(
        model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )
    sched.load_state_dict(state["scheduler"])
    rngs = state["rng"]
    ckpt.set_rng_state(rngs[ctx.rank % len(rngs)])


def _local_tensors(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    """This rank's part of every loaded tensor, by readable name (``model.<fqn>``, ``optim.<fqn>.exp_avg``)."""
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj.to_local() if isinstance(obj, DTensor) else obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)

    walk("model", sd["model"])
    walk("optim", sd["optim"].get("state", {}))
    return out


# What a DCP ``.metadata`` pickle may build: DCP's metadata classes, dtypes, sizes, layouts, paths.
_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_METADATA_GLOBALS = frozenset({
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
})


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        import torch.distributed.checkpoint.metadata as md

        ok = ((module, name) in _METADATA_GLOBALS
              or (module == _METADATA_MODULE and isinstance(getattr(md, name, None), type))
              or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)))
        if not ok:
            raise UnsafeCheckpointError(
                f"DCP metadata names {module}.{name}, which a checkpoint's metadata never holds: refused "
                "(unpickling it could run code)")
        return super().find_class(module, name)


def _read_metadata(path: Path) -> Any:
    with open(path, "rb") as fh:
        try:
            return _MetadataUnpickler(fh).load()
        except UnsafeCheckpointError as exc:
            raise UnsafeCheckpointError(f"{path}: {exc}") from None


def _safe_reader(target: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = _read_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(target))


def _safe_planner() -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except pickle.UnpicklingError as exc:
                raise UnsafeCheckpointError(
                    f"DCP entry {read_item.dest_index.fqn!r} holds Python objects other than tensors and plain "
                    f"data, refused (weights_only=True): {str(exc).splitlines()[-1]}") from None
            if self.flatten_state_dict:  # as DefaultLoadPlanner.load_bytes, with the safe load
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafePlanner()


def cleanup(run_dir: Path) -> None:
    """Remove every DCP directory of a finished run (rank 0, after ``checkpoint.pt`` is gone)."""
    for d in run_dir.glob("checkpoint-*.dcp"):
        shutil.rmtree(d, ignore_errors=True)
