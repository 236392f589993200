"""Shared fixtures of the quantized-base tests: skip cleanly without bitsandbytes, a pure-torch
reference dequantizer (independent of bitsandbytes' kernels), toy models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed: pip install 'lorakit[quant]'")


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def reference_dequantize(module: nn.Module) -> torch.Tensor:
    """W from a bitsandbytes layer's stored tensors with plain torch ops (fp32, (out, in)).

    4-bit: byte j holds elements 2j (high nibble) and 2j+1 (low nibble) of the flattened weight;
    element i is ``code[nibble] * absmax[i // blocksize]``; with double quantization the absmaxes
    are ``code2[q] * absmax2[b // 256] + offset``. int8: ``CB * SCB * (1/127)`` per row.
    """
    w = module.weight
    if w.dtype == torch.int8:
        scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB
        return w.data.float() * scb.float().view(-1, 1) * 7.874015718698502e-3  # (1/127 in float32)
    qs = w.quant_state
    packed = w.data.reshape(-1).to(torch.int64)
    nib = torch.stack([packed >> 4, packed & 0xF], 1).reshape(-1)
    out_f, in_f = qs.shape
    n = out_f * in_f
    nib = nib[:n]
    if qs.nested:
        s2 = qs.state2
        idx = torch.arange(qs.absmax.numel()) // s2.blocksize
        absmax = s2.code[qs.absmax.long()] * s2.absmax[idx] + qs.offset
    else:
        absmax = qs.absmax.float()
    scale = absmax[torch.arange(n) // qs.blocksize]
    return (qs.code[nib] * scale).reshape(out_f, in_f)


def assert_merged_once(plain: nn.Module, exact: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """After ``merge_and_unload(dtype=dtype)``: each layer named in ``exact`` is a plain ``nn.Linear`` of
    ``dtype`` whose weight is the exact sum rounded once (0 % of elements off), nothing quantized left."""
    from lorakit.quant import backend as QB

    for name, want in exact.items():
        lin = plain.get_submodule(name)
        assert type(lin) is nn.Linear and lin.weight.dtype == dtype
        assert (lin.weight != want).float().mean().item() == 0.0, name  # 0 % of elements off
    assert not any(QB.is_quantized(x) for x in plain.modules())


def toy_batch(vocab: int = 48) -> torch.Tensor:
    """The fixed (8, 16) batch of token ids :func:`train_toy` trains on."""
    return torch.randint(0, vocab, (8, 16), generator=torch.Generator().manual_seed(0))


def train_toy(model: nn.Module, steps: int, lr: float = 1e-2, vocab: int = 48) -> list[float]:
    """AdamW on next-token cross-entropy over :func:`toy_batch`: each step's loss."""
    ids = toy_batch(vocab)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


class Toy(nn.Module):
    """Two projections and a head, with names like a transformer block's."""

    def __init__(self, d: int = 64, h: int = 128, vocab: int = 48) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.q_proj = nn.Linear(d, d)
        self.up_proj = nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        x = x + self.q_proj(x)
        x = x + self.down_proj(torch.relu(self.up_proj(x)))
        return self.lm_head(x)


@pytest.fixture
def toy() -> Toy:
    torch.manual_seed(0)
    return Toy()
