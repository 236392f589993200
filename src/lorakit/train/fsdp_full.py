"""``lorakit train --method full --fsdp``: the fully fine-tuned sharded model saved as HF sharded safetensors.

Under ``--method full`` every parameter trains, so :func:`lorakit.train.fsdp.shard` shards them all with
their block (the replicated placement would keep the whole model on every rank) and FSDP2
reduce-scatters their gradients; AdamW's moments are sharded with them. At the end
:func:`save_model` walks the state dict tensor by tensor: every rank takes part in the all-gather of one
tensor (``full_tensor``), rank 0 adds it to the current output shard and writes
``model-0000K-of-0000M.safetensors`` once it reaches ``max_shard_size`` (``$LORAKIT_MAX_SHARD_SIZE``,
default 2GB; plus
``model.safetensors.index.json``, ``config.json``, the tokenizer and the run's meta), atomically. No rank
holds more than one output shard and one gathered tensor, and ``transformers.from_pretrained`` loads the
directory. A tensor tied under several names (an LM head tied to its embedding) is written once, under
its first name, as ``save_pretrained`` does. The ranks agree after each step of the save (an all-reduce
of rank 0's outcome): a failure there (disk full, a wrong output path) raises ``FullSaveError`` on every
rank at once rather than leaving the others in the next all-gather until ``LORAKIT_DIST_TIMEOUT``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_SHARD = "2GB"  # per output file, transformers' save_pretrained default; $LORAKIT_MAX_SHARD_SIZE overrides


def shard_size() -> int:
    import os

    from lorakit.train.sharded_export import parse_size

    return parse_size(os.environ.get("LORAKIT_MAX_SHARD_SIZE") or DEFAULT_SHARD)


def _local_key(t: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    return id(t._local_tensor) if isinstance(t, DTensor) else id(t)


def _unique_state(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``model.state_dict`` (sharded tensors, no copies), a tied tensor once under its first name."""
    seen: set[int] = set()
    out = []
    for name, t in model.state_dict(keep_vars=True).items():
        key = _local_key(t)
        if key in seen:
            continue
        seen.add(key)
        out.append((name, t))
    return out


