"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for ``lorakit train --fsdp`` under torchrun.

The frozen base is sharded per transformer block (one ``fully_shard`` unit per block, then the root
for embeddings and heads), so each rank holds about 1/N of the base between a block's all-gather and
its reshard. The trainable parameters (LoRA factors, task heads) are by default *replicated*: left out
of FSDP (``ignored_params``), whole on every rank, their gradients averaged by one flat all-reduce at
the end of each synchronising backward. Measured against sharding them with their block (2 gloo
ranks, ``benchmarks/bench_fsdp.py``, docs/benchmarks.md): equal or faster on the tiny shape (3 of 3
interleaved pairs, 0.46-0.95x the sharded step), within the machine's noise on SmolLM2-135M (the base
all-gathers dominate), one collective per step instead of one reduce-scatter per block, and the
trainables stay plain tensors (no DTensor in clipping, optimizer or user code: PEFT #2344). The cost
is memory: param + grad + AdamW moments of the adapter on every rank (SmolLM2 r=8 q/v: 7 MiB vs
3.5 MiB sharded, against a rank's 257 MiB base shard). For adapters too large to replicate,
``LORAKIT_FSDP_LORA=sharded`` shards them with their block (tested: the same losses and adapter).

Launch (one node)::

    torchrun --standalone --nproc_per_node 2 -m lorakit train --task mrpc --fsdp

The loop (:mod:`lorakit.train.loop`) calls :func:`check_launch` (config validation), :func:`shard`
(where it would wrap in DDP), :func:`full_trainable_state` (best checkpoint) and
:func:`gather_trainables` (before rank 0 writes the adapter); resumable checkpoints are in
:mod:`lorakit.train.sharded_ckpt`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lorakit.train import distributed
from lorakit.train.errors import FSDPBlockError, FSDPLaunchError, TrainConfigError

# Where the trainable (LoRA, head) parameters live under --fsdp; see the module docstring for the measurement.
LORA_PLACEMENT = "replicated"  # LORAKIT_FSDP_LORA=sharded overrides
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")
LAUNCH_HINT = (
    "launch it with torchrun, e.g. `torchrun --standalone --nproc_per_node 2 -m lorakit train ... --fsdp` "
    "(several nodes: `torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint host0:29500 "
    "-m lorakit train ... --fsdp` on every node)"
)


# --- before the model exists ----------------------------------------------------------------------
def check_launch(cfg: Any, env: dict[str, str] | None = None) -> None:
    """Refuse ``--fsdp`` outside torchrun and combinations that cannot work, before any model is loaded."""
    env = dict(os.environ) if env is None else env
    if not cfg.fsdp:
        for key in ("fsdp_offload", "fsdp_block"):
            if getattr(cfg, key):
                raise TrainConfigError(f"--{key.replace('_', '-')}: only meaningful with --fsdp")
        return
    missing = [v for v in TORCHRUN_VARS if v not in env]
    if missing:
        raise FSDPLaunchError(
            f"--fsdp: this process was not started by torchrun (no {', '.join(missing)} in the environment); "
            + LAUNCH_HINT
        )


# --- blocks ------------------------------------------------------------------------------------------
def _class_names(model: nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for m in model.modules():
        counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    return counts


def default_block_names(model: nn.Module) -> list[str]:
    """The transformer-block class: transformers' ``_no_split_modules`` present in the model, else the
    class of the longest ``nn.ModuleList`` (BERT's ``BertLayer``, GPT-2's ``GPT2Block``...)."""
    present = _class_names(model)
    declared = [n for n in (getattr(model, "_no_split_modules", None) or []) if present.get(n)]
    if declared:
        return declared
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise FSDPBlockError(
            f"--fsdp: {type(model).__name__} has no nn.ModuleList of blocks; name the block class with "
            "--fsdp-block (module classes in the model: " + ", ".join(sorted(present)) + ")"
        )
    longest = max(lists, key=len)
    return [type(longest[0]).__name__]


def find_blocks(model: nn.Module, block: str | None = None) -> list[nn.Module]:
    """Modules to shard one by one: instances of ``block`` (a class name; default: :func:`default_block_names`).

    Raises :class:`FSDPBlockError` naming the classes that do exist when ``block`` matches nothing.
    """
    names = [block] if block else default_block_names(model)
    found = [m for m in model.modules() if type(m).__name__ in names and m is not model]
    if not found:
        present = _class_names(model)
        repeated = sorted(n for n, c in present.items() if c > 1)
        raise FSDPBlockError(
            f"--fsdp-block: no module of class {names[0]!r} in {type(model).__name__}; "
            f"repeated module classes are: {', '.join(repeated)} (default here: "
            f"{', '.join(default_block_names(model))})"
        )
    # Nested matches (a block inside a block) would be sharded twice; keep the outermost.
    inner = {id(c) for m in found for c in m.modules() if c is not m}
    return [m for m in found if id(m) not in inner]


# --- named adapters ----------------------------------------------------------------------------------
def adapter_params(model: nn.Module) -> set[nn.Parameter]:
    """Every adapter's parameters (``lora_*`` attributes: the first adapter's ``lora_A``/``lora_B`` and the
    named ones' ``lora_named_*``), active or not. Pass them to ``fully_shard(..., ignored_params=...)``:
    a layer switches adapters by pointing at their Parameter objects, which FSDP2 would swap for DTensors."""
    return {p for n, p in model.named_parameters() if any(c.startswith("lora_") for c in n.split("."))}


def adapter_names(model: nn.Module) -> list[str]:
    """The model's adapters, read without building lorakit's adapter registry (whose slots would hold the
    Parameter objects of the moment; FSDP2 and :func:`gathered` swap them)."""
    return list(model.__dict__.get("_lorakit_configs") or {})


def check_adapters(model: nn.Module) -> None:
    """Refuse a model with several adapters whose adapter parameters FSDP2 sharded (:class:`UnsupportedModuleError`):
    its layers would go on reading the unsharded originals (full copies, never trained, never saved)."""
    from torch.distributed.tensor import DTensor

    import lorakit

    names = adapter_names(model)
    if len(names) < 2:
        return
    bad = [n for n, p in model.named_parameters()
           if isinstance(p, DTensor) and any(c.startswith("lora_") for c in n.split("."))]
    if bad:
        raise lorakit.errors.UnsupportedModuleError(
            f"named adapters {names}: {len(bad)} adapter parameters (e.g. {bad[0]!r}) were "
            "sharded by fully_shard, so set_adapter / training / saving would use stale unsharded copies; pass "
            "ignored_params=lorakit.train.fsdp.adapter_params(model) to every fully_shard call "
            "(lorakit.train.fsdp.shard does so)"
        )


# --- sharding ----------------------------------------------------------------------------------------
class Sharded:
    """The sharded model as the loop calls it: ``__call__`` forwards, ``no_sync()`` defers gradient
    synchronisation during accumulation micro-batches.

    With ``replicated`` parameters (kept whole on every rank, outside FSDP), their gradients are averaged
    by one flat all-reduce queued at the end of each synchronising backward pass.
    """

    def __init__(self, model: nn.Module, replicated: list[nn.Parameter] | None = None) -> None:
        self.module = model
        self.replicated = replicated or []
        self.sync = True
        self._queued = False
        for p in self.replicated:  # frozen ones too (an inactive named adapter may be trained after set_adapter)
            frozen = not p.requires_grad
            p.requires_grad_(True)
            p.register_post_accumulate_grad_hook(self._queue)
            p.requires_grad_(not frozen)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def _queue(self, _: torch.Tensor) -> None:
        if self.sync and not self._queued and dist.is_initialized() and dist.get_world_size() > 1:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._all_reduce)  # end of this backward

    def _all_reduce(self) -> None:
        self._queued = False
        live = [p for p in self.replicated if p.requires_grad]  # the same on every rank (set_adapter on all)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in live]
        flat = torch.cat([g.reshape(-1) for g in grads])  # one collective for every replicated gradient
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        off = 0
        for p, g in zip(live, grads, strict=True):
            p.grad = flat[off:off + g.numel()].view_as(g).clone()
            off += g.numel()

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        self.module.set_requires_gradient_sync(False)  # type: ignore[operator]
        self.sync = False
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)  # type: ignore[operator]
            self.sync = True


def shard(model: nn.Module, cfg: Any, ctx: Any, *, bf16: bool = False, lora: str | None = None) -> Sharded:
    """``fully_shard`` each block of ``model`` (in place), then the root; returns the loop's handle.

    ``lora``: ``"sharded"`` (the trainable parameters sharded with their block) or ``"replicated"``
    (kept whole on every rank); default ``$LORAKIT_FSDP_LORA`` or :data:`LORA_PLACEMENT`. Must run before
    the optimizer is built: FSDP2 replaces the parameters it shards by DTensors.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    lora = lora or os.environ.get("LORAKIT_FSDP_LORA") or LORA_PLACEMENT
    if getattr(cfg, "method", None) == "full":  # every parameter trains: replicating them is DDP (fsdp_full)
        lora = "sharded"
    if lora not in ("sharded", "replicated"):
        raise TrainConfigError(f"LORAKIT_FSDP_LORA / fsdp.shard(lora=): 'sharded' or 'replicated', not {lora!r}")
    blocks = find_blocks(model, cfg.fsdp_block)
    if not dist.is_initialized():  # torchrun with one process: FSDP2 still needs a process group
        dist.init_process_group("nccl" if ctx.device.type == "cuda" else "gloo",
                                timeout=distributed.collective_timeout())
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    if ctx.device.type == "cpu" or cfg.fsdp_offload:  # all-gather buffers live in host memory
        distributed.return_freed_host_memory()
    from lorakit.train import meta_load

    skeleton = meta_load.is_skeleton(model)  # built on meta: each rank reads its shard after fully_shard
    if skeleton:
        meta_load.real_trainables(model)
    named = len(adapter_names(model)) > 1
    if named and lora == "sharded":
        raise TrainConfigError(
            f"LORAKIT_FSDP_LORA=sharded with named adapters {adapter_names(model)}: adapters switch by "
            "pointing at their Parameter objects, which sharding replaces; use the default 'replicated'"
        )
    trainable = _replicated(model, lora, named)
    kw: dict[str, Any] = {"mesh": mesh, "ignored_params": set(trainable) or None}
    # pinned host memory needs an accelerator; on a CPU-only run offloading is a no-op kept for parity
    pin = ctx.device.type != "cpu"
    kw["offload_policy"] = CPUOffloadPolicy(pin_memory=pin) if cfg.fsdp_offload else OffloadPolicy()
    if bf16 and ctx.device.type == "cuda":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    from lorakit.train.fsdp_alias import visible_bases

    with visible_bases(model):  # the base modules LoRA layers wrap: their shared weights sharded on both
        for b in blocks:
            fully_shard(b, **kw)
        fully_shard(model, **kw)
    if skeleton:  # to_empty gives the replicated trainables new Parameter objects
        meta_load.materialise(model, torch.device("cpu") if cfg.fsdp_offload else ctx.device)
        trainable = _replicated(model, lora, named)
    return Sharded(model, trainable)


def _replicated(model: nn.Module, lora: str, named: bool) -> list[nn.Parameter]:
    """The parameters kept whole on every rank: the trainable ones, and with named adapters every adapter's
    (inactive ones too: :func:`adapter_params`), so that ``set_adapter`` after sharding trains and syncs."""
    if lora != "replicated":
        return []
    extra = adapter_params(model) if named else set()
    return [p for p in model.parameters() if p.requires_grad or p in extra]  # same order on every rank


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# --- trainable state ---------------------------------------------------------------------------------
def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of every trainable parameter, gathered whole (a collective: call it on every rank).

    Only the trainable parameters travel (the LoRA factors and heads: small), never the base.
    """
    out: dict[str, torch.Tensor] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            out[n] = _full(p.detach()).cpu().clone()
    return out


_Undo = tuple[list[tuple[nn.Module, str, Any]], list[tuple[nn.Module, Any, Any]]]


def _gather(model: nn.Module) -> _Undo:
    """Swap every trainable DTensor parameter for its full plain tensor (collective); returns how to undo."""
    from torch.distributed.tensor import DTensor

    swapped: list[tuple[nn.Module, str, Any]] = []
    hooks: list[tuple[nn.Module, Any, Any]] = []
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.requires_grad and isinstance(p, DTensor):
                swapped.append((mod, name, p))
                mod._parameters[name] = nn.Parameter(p.detach().full_tensor().clone(), requires_grad=True)
        # FSDP2's state-dict pre-hook puts the sharded parameters back (``to_sharded``); while gathered,
        # ``state_dict()`` must see the full ones (torch 2.13: a closure named ``to_sharded_hook``).
        for key, hook in list(mod._state_dict_pre_hooks.items()):
            if getattr(hook, "__name__", "") == "to_sharded_hook":
                hooks.append((mod, key, hook))
                del mod._state_dict_pre_hooks[key]
    return swapped, hooks


def _scatter(undo: _Undo) -> None:
    """Copy each rank's shard of the (possibly changed) full values back; reinstate the sharded parameters."""
    from torch.distributed.tensor import distribute_tensor

    swapped, hooks = undo
    with torch.no_grad():
        for mod, name, orig in swapped:
            full = mod._parameters[name]
            if full is not None and full.shape == orig.shape:
                orig.copy_(distribute_tensor(full.detach().to(orig.dtype), orig.device_mesh, orig.placements))
            mod._parameters[name] = orig
    for mod, key, hook in hooks:
        mod._state_dict_pre_hooks[key] = hook


@contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Inside: every trainable DTensor parameter is its full plain tensor, on every rank (collective).

    ``lorakit.save_adapter``, ``load_adapter`` (into the existing adapter), ``trainable_state`` and
    ``load_state_dict`` of the trainable tensors then work as on an unsharded model; the frozen base
    stays sharded, so no forward may run inside. On exit each rank copies its shard of the (possibly
    loaded) full values back into the sharded parameters; a parameter added inside is an error.
    A no-op for replicated trainables (already plain).
    """
    check_adapters(model)
    before = {id(m): set(m._parameters) for m in model.modules()}
    undo = _gather(model)
    try:
        yield model
    finally:
        _scatter(undo)
    added = [n for m in model.modules() for n in set(m._parameters) - before.get(id(m), set())]
    if added:
        raise TrainConfigError(
            f"parameters {added[:4]} were added to a sharded model (a new adapter?); FSDP2 cannot shard them "
            "after fully_shard: add adapters before sharding"
        )


def gather_trainables(model: nn.Module) -> None:
    """:func:`gathered` without the way back (end of training: rank 0 then saves as from an unsharded model)."""
    _gather(model)


def save_adapter(model: nn.Module, path: str | os.PathLike[str], **kwargs: Any) -> None:
    """``lorakit.save_adapter`` of a sharded model: gathered on every rank, written by rank 0 (collective); a
    failure there raises :class:`~lorakit.train.errors.SaveError` on every rank (the previous one intact)."""
    import lorakit

    with gathered(model):
        distributed.rank0_save(distributed.current(), lambda: lorakit.save_adapter(model, path, **kwargs),
                               f"saving the adapter {path}", path)


def load_adapter(model: nn.Module, path: str | os.PathLike[str], **kwargs: Any) -> None:
    """``lorakit.load_adapter`` into a sharded model's existing adapter: every rank reads the directory and
    keeps its shard (collective)."""
    import lorakit

    with gathered(model):
        lorakit.load_adapter(model, path, **kwargs)


def save_best(model: nn.Module, step: int, metrics: dict[str, float], path: Path, ctx: Any) -> None:
    """The loop's ``best.pt`` (same content as unsharded): gathered on every rank, written by rank 0 (a failure
    there: :class:`~lorakit.train.errors.SaveError` on every rank)."""
    from lorakit.train import checkpoint

    state = full_trainable_state(model)
    distributed.rank0_save(ctx, lambda: checkpoint.save_best(path, step, metrics, state),
                           f"writing the best step's {path}", path)
