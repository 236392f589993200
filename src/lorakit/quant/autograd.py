"""The training path of a LoRA layer on a quantized base: ``h = x deq(Wq)^T + b + s B A (m ⊙ x)``.

One ``autograd.Function`` per projection. The dense weight ``deq(Wq)`` is made in the compute
dtype when the forward needs it and freed right after its GEMM; backward dequantizes again for
the input gradient. So no layer ever holds a dense copy of its weight across the step: the
resident base is the quantized bytes only, and the transient is one layer's dense weight at a time.
(On this project's CPU, dequantizing SmolLM2's largest weight, 1536×576 NF4 with double
quantization, takes ~0.4 ms against ~16 ms for the GEMM it feeds: dequantization is not the cost.)

The LoRA part follows :class:`lorakit.kernels.fused.FusedLoraLinear`: the update is added in place,
the scaling is the GEMM's ``alpha``, the dropout mask is hashed from a seed shared by sibling
projections (never stored), and only the (N, r) product ``t = (m ⊙ x) Aᵀ`` and the input (or the
masked input) are saved. The base weight gets no gradient (it is frozen; int8 / 4-bit codes have
none).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import dropout as DK
from ..kernels.fused import _cast, _compute_dtype, _mm_t, _no_autocast, _scaled_mm, _t_mm

Slices = tuple[tuple[int, int], ...]
Dequant = Callable[[torch.dtype], Tensor]


class QuantLoraLinear(torch.autograd.Function):
    """``out = x deq(W)^T + b``; ``out[:, o0:o1] += s_eff (m ⊙ x) A_j^T B_j^T`` for each slice j
    (no LoRA term when ``A`` is None: the bare quantized base with an input gradient)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, bias: Tensor | None, A: Tensor | None, B: Tensor | None, deq: Dequant,
                cdt: torch.dtype | None, scaling: float, p: float, slices: Slices,
                group: DK._DropGroup | None) -> Tensor:
        cdt = cdt or _compute_dtype(x)
        with _no_autocast(x.device.type):
            in_f = x.shape[-1]
            x2 = _cast(x.reshape(-1, in_f), cdt)  # (N, in)
            w = deq(cdt)  # (out, in), freed after the GEMM
            out = F.linear(x2, w, None if bias is None else _cast(bias, cdt))  # (N, in) -> (N, out)
            del w
            t = masked = None
            s_eff = scaling * (DK.keep_scale(p) if p > 0 else 1.0)
            if A is not None:
                if group is not None:
                    masked = group.masked
                    if masked is None:
                        with torch.no_grad():
                            masked = DK.masked(x, group.seed, p)
                else:
                    masked = x
                Ac, Bc = _cast(A, cdt), _cast(B, cdt)
                t = _mm_t(_cast(masked.reshape(-1, in_f), cdt), Ac)  # (N, in) @ (in, r*k) -> (N, r*k)
                if len(slices) == 1:
                    out.addmm_(t, Bc.transpose(0, 1), alpha=s_eff)  # (N, r) @ (r, out), in place
                else:
                    r, row = A.shape[0] // len(slices), 0
                    for j, (o0, o1) in enumerate(slices):
                        out[:, o0:o1].addmm_(t[:, j * r:(j + 1) * r], Bc[row:row + o1 - o0].transpose(0, 1),
                                             alpha=s_eff)
                        row += o1 - o0
        dropped = group is not None
        ctx.meta = (deq, cdt, s_eff, slices, x.shape, x.dtype, None if group is None else (group.seed, p))
        need_a = A is not None and ctx.needs_input_grad[2]
        ctx.save_for_backward(x if need_a and not dropped else None, masked if need_a and dropped else None, A, B, t)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, masked_in, A, B, t = ctx.saved_tensors
        deq, cdt, s_eff, slices, x_shape, x_dtype, hashed = ctx.meta
        need_x, need_b, need_a, need_bb = ctx.needs_input_grad[:4]
        in_f = x_shape[-1]
        gA = gB = gx = gb = None
        with _no_autocast(grad_out.device.type):
            g = _cast(grad_out.reshape(-1, grad_out.shape[-1]), cdt)  # (N, out)
            gt = None
            if A is not None:
                Bc = _cast(B, cdt)
                parts_b: list[Tensor] = []
                parts_t: list[Tensor] = []
                r, row = A.shape[0] // len(slices), 0
                for j, (o0, o1) in enumerate(slices):
                    gj = g if len(slices) == 1 else g[:, o0:o1]  # (N, rows)
                    if need_bb:  # (rows, N) @ (N, r) -> (rows, r)
                        parts_b.append(_t_mm(gj, t if len(slices) == 1 else t[:, j * r:(j + 1) * r]))
                    if need_a or need_x:  # (N, rows) @ (rows, r) -> (N, r), scaled
                        parts_t.append(_scaled_mm(gj, Bc[row:row + o1 - o0], s_eff))
                    row += o1 - o0
                if parts_b:
                    gB = (parts_b[0] if len(parts_b) == 1 else torch.cat(parts_b, 0)).mul_(s_eff)
                if parts_t:
                    gt = parts_t[0] if len(parts_t) == 1 else torch.cat(parts_t, 1)  # (N, r*k)
                if need_a:
                    src = masked_in if masked_in is not None else x
                    gA = _t_mm(_cast(src.reshape(-1, in_f), cdt), gt, transposed=True)  # (r*k, in)
            if need_x:
                gx_full = torch.empty(x_shape, dtype=cdt, device=g.device)
                gx = gx_full.view(-1, in_f)
                if gt is not None:  # the LoRA part, masked like dropout's backward, then the base GEMM
                    torch.mm(gt, _cast(A, cdt), out=gx)  # (N, r*k) @ (r*k, in)
                    if hashed is not None:
                        DK.mask_(gx, *hashed)
                    w = deq(cdt)  # (out, in), dequantized again rather than kept from forward
                    gx.addmm_(g, w)
                else:
                    w = deq(cdt)
                    torch.mm(g, w, out=gx)  # (N, out) @ (out, in) -> (N, in)
                del w
                gx = _cast(gx_full, x_dtype)
            if need_b:
                gb = g.sum(0)
        return (gx, gb, None if gA is None else _cast(gA, A.dtype), None if gB is None else _cast(gB, B.dtype),
                None, None, None, None, None, None)


def quant_lora_linear(x: Tensor, bias: Tensor | None, A: Tensor | None, B: Tensor | None, deq: Dequant,
                      cdt: torch.dtype | None, scaling: float, p: float, slices: Slices, user: int) -> Tensor:
    """Run :class:`QuantLoraLinear` (``p``: the active drop probability, 0 in eval; ``user``: the
    adapter's identity for sharing dropout masks between sibling projections)."""
    group = DK._group_for(x, p, user) if p > 0.0 and A is not None else None
    needs_graph = torch.is_grad_enabled() and (
        x.requires_grad or (bias is not None and bias.requires_grad)
        or (A is not None and (A.requires_grad or B.requires_grad)))
    if not needs_graph:
        with torch.no_grad():
            return QuantLoraLinear.forward(_NoCtx(), x, bias, A, B, deq, cdt, scaling, p, slices, group)
    return QuantLoraLinear.apply(x, bias, A, B, deq, cdt, scaling, p, slices, group)


class _NoCtx:
    needs_input_grad = (False,) * 10

    def save_for_backward(self, *tensors: Any) -> None:
        pass
