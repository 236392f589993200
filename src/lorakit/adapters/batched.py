"""Mixed-adapter batches: each row of one forward uses its own adapter (or none).

The low-rank path of a layer for a batch whose rows name different adapters is computed with
batched matmuls over stacked adapter weights, never as a loop over adapters. The stacks hold the
``G`` adapters of the batch plus one all-zero slot (for "base" rows and rows whose adapter the
layer lacks): ``At`` (G+1, in, r_max) and ``Bt`` (G+1, r_max, out), transposed for the matmuls,
smaller ranks zero-padded, each adapter's scaling folded into its ``Bt``. Two ways to use them:

* **per-row weights** (sequences of at least :data:`ROW_TOKENS` tokens per row, e.g. prefill and
  training)::

      Ar, Br = At[g_i], Bt[g_i]       (batch, in, r), (batch, r, out)   g_i: row i's slot
      out += (x @ Ar) @ Br            one bmm, one in-place baddbmm

  Only weights are gathered (``batch * r * (in + out)`` values, less than the activations when a
  row has more tokens than the rank); no activation is copied or scattered.
* **rows grouped by adapter** (few tokens per row, e.g. decoding)::

      xg = x[rows of each adapter]    (G, M*T, in)      M rows max per adapter
      y  = (xg @ At[:G]) @ Bt[:G]     (G, M*T, out)     each adapter's weights read once
      out[rows] += y[rows]            scatter back with index_add; "base" rows get nothing

  With contiguous, equal groups no gather or scatter is needed (``baddbmm`` into ``out``).

A fused projection (``MergedLinear``: ``A`` (r*k, in), ``B`` (out/n*k, r), one rank-r pair per
enabled slice) enters the stacks as ``A`` and a dense block-structured ``B`` (out, r*k) with zeros
outside its slices (:func:`merged_dense_B`), so the same two matmuls apply. An ``Embedding`` looks
up each row's ids in its own adapter's ``A^T`` (one lookup in the concatenated tables, ids offset by
the slot) and multiplies by the per-row ``B`` (:func:`mixed_embedding_delta`).

Without autograd the result is added to the base output in place. In grad mode the stacks are
built from the Parameters in every forward, so autograd sends each row's gradient to its own
adapter only; without grad :mod:`lorakit.adapters.mixed` caches them per adapter set and layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Rows with at least this many tokens use per-row weights; fewer (decoding) group rows by adapter.
#: Per-row weights move ``batch * r * (in + out)`` values, grouping ``~batch * T * (in + 2 out)``.
ROW_TOKENS = 8


@dataclass(frozen=True)
class RowPlan:
    """How rows map to adapter groups for one batch size.

    ``groups`` are the adapter names that have rows, ``m`` the most rows any of them has.
    ``gather`` (G*m,) picks each group's rows (padding repeats a row, its output is dropped) or is
    None when the batch already is ``G`` contiguous blocks of ``m`` rows. ``src``/``dst`` scatter
    the valid grouped outputs back to their rows (None in the contiguous case; ``src`` is also None
    when no group is padded). ``slot`` (batch,) is each row's index into the stacks (``G``: none),
    ``slots`` the same as a list.
    """

    groups: tuple[str, ...]
    m: int
    gather: Tensor | None
    src: Tensor | None
    dst: Tensor | None
    slot: Tensor | None = None
    slots: tuple[int, ...] = field(default=())

    @property
    def whole(self) -> bool:
        """One adapter on every row: the single-adapter path applies."""
        return len(self.groups) == 1 and self.gather is None


def plan_rows(row_names: Sequence[str], available: Sequence[str], device: torch.device) -> RowPlan | None:
    """Group rows by adapter among ``available``; None when no row uses any of them."""
    rows: dict[str, list[int]] = {}
    have = set(available)
    for i, n in enumerate(row_names):
        if n in have:
            rows.setdefault(n, []).append(i)
    if not rows:
        return None
    groups = tuple(n for n in available if n in rows)

    def as_index(v: Sequence[int]) -> Tensor:
        return torch.tensor(list(v), dtype=torch.long, device=device)

    index = {g: gi for gi, g in enumerate(groups)}
    slots = tuple(index.get(n, len(groups)) for n in row_names)
    m = max(len(rows[g]) for g in groups)
    flat = [i for g in groups for i in rows[g]]
    contiguous = all(len(rows[g]) == m for g in groups) and flat == list(range(len(row_names)))
    if contiguous:
        return RowPlan(groups, m, None, None, None, as_index(slots), slots)
    gather, src, dst = padded_groups(groups, rows, m)
    padded = len(src) < len(gather)
    return RowPlan(groups, m, as_index(gather), as_index(src) if padded else None, as_index(dst),
                   as_index(slots), slots)


def padded_groups(groups: Sequence[Any], rows: dict[Any, list[int]], m: int) -> tuple[list[int], list[int], list[int]]:
    """Row indices for ``len(groups)`` groups of ``m`` rows each (short groups padded with their first row).

    ``gather`` lists the input row of every padded position (group-major); ``src`` / ``dst`` map the
    real positions back to their rows (``out[dst] = grouped[src]``).
    """
    gather: list[int] = []
    src: list[int] = []
    dst: list[int] = []
    for gi, g in enumerate(groups):
        rs = rows[g]
        for j in range(m):
            gather.append(rs[j] if j < len(rs) else rs[0])
            if j < len(rs):
                src.append(gi * m + j)
                dst.append(rs[j])
    return gather, src, dst


def stack_pairs(As: Sequence[Tensor], Bs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack (r_i, in) and (out, r_i) pairs into (G, r_max, in) and (G, out, r_max), zero-padded."""
    r_max = max(a.shape[0] for a in As)
    if any(a.shape[0] != r_max for a in As):
        As = [F.pad(a, (0, 0, 0, r_max - a.shape[0])) for a in As]
        Bs = [F.pad(b, (0, r_max - b.shape[1])) for b in Bs]
    return torch.stack(list(As)), torch.stack(list(Bs))


