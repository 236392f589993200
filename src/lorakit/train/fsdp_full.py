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
its first name, as ``save_pretrained`` does.
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


def save_model(model: nn.Module, tokenizer: Any, dest: Path, meta_text: str, ctx: Any,
               max_shard_size: int | None = None) -> Path:
    """Write the sharded model's full weights to ``dest`` (rank 0) from every rank's shards (collective)."""
    from safetensors.torch import save_file

    from lorakit.atomic import atomic_dir
    from lorakit.train.methods import META

    state = _unique_state(model)
    files = _plan(state, max_shard_size or shard_size())
    stream = _gathered(state)

    def fill(d: Path) -> None:
        weight_map: dict[str, str] = {}
        total = 0
        for k, names in enumerate(files, 1):
            fname = f"model-{k:05d}-of-{len(files):05d}.safetensors" if len(files) > 1 else "model.safetensors"
            shard: dict[str, torch.Tensor] = {}
            for want in names:
                name, t = next(stream)
                assert name == want  # the same order as the plan
                shard[name] = t
                total += t.numel() * t.element_size()
                weight_map[name] = fname
            save_file(shard, str(d / fname), metadata={"format": "pt"})
            del shard
        if len(files) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        model.config.architectures = [model_class_name(type(model))]  # as save_pretrained sets it
        model.config.save_pretrained(d)  # type: ignore[operator]
        gen = getattr(model, "generation_config", None)
        if gen is not None and getattr(model, "can_generate", lambda: False)():
            gen.save_pretrained(d)
        tokenizer.save_pretrained(d)
        (d / META).write_text(meta_text)

    if ctx.is_main:
        atomic_dir(dest, fill)
    else:
        for _ in stream:  # the same all-gathers, nothing kept
            pass
    return dest
