"""The LoRA math as pure functions (paper Section 4.1): h = W0 x + (alpha/r) B A dropout(x).

Layers in :mod:`lorakit.layers` are thin shells over these. Shapes follow loralib:
``A`` is (r, in), ``B`` is (out, r), so ``delta = B @ A`` is (out, in) like an ``nn.Linear`` weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def lora_delta(A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """The dense update ``scaling * B @ A`` in fp32, shape (out, in)."""
    return (B.float() @ A.float()) * scaling  # (out, r) @ (r, in) -> (out, in)


def grouped_delta(A: Tensor, B: Tensor, scaling: float, enable: Sequence[bool]) -> Tensor:
    """Update of a fused projection whose enabled output slices each get their own rank-r pair.

    ``A`` is (r*k, in) and ``B`` is (out/len(enable)*k, r) with k = sum(enable), loralib's
    ``MergedLinear`` layout; disabled slices get zero rows. Returns fp32 (out, in).
    """
    k, n = sum(enable), len(enable)
    r = A.shape[0] // k
    rows = B.shape[0] // k
    blocks = torch.bmm(B.float().view(k, rows, r), A.float().view(k, r, -1))  # (k, rows, in)
    delta = A.new_zeros((n, rows, A.shape[1]), dtype=torch.float32)
    delta[torch.tensor(list(enable), dtype=torch.bool)] = blocks
    return delta.view(n * rows, -1) * scaling


def enabled_columns(enable: Sequence[bool], out_features: int, device: torch.device | None = None) -> Tensor:
    """Indices of the output features that a fused projection's LoRA writes to."""
    rows = out_features // len(enable)
    mask = torch.tensor(list(enable), dtype=torch.bool).repeat_interleave(rows)
    return mask.nonzero().view(-1).to(device)


def lora_path(x: Tensor, A: Tensor, B: Tensor, scaling: float, dropout: torch.nn.Module | None = None) -> Tensor:
    """``scaling * dropout(x) @ A.T @ B.T`` in the adapter's dtype, shape (..., out)."""
    if dropout is not None:
        x = dropout(x)
    x = x.to(A.dtype)
    return (x @ A.transpose(0, 1) @ B.transpose(0, 1)) * scaling  # (..., in) -> (..., r) -> (..., out)


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float,
                dropout: torch.nn.Module | None = None, fan_in_fan_out: bool = False) -> Tensor:
    """Base linear plus the low-rank path: ``x W^T + b + scaling * dropout(x) A^T B^T``."""
    w = weight.transpose(0, 1) if fan_in_fan_out else weight  # stored (in, out) for GPT-2's Conv1D
    out = F.linear(x, w, bias)
    return out + lora_path(x, A, B, scaling, dropout).to(out.dtype)


def grouped_lora_path(x: Tensor, A: Tensor, B: Tensor, scaling: float, enable: Sequence[bool],
                      dropout: torch.nn.Module | None = None) -> Tensor:
    """Low-rank path of a fused projection, only for the enabled slices: (..., rows*k)."""
    if dropout is not None:
        x = dropout(x)
    k = sum(enable)
    r = A.shape[0] // k
    t = x.to(A.dtype) @ A.transpose(0, 1)  # (..., in) -> (..., r*k)
    t = t.unflatten(-1, (k, r))  # (..., k, r)
    y = torch.einsum("...kr,kor->...ko", t, B.view(k, -1, r))  # (..., k, rows)
    return y.flatten(-2) * scaling


def fused_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scaling: float,
                 enable: Sequence[bool], columns: Tensor, dropout: torch.nn.Module | None = None,
                 fan_in_fan_out: bool = False) -> Tensor:
    """Base linear plus the fused-projection low-rank path added into the enabled columns."""
    w = weight.transpose(0, 1) if fan_in_fan_out else weight
    out = F.linear(x, w, bias)
    y = grouped_lora_path(x, A, B, scaling, enable, dropout).to(out.dtype)
    return out.index_add(-1, columns, y)
