"""Shared pieces of the variant tests (DoRA and its mixed batches), also used by the quantized-base
DoRA tests: a small embedding + linear model and the mixed-batch row check."""

from __future__ import annotations

import torch
from torch import nn

import lorakit


class EmbLin(nn.Module):
    """An embedding (20 ids, dim 8) into a linear (8 -> 5), with an optional tanh between them."""

    def __init__(self, tanh: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lin = nn.Linear(8, 5)
        self.tanh = tanh

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.lin(torch.tanh(h) if self.tanh else h)


def assert_rows_each_alone(model: nn.Module, x: torch.Tensor, rows: list[str], tol: float = 1e-5) -> torch.Tensor:
    """Row i of ``model(x)`` under ``batch_adapters(model, rows)`` equals the model run on row i with
    that row's adapter alone (``"base"``: adapters disabled), to ``tol``. Returns the mixed output."""
    with torch.no_grad():
        with lorakit.batch_adapters(model, rows):
            got = model(x)
        for i, name in enumerate(rows):
            if name == "base":
                with lorakit.disable_adapters(model):
                    want = model(x[i:i + 1])
            else:
                lorakit.set_adapter(model, name)
                want = model(x[i:i + 1])
            assert (got[i:i + 1] - want).abs().max().item() < tol, (i, name)
    return got
