"""DoRA rows in a mixed-adapter batch (:mod:`.mixed`): each row its own adapter's
``m ⊙ (W0 + s B A) / ‖W0 + s B A‖``, the norm being per adapter.

With ``f_g = m_g / ‖W0 + s_g B_g A_g‖`` (per output, the norm detached as in :mod:`lorakit.variants.dora`)
a DoRA row's output is ``f_g ⊙ (x W0ᵀ + s_g (d A_gᵀ) B_gᵀ) + b``. The layer's base forward gives
``y = x W0ᵀ + b``, so::

    h_row = F_row ⊙ (y - b) + b  +  s_g (d A_gᵀ) (f_g ⊙ B_g)ᵀ

``F`` stacks the adapters' factors (G+1, out) with ones for plain-LoRA adapters and for "base" rows
(the zero slot), so their rows are untouched; the low-rank part is :mod:`.batched`'s stacked matmuls
with each DoRA adapter's ``B`` scaled row-wise by ``f_g`` (differentiable in ``m`` when training).
Dropout acts on the low-rank input only (:func:`~lorakit.variants.dora.set_dropout_form`'s
``"lora-only"``); a layer set to ``"peft"`` is refused while dropout is active.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import MixedBatchError
from ..variants.dora import _Dora

__all__ = ["check_variants", "dora_B", "factor_stack", "rescale_rows"]


def check_variants(mod_name: str, layer: nn.Module, slots: Sequence[Any]) -> bool:
    """True when one of ``slots`` is a DoRA adapter; raises for any other variant (its own forward)."""
    dora = False
    for s in slots:
        v = s.variant
        if v is None:
            continue
        if not isinstance(v, _Dora):
            raise MixedBatchError(f"mixed-adapter batches: {mod_name!r} has a {v.describe()} adapter; "
                                  "use one adapter per batch for it (DoRA and plain LoRA mix)")
        dora = True
    return dora


def _factor(layer: nn.Module, s: Any) -> Tensor:
    return s.variant.row_factor(layer, s.A, s.B, s.scaling)


def dora_B(layer: nn.Module, s: Any, B: Tensor) -> Tensor:
    """``B`` (out, r) of a DoRA slot with each output row scaled by ``f``; a plain slot's unchanged."""
    if s.variant is None:
        return B
    return B * _factor(layer, s).to(B.dtype).unsqueeze(1)


def factor_stack(layer: nn.Module, slots: Sequence[Any]) -> Tensor | None:
    """``F`` (G+1, out), fp32: each slot's DoRA factor, ones for plain slots and the zero slot;
    None when no slot is DoRA."""
    if all(s.variant is None for s in slots):
        return None
    fs = [_factor(layer, s) if s.variant is not None else None for s in slots]
    ref = next(f for f in fs if f is not None)
    ones = torch.ones_like(ref, requires_grad=False)
    return torch.stack([f if f is not None else ones for f in fs] + [ones])


def check_dropout(layer: nn.Module, mod_name: str, slots: Sequence[Any], dropping: bool) -> None:
    """Refuse PEFT's dropout form in a mixed batch (its second base GEMM per adapter is not batched)."""
    if not dropping:
        return
    for s in slots:
        if s.variant is not None and s.variant.dropout_form == "peft" and not isinstance(s.dropout, nn.Identity):
            raise MixedBatchError(f"mixed-adapter batches: {mod_name!r} uses DoRA's 'peft' dropout form while "
                                  "training; set_dropout_form(model, 'lora-only') or eval() for mixed batches")


def rescale_rows(out: Tensor, slot: Tensor, fac: Tensor, bias: Tensor | None) -> Tensor:
    """``F_row ⊙ (out - b) + b`` with ``F_row = fac[slot[row]]`` broadcast over the row's positions."""
    fr = fac.index_select(0, slot).view(out.shape[0], *([1] * (out.dim() - 2)), out.shape[-1])
    y = out.to(fr.dtype)
    if bias is None:
        return (fr * y).to(out.dtype)
    b = bias.to(fr.dtype)
    return (fr * (y - b) + b).to(out.dtype)