def build_stacks(As: Sequence[Tensor], Bs: Sequence[Tensor], scales: Sequence[float]) -> tuple[Tensor, Tensor]:
    """``At`` (G+1, in, r_max) and ``Bt`` (G+1, r_max, out): transposed, scaled, a zero slot last.

    Differentiable (grad mode builds them from the Parameters in each forward).
    """
    r_max = max(a.shape[0] for a in As)
    A, B = stack_pairs(list(As) + [As[0].new_zeros(r_max, As[0].shape[1])],
                       list(Bs) + [Bs[0].new_zeros(Bs[0].shape[0], r_max)])
    scale = torch.tensor(list(scales) + [0.0], dtype=B.dtype, device=B.device).view(-1, 1, 1)
    return A.transpose(1, 2), B.transpose(1, 2) * scale


def merged_dense_B(B: Tensor, enable: Sequence[bool]) -> Tensor:
    """A fused projection's ``B`` (out/n*k, r) as a dense (out, r*k): slice j's block at its rows
    and its rank columns ``j*r:(j+1)*r``, zeros elsewhere, so ``dense @ A`` is the full update."""
    k, n = sum(enable), len(enable)
    rows, r = B.shape[0] // k, B.shape[1]
    blocks = torch.block_diag(*B.view(k, rows, r).unbind(0))  # (k*rows, k*r)
    if k == n:
        return blocks
    full = B.new_zeros(n, rows, k * r)
    full[torch.tensor(list(enable), dtype=torch.bool, device=B.device)] = blocks.view(k, rows, k * r)
    return full.view(n * rows, k * r)


def _in_place(out: Tensor, *ws: Tensor) -> bool:
    """Whether the update may be added into ``out`` (no autograd graph involved, same dtype)."""
    if torch.is_grad_enabled() and (out.requires_grad or any(w.requires_grad for w in ws)):
        return False
    return all(w.dtype == out.dtype for w in ws)


def _drop_rows(xb: Tensor, plan: RowPlan, dropouts: Sequence[nn.Module] | None) -> Tensor:
    """Dropout on the low-rank path's input: one module for all rows, or row i gets its slot's."""
    if not dropouts:
        return xb
    if len(dropouts) == 1:
        return dropouts[0](xb)
    return torch.stack([dropouts[s](xb[i]) if s < len(dropouts) else xb[i] for i, s in enumerate(plan.slots)])


