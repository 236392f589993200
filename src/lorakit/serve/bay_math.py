"""One forward's low-rank updates over adapter bays (:mod:`.slots`): rows grouped by bay.

A :class:`Step` is built once per (row names, bay owners) and reused by every layer of the
forward. With ``A`` (n+1, R, in) and ``B`` (n+1, R, out) one layer's bays (scaling folded into
``B``), a Linear layer's update is:

* **one bay for every row** (the whole batch shares an adapter, e.g. a prefill of rows of one
  adapter or a single-adapter server): ``out += (x @ A_b^T) @ B_b``, two plain matmuls, no
  gather.
* **rows grouped by bay** otherwise (decode and prefill alike)::

      xg = x[rows of each bay]           (G, m*T, in)   G bays with rows, m rows at most per bay
      h  = A_g @ xg^T                    (G, R, m*T)    each bay's A read once, only its rows
      y  = h^T @ B_g                     (G, m*T, out)
      out[rows] += y[rows]               index_add; padding rows dropped, base rows get nothing

  ``A_g`` are views of bays ``0..G-1`` when those are the bays with rows (every decode step: the
  batch's adapters are always a prefix of the bays), else the used bays gathered. When the rows
  already are ``G`` contiguous blocks of ``m`` rows in bay order nothing is gathered or scattered
  (one ``baddbmm_`` into ``out``).

Why not one masked matmul over all bays (``x @ A_k^T`` (rows, k*R), zero the other bays' columns,
``@ B_k``): it multiplies every row by every bay, ``k``-fold the work; with 16 distinct adapters
on 16 rows that was 1.7x the base model's flops at decode (docs/benchmarks.md, "Serving").
Grouping does each row's own rank-R product only; the adapter weights are read once either way.

Embedding layers look each row's ids up in its own bay (``slot``: the all-zero bay ``n`` for
base rows).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..adapters.batched import padded_groups


@dataclass(eq=False)
class Step:
    """One forward's rows: each row's bay and how rows group by bay (see the module docstring).

    ``slot`` (rows,) each row's bay, ``n`` (the zero bay) for base rows. ``single``: the one bay every
    row uses, else None. Grouping: ``groups`` the bays with rows (ascending), ``g`` their number and
    ``m`` the most rows any has; ``gidx`` those bays as a tensor, None when they are ``0..g-1``;
    ``gather`` (g*m,) the rows of each group (padding repeats the group's first row), None when the
    rows already are contiguous equal blocks in bay order; ``src`` the valid entries of the grouped
    output (None: no padding) and ``dst`` their rows.
    """

    bays: list[int]
    slot: Tensor
    single: int | None
    groups: list[int]
    m: int
    gidx: Tensor | None
    gather: Tensor | None
    src: Tensor | None
    dst: Tensor | None

    @property
    def g(self) -> int:
        return len(self.groups)


def plan(bays: list[int], n: int, device: torch.device) -> Step | None:
    """The :class:`Step` of rows using ``bays`` (``n``: no adapter); None when no row has an adapter."""
    rows: dict[int, list[int]] = defaultdict(list)
    for i, b in enumerate(bays):
        if b < n:
            rows[b].append(i)
    if not rows:
        return None

    def index(v: list[int]) -> Tensor:
        return torch.tensor(v, dtype=torch.long, device=device)

    slot = index(bays)
    groups = sorted(rows)
    if len(groups) == 1 and len(rows[groups[0]]) == len(bays):
        return Step(bays, slot, groups[0], groups, len(bays), None, None, None, None)
    m = max(len(rows[b]) for b in groups)
    gidx = None if groups == list(range(len(groups))) else index(groups)
    flat = [i for b in groups for i in rows[b]]
    if len(flat) == len(bays) and flat == list(range(len(bays))) and all(len(rows[b]) == m for b in groups):
        return Step(bays, slot, None, groups, m, gidx, None, None, None)
    gather, src, dst = padded_groups(groups, rows, m)
    padded = len(src) < len(gather)
    return Step(bays, slot, None, groups, m, gidx, index(gather), index(src) if padded else None, index(dst))


def _add(out: Tensor, delta: Tensor) -> Tensor:
    if delta.dtype == out.dtype and not torch.is_grad_enabled():
        return out.add_(delta)
    return out + delta.to(out.dtype)


def linear_delta(x: Tensor, out: Tensor, step: Step, A: Tensor, B: Tensor,
                 views: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``out`` (the base output) plus each row's update from its bay; in place without autograd.

    ``A`` (n+1, R, in), ``B`` (n+1, R, out); ``views``: ``(A[:g], B[:g])`` when the caller caches them.
    """
    bsz, in_f, out_f = x.shape[0], x.shape[-1], out.shape[-1]
    n_tok = x.numel() // in_f
    t_len = n_tok // bsz
    dtype = A.dtype
    inplace = out.dtype == dtype and out.is_contiguous() and not torch.is_grad_enabled()
    if step.single is not None:  # every row shares one bay: two plain matmuls
        b = step.single
        h = torch.mm(x.reshape(n_tok, in_f).to(dtype), A[b].t())  # (rows*T, R)
        if inplace:
            out.view(n_tok, out_f).addmm_(h, B[b])
            return out
        return _add(out, torch.mm(h, B[b]).view(out.shape))
    g, m = step.g, step.m
    if step.gidx is not None:
        Ag, Bg = A.index_select(0, step.gidx), B.index_select(0, step.gidx)
    else:
        Ag, Bg = views if views is not None else (A[:g], B[:g])
    xb = x.reshape(bsz, t_len, in_f)
    xg = xb if step.gather is None else xb.index_select(0, step.gather)
    xg = xg.reshape(g, m * t_len, in_f).to(dtype)
    h = torch.bmm(Ag, xg.transpose(1, 2)).transpose(1, 2)  # (g, m*T, R): A_b read once per bay
    if step.gather is None:
        if inplace:
            out.view(g, m * t_len, out_f).baddbmm_(h, Bg)
            return out
        return _add(out, torch.bmm(h, Bg).view(out.shape))
    y = torch.bmm(h, Bg).view(g * m, t_len, out_f)
    if step.src is not None:
        y = y.index_select(0, step.src)  # drop the padding rows
    assert step.dst is not None
    if inplace:
        out.view(bsz, t_len, out_f).index_add_(0, step.dst, y)
        return out
    return out.reshape(bsz, t_len, out_f).index_add(0, step.dst, y.to(out.dtype)).view(out.shape)


def embedding_delta(ids: Tensor, out: Tensor, step: Step, A: Tensor, B: Tensor) -> Tensor:
    """``out`` + each row's embedding update: its ids looked up in its own bay's ``A^T`` (num, R)."""
    bsz, num, r = ids.shape[0], A.shape[1], A.shape[2]
    idb = ids.reshape(bsz, -1)
    emb = F.embedding(idb + (step.slot * num).view(-1, 1), A.reshape(-1, r))  # (rows, T, R)
    delta = torch.bmm(emb, B.index_select(0, step.slot))  # (rows, T, dim)
    return _add(out, delta.view(out.shape))


__all__ = ["Step", "embedding_delta", "linear_delta", "plan"]
