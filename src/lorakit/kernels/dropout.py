"""The fused path's dropout mask: a counter-based hash, applied by a small C++ kernel on CPU.

Element ``i`` (row-major index into the input) is kept when its 16-bit lane of
``fmix32((i // 2) * 0x9E3779B9 ^ seed)`` is at least ``threshold = round(p * 65536)``, lane
``i % 2`` (low, high half). Being a pure function of ``(seed, i)``, the mask is never stored:
forward writes ``x ⊙ keep`` and backward zeroes the dropped input-gradient elements, both in one
pass with no mask tensor. On CPU that pass is :mod:`lorakit.kernels.cpu`' ``apply_mask``, compiled
on first use (~50 s once, cached); CUDA tensors, a machine without a compiler, or
``LORAKIT_NO_EXTENSION=1`` use the same hash written with torch integer ops, so every path draws
the identical mask for a seed.

Why: with torch's CPU generator a mask costs a serial ``random_`` plus three passes (bit
extraction, comparison, conversion to floats) and the multiply. The kernel does it all in one
pass at the cost of a multiply (0.18 vs 1.25 ms for a 512×576 input on one thread).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .cpu import extension

_GOLDEN = 0x9E3779B9
_M1, _M2 = 0x85EBCA6B, 0xC2B2AE35
LEVELS = 1 << 16  #: resolution of the drop probability (p is rounded to 1/65536)

__all__ = ["LEVELS", "extension", "keep_mask", "mask_", "masked", "threshold"]


def threshold(p: float) -> int:
    """Lanes below this are dropped."""
    return int(round(p * LEVELS))


def keep_mask(n: int, seed: int, p: float, device: torch.device | str = "cpu") -> Tensor:
    """The (n,) bool keep mask for ``seed``, by torch integer ops (the kernel's reference)."""
    m = 0xFFFFFFFF  # int64 arithmetic, reduced to 32 bits after each multiply
    w = torch.arange((n + 1) // 2, dtype=torch.int64, device=device)
    h = w.mul_(_GOLDEN).bitwise_and_(m).bitwise_xor_(seed & m)
    h ^= h >> 16
    h.mul_(_M1).bitwise_and_(m)
    h ^= h >> 13
    h.mul_(_M2).bitwise_and_(m)
    h ^= h >> 16
    lanes = torch.stack([h & 0xFFFF, h >> 16], -1).view(-1)[:n]
    return lanes >= threshold(p)


def _kernel_for(t: Tensor) -> Any | None:
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return None
    return extension()


def masked(x: Tensor, seed: int, p: float) -> Tensor:
    """``x ⊙ keep`` as a new contiguous tensor (the mask indexes ``x`` in row-major order)."""
    x = x.contiguous()
    ext = _kernel_for(x)
    if ext is not None:
        return ext.apply_mask(x, seed & 0xFFFFFFFF, threshold(p), torch.empty_like(x))
    return x * keep_mask(x.numel(), seed, p, x.device).view(x.shape).to(x.dtype)


def mask_(g: Tensor, seed: int, p: float) -> Tensor:
    """Zero the dropped elements of the contiguous ``g`` in place (dropout's backward)."""
    ext = _kernel_for(g)
    if ext is not None and g.is_contiguous():
        return ext.apply_mask(g, seed & 0xFFFFFFFF, threshold(p), g)
    return g.mul_(keep_mask(g.numel(), seed, p, g.device).view(g.shape).to(g.dtype))


# --- the fused path's masks: probabilities, seeds, masks shared by sibling projections --------------
def keep_threshold(p: float) -> int:
    """Elements whose 16-bit hash lane is below this are dropped."""
    return threshold(p)


def keep_scale(p: float) -> float:
    """``1 / P(keep)`` for the quantised drop probability (unbiased inverted dropout)."""
    return LEVELS / (LEVELS - keep_threshold(p))


def draw_seed() -> int:
    """A 32-bit seed for one dropout mask, drawn from torch's default CPU generator (so
    ``manual_seed`` and activation checkpointing's RNG-state replay reproduce it)."""
    return int(torch.randint(0, 1 << 32, (1,)).item())


def dropout_mask(shape: Sequence[int], p: float, seed: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.bool) -> Tensor:
    """The keep mask (``shape``, row-major element order) the fused path applies for ``seed``:
    as bool, or as 0/1 values of ``dtype``. The fused path itself never builds it."""
    keep = keep_mask(math.prod(shape), seed, p, device).view(tuple(shape))
    return keep if dtype == torch.bool else keep.to(dtype)


class _DropGroup:
    """One dropout mask (a seed) shared by every projection that reads the same input tensor.

    ``masked`` is the input times the keep mask, made once and reused by the forward members while
    the group is the cache's current entry; backward members zero their input gradients' dropped
    elements from the seed.
    """

    __slots__ = ("seed", "p", "ref", "version", "masked", "users", "__weakref__")

    def __init__(self, x: Tensor, p: float) -> None:
        self.seed = draw_seed()
        self.p = p
        self.ref = weakref.ref(x)
        self.version = x._version
        with torch.no_grad():  # a constant of the graph, never differentiated through
            self.masked: Tensor | None = masked(x, self.seed, p)
        self.users: set[int] = set()  # adapters (id of A) that already drew from this mask

    def matches(self, x: Tensor, p: float, user: int) -> bool:
        return (self.ref() is x and self.version == x._version and self.p == p and self.masked is not None
                and user not in self.users)

    def release(self) -> None:
        self.masked = None


_current: list[_DropGroup | None] = [None]


def _group_for(x: Tensor, p: float, user: int) -> _DropGroup:
    """The current group when ``x`` is the tensor it was made for and ``user`` (a layer's adapter)
    has not drawn from it yet, else a new one (frees the old): siblings share a mask, a second
    forward of the same layer on the same tensor gets a fresh one."""
    g = _current[0]
    if g is not None and g.matches(x, p, user):
        g.users.add(user)
        return g
    if g is not None:
        g.release()  # its forward siblings are done; backward regenerates from the seed
    g = _DropGroup(x, p)
    g.users.add(user)
    _current[0] = g
    return g
