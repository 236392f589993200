"""Combine adapters into a new one: ``linear`` (PEFT's rule), ``cat`` (exact sum), ``svd`` (truncated),
and PEFT's task-arithmetic merges ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (on the
factors) and their ``*_svd`` forms (on the dense updates, then truncated): :mod:`lorakit.task_arithmetic`.

::

    report = lorakit.combine(model, {"a": 0.7, "b": 0.3}, method="svd", name="ab", rank=8)
    report.energy     # share of the exact sum's spectral energy the rank-8 adapter keeps
    lorakit.combine(model, {"a": 1.0, "b": 1.0}, method="ties", density=0.5, name="ab_ties")
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import task_arithmetic as TA
from .adapters.manage import _commit, _new_slot, _Staged
from .adapters.registry import _check_known, _check_new_name, _registry, _slots
from .checks import takes_model
from .config import LoraConfig
from .errors import AdapterMismatchError, LoraConfigError, UnsupportedModuleError
from .inject import LayerSpec
from .layers import Embedding, LoraLayer, MergedLinear, _InjectedConv
from .layers import Linear as LoraLinear
from .layers.param import LoraParameter

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


#: Methods on the factors (A and B separately; same targets and ranks, like ``linear``).
FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
#: Methods on the dense updates ``w_i s_i B_i A_i``, then an SVD truncated to ``rank``.
DENSE_METHODS = ("ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = (*FACTOR_METHODS, "cat", "svd", *DENSE_METHODS)
_DENSITY = {"ties", "dare_linear", "dare_ties", "magnitude_prune", *DENSE_METHODS}


def _merge(method: str, tensors: list[Tensor], weights: list[float], density: float | None, sign: str,
           generator: torch.Generator | None) -> Tensor:
    """One task-arithmetic merge of ``tensors`` (``method`` without its ``_svd``)."""
    base = method.removesuffix("_svd")
    if base == "linear":
        return TA.weighted_sum(tensors, weights)
    assert density is not None
    if base == "ties":
        return TA.ties(tensors, weights, density, sign)
    if base == "dare_linear":
        return TA.dare_linear(tensors, weights, density, generator=generator)
    if base == "dare_ties":
        return TA.dare_ties(tensors, weights, density, sign, generator=generator)
    return TA.magnitude_prune(tensors, weights, density)


def _truncate(dense: Tensor, rank: int) -> tuple[Tensor, Tensor, float, float]:
    """``dense ≈ B A`` with rank ``rank`` (root singular values on both sides); kept and total energy."""
    u, s, vh = torch.linalg.svd(dense.double(), full_matrices=False)
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    return root[:, None] * vh[:k], u[:, :k] * root, float((s[:k] ** 2).sum()), float((s ** 2).sum())


def _refuse_variants(reg: object, names: list[str]) -> None:
    for n in names:
        cfg = reg.configs[n]  # type: ignore[attr-defined]
        if getattr(cfg, "use_dora", False):
            raise UnsupportedModuleError(
                f"combine: adapter {n!r} is a DoRA adapter; a weighted combination of DoRA adapters is not "
                "defined (each has its own magnitude vector m and column norm ||W0 + sBA||): merge_and_unload "
                "them one at a time, or combine plain LoRA adapters")


@takes_model
def combine(model: nn.Module, weights: Mapping[str, float], method: str = "linear", name: str = "combined",
            rank: int | None = None, *, density: float | None = None, majority_sign_method: str = "total",
            seed: int | None = None) -> CombineReport:
    """Make a new adapter ``name`` from a weighted combination of existing ones (inactive).

    * ``"linear"``: same targets and ranks; ``A = sum sign(w_i) sqrt|w_i s_i| A_i`` and
      ``B = sum sqrt|w_i s_i| B_i`` (scaling 1), PEFT's ``add_weighted_adapter`` rule (peft 0.21;
      tested against it, ``tests/test_vs_peft.py``). Note: ``B A`` then holds cross terms
      ``B_j A_i``; it is **not** ``sum w_i dW_i`` unless the adapters are orthogonal.
    * ``"cat"``: ranks concatenate; ``dW = sum w_i s_i B_i A_i`` exactly (rank ``sum r_i``).
    * ``"svd"``: the exact ``sum w_i dW_i`` truncated to ``rank`` by SVD (through QR of the
      concatenated factors, no dense SVD); the report gives the spectral energy kept.
    * ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``: PEFT's task-arithmetic
      merges applied to the A and to the B factors (weights ``sign(w s) sqrt|w s|`` on A and
      ``sqrt|w s|`` on B, as ``linear``); ``density`` (0 < density <= 1) is the share of entries
      kept, ``majority_sign_method`` ``"total"`` or ``"frequency"``, ``seed`` fixes DARE's masks
      (default: torch's global generator, as PEFT).
    * ``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``, ``"magnitude_prune_svd"``: the
      same merges on the dense updates ``s_i B_i A_i`` with weights ``w_i``, truncated to ``rank``.

    DoRA adapters are refused (the combination is not defined for them).
    """
    reg = _registry(model)
    if method not in METHODS:
        raise LoraConfigError(f"combine: method {method!r} is not one of {', '.join(map(repr, METHODS))}")
    if not weights:
        raise LoraConfigError("combine: give at least one {adapter: weight}")
    _check_known(reg, list(weights))
    _check_new_name(reg, name)
    _refuse_variants(reg, list(weights))
    dense = method == "svd" or method in DENSE_METHODS
    if dense and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise LoraConfigError(f"combine(method={method!r}) needs rank=<positive int>, got {rank!r}")
    if method in _DENSITY:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < float(density) <= 1.0:
            raise LoraConfigError(f"combine(method={method!r}) needs density=<share of entries kept, in (0, 1]>, "
                                  f"got {density!r}")
        density = float(density)
    elif density is not None:
        raise LoraConfigError(f"combine: density= applies to {sorted(_DENSITY)}, not to method={method!r}")
    if majority_sign_method not in TA.SIGN_METHODS:
        raise LoraConfigError(f"combine: majority_sign_method {majority_sign_method!r} is not one of "
                              f"{TA.SIGN_METHODS}")
    gen = None
    if seed is not None:
        gen = torch.Generator().manual_seed(int(seed))
    ws = {n: float(w) for n, w in weights.items()}
    built: dict[str, tuple[LoraLayer, Tensor, Tensor]] = {}
    per_layer: dict[str, float] = {}
    kept_total = energy_total = 0.0
    for mod_name, layer in reg.layers:
        slots = _slots(layer)
        have = [n for n in ws if n in slots]
        if not have:
            continue
        if isinstance(layer, LoraParameter):  # before any change: the model is left as it was
            owner = mod_name.rsplit(".", 1)[0] if "." in mod_name else ""
            raise UnsupportedModuleError(
                f"combine({method}): {mod_name!r} is LoRA on the parameter {owner + '.' if owner else ''}"
                f"{layer.param_name} (target_parameters); combining parameter-target adapters is not supported "
                "(PEFT's add_weighted_adapter has no target_parameters either): set_adapter one of them, or "
                "merge_and_unload them one at a time")
        if method in FACTOR_METHODS:
            if len(have) != len(ws):
                missing = [n for n in ws if n not in have]
                raise AdapterMismatchError(f"combine({method}): {mod_name!r} has adapters {have} but not "
                                           f"{missing}; {method} needs the same targets (use 'cat' or 'svd')")
            shapes = {tuple(slots[n].A.shape) for n in have}
            if len(shapes) != 1:
                ranks_here = {n: slots[n].r for n in have}
                raise AdapterMismatchError(f"combine({method}): ranks differ at {mod_name!r} ({ranks_here}); "
                                           "use method='cat' or 'svd'")
            with torch.no_grad():
                if method == "linear":
                    wsc_ = {n: ws[n] * slots[n].scaling for n in have}  # PEFT: sqrt|w s| on both sides
                    A = sum(math.copysign(math.sqrt(abs(wsc_[n])), wsc_[n]) * slots[n].A for n in have)
                    B = sum(math.sqrt(abs(wsc_[n])) * slots[n].B for n in have)
                else:  # PEFT's form: each weight (times the scaling) split as square roots over A and B
                    wsc = [ws[n] * slots[n].scaling for n in have]
                    A = _merge(method, [slots[n].A.detach() for n in have],
                               [math.copysign(math.sqrt(abs(w)), w) for w in wsc], density, majority_sign_method, gen)
                    B = _merge(method, [slots[n].B.detach() for n in have], [math.sqrt(abs(w)) for w in wsc],
                               density, majority_sign_method, gen)
            built[mod_name] = (layer, A, B)  # type: ignore[assignment]
            continue
        if not _plain_delta_layer(layer):
            raise UnsupportedModuleError(f"combine({method}): {mod_name!r} is a {type(layer).__name__}: "
                                         "cat, svd and the *_svd merges handle Linear, Embedding, injected convs")
        if method in DENSE_METHODS:
            with torch.no_grad():
                deltas = [slots[n].scaling * (slots[n].B.float() @ slots[n].A.float()) for n in have]
                merged = _merge(method, deltas, [ws[n] for n in have], density, majority_sign_method, gen)
                A, B, kept, tot = _truncate(merged, rank)  # type: ignore[arg-type]
            per_layer[mod_name] = kept / tot if tot > 0 else 1.0
            kept_total += kept
            energy_total += tot
            dt = slots[have[0]].A.dtype
            built[mod_name] = (layer, A.to(dt), B.to(dt))
            continue
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
    elif dense:
        energy = kept_total / energy_total if energy_total else 1.0
    return CombineReport(name, method, r0, len(built), energy, per_layer)
