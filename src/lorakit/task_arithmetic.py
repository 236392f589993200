"""Merging task tensors: magnitude and random (DARE) pruning, TIES sign election, disjoint merge.

Pure functions on a list of same-shaped tensors (one per adapter) and a weight per tensor, with the
semantics of PEFT's ``add_weighted_adapter`` (so a combination made in lorakit equals PEFT's):

* ``magnitude_prune``: keep the ``int(density * numel)`` largest-magnitude entries of each tensor,
  then the weighted sum.
* ``ties`` (Yadav et al. 2023, arXiv 2306.01708): magnitude-prune each tensor, elect a sign per
  entry (``"total"``: the sign of the sum of the pruned tensors; ``"frequency"``: the more frequent
  sign; ties go to +), weight, and average the entries that agree with the elected sign (divided by
  how many agree, at least 1).
* ``dare_linear`` / ``dare_ties`` (Yu et al. 2023, arXiv 2311.03099): drop each entry with
  probability ``1 - density`` and rescale the kept ones by ``1 / density``, then the weighted sum /
  the TIES election and disjoint merge.

``density >= 1`` prunes nothing (as PEFT). DARE draws from ``generator`` (default: torch's global
generator, which is what PEFT uses, so the same ``torch.manual_seed`` gives the same masks when the
tensors are visited in the same order).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import LoraConfigError

__all__ = ["dare_linear", "dare_ties", "magnitude_prune", "majority_sign_mask", "prune", "ties", "weighted_sum"]

SIGN_METHODS = ("total", "frequency")


def _check(tensors: Sequence[Tensor], weights: Sequence[float], density: float | None) -> None:
    if len(tensors) != len(weights) or not tensors:
        raise LoraConfigError(f"task arithmetic: {len(tensors)} tensors but {len(weights)} weights")
    if density is not None and not (0.0 <= float(density)):
        raise LoraConfigError(f"density must be in [0, 1] (the share of entries kept), got {density!r}")


def _stack(tensors: Sequence[Tensor], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    t = torch.stack(list(tensors), 0)
    w = torch.tensor([float(x) for x in weights], dtype=t.dtype, device=t.device).view(-1, *([1] * (t.dim() - 1)))
    return t, w


def prune(t: Tensor, density: float, method: str, *, generator: torch.Generator | None = None) -> Tensor:
    """``t`` with all but a ``density`` share of its entries zeroed: the largest magnitudes
    (``"magnitude"``), or a random Bernoulli(density) mask rescaled by ``1/density`` (``"random"``)."""
    if density >= 1:
        return t
    if method == "magnitude":
        k = int(density * t.numel())
        mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
        mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
        return t * mask.view(t.shape)
    if method == "random":
        keep = torch.bernoulli(torch.full_like(t, density), generator=generator)
        return (t * keep) / density if density > 0 else t * keep
    raise LoraConfigError(f"prune: method {method!r} is not 'magnitude' or 'random'")


def majority_sign_mask(stacked: Tensor, method: str = "total") -> Tensor:
    """Per entry, whether each task tensor (dim 0) agrees with the elected sign."""
    if method not in SIGN_METHODS:
        raise LoraConfigError(f"majority_sign_method {method!r} is not one of {SIGN_METHODS}")
    sign = stacked.sign()
    magnitude = stacked.sum(0) if method == "total" else sign.sum(0)
    return sign == torch.where(magnitude >= 0, 1.0, -1.0).to(sign.dtype)


def _disjoint_merge(weighted: Tensor, mask: Tensor) -> Tensor:
    return (weighted * mask).sum(0) / mask.sum(0).clamp(min=1.0)


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_i w_i t_i``."""
    _check(tensors, weights, None)
    t, w = _stack(tensors, weights)
    return (t * w).sum(0)


def magnitude_prune(tensors: Sequence[Tensor], weights: Sequence[float], density: float) -> Tensor:
    """Magnitude-prune each tensor to ``density``, then the weighted sum."""
    _check(tensors, weights, density)
    return weighted_sum([prune(t, density, "magnitude") for t in tensors], weights)


def ties(tensors: Sequence[Tensor], weights: Sequence[float], density: float, sign_method: str = "total") -> Tensor:
    """TIES: magnitude-prune, elect signs on the pruned tensors, weighted disjoint merge."""
    _check(tensors, weights, density)
    t, w = _stack([prune(x, density, "magnitude") for x in tensors], weights)
    return _disjoint_merge(t * w, majority_sign_mask(t, sign_method))


def dare_linear(tensors: Sequence[Tensor], weights: Sequence[float], density: float, *,
                generator: torch.Generator | None = None) -> Tensor:
    """DARE: random drop with rescale, then the weighted sum."""
    _check(tensors, weights, density)
    return weighted_sum([prune(t, density, "random", generator=generator) for t in tensors], weights)


def dare_ties(tensors: Sequence[Tensor], weights: Sequence[float], density: float, sign_method: str = "total", *,
              generator: torch.Generator | None = None) -> Tensor:
    """DARE's random drop with rescale, then TIES' sign election and disjoint merge."""
    _check(tensors, weights, density)
    t, w = _stack([prune(x, density, "random", generator=generator) for x in tensors], weights)
    return _disjoint_merge(t * w, majority_sign_mask(t, sign_method))
