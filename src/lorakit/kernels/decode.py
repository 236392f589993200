"""Inference (no autograd) forward of an adapted linear layer: the fewest ops per call.

In token-by-token decoding each op's dispatch is what LoRA costs, so this path avoids views and
temporaries: for ≤ :data:`KERNEL_ROWS` float32 CPU rows the whole layer (base GEMV and
``s (x Aᵀ) Bᵀ``) is one call of the C++ ``linear_rows`` (:mod:`lorakit.kernels.cpu`); with many rows
per weight the update is folded into a temporary weight (:func:`lorakit.kernels.fused.fold_pays`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import fused as FK
from .fused import Slices


def _inference_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
                      scaling: float) -> Tensor:
    """:func:`_inference` for one (out, in) weight without autocast: the fewest ops."""
    in_f = x.shape[-1]
    n = x.numel() // in_f if in_f else 0
    ext = FK._cpu_ext(x) if n <= KERNEL_ROWS else None
    if ext is not None:
        # decoding: the whole layer in one C++ call (base GEMV and s (x A^T) B^T); where it does not
        # take these tensors, the base GEMV and the low-rank kernel, else four ATen calls
        out = ext.linear_rows(x, weight, bias, A, B, scaling)
        if out is not None:
            return out
        out = F.linear(x, weight, bias)
        if ext.lora_add_(out, x, A, B, scaling):
            return out
        return out.add_(F.linear(F.linear(x, A), B), alpha=scaling)
    if n < _SMALL_ROWS:  # few rows: three GEMM calls, no views (their dispatch is the cost here)
        return F.linear(x, weight, bias).add_(F.linear(F.linear(x, A), B), alpha=scaling)
    out_f = weight.shape[0]
    if FK.fold_pays(n, in_f, out_f):
        return F.linear(x, FK.folded_weight(weight, A, B, ((0, out_f),), scaling), bias)
    out = F.linear(x, weight, bias)
    out.view(-1, out_f).addmm_(F.linear(x.reshape(-1, in_f), A), B.transpose(0, 1), alpha=scaling)
    return out


#: Up to this many rows (token-by-token decoding) the no-grad float32 forward on CPU runs the whole
#: layer in :mod:`lorakit.kernels.cpu`' ``linear_rows`` (fused qkv: its base, then ``lora_add_`` per
#: slice). With SmolLM2's weights coming from DRAM the unmerged layer then costs 0.79-0.82x the base
#: ``F.linear`` for one row and 0.77-0.87x for four, but 1.12x for eight and 1.5x for sixteen, where
#: MKL's GEMM reuses each weight load across rows (``python -m benchmarks.micro_decode --cold``).
KERNEL_ROWS = 4

#: Below this many rows the no-grad forward adds ``s (x A^T) B^T`` through a temporary instead of
#: ``addmm_`` into a 2-d view: the (rows, out) temporary is cheaper than the extra view calls.
_SMALL_ROWS = 64



def _inference(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float,
               slices: Slices, fan_in_fan_out: bool) -> Tensor:
    """No-autograd forward: base linear with the folded weight when enough rows share it, else the
    base linear plus an ``addmm_`` (scaling as its ``alpha``) of each slice's low-rank product.
    Few ops on purpose: in token-by-token generation each op's dispatch cost is the overhead."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        with torch.autocast(dev, enabled=False):
            cdt = torch.get_autocast_dtype(dev)
            return _inference(x.to(cdt), weight.to(cdt), None if bias is None else bias.to(cdt),
                              A.to(cdt), B.to(cdt), scaling, slices, fan_in_fan_out)
    w = weight.transpose(0, 1) if fan_in_fan_out else weight  # (out, in)
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    if FK.fold_pays(x2.shape[0], w.shape[1], w.shape[0]):
        out2 = F.linear(x2, FK.folded_weight(w, A, B * scaling, slices), bias)
        return out2.view(*x.shape[:-1], out2.shape[-1])
    ext = FK._cpu_ext(x2) if x2.shape[0] <= KERNEL_ROWS else None  # decoding: C++ base, one call per slice
    out2 = _base_rows(ext, x2, w, bias)  # (N, in) -> (N, out)
    if ext is not None and _kernel_slices(ext, out2, x2, A, B, scaling, slices):
        return out2.view(*x.shape[:-1], out2.shape[-1])
    t = F.linear(x2, A)  # (N, in) -> (N, r*k)
    if len(slices) == 1:
        o0, o1 = slices[0]
        (out2 if o1 - o0 == out2.shape[1] else out2[:, o0:o1]).addmm_(t, B.transpose(0, 1), alpha=scaling)
    else:
        r = A.shape[0] // len(slices)
        row = 0
        for j, (o0, o1) in enumerate(slices):  # (N, r) @ (r, rows), scaled, added in place
            Bj = B[row:row + o1 - o0].transpose(0, 1)  # (r, rows)
            out2[:, o0:o1].addmm_(t[:, j * r:(j + 1) * r], Bj, alpha=scaling)
            row += o1 - o0
    return out2.view(*x.shape[:-1], out2.shape[-1])


def _base_rows(ext: Any | None, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)``, by the C++ decode kernel where ``ext`` is given and takes the tensors."""
    if ext is not None:
        out = ext.linear_rows(x, weight, bias, None, None, 0.0)
        if out is not None:
            return out
    return F.linear(x, weight, bias)


def _kernel_slices(ext: Any, out2: Tensor, x2: Tensor, A: Tensor, B: Tensor, scaling: float,
                   slices: Slices) -> bool:
    """``out2[:, slice] += s (x2 A_jᵀ) B_jᵀ`` for every slice by the C++ kernel; False (nothing written)
    when it does not take these tensors."""
    r = A.shape[0] // len(slices)
    row = 0
    for j, (o0, o1) in enumerate(slices):
        Aj, Bj, oj = A[j * r:(j + 1) * r], B[row:row + o1 - o0], out2[:, o0:o1]
        if not ext.lora_add_(oj, x2, Aj, Bj, scaling):
            if j == 0:  # the slices share dtypes and layouts: a refusal comes at the first
                return False
            oj.addmm_(F.linear(x2, Aj), Bj.transpose(0, 1), alpha=scaling)
        row += o1 - o0
    return True

