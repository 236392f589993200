"""Combine adapters into a new one: ``linear`` (PEFT's rule), ``cat`` (exact sum), ``svd`` (truncated).

::

    report = lorakit.combine(model, {"a": 0.7, "b": 0.3}, method="svd", name="ab", rank=8)
    report.energy     # share of the exact sum's spectral energy the rank-8 adapter keeps
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .adapters.manage import _commit, _new_slot, _Staged
from .adapters.registry import _check_known, _check_new_name, _registry, _slots
from .config import LoraConfig
from .errors import AdapterMismatchError, LoraConfigError, UnsupportedModuleError
from .inject import LayerSpec
from .layers import Embedding, LoraLayer, MergedLinear, _InjectedConv
from .layers import Linear as LoraLinear

__all__ = ["CombineReport", "combine"]


@dataclass
class CombineReport:
    """What :func:`combine` made. ``energy`` is the share of ``sum ||dW||_F^2`` the new adapter
    keeps (1.0 for ``cat``; for ``svd`` the kept singular values' energy; None for ``linear``,
    which does not aim at the sum of deltas). ``per_layer`` has each layer's share (svd)."""

    name: str
    method: str
    rank: int
    layers: int
    energy: float | None
    per_layer: dict[str, float] = field(default_factory=dict)


def _plain_delta_layer(layer: LoraLayer) -> bool:
    """Layers whose update is exactly ``scaling * B @ A`` with A (r, in) and B (out, r)."""
    return isinstance(layer, (LoraLinear, Embedding, _InjectedConv))


def combine(model: nn.Module, weights: Mapping[str, float], method: str = "linear", name: str = "combined",
            rank: int | None = None) -> CombineReport:
    """Make a new adapter ``name`` from a weighted combination of existing ones (inactive).

    * ``"linear"``: same targets and ranks; ``A = sum sign(w_i) sqrt|w_i| s_i A_i`` and
      ``B = sum sqrt|w_i| B_i`` (scaling 1), PEFT's rule. Note: ``B A`` then holds cross terms
      ``B_j A_i``; it is **not** ``sum w_i dW_i`` unless the adapters are orthogonal.
    * ``"cat"``: ranks concatenate; ``dW = sum w_i s_i B_i A_i`` exactly (rank ``sum r_i``).
    * ``"svd"``: the exact ``sum w_i dW_i`` truncated to ``rank`` by SVD (through QR of the
      concatenated factors, no dense SVD); the report gives the spectral energy kept.
    """
    reg = _registry(model)
    if method not in ("linear", "cat", "svd"):
        raise LoraConfigError(f"combine: method {method!r} is not one of 'linear', 'cat', 'svd'")
    if not weights:
        raise LoraConfigError("combine: give at least one {adapter: weight}")
    _check_known(reg, list(weights))
    _check_new_name(reg, name)
    if method == "svd" and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise LoraConfigError(f"combine(method='svd') needs rank=<positive int>, got {rank!r}")
    ws = {n: float(w) for n, w in weights.items()}
    built: dict[str, tuple[LoraLayer, Tensor, Tensor]] = {}
    per_layer: dict[str, float] = {}
    kept_total = energy_total = 0.0
    for mod_name, layer in reg.layers:
        slots = _slots(layer)
        have = [n for n in ws if n in slots]
        if not have:
            continue
        if method == "linear":
            if len(have) != len(ws):
                missing = [n for n in ws if n not in have]
                raise AdapterMismatchError(f"combine(linear): {mod_name!r} has adapters {have} but not "
                                           f"{missing}; linear needs the same targets (use 'cat' or 'svd')")
            shapes = {tuple(slots[n].A.shape) for n in have}
            if len(shapes) != 1:
                raise AdapterMismatchError(f"combine(linear): ranks differ at {mod_name!r} "
                                           f"({ {n: slots[n].r for n in have} }); use method='cat' or 'svd'")
            with torch.no_grad():
                A = sum(math.copysign(math.sqrt(abs(ws[n])), ws[n]) * slots[n].scaling * slots[n].A
                        for n in have)
                B = sum(math.sqrt(abs(ws[n])) * slots[n].B for n in have)
            built[mod_name] = (layer, A, B)  # type: ignore[assignment]
            continue
        if not _plain_delta_layer(layer):
            raise UnsupportedModuleError(f"combine({method}): {mod_name!r} is a {type(layer).__name__}; "
                                         "cat and svd handle Linear, Embedding and injected convolutions")
        with torch.no_grad():
            Ac = torch.cat([slots[n].A for n in have], 0)  # (R, in)
            Bc = torch.cat([slots[n].B * (ws[n] * slots[n].scaling) for n in have], 1)  # (out, R)
            if method == "cat":
                built[mod_name] = (layer, Ac.clone(), Bc)
                continue
            qb, rb = torch.linalg.qr(Bc.double())  # (out, R), (R, R)
            qa, ra = torch.linalg.qr(Ac.double().transpose(0, 1))  # (in, R), (R, R)
            u, s, vh = torch.linalg.svd(rb @ ra.transpose(0, 1))
            k = min(rank, s.shape[0])  # type: ignore[type-var]
            root = s[:k].sqrt()
            B = (qb @ u[:, :k]) * root  # (out, k)
            A = root[:, None] * (vh[:k] @ qa.transpose(0, 1))  # (k, in)
            tot, kept = float((s ** 2).sum()), float((s[:k] ** 2).sum())
            per_layer[mod_name] = kept / tot if tot > 0 else 1.0
            kept_total += kept
            energy_total += tot
            built[mod_name] = (layer, A.to(Ac.dtype), B.to(Ac.dtype))
    if not built:
        raise AdapterMismatchError(f"combine: adapters {list(ws)} are on no layer")
    ranks = {m: a.shape[0] // (sum(layer.enable_lora) if isinstance(layer, MergedLinear) else 1)
             for m, (layer, a, _) in built.items()}
    r0 = max(ranks.values())
    esc = {m: re.escape(m) for m in built}
    config = LoraConfig(r=r0, alpha=r0, targets=tuple(built), rank_pattern={esc[m]: ranks[m] for m in built},
                        alpha_pattern={esc[m]: float(ranks[m]) for m in built})
    staged = _Staged(name, config, {}, {})
    for m, (layer, A, B) in built.items():
        spec = LayerSpec(ranks[m], float(ranks[m]), 0.0, False, "kaiming", None)
        staged.slots[m] = (layer, _new_slot(layer, spec, (A, B)))
    _commit(model, reg, staged)
    energy: float | None = None
    if method == "cat":
        energy = 1.0
    elif method == "svd":
        energy = kept_total / energy_total if energy_total else 1.0
    return CombineReport(name, method, r0, len(built), energy, per_layer)
