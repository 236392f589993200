"""How ΔW relates to W (LoRA paper, Section 7.3, Table 7) and ΔW's singular spectrum.

Convention (the paper writes ``UᵀWVᵀ``; we spell it out): with the thin SVD
``ΔW = U diag(σ) Vh`` (torch convention, Vh = Vᵀ), take U_r = U[:, :r] (out, r) and
V_r = Vh[:r].T (in, r), the top-r left/right singular vectors. The projection of W onto ΔW's
r-dimensional subspace is the r×r matrix ``U_rᵀ W V_r`` and we report its Frobenius norm.
The same is done with W's own top-r singular vectors (= sqrt of W's top-r energy) and with
random orthonormal U, V (for which E‖UᵀWV‖²_F = r²‖W‖²_F/(out·in)).
The amplification factor is ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .loading import AnalysisError, AnalysisMismatchError, LoraModule

__all__ = [
    "delta_svd",
    "effective_rank",
    "spectrum_report",
    "projection_norm",
    "random_projection_norm",
    "weight_projection",
]

ENERGY_LEVELS = (0.9, 0.99)


def delta_svd(delta: LoraModule | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ΔW in fp64 -> U (out, k), σ (k,), V (in, k), σ descending.

    For a LoraModule, ΔW = s·B A is never formed: B = Q_B R_B, Aᵀ = Q_A R_A, so
    ΔW = Q_B (s R_B R_Aᵀ) Q_Aᵀ and only the small r×r core is decomposed.
    """
    if isinstance(delta, LoraModule):
        Qb, Rb = torch.linalg.qr(delta.B)  # (out, r), (r, r)
        Qa, Ra = torch.linalg.qr(delta.A.T)  # (in, r), (r, r)
        core = delta.scaling * (Rb @ Ra.T)  # (r, r) @ (r, r) -> (r, r)
        u, s, vh = torch.linalg.svd(core)
        return Qb @ u, s, Qa @ vh.T  # (out, r), (r,), (in, r)
    if delta.dim() != 2:
        raise AnalysisError(f"ΔW must be 2-D, got shape {tuple(delta.shape)}")
    U, s, Vh = torch.linalg.svd(delta.detach().to(torch.float64), full_matrices=False)
    return U, s, Vh.T


def numerical_rank(s: Tensor, rtol: float = 1e-10) -> int:
    """Number of singular values above rtol·σ_max."""
    if s.numel() == 0 or float(s.max()) == 0.0:
        return 0
    return int((s > rtol * s.max()).sum())


def effective_rank(s: Tensor, level: float) -> int:
    """Smallest k whose top-k singular values hold at least ``level`` of the energy Σσ²."""
    energy = s.square()
    total = float(energy.sum())
    if total == 0.0:
        return 0
    cum = energy.cumsum(0) / total
    return min(int((cum < level - 1e-12).sum()) + 1, s.numel())


def spectrum_report(s: Tensor) -> dict[str, Any]:
    """ΔW singular values, energy captured by each top-k, effective ranks at 90 % / 99 %."""
    energy = s.square()
    total = float(energy.sum())
    topk = (energy.cumsum(0) / total).tolist() if total > 0 else [0.0] * s.numel()
    out: dict[str, Any] = {
        "fro": math.sqrt(total),
        "singular_values": s.tolist(),
        "energy_topk": topk,
        "numerical_rank": numerical_rank(s),
    }
    for level in ENERGY_LEVELS:
        out[f"effective_rank_{round(level * 100)}"] = effective_rank(s, level)
    return out


def projection_norm(W: Tensor, U: Tensor, V: Tensor) -> float:
    """‖Uᵀ W V‖_F with U (out, k), W (out, in), V (in, k)."""
    return float(torch.linalg.matrix_norm(U.T @ W @ V))  # (k, out) @ (out, in) @ (in, k) -> (k, k)


def _random_orthonormal(n: int, k: int, g: torch.Generator) -> Tensor:
    Q, R = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(R))  # Haar-distributed (n, k)


def random_projection_norm(W: Tensor, k: int, draws: int = 8, seed: int = 0) -> tuple[float, float]:
    """Mean and std of ‖UᵀWV‖_F over random orthonormal U (out, k), V (in, k)."""
    g = torch.Generator().manual_seed(seed)
    vals = torch.tensor(
        [projection_norm(W, _random_orthonormal(W.shape[0], k, g), _random_orthonormal(W.shape[1], k, g))
         for _ in range(max(draws, 1))],
        dtype=torch.float64,
    )
    return float(vals.mean()), float(vals.std()) if vals.numel() > 1 else 0.0


def weight_projection(
    W: Tensor,
    delta: LoraModule | Tensor,
    rank: int | None = None,
    random_draws: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Table 7 numbers for one module: W projected on ΔW's / W's / random top-r subspaces.

    ``rank`` defaults to the adapter rank (LoraModule) or ΔW's numerical rank (dense ΔW).
    """
    W = W.detach().to(torch.float64)
    U, s, V = delta_svd(delta)
    if W.shape != (U.shape[0], V.shape[0]):
        raise AnalysisMismatchError(f"W has shape {tuple(W.shape)} but ΔW is {(U.shape[0], V.shape[0])}")
    if rank is None:
        rank = delta.r if isinstance(delta, LoraModule) else max(numerical_rank(s), 1)
    if not 1 <= rank <= s.numel():
        raise AnalysisError(f"projection rank must be in [1, {s.numel()}], got {rank}")
    delta_fro = float(s.norm())
    proj_delta = projection_norm(W, U[:, :rank], V[:, :rank])
    sw = torch.linalg.svdvals(W)
    proj_w = float(sw[:rank].norm())  # = ‖U_Wᵀ W V_W‖_F on W's own top-r directions
    rand_mean, rand_std = random_projection_norm(W, rank, random_draws, seed)
    w_fro = float(sw.norm())
    return {
        "rank": rank,
        "W_fro": w_fro,
        "delta_fro": delta_fro,
        "proj_delta": proj_delta,
        "proj_W": proj_w,
        "proj_random": rand_mean,
        "proj_random_std": rand_std,
        "proj_random_rms_expected": rank * w_fro / math.sqrt(W.shape[0] * W.shape[1]),
        # ΔW orthogonal to W (up to round-off): amplification is unbounded -> inf (None in JSON)
        "amplification": delta_fro / proj_delta if proj_delta > 1e-12 * max(w_fro, 1e-300) else math.inf,
    }