def _gathered(state: list[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor whole, one at a time (a collective per DTensor: every rank iterates in the same order)."""
    from torch.distributed.tensor import DTensor

    for name, t in state:
        t = t.detach()
        yield name, (t.full_tensor() if isinstance(t, DTensor) else t).cpu().contiguous()


def _plan(state: list[tuple[str, torch.Tensor]], max_shard_size: int) -> list[list[str]]:
    """Names per output file, from the global shapes (known before any gather)."""
    files: list[list[str]] = [[]]
    size = 0
    for name, t in state:
        n = t.numel() * t.element_size()
        if files[-1] and size + n > max_shard_size:
            files.append([])
            size = 0
        files[-1].append(name)
        size += n
    return files


def model_class_name(cls: type) -> str:
    """The model's own class under ``fully_shard``'s ``FSDP<Class>`` wrapper (``config.architectures``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in cls.__mro__ if not issubclass(c, FSDPModule)).__name__


def _agree(ctx: Any, failure: BaseException | None, what: str, dest: Path) -> None:
    """Every rank learns whether rank 0's step ``what`` of the save succeeded
    (:func:`lorakit.train.distributed.agree`); on a failure all raise :class:`FullSaveError` at once."""
    from lorakit.train import distributed as dd
    from lorakit.train.errors import FullSaveError

    dd.agree(ctx, failure, f"saving the sharded model to {dest} (at {what})", dest, FullSaveError)


def save_model(model: nn.Module, tokenizer: Any, dest: Path, meta_text: str, ctx: Any,
               max_shard_size: int | None = None) -> Path:
    """Write the sharded model's full weights to ``dest`` (rank 0) from every rank's shards (collective).

    All ranks agree after each step (the temporary directory, each output file, the config and tokenizer,
    the rename): a failure on rank 0 raises :class:`~lorakit.train.errors.FullSaveError` on every rank at
    that step, and the atomic write leaves any previous ``dest`` as it was."""
    from safetensors.torch import save_file

    from lorakit.atomic import atomic_dir
    from lorakit.train.errors import FullSaveError
    from lorakit.train.methods import META

    state = _unique_state(model)
    files = _plan(state, max_shard_size or shard_size())
    stream = _gathered(state)

    def write(d: Path | None) -> None:  # d: rank 0's temporary directory; None on the other ranks
        weight_map: dict[str, str] = {}
        total = 0
        for k, names in enumerate(files, 1):
            fname = f"model-{k:05d}-of-{len(files):05d}.safetensors" if len(files) > 1 else "model.safetensors"
            shard: dict[str, torch.Tensor] = {}
            for want in names:
                name, t = next(stream)  # an all-gather on every rank
                assert name == want  # the same order as the plan
                if d is not None:
                    shard[name] = t
                    total += t.numel() * t.element_size()
                    weight_map[name] = fname
            failure = None
            if d is not None:
                try:
                    save_file(shard, str(d / fname), metadata={"format": "pt"})
                except Exception as exc:  # noqa: BLE001 - every rank is told, then raises FullSaveError
                    failure = exc
            del shard
            _agree(ctx, failure, fname, dest)
        failure = None
        if d is not None:
            try:
                _write_meta(model, tokenizer, d, meta_text, META, weight_map, total, len(files))
            except Exception as exc:  # noqa: BLE001
                failure = exc
        _agree(ctx, failure, "config.json / the tokenizer / the index", dest)

    if not ctx.is_main:
        _agree(ctx, None, "the temporary directory", dest)
        write(None)  # the same all-gathers, nothing kept
        _agree(ctx, None, "the rename", dest)
        return dest
    started = False

    def fill(d: Path) -> None:
        nonlocal started
        started = True
        _agree(ctx, None, "the temporary directory", dest)
        write(d)

    try:
        atomic_dir(dest, fill)
    except FullSaveError:
        raise
    except Exception as exc:  # noqa: BLE001 - before fill (a wrong output path) or after it (fsync, rename)
        _agree(ctx, exc, "the rename" if started else "the temporary directory", dest)
    _agree(ctx, None, "the rename", dest)
    return dest


def _write_meta(model: nn.Module, tokenizer: Any, d: Path, meta_text: str, meta_name: str,
                weight_map: dict[str, str], total: int, n_files: int) -> None:
    """The index (several files), config.json, generation config, tokenizer and the run's meta."""
    if n_files > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    model.config.architectures = [model_class_name(type(model))]  # as save_pretrained sets it
    model.config.save_pretrained(d)  # type: ignore[operator]
    gen = getattr(model, "generation_config", None)
    if gen is not None and getattr(model, "can_generate", lambda: False)():
        gen.save_pretrained(d)
    tokenizer.save_pretrained(d)
    (d / meta_name).write_text(meta_text)


def save_best(t: Any, step: int) -> Path:
    """``best/model`` of a ``--method full --fsdp`` run (a collective): the model at an improving eval, written
    as :func:`save_model` writes ``model/`` (no rank holds more than one output file; no ``best.pt``, which
    would hold the whole model on rank 0). Atomic: a crash keeps the previous best, which ``--resume`` keeps."""
    from lorakit.train.finish import run_meta

    meta = json.dumps(run_meta(t), indent=2, default=str)
    return save_model(t.model, t.tokenizer, t.run_dir / "best" / "model", meta, t.ctx)


def kept_best(run_dir: Path, best: dict[str, Any], step: int) -> Path | None:
    """After the final save (rank 0): ``best/model`` when the best eval is an earlier step than the final one
    (as the unsharded run's ``best/``); else ``best/`` is removed (the final model is the best) and None."""
    import shutil

    d = run_dir / "best"
    if best.get("step") not in (None, step) and (d / "model").is_dir():
        return d / "model"
    shutil.rmtree(d, ignore_errors=True)
    return None
