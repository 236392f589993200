"""torchrun support: process group setup (gloo on CPU, nccl on GPU) and small collectives.

Under ``torchrun --nproc_per_node N`` the environment carries ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``;
without it everything degrades to a single process with rank 0.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from lorakit.train.errors import CollectiveTimeoutError, SaveError

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Rank, world size and the device this process uses."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup() -> DistContext:
    """Initialise the process group if launched by torchrun; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=collective_timeout())
    return DistContext(rank, world, local, device)


def collective_timeout() -> timedelta:
    """Bound on every collective: ``$LORAKIT_DIST_TIMEOUT`` seconds (default 1800, torch's own default);
    a rank that dies makes the others fail with a timeout error instead of hanging."""
    return timedelta(seconds=float(os.environ.get("LORAKIT_DIST_TIMEOUT", "1800")))


def _is_timeout(exc: BaseException) -> bool:
    """A backend's collective timeout (gloo: "Timed out waiting 60000ms for recv"; NCCL's watchdog:
    "Watchdog caught collective operation timeout"; the c10d store: "wait timeout")."""
    if not isinstance(exc, (RuntimeError, dist.DistError)) or isinstance(exc, CollectiveTimeoutError):
        return False
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


@contextmanager
def named_timeouts() -> Iterator[None]:
    """Inside: a collective that times out raises :class:`CollectiveTimeoutError` naming
    ``LORAKIT_DIST_TIMEOUT`` (its value, this rank) instead of the backend's bare message."""
    try:
        yield
    except Exception as exc:
        if not _is_timeout(exc):
            raise
        rank = os.environ.get("RANK", "0")
        raise CollectiveTimeoutError(
            f"rank {rank}: a collective did not complete within LORAKIT_DIST_TIMEOUT="
            f"{collective_timeout().total_seconds():g} s (another rank died or is stuck; raise "
            f"LORAKIT_DIST_TIMEOUT if steps are legitimately slower). Backend: {str(exc).splitlines()[0][:300]}"
        ) from exc


def teardown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def current() -> DistContext:
    """This process's context read from the initialised process group (one process without one): for the
    public helpers that take no ``ctx`` (``lorakit.train.fsdp.save_adapter``)."""
    if not dist.is_initialized():
        return DistContext(0, 1, 0, torch.device("cpu"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = "nccl" in str(dist.get_backend()) and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), local, device)


def agree(ctx: DistContext, failure: BaseException | None, what: str, dest: Any,
          error: type[SaveError] = SaveError) -> None:
    """Every rank learns whether rank 0's ``what`` (writing ``dest``) succeeded: one all-reduce of the ranks'
    failure flags, then (only on a failure) rank 0's cause broadcast; on a failure every rank raises ``error``
    at once, naming ``dest`` and the cause, instead of the others waiting in the next collective until
    ``LORAKIT_DIST_TIMEOUT``. In one process a failure raises ``error`` too (no collective)."""
    failed = failure is not None
    if ctx.enabled:
        failed = float(all_sum(ctx, torch.tensor(float(failed), device=ctx.device))) > 0
    if not failed:
        return
    cause = broadcast_object(ctx, f"{type(failure).__name__}: {failure}" if failure is not None else None)
    raise error(f"rank {ctx.rank}: {what} failed on rank 0 ({cause or 'on another rank'}); every rank stopped "
                f"there and {dest} was left as it was") from failure


def rank0_save(ctx: DistContext, write: Callable[[], T], what: str, dest: Any) -> T | None:
    """``write()`` on rank 0 alone (an atomic write of ``dest``), then every rank agrees on its outcome
    (:func:`agree`; this replaces the barrier after such a save): a failure there raises :class:`SaveError` on
    every rank at once. Returns ``write()``'s value on rank 0, None elsewhere. In one process: just
    ``write()`` (its own error, no collective), as before."""
    if not ctx.enabled:
        return write()
    out, failure = None, None
    if ctx.is_main:
        try:
            out = write()
        except Exception as exc:  # noqa: BLE001 - every rank is told, then raises SaveError
            failure = exc
    agree(ctx, failure, what, dest)
    return out


def all_sum(ctx: DistContext, value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (returns it unchanged in a single process)."""
    if ctx.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a list of one in a single process)."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# glibc's dynamic mmap threshold climbs to 32 MiB after the first large free, so FSDP2's per-block
# all-gather buffers (one block's weights, allocated and freed twice per step) land on the heap and
# are kept: a CPU rank's RSS grew by ~0.6-1 GiB over its shard (SmolLM2-135M, docs/benchmarks.md).
HOST_MMAP_THRESHOLD = 1 << 20


def return_freed_host_memory() -> bool:
    """Serve host allocations >= 1 MiB by mmap so that freeing them gives the pages back (glibc only;
    ``MALLOC_MMAP_THRESHOLD_`` in the environment wins). Returns whether the setting was applied."""
    import ctypes
    import ctypes.util

    if "MALLOC_MMAP_THRESHOLD_" in os.environ or not ctypes.util.find_library("c"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(-3, HOST_MMAP_THRESHOLD))  # M_MMAP_THRESHOLD; also fixes it (no climb)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
