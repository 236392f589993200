"""No route of a LoRA layer on a quantized base keeps a dense copy of W0 for backward (issue 15 §2).

Every tensor autograd saves during a training forward is recorded with
``torch.autograd.graph.saved_tensors_hooks``; none may have a float (out, in) / (in, out) weight's
element count. Routes: the fused Function (with and without dropout), the plain reference route
(``lora_fused = False``; a dropout module that is not ``nn.Dropout``), the fused-projection layer
(``QuantMergedLinear``), and gradient checkpointing. The plain route's outputs and gradients are
also checked against plain torch on the pure-torch dequantized weight.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lorakit
from lorakit.quant import quantize_base
from lorakit.quant.layer import QuantLinear, QuantMergedLinear

from .conftest import Toy, reference_dequantize

TARGETS = ["q_proj", "up_proj", "down_proj"]


class _Scale(nn.Module):
    """A dropout-like module lorakit's fused path does not know (forces the plain route)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5


def _adapted(toy: Toy, dropout: float, fused: bool) -> Toy:
    m = quantize_base(copy.deepcopy(toy), "nf4")
    lorakit.inject(m, lorakit.LoraConfig(r=4, alpha=8, targets=TARGETS, dropout=dropout))
    torch.manual_seed(1)
    for _, layer in lorakit.lora_layers(m):
        nn.init.normal_(layer.lora_B, std=0.05)
        layer.lora_fused = fused
    return m.train()


def _weight_sizes(m: nn.Module) -> set[int]:
    return {layer.in_features * layer.out_features for _, layer in lorakit.lora_layers(m)}


def _saved_numels(fn) -> list[tuple[int, torch.dtype]]:
    seen: list[tuple[int, torch.dtype]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.append((t.numel(), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.float().sum().backward()
    return seen


def _dense_saved(m: nn.Module, fn) -> list[tuple[int, torch.dtype]]:
    sizes = _weight_sizes(m)
    return [(n, dt) for n, dt in _saved_numels(fn) if n in sizes and dt.is_floating_point]


def _ids() -> torch.Tensor:
    return torch.randint(0, 48, (3, 11), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_no_route_saves_a_dense_base_weight(toy: Toy, fused: bool, p: float) -> None:
    m = _adapted(toy, p, fused)
    assert all(isinstance(layer, QuantLinear) for _, layer in lorakit.lora_layers(m))
    assert _dense_saved(m, lambda: m(_ids())) == []


def _saved_activation_bytes(m: nn.Module) -> tuple[int, int]:
    """(storages, bytes) autograd saves in one training forward, besides the model's own parameters."""
    own = {t.untyped_storage().data_ptr() for t in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in own:
            seen[st.data_ptr()] = st.nbytes()
        return t

    torch.manual_seed(2)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = m(_ids())
    out.float().sum().backward()
    return len(seen), sum(seen.values())


@pytest.mark.parametrize("fused", [True, False])
def test_nf4_step_saves_what_the_fp32_step_saves(toy: Toy, fused: bool) -> None:
    """Beyond its parameters, the NF4 model's step saves for backward exactly the storages and bytes the
    fp32 model's does (no dequantized W0, absmax or state copy; SmolLM2 B4×T128: 695 storages,
    722.0 MiB both, docs/benchmarks.md)."""
    fp32 = lorakit.inject(copy.deepcopy(toy), lorakit.LoraConfig(r=4, alpha=8, targets=TARGETS, dropout=0.1))
    for _, layer in lorakit.lora_layers(fp32):
        layer.lora_fused = fused
    n, nbytes = _saved_activation_bytes(fp32.train())
    assert n > 0 and nbytes > 0
    assert _saved_activation_bytes(_adapted(toy, 0.1, fused)) == (n, nbytes)


def test_unknown_dropout_module_route_saves_no_dense_weight(toy: Toy) -> None:
    m = _adapted(toy, 0.0, True)
    for _, layer in lorakit.lora_layers(m):
        layer.lora_dropout = _Scale()  # not nn.Dropout: the fused path cannot hash its mask
    assert _dense_saved(m, lambda: m(_ids())) == []


def test_checkpointed_forward_saves_no_dense_weight(toy: Toy) -> None:
    m = _adapted(toy, 0.1, True)
    x = m.emb(_ids()).detach().requires_grad_(True)

    def block(h: torch.Tensor) -> torch.Tensor:
        h = h + m.q_proj(h)
        return h + m.down_proj(torch.relu(m.up_proj(h)))

    sizes = _weight_sizes(m)
    seen = _saved_numels(lambda: checkpoint(block, x, use_reentrant=False))
    assert not [n for n, dt in seen if n in sizes and dt.is_floating_point]
    assert m.up_proj.lora_A.grad is not None and x.grad is not None


class _Fused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(32, 96, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(x)


@pytest.mark.parametrize("fused", [True, False])
def test_fused_projection_routes_save_no_dense_weight(fused: bool) -> None:
    torch.manual_seed(0)
    m = quantize_base(_Fused(), "nf4", skip=())
    lorakit.inject(m, lorakit.LoraConfig(r=2, alpha=4, targets=["qkv"], fused={"qkv": [True, False, True]},
                                         init="random"))
    m.qkv.lora_fused = fused
    assert isinstance(m.qkv, QuantMergedLinear)
    x = torch.randn(5, 32, requires_grad=True)
    assert [n for n, dt in _saved_numels(lambda: m(x)) if n == 96 * 32 and dt.is_floating_point] == []


def test_plain_route_is_the_plain_torch_formula(toy: Toy) -> None:
    """``x deq(W0)ᵀ + s (x/2) Aᵀ Bᵀ`` in plain torch on the pure-torch dequantized W0, grads too."""
    m = _adapted(toy, 0.0, True)
    q = m.up_proj
    q.lora_dropout = _Scale()
    w = reference_dequantize(q.quant_base)
    x = torch.randn(2, 7, 64)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya = q(xa)
    A, B = q.lora_A.detach().clone().requires_grad_(True), q.lora_B.detach().clone().requires_grad_(True)
    yb = xb @ w.t() + q.scaling * (xb * 0.5) @ A.t() @ B.t()
    g = torch.linspace(-1, 1, ya.numel()).view_as(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    for got, want in ((ya, yb), (xa.grad, xb.grad), (q.lora_A.grad, A.grad), (q.lora_B.grad, B.grad)):
        assert torch.allclose(got, want, atol=2e-5, rtol=1e-5)
