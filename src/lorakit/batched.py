"""Mixed-adapter batches: each row of one forward uses its own adapter (or none).

The low-rank path of a Linear layer for a batch whose rows name different adapters is computed
as two batched matmuls over the adapters that occur, never as a loop over adapters::

    rows grouped by adapter  xg (G, M*T, in)      G adapters in the batch, M rows max per adapter
    t = xg @ A_g^T           (G, M*T, r_max)      A stacked (G, r_max, in), smaller ranks zero-padded
    y = t @ B_g^T * s_g      (G, M*T, out)        B stacked (G, out, r_max)
    out[rows] += y[rows]                          scatter back; "base" rows get nothing

Only activations are gathered (cheap), each adapter's weights are read once. When the rows of
each adapter are contiguous and equally many, no gather or scatter is needed at all.

In grad mode the stacks are built from the Parameters in every forward, so autograd sends each
row's gradient to its own adapter only; without grad they are built once, transposed for the
matmuls with the scaling folded into B, and cached (rebuilt when an adapter's ``_version`` changes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class RowPlan:
    """How rows map to adapter groups for one batch size.

    ``groups`` are the adapter names that have rows, ``m`` the most rows any of them has.
    ``gather`` (G*m,) picks each group's rows (padding repeats a row, its output is dropped) or is
    None when the batch already is ``G`` contiguous blocks of ``m`` rows. ``src``/``dst`` scatter
    the valid grouped outputs back to their rows (None in the contiguous case).
    """

    groups: tuple[str, ...]
    m: int
    gather: Tensor | None
    src: Tensor | None
    dst: Tensor | None


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
    m = max(len(rows[g]) for g in groups)
    flat = [i for g in groups for i in rows[g]]
    contiguous = all(len(rows[g]) == m for g in groups) and flat == list(range(len(row_names)))
    if contiguous:
        return RowPlan(groups, m, None, None, None)
    gather, src, dst = [], [], []
    for gi, g in enumerate(groups):
        rs = rows[g]
        for j in range(m):
            gather.append(rs[j] if j < len(rs) else rs[0])
            if j < len(rs):
                src.append(gi * m + j)
                dst.append(rs[j])

    def as_index(v: list[int]) -> Tensor:
        return torch.tensor(v, dtype=torch.long, device=device)

    return RowPlan(groups, m, as_index(gather), as_index(src), as_index(dst))


def stack_pairs(As: Sequence[Tensor], Bs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack (r_i, in) and (out, r_i) pairs into (G, r_max, in) and (G, out, r_max), zero-padded."""
    r_max = max(a.shape[0] for a in As)
    if any(a.shape[0] != r_max for a in As):
        As = [F.pad(a, (0, 0, 0, r_max - a.shape[0])) for a in As]
        Bs = [F.pad(b, (0, r_max - b.shape[1])) for b in Bs]
    return torch.stack(list(As)), torch.stack(list(Bs))


def mixed_linear_delta(x: Tensor, out: Tensor, plan: RowPlan, At: Tensor, Bt: Tensor, scale: Tensor | None,
                       dropouts: Sequence[nn.Module] | None = None) -> Tensor:
    """``out`` plus each row's own low-rank path (see the module docstring).

    ``x`` is (batch, ..., in), ``out`` the base output (batch, ..., out); ``At`` (G, in, r) and
    ``Bt`` (G, r, out) are the transposed stacks following ``plan.groups``, ``scale`` (G, 1, 1)
    multiplies the result (None: already folded into ``Bt``). ``dropouts`` (one per group, or one
    for all) act on the low-rank path's input.
    """
    bsz, in_f, out_f = x.shape[0], x.shape[-1], out.shape[-1]
    g, m = len(plan.groups), plan.m
    xb = x.reshape(bsz, -1, in_f)  # (batch, T, in)
    t_len = xb.shape[1]
    xg = xb if plan.gather is None else xb.index_select(0, plan.gather)
    xg = xg.reshape(g, m * t_len, in_f).to(At.dtype)  # (G, M*T, in)
    if dropouts:
        if len(dropouts) == 1:
            xg = dropouts[0](xg)
        else:
            xg = torch.stack([d(xg[i]) for i, d in enumerate(dropouts)])
    y = torch.bmm(torch.bmm(xg, At), Bt)  # (G, M*T, r) -> (G, M*T, out)
    if scale is not None:
        y = y * scale
    if plan.gather is None:
        return out + y.view(out.shape).to(out.dtype)
    y = y.view(g * m, t_len, out_f).index_select(0, plan.src)  # (rows with an adapter, T, out)
    res = out.reshape(bsz, t_len, out_f).index_add(0, plan.dst, y.to(out.dtype))
    return res.view(out.shape)