def mixed_linear_delta(x: Tensor, out: Tensor, plan: RowPlan, At: Tensor, Bt: Tensor,
                       dropouts: Sequence[nn.Module] | None = None,
                       grouped: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``out`` plus each row's own low-rank path (see the module docstring); in place without grad.

    ``x`` is (batch, ..., in), ``out`` the base output (batch, ..., out); ``At`` (G+1, in, r) and
    ``Bt`` (G+1, r, out) the stacks from :func:`build_stacks` following ``plan.groups``.
    ``dropouts`` (one per group, or one for all) act on the low-rank path's input. ``grouped`` may
    pass ``(At[:G], Bt[:G])`` (cached views: saves two slicing ops per decoding step).
    """
    bsz, in_f, out_f = x.shape[0], x.shape[-1], out.shape[-1]
    xb = x.reshape(bsz, -1, in_f)  # (batch, T, in)
    t_len = xb.shape[1]
    ob = out.view(bsz, t_len, out_f) if out.is_contiguous() else out.reshape(bsz, t_len, out_f)
    inplace = _in_place(out, At, Bt)
    if t_len >= ROW_TOKENS:  # per-row weights: (batch, T, in) @ (batch, in, r) @ (batch, r, out)
        Ar, Br = At.index_select(0, plan.slot), Bt.index_select(0, plan.slot)
        t = torch.bmm(_drop_rows(xb.to(At.dtype), plan, dropouts), Ar)
        if inplace:
            ob.baddbmm_(t, Br)
            return out
        return (ob + torch.bmm(t, Br).to(out.dtype)).view(out.shape)
    g, m = len(plan.groups), plan.m
    xg = xb if plan.gather is None else xb.index_select(0, plan.gather)
    xg = xg.reshape(g, m * t_len, in_f).to(At.dtype)  # (G, M*T, in)
    if dropouts:
        xg = dropouts[0](xg) if len(dropouts) == 1 else torch.stack([d(xg[i]) for i, d in enumerate(dropouts)])
    Atg, Btg = grouped if grouped is not None else (At[:g], Bt[:g])
    t = torch.bmm(xg, Atg)  # (G, M*T, r)
    if plan.gather is None:  # rows already grouped: out viewed (G, M*T, out)
        if inplace:
            ob.view(g, m * t_len, out_f).baddbmm_(t, Btg)
            return out
        return (ob + torch.bmm(t, Btg).view(ob.shape).to(out.dtype)).view(out.shape)
    y = torch.bmm(t, Btg).view(g * m, t_len, out_f)
    if plan.src is not None:
        y = y.index_select(0, plan.src)  # drop the padding rows
    if inplace:
        ob.index_add_(0, plan.dst, y)
        return out
    return ob.index_add(0, plan.dst, y.to(out.dtype)).view(out.shape)


def mixed_embedding_delta(ids: Tensor, out: Tensor, plan: RowPlan, At: Tensor, Bt: Tensor,
                          dropouts: Sequence[nn.Module] | None = None, padding_idx: int | None = None,
                          scale_grad_by_freq: bool = False) -> Tensor:
    """``out`` plus each row's own embedding update: row i looks its ids up in its slot's ``A^T``.

    ``ids`` is (batch, ...), ``out`` the base lookup (batch, ..., dim); ``At`` (G+1, num, r) and
    ``Bt`` (G+1, r, dim) as from :func:`build_stacks` on the (r, num) / (dim, r) pairs. One lookup
    in the concatenated tables (ids offset by ``slot * num``: per-adapter ``scale_grad_by_freq``
    counts come out as when each adapter sees only its rows), then a per-row bmm with ``B``. The
    ``padding_idx`` entry gets no gradient, as in the single-adapter layer. Gradients are dense.
    """
    bsz, dim = ids.shape[0], out.shape[-1]
    num, r = At.shape[1], At.shape[2]
    idb = ids.reshape(bsz, -1)
    ob = out.view(bsz, -1, dim) if out.is_contiguous() else out.reshape(bsz, -1, dim)
    grad = torch.is_grad_enabled() and At.requires_grad
    table = At.reshape(-1, r)  # ((G+1)*num, r)
    emb = F.embedding(idb + (plan.slot * num).view(-1, 1), table, None, None, 2.0, scale_grad_by_freq and grad)
    if padding_idx is not None and grad:
        emb = torch.where((idb == padding_idx).unsqueeze(-1), emb.detach(), emb)
    emb = _drop_rows(emb, plan, dropouts)
    Br = Bt.index_select(0, plan.slot)  # (batch, r, dim)
    if _in_place(out, At, Bt):
        ob.baddbmm_(emb, Br)
        return out
    return (ob + torch.bmm(emb, Br).to(out.dtype)).view(out.shape)
