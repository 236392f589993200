"""Fused LoRA autograd path: ``h = x W^T + b + s B A (m ⊙ x)`` as one ``autograd.Function``.

What it saves over the plain composition in :mod:`lorakit.functional` (the reference path):

* The low-rank update is added into the base output **in place** (``addmm_``) and the scaling
  ``alpha/r`` (times the dropout keep-scale) is the GEMMs' ``alpha`` or scales an (N, r) product,
  so no extra (N, out) tensors are made for ``B A x``, its scaled copy or the sum, and no scaled
  copy of ``B`` (each small op is ~5-25 µs of dispatch: a few per projection are a point of the
  SmolLM2 step).
* Without dropout and with many rows (tokens) per weight (:func:`fold_pays`), the update is folded
  into a temporary weight ``W' = W + s B A`` (out*in*r flops): the forward and the input gradient
  are then one GEMM each, with no rank-r pass over the (N, out) output or the (N, in) input grad.
  ``W'`` is rebuilt in backward rather than saved (no weight-sized activation).
* Saved for backward: the input ``x`` (once; the same tensor object for sibling projections) or,
  with dropout, the masked input instead of ``x`` (same size, also shared by siblings; saves
  rebuilding it), the (N, r) intermediate ``A x`` and nothing else. The dropout mask is **not**
  saved: backward applies it again from its 32-bit seed, so dropout costs no extra activation
  memory, instead of a float copy of ``dropout(x)`` plus a bool mask per module.
* Sibling projections that read the same tensor (q/k/v, gate/up) share one dropout mask and one
  masked input, as loralib's ``MergedLinear`` does for a fused qkv: a one-entry cache keyed by the
  input tensor's identity and version (:class:`_DropGroup`). Their backwards apply the same
  mask from the group's seed.
* Gradients are computed only where ``needs_input_grad`` says so: a frozen base weight gets no
  weight gradient, the input gets one only when it requires grad.
* The dropout mask is a counter-based hash of ``(seed, element index)`` (:mod:`lorakit.kernels.dropout`;
  ``p`` quantised to 1/65536, the keep-scale uses the quantised ``p`` so the estimator stays
  unbiased). No mask tensor exists: on CPU one C++ pass writes the masked input in forward and
  another zeroes the dropped input-gradient elements in backward (torch integer ops compute the
  identical mask where the kernel is unavailable).
* The rank-r products (``x Aᵀ``, ``g Bᵀ``, ``gᵀ (x Aᵀ)``, ``(g B)ᵀ x``) run in
  :mod:`lorakit.kernels.cpu` when their wide operand no longer fits the caches
  (:data:`SKINNY_MIN_ELEMENTS`, float32 CPU; the weight-gradient products ``Gᵀ T`` from the much
  smaller :data:`GRAD_PRODUCT_MIN_ELEMENTS`): MKL runs these skinny shapes well below memory
  bandwidth.
* Without autograd (inference) nothing is saved and no Function runs. For token-by-token decoding
  (≤ :data:`KERNEL_ROWS` rows, CPU, float32) the whole layer, base GEMV and low-rank update, is one
  call of the C++ ``linear_rows`` (:mod:`lorakit.kernels.cpu`) instead of four BLAS calls and an
  add; merged layers decode through the same kernel (:func:`merged_linear`).

When the fused path is used (:func:`fused_eligible`): the layer is active, the fast path is
enabled (:func:`set_enabled`, :func:`disabled`) and the layer's ``lora_fused`` attribute is not
False, its dropout is an ``nn.Dropout`` or ``nn.Identity``, the input is floating point, and the
dtypes line up (input, base weight and adapter share one dtype, or autocast is on for the input's
device). Anything else (custom dropout modules, mixed dtypes without autocast, functorch
transforms of the layer) takes the plain path, whose result the fused path reproduces to
round-off. Under ``torch.compile`` the mask is drawn with ``torch.rand`` and saved as a bool
tensor (1 byte per element) because dynamo cannot trace generator objects; everything else is the
same Function, traced without graph breaks.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import cpu as CK
from . import dropout as DK
from .dropout import _DropGroup, keep_scale

Slices = tuple[tuple[int, int], ...]



# --- skinny products ------------------------------------------------------------------------------
#: The rank-r products of the training step go to :mod:`lorakit.kernels.cpu` (float32 CPU) when the
#: wide operand has at least this many elements, i.e. no longer fits the caches: there MKL runs
#: them at a third of memory bandwidth, below it MKL is as fast or faster (SmolLM2's 512-row
#: steps). ``0`` always uses the kernels (tests), ``inf`` never.
SKINNY_MIN_ELEMENTS: float = 1 << 20
#: The weight-gradient products ``Gᵀ T`` use the register-blocked kernel from this many elements of
#: ``G``: MKL's r-major product is slow already at SmolLM2's 512-row shapes (512×1536, r=16: 0.71 ms
#: vs the kernel's 0.44 ms on one thread, 0.66 vs 0.32 ms on two).
GRAD_PRODUCT_MIN_ELEMENTS: float = 1 << 16


def _cpu_ext(t: Tensor) -> Any | None:
    """The C++ kernels for a CPU tensor outside ``torch.compile`` (dynamo cannot trace them), else None."""
    if not t.is_cpu or torch.compiler.is_compiling():
        return None
    return CK.extension()


def _skinny_ext(wide: Tensor, min_elements: float) -> Any | None:
    if wide.numel() < min_elements or wide.dtype != torch.float32:
        return None
    return _cpu_ext(wide)


def _mm_t(X: Tensor, M: Tensor) -> Tensor:
    """``X Mᵀ``: (N, k) @ (k, r) -> (N, r)."""
    ext = _skinny_ext(X, SKINNY_MIN_ELEMENTS)
    out = ext.rows_mm_t(X, M) if ext is not None else None
    return F.linear(X, M) if out is None else out


def _scaled_mm(G: Tensor, B: Tensor, s: float) -> Tensor:
    """``s G B``: (N, o) @ (o, r) -> (N, r). The kernel takes ``s Bᵀ`` as a contiguous (r, o);
    MKL is as fast with B as it is (so no transposed copy, 15-27 µs per call at SmolLM2's widths)."""
    ext = _skinny_ext(G, SKINNY_MIN_ELEMENTS)
    if ext is not None:
        sbt = torch.empty((B.shape[1], B.shape[0]), dtype=B.dtype, device=B.device)
        out = ext.rows_mm_t(G, torch.mul(B.transpose(0, 1), s, out=sbt))
        if out is not None:
            return out
    return torch.mm(G, B).mul_(s)


def _t_mm(G: Tensor, T: Tensor, transposed: bool = False) -> Tensor:
    """``Gᵀ T``: (o, N) @ (N, r) -> (o, r); its transpose ``Tᵀ G`` (r, o) when ``transposed``."""
    ext = _skinny_ext(G, GRAD_PRODUCT_MIN_ELEMENTS)
    out = ext.rows_t_mm(G, T) if ext is not None else None
    if out is None:  # (r, N) @ (N, o): the r-major product is the fast BLAS shape
        rt = T.transpose(0, 1) @ G
        return rt if transposed else rt.transpose(0, 1)
    return out.transpose(0, 1).contiguous() if transposed else out


# --- the Function -------------------------------------------------------------------------------
def _compute_dtype(x: Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


_NO_CONTEXT = contextlib.nullcontext()


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast switched off inside the Function (it casts itself), or nothing when it is off anyway."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return _NO_CONTEXT


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without the dispatch when it is already ``dtype`` (the common case)."""
    return t if t.dtype == dtype else t.to(dtype)


class FusedLoraLinear(torch.autograd.Function):
    """``out = x W^T + b``; ``out[:, o0:o1] += s_eff * (m ⊙ x) A_j^T B_j^T`` for each slice j.

    ``slices`` lists the output column ranges with a rank-r block (one range for ``Linear``,
    the enabled q/k/v slices for ``MergedLinear``); A is (r*k, in), B is (rows*k, r).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor,
                keep: Tensor | None, scaling: float, p: float, slices: Slices, fan_in_fan_out: bool,
                group: _DropGroup | None) -> Tensor:
        cdt = _compute_dtype(x)
        dev = x.device.type
        with _no_autocast(dev):
            in_f = x.shape[-1]
            x2 = _cast(x.reshape(-1, in_f), cdt)  # (N, in)
            w = _cast(weight, cdt)
            w = w.transpose(0, 1) if fan_in_fan_out else w  # (out, in)
            s_eff = scaling * (keep_scale(p) if p > 0 else 1.0)
            Ac = _cast(A, cdt)
            Bc = _cast(B, cdt)  # (rows*k, r); the scaling goes in as the GEMMs' alpha
            fold = group is None and keep is None and fold_pays(x2.shape[0], in_f, w.shape[0])
            if fold:  # no dropout, many rows: one GEMM with W' = W + s B A (out*in*r flops)
                out = F.linear(x2, folded_weight(w, Ac, Bc, slices, s_eff), None if bias is None else _cast(bias, cdt))
                # t = x A^T is only needed for grad B
                t = _mm_t(x2, Ac) if ctx.needs_input_grad[4] else None  # (N, in) -> (N, r*k)
            else:
                out = F.linear(x2, w, None if bias is None else _cast(bias, cdt))  # (N, in) -> (N, out)
                if group is not None:  # eager dropout: the group's masked input (one per sibling group)
                    masked = group.masked
                    if masked is None:
                        with torch.no_grad():
                            masked = DK.masked(x, group.seed, p)
                elif keep is not None:  # compiled dropout: explicit bool mask
                    masked = torch.where(keep, x, 0)
                else:
                    masked = x
                t = _mm_t(_cast(masked.reshape(-1, in_f), cdt), Ac)  # (N, in) @ (in, r*k) -> (N, r*k)
                if len(slices) == 1:  # (N, r) @ (r, out), added in place
                    out.addmm_(t, Bc.transpose(0, 1), alpha=s_eff)
                else:
                    r = A.shape[0] // len(slices)
                    row = 0
                    for j, (o0, o1) in enumerate(slices):
                        # (N, r) @ (r, rows) -> added in place into out[:, o0:o1]
                        out[:, o0:o1].addmm_(t[:, j * r:(j + 1) * r], Bc[row:row + o1 - o0].transpose(0, 1),
                                             alpha=s_eff)
                        row += o1 - o0
        dropped = group is not None or keep is not None
        ctx.meta = (scaling, s_eff, slices, fan_in_fan_out, cdt, x.shape, x.dtype, bias is not None, fold,
                    dropped, None if group is None else (group.seed, p))
        # grad A needs the (masked) input, grad W the input: with dropout, the masked input is saved
        # instead of x (same size, shared by siblings) so backward need not rebuild it
        need_a, need_w = ctx.needs_input_grad[3], ctx.needs_input_grad[1]
        ctx.save_for_backward(x if need_w or (need_a and not dropped) else None, weight, A, B, t,
                              keep if group is None else None, masked if need_a and dropped else None)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, A, B, t, keep, masked_in = ctx.saved_tensors
        _scaling, s_eff, slices, fifo, cdt, x_shape, x_dtype, has_bias, fold, dropped, hashed = ctx.meta
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        in_f = x_shape[-1]
        with _no_autocast(grad_out.device.type):
            g = _cast(grad_out.reshape(-1, grad_out.shape[-1]), cdt)  # (N, out)
            x2 = _cast(x.reshape(-1, in_f), cdt) if x is not None else None
            mask: Tensor | None = None
            masked = x2
            if dropped:
                masked = _cast(masked_in.reshape(-1, in_f), cdt) if masked_in is not None else None
                if need_x and hashed is None:  # compiled dropout: the saved bool mask
                    mask = _cast(keep, cdt).reshape(-1, in_f)
            Ac = _cast(A, cdt)
            need_gt = need_a or (need_x and not fold)
            Bc = _cast(B, cdt)
            gB: Tensor | None = None
            gt: Tensor | None = None
            if len(slices) == 1:
                if need_bb:  # (out, N) @ (N, r) -> (out, r)
                    gB = _t_mm(g, t)
                if need_gt:  # (N, out) @ (out, r) -> (N, r), scaled
                    gt = _scaled_mm(g, Bc, s_eff)
            else:
                r = A.shape[0] // len(slices)
                gB_parts: list[Tensor] = []
                gt_parts: list[Tensor] = []
                row = 0
                for j, (o0, o1) in enumerate(slices):
                    gj = g[:, o0:o1]  # (N, rows)
                    if need_bb:  # (rows, N) @ (N, r) -> (rows, r)
                        gB_parts.append(_t_mm(gj, t[:, j * r:(j + 1) * r]))
                    if need_gt:
                        gt_parts.append(_scaled_mm(gj, Bc[row:row + o1 - o0], s_eff))
                    row += o1 - o0
                if gB_parts:
                    gB = torch.cat(gB_parts, 0)
                if gt_parts:
                    gt = torch.cat(gt_parts, 1)  # (N, r*k)
            if gB is not None:
                gB = gB.mul_(s_eff)  # a fresh product (or a view of one): scaled in place
            gA = _t_mm(masked, gt, transposed=True) if need_a else None  # (r*k, N) @ (N, in) -> (r*k, in)
            gx = None
            if need_x:
                w = _cast(weight, cdt)
                w = w.transpose(0, 1) if fifo else w  # (out, in)
                gx_full = torch.empty(x_shape, dtype=cdt, device=g.device)  # a base tensor, not a view:
                gx = gx_full.view(-1, in_f)  # autograd can then take it as x.grad without a copy
                if fold:  # one GEMM with the recomputed W' = W + s B A
                    torch.mm(g, folded_weight(w, Ac, Bc, slices, s_eff), out=gx)
                elif not dropped:
                    torch.mm(g, w, out=gx)  # (N, out) @ (out, in) -> (N, in)
                    gx.addmm_(gt, Ac)  # (N, r*k) @ (r*k, in), added in place
                else:  # dropout's backward: the LoRA part masked, then the GEMM accumulates into it
                    torch.mm(gt, Ac, out=gx)
                    if hashed is not None:  # the dropped elements zeroed from the seed, in one pass
                        DK.mask_(gx, *hashed)
                    else:
                        gx.mul_(mask)
                    gx.addmm_(g, w)
                gx = _cast(gx_full, x_dtype)
            gw = None
            if need_w:
                gw = (x2.transpose(0, 1) @ g) if fifo else (g.transpose(0, 1) @ x2)  # (in,out) or (out,in)
                gw = _cast(gw, weight.dtype)
            gb = _cast(g.sum(0), weight.dtype) if (need_b and has_bias) else None
        return (gx, gw, gb, None if gA is None else _cast(gA, A.dtype), None if gB is None else _cast(gB, B.dtype),
                None, None, None, None, None, None)


#: Fold ``s B A`` into a temporary weight when the rows (tokens) reach this multiple of
#: ``out*in/(out+in)`` (half the harmonic mean of the two widths): below it, the two rank-r passes
#: over the (N, out) output and (N, in) input grad cost less than building the (out, in) weight twice
#: (forward, and again in backward). Measured on a 2-core AMD EPYC, D=768, one thread
#: (``python -m benchmarks.micro_fused --threads 1 --tokens 4096,8192``): even at 4096 rows
#: (1.13x vs 1.12x the frozen floor), clearly ahead at 8192 (1.03x vs 1.12x); so from ~3.8k rows.
#: ``inf`` never folds, ``0`` always does (tests).
FOLD_ROWS_FACTOR = 10.0


def fold_pays(n: int, in_f: int, out_f: int) -> bool:
    """Whether folding ``W' = W + s B A`` beats adding the low-rank product per row (no dropout)."""
    return n >= FOLD_ROWS_FACTOR * in_f * out_f / (in_f + out_f)


def folded_weight(w: Tensor, A: Tensor, Bs: Tensor, slices: Slices, alpha: float = 1.0) -> Tensor:
    """``W + alpha Bs A`` per slice, a new (out, in) tensor; ``w`` is (out, in), ``Bs`` already scaled
    unless ``alpha`` scales it."""
    if len(slices) == 1 and slices[0] == (0, w.shape[0]):
        return torch.addmm(w, Bs, A, alpha=alpha)  # (out, r) @ (r, in) + W
    wf = w.clone(memory_format=torch.contiguous_format)
    r = A.shape[0] // len(slices)
    row = 0
    for j, (o0, o1) in enumerate(slices):
        wf[o0:o1].addmm_(Bs[row:row + o1 - o0], A[j * r:(j + 1) * r], alpha=alpha)
        row += o1 - o0
    return wf

