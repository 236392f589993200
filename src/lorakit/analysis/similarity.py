"""Normalized subspace similarity between adapters (LoRA paper, Section 7.2, Eq. 4).

For A (r, in) the subspace is spanned by A's right-singular vectors (directions in the input
space); for B (out, r) by B's left-singular vectors (directions in the output space). With
U1 (d, r1) and U2 (d, r2) those orthonormal bases, ordered by singular value,

    φ(i, j) = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F / min(i, j)  ∈ [0, 1].

For independent uniformly random subspaces, E‖P_iᵀ Q_j‖²_F = i·j/d, so E[φ(i, j)] = max(i, j)/d.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from .loading import AnalysisError, AnalysisMismatchError

__all__ = [
    "subspace_basis",
    "subspace_similarity",
    "chance_similarity",
    "random_gaussian_similarity",
    "similarity_report",
]

Kind = Literal["A", "B"]


def _check_kind(kind: str) -> None:
    if kind not in ("A", "B"):
        raise AnalysisError(f"kind must be 'A' (r, in) or 'B' (out, r), got {kind!r}")


def subspace_basis(M: Tensor, kind: Kind = "A") -> Tensor:
    """Orthonormal basis (d, k), k = min(r, d), of the subspace Eq. 4 uses, in fp64.

    kind="A": M is (r, in), returns right-singular vectors (in, k).
    kind="B": M is (out, r), returns left-singular vectors (out, k).
    """
    _check_kind(kind)
    if M.dim() != 2:
        raise AnalysisError(f"expected a 2-D LoRA matrix, got shape {tuple(M.shape)}")
    U, _, Vh = torch.linalg.svd(M.detach().to(torch.float64), full_matrices=False)
    return Vh.T if kind == "A" else U  # (in, k) or (out, k)


def subspace_similarity(M1: Tensor, M2: Tensor, kind: Kind = "A") -> Tensor:
    """Grid φ(i, j) of Eq. 4 for i = 1..r1 (rows), j = 1..r2 (columns), fp64, shape (r1, r2).

    (If a rank exceeds the dimension d, that axis stops at d.)
    """
    _check_kind(kind)
    axis = 1 if kind == "A" else 0
    if M1.dim() != 2 or M2.dim() != 2 or M1.shape[axis] != M2.shape[axis]:
        space = "input" if kind == "A" else "output"
        raise AnalysisMismatchError(
            f"{kind} matrices live in different {space} spaces: "
            f"shapes {tuple(M1.shape)} and {tuple(M2.shape)}"
        )
    U1, U2 = subspace_basis(M1, kind), subspace_basis(M2, kind)
    G2 = (U1.T @ U2).square()  # (k1, d) @ (d, k2) -> (k1, k2), squared overlaps
    C = G2.cumsum(0).cumsum(1)  # C[i-1, j-1] = ‖U1[:, :i]ᵀ U2[:, :j]‖²_F
    i = torch.arange(1, C.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, C.shape[1] + 1, dtype=torch.float64)[None, :]
    return (C / torch.minimum(i, j)).clamp(0.0, 1.0)


def chance_similarity(r1: int, r2: int, d: int) -> Tensor:
    """Closed-form E[φ(i, j)] = max(i, j)/d for independent random subspaces, shape (r1, r2)."""
    i = torch.arange(1, r1 + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, r2 + 1, dtype=torch.float64)[None, :]
    return (torch.maximum(i, j) / d).clamp(max=1.0)


def random_gaussian_similarity(
    r1: int, r2: int, d: int, kind: Kind = "A", draws: int = 1, seed: int = 0
) -> Tensor:
    """φ between independent Gaussian matrices of the given ranks (paper Fig. 4, right panel).

    Averaged over ``draws`` independent pairs; shape (min(r1, d), min(r2, d)).
    """
    _check_kind(kind)
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros(min(r1, d), min(r2, d), dtype=torch.float64)
    for _ in range(draws):
        if kind == "A":
            M1, M2 = (torch.randn(r, d, generator=g, dtype=torch.float64) for r in (r1, r2))
        else:
            M1, M2 = (torch.randn(d, r, generator=g, dtype=torch.float64) for r in (r1, r2))
        total += subspace_similarity(M1, M2, kind)
    return total / draws


def similarity_report(M1: Tensor, M2: Tensor, kind: Kind = "A") -> dict[str, Any]:
    """φ grid plus summary numbers and the chance level, JSON-ready."""
    grid = subspace_similarity(M1, M2, kind)
    d = int(M1.shape[1] if kind == "A" else M1.shape[0])
    chance = chance_similarity(grid.shape[0], grid.shape[1], d)
    return {
        "d": d,
        "r1": int(grid.shape[0]),
        "r2": int(grid.shape[1]),
        "phi_1_1": float(grid[0, 0]),
        "phi_1_r2": float(grid[0, -1]),
        "phi_full": float(grid[-1, -1]),
        "phi_mean": float(grid.mean()),
        "chance_mean": float(chance.mean()),
        "chance_max": float(chance.max()),
        "excess_over_chance_mean": float((grid - chance).mean()),
        "grid": grid.tolist(),
    }
