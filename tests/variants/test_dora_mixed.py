"""DoRA rows in mixed-adapter batches (``batch_adapters``): each row against the plain-PyTorch formula
m (W0 + s B A) / ||W0 + s B A|| of its own adapter (per-adapter norm), gradients against per-adapter
runs, and the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.errors import MixedBatchError

from .conftest import EmbLin, assert_rows_each_alone

# adapter -> (r, alpha, use_dora)
ADAPTERS = {"default": (2, 5, True), "chat": (3, 4, True), "plain": (2, 2, False)}
ROWS = ["default", "chat", "base", "plain", "chat"]


def _model() -> nn.Module:
    torch.manual_seed(7)
    model = EmbLin(tanh=True)
    for name, (r, alpha, dora) in ADAPTERS.items():
        cfg = LoraConfig(r=r, alpha=alpha, targets=["emb", "lin"], use_dora=dora)
        if name == "default":
            lorakit.inject(model, cfg)
        else:
            lorakit.add_adapter(model, name, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "magnitude" in n:
                p.mul_(1 + 0.5 * torch.rand_like(p))
            elif "lora_B" in n or "lora_named_B" in n:
                p.normal_(0, 0.3)
    return model


def _pair(layer: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if name == "default":
        A, B = layer._parameters["lora_A"], layer._parameters["lora_B"]
        m = layer._parameters.get("lora_magnitude_vector")
    else:
        A, B = layer.lora_named_A[name], layer.lora_named_B[name]
        m = layer.lora_named_magnitude[name] if name in getattr(layer, "lora_named_magnitude", {}) else None
    return A.detach().double(), B.detach().double(), None if m is None else m.detach().double()


def _weights(layer: nn.Module, name: str, dim: int) -> torch.Tensor:
    """The adapter's effective weight, plain torch in float64: W0, W0 + s B A, or DoRA's W'."""
    W0 = layer.weight.detach().double()
    if name == "base":
        return W0
    r, alpha, _ = ADAPTERS[name]
    A, B, m = _pair(layer, name)
    delta = (alpha / r) * (B @ A)
    full = W0 + (delta.t() if dim == 0 else delta)  # the embedding table is (num, dim), B A (dim, num)
    if m is None:
        return full
    norm = full.norm(dim=dim, keepdim=True)
    return (m.view(1, -1) if dim == 0 else m.view(-1, 1)) * full / norm


