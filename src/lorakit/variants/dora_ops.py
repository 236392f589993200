"""DoRA's arithmetic without a dense ``W0 + s B A``: the factored row norm and the Linear forward.

Row norm (every layer kind reduces to rows of a 2-D ``W`` aligned with ``B A``)::

    ‖W + s B A‖²_row = ‖W‖²_row + 2 s · rowsum(B ⊙ (W Aᵀ)) + s² · rowsum((B (A Aᵀ)) ⊙ B)

``‖W‖²_row`` is cached by the caller (W0 is frozen), the rest is one (out × in × r) product and
r × r work: no (out, in) temporary. A convolution's ``B A`` (loralib layout) has ``k`` rows per
output channel; their squares are summed.

Linear forward, one autograd node (float32 / float64, frozen W0)::

    h = f ⊙ (x W0ᵀ + s (d Aᵀ) Bᵀ) + b,   f = m / ‖W0 + s B A‖ (detached norm), d = dropout(x) or x

with the fused LoRA path's dropout (a hashed mask shared by the projections reading the same x,
regenerated from its seed in backward instead of stored)

backward: ``gf = f ⊙ g``; ``dx = gf W0 + mask ⊙ s (gf B) A``,
``dA = s (gf B)ᵀ d``, ``dB = s gfᵀ (d Aᵀ)``, ``df = colsum(g ⊙ (x W0ᵀ + s (d Aᵀ) Bᵀ))``. It saves
``d``, ``d Aᵀ`` and that one (n, out) sum, and does one base GEMM forward and one backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import dropout as DK

__all__ = ["dora_linear", "factored_row_sq", "fast_eligible"]


def factored_row_sq(W: Tensor, w_sq: Tensor, A: Tensor, B: Tensor, scaling: float, n_out: int) -> Tensor:
    """``‖W + s B A‖²`` per output (fp32, shape (n_out,)); ``W`` (B.rows, A.cols) any float dtype,
    ``w_sq`` its row sums of squares (fp32, (B.rows,))."""
    A32, B32 = A.float(), B.float()
    cross = (B32 * (W.float() @ A32.transpose(0, 1))).sum(1)  # rowsum(B ⊙ W Aᵀ)
    lo = ((B32 @ (A32 @ A32.transpose(0, 1))) * B32).sum(1)  # ‖(B A)_row‖²
    sq = w_sq + (2 * scaling) * cross + (scaling * scaling) * lo
    if sq.shape[0] != n_out:
        sq = sq.view(n_out, -1).sum(1)
    return sq.clamp_min_(0)


def fast_eligible(x: Tensor, W: Tensor, A: Tensor, B: Tensor) -> bool:
    """The fused node applies: one float32/float64 dtype everywhere, frozen W0, no autocast."""
    dt = x.dtype
    return (dt in (torch.float32, torch.float64) and W.dtype == dt and A.dtype == dt and B.dtype == dt
            and not W.requires_grad and not torch.is_autocast_enabled(x.device.type))


class _DoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, f: Tensor, s: float,
                p: float) -> Tensor:  # type: ignore[override]
        k, o = W.shape[1], W.shape[0]
        x2 = x.reshape(-1, k)
        hashed = None
        d2, s_eff = x2, s
        if p > 0:  # the fused LoRA path's hashed mask (shared by siblings reading x, never stored)
            group = DK._group_for(x, p, id(A))
            masked = group.masked
            if masked is None:
                masked = DK.masked(x, group.seed, p)
            d2, s_eff, hashed = masked.reshape(-1, k), s * DK.keep_scale(p), (group.seed, p)
        da = d2 @ A.transpose(0, 1)  # (n, r), the mask's scale folded into s_eff
        t = x2 @ W.transpose(0, 1)  # (n, out): x W0ᵀ ...
        t.addmm_(da, B.transpose(0, 1), alpha=s_eff)  # ... + s (d Aᵀ) Bᵀ
        fd = f.to(t.dtype)
        out = torch.addcmul(bias.to(t.dtype), t, fd) if bias is not None else t * fd
        ctx.save_for_backward(d2 if ctx.needs_input_grad[3] else None, da, t, W, A, B, fd)
        ctx.meta = (s_eff, hashed, x.shape, f.dtype)
        return out.view(*x.shape[:-1], o)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        d2, da, t, W, A, B, fd = ctx.saved_tensors
        s_eff, hashed, x_shape, f_dtype = ctx.meta
        nx, _, nbias, nA, nB, nf, _, _ = ctx.needs_input_grad
        g2 = g.reshape(-1, W.shape[0])
        gf = g2 * fd
        gx = gbias = gA = gB = gfac = None
        gfb = gf @ B if (nA or nx) else None  # (n, r)
        if nx:
            if hashed is None:
                gx = gf @ W
                gx.addmm_(gfb, A, alpha=s_eff)
            else:  # the LoRA part's dropped elements zeroed from the seed, then the base GEMM added
                gx = (gfb @ A).mul_(s_eff)
                DK.mask_(gx, *hashed)
                gx.addmm_(gf, W)
            gx = gx.view(x_shape)
        if nA:
            gA = (gfb.transpose(0, 1) @ d2).mul_(s_eff)
        if nB:
            gB = (gf.transpose(0, 1) @ da).mul_(s_eff)
        if nf:
            gfac = (g2 * t).sum(0).to(f_dtype)
        if nbias:
            gbias = g2.sum(0)
        return gx, None, gbias, gA, gB, gfac, None, None


def dora_linear(x: Tensor, W: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, f: Tensor, scaling: float,
                p: float = 0.0) -> Tensor:
    """``f ⊙ (x Wᵀ + s (d Aᵀ) Bᵀ) + b`` in one autograd node, ``d`` the input with the fused LoRA
    path's hashed dropout mask of probability ``p`` (:mod:`lorakit.kernels.dropout`; ``p=0``: x);
    ``W`` (out, in), ``f`` (out,) differentiable (in m); callers check :func:`fast_eligible`."""
    return _DoraLinear.apply(x, W, bias, A, B, f, scaling, p)