def _reference(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    rows = []
    for i, name in enumerate(ROWS):
        e = F.embedding(ids[i], _weights(model.emb, name, 0))
        rows.append(F.linear(torch.tanh(e), _weights(model.lin, name, 1), model.lin.bias.detach().double()))
    return torch.stack(rows)


@pytest.mark.parametrize("tokens", [3, 12])  # rows grouped by adapter (decoding) / per-row weights (prefill)
def test_mixed_dora_rows_match_the_formula_of_their_own_adapter(tokens: int) -> None:
    model = _model().eval()
    ids = torch.randint(0, 20, (len(ROWS), tokens))
    want = _reference(model, ids)
    with torch.no_grad(), lorakit.batch_adapters(model, ROWS):
        got = model(ids)
        again = model(ids)  # the cached stacks
    assert (got.double() - want).abs().max().item() < 1e-5
    assert torch.equal(got, again)
    lorakit.set_adapter(model, "chat")  # the same rows one adapter at a time (the single-adapter path)
    assert (model(ids[1:2]).double() - want[1:2]).abs().max().item() < 1e-5
    with lorakit.disable_adapters(model):
        base = model(ids).double()
    assert (want[2] - base[2]).abs().max().item() < 1e-6  # the "base" row
    for i in (0, 1, 3):
        assert (want[i] - base[i]).abs().max().item() > 1e-2  # each adapter really changes its row


def test_mixed_dora_cache_follows_magnitude_updates() -> None:
    model = _model().eval()
    ids = torch.randint(0, 20, (len(ROWS), 3))
    with torch.no_grad(), lorakit.batch_adapters(model, ROWS):
        model(ids)
        model.lin.lora_named_magnitude["chat"].mul_(0.5)
        got = model(ids)
    assert (got.double() - _reference(model, ids)).abs().max().item() < 1e-5


@pytest.mark.parametrize("tokens", [3, 9])
def test_mixed_dora_gradients_equal_per_adapter_runs(tokens: int) -> None:
    model = _model().train()
    ids = torch.randint(0, 20, (len(ROWS), tokens))
    params = dict(model.named_parameters())
    for n, p in params.items():
        p.requires_grad_("lora_" in n)  # every adapter's A, B and magnitude
    with lorakit.batch_adapters(model, ROWS):
        model(ids).square().sum().backward()
    mixed = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    assert any("lora_named_magnitude.chat" in n for n in mixed) and any("lora_magnitude_vector" in n for n in mixed)
    model.zero_grad()
    for name in ("default", "chat", "plain"):
        rows = [i for i, n in enumerate(ROWS) if n == name]
        lorakit.set_adapter(model, name)
        model(ids[rows]).square().sum().backward()
    for n, g in mixed.items():
        ref = params[n].grad
        assert ref is not None and torch.allclose(g, ref, rtol=1e-4, atol=1e-6), n


def test_peft_dropout_form_is_refused_in_training_mixed_batches() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    lorakit.inject(model, LoraConfig(r=2, targets=["0"], use_dora=True, dropout=0.1))
    lorakit.add_adapter(model, "b", LoraConfig(r=2, targets=["0"], use_dora=True, dropout=0.1))
    assert lorakit.variants.dora.set_dropout_form(model, "peft") == 2  # both adapters' DoRA
    lorakit.set_adapter(model, "b")  # so the refusal below comes from "b" too
    x = torch.randn(2, 6)
    with pytest.raises(MixedBatchError, match="'peft' dropout form"):
        with lorakit.batch_adapters(model, ["default", "b"]):
            model(x)
    model.eval()
    with lorakit.batch_adapters(model, ["default", "b"]):  # no dropout in eval: the forms agree
        model(x)


def test_peft_refuses_what_lorakit_does_here() -> None:
    """The README's PEFT column: PEFT 0.21 refuses ``adapter_names`` with DoRA; lorakit's rows above."""
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(nn.Sequential(nn.Linear(4, 3)), peft.LoraConfig(r=2, target_modules=["0"], use_dora=True),
                             adapter_name="x")
    pm.add_adapter("y", peft.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        pm.eval()(torch.randn(2, 4), adapter_names=["x", "y"])


@pytest.mark.parametrize("case", ["mlp", "gpt2_conv1d", "embedding"])
def test_mixed_rows_equal_each_adapter_alone(case: str) -> None:
    """Every layer kind DoRA mixed batches take (Linear with/without bias, GPT-2 Conv1D, Embedding):
    row i of the mixed batch = the model with row i's adapter alone (that path: PEFT-tested)."""
    from .test_dora import CASES, _perturb

    torch.manual_seed(9)
    build, targets, inp = CASES[case]
    model = lorakit.inject(build(), LoraConfig(r=2, alpha=5, targets=targets, use_dora=True))
    lorakit.add_adapter(model, "chat", LoraConfig(r=3, alpha=4, targets=targets, use_dora=True))
    lorakit.add_adapter(model, "plain", LoraConfig(r=2, alpha=2, targets=targets, init="random"))
    _perturb(model)
    with torch.no_grad():  # the named adapters' B too (_perturb matches "lora_B" only)
        for n, p in model.named_parameters():
            if "lora_named_B" in n:
                p.normal_(0, 0.3)
    model.eval()
    x = inp()
    rows = ["chat", "base", "default", "plain", "chat"][: x.shape[0]]
    assert_rows_each_alone(model, x, rows)
