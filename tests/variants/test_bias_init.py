"""LoRA bias and PiSSA / OLoRA / gaussian init: against the real PEFT and plain-PyTorch formulas."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.errors import LoraConfigError, UnsupportedModuleError
from lorakit.inject import lora_layers
from lorakit.variants import initial_state, to_plain_lora

peft = pytest.importorskip("peft", reason="peft is the reference implementation")


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, 2, 6, 6) -> (b, 4)
        h = self.conv(x).mean(1)  # (b, 6, 6)
        return self.out(torch.tanh(self.lin(h)).mean(1))


def _randomize(model: nn.Module) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)


@pytest.mark.parametrize("direction", ["peft_to_lorakit", "lorakit_to_peft"])
def test_lora_bias_both_ways(direction: str, tmp_path) -> None:
    torch.manual_seed(0)
    base = _Net()
    x = torch.randn(3, 2, 6, 6)
    if direction == "peft_to_lorakit":
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["lin", "conv", "out"], lora_bias=True))
        _randomize(pm)
        pm.save_pretrained(tmp_path / "a")
        src, dst = pm.eval(), lorakit.load_adapter(copy.deepcopy(base), tmp_path / "a").eval()
    else:
        ours = lorakit.inject(copy.deepcopy(base), LoraConfig(r=2, alpha=4, targets=["lin", "conv", "out"],
                                                              lora_bias=True))
        _randomize(ours)
        lorakit.save_adapter(ours, tmp_path / "a")
        src, dst = ours.eval(), peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    want = src(x)
    assert (dst(x) - want).abs().max().item() < 1e-5
    assert (want - base(x)).abs().max().item() > 1e-2


def test_lora_bias_formula_merge_and_unmerge() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 4))
    lorakit.inject(model, LoraConfig(r=2, alpha=6, targets=["0"], lora_bias=True))
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_B_bias.normal_()
    assert layer.lora_B_bias.requires_grad
    x = torch.randn(3, 5)
    s = layer.scaling
    want = F.linear(x, layer.weight + s * layer.lora_B @ layer.lora_A, layer.bias + s * layer.lora_B_bias)
    assert (model(x) - want).abs().max().item() < 1e-5
    w0, b0 = layer.weight.detach().clone(), layer.bias.detach().clone()
    lorakit.merge(model)
    assert torch.equal(layer.bias, (b0.float() + s * layer.lora_B_bias.float()).to(b0.dtype))
    assert (model(x) - want).abs().max().item() < 1e-5
    lorakit.unmerge(model)
    assert torch.equal(layer.weight, w0) and torch.equal(layer.bias, b0)


def test_lora_bias_refused_without_base_bias_or_on_embedding() -> None:
    model = nn.Sequential(nn.Linear(5, 4, bias=False), nn.Embedding(5, 3))
    with pytest.raises(UnsupportedModuleError, match="bias"):
        lorakit.inject(model, LoraConfig(r=2, targets=["0"], lora_bias=True))
    with pytest.raises(UnsupportedModuleError, match="Embedding"):
        lorakit.inject(model, LoraConfig(r=2, targets=["1"], lora_bias=True))
    assert not list(lora_layers(model))


# --- init variants -------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_match_peft(init: str) -> None:
    torch.manual_seed(2)
    base = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"],
                                                                   init_lora_weights=init))
    ours = lorakit.inject(copy.deepcopy(base), LoraConfig(r=3, alpha=6, targets=["0", "2"], init=init))
    for i in (0, 2):
        p, o = pm.base_model.model[i], ours[i]
        prod_p = p.lora_B["default"].weight @ p.lora_A["default"].weight
        assert (o.lora_B @ o.lora_A - prod_p).abs().max().item() < 1e-4  # same principal part
        assert (o.weight - p.base_layer.weight).abs().max().item() < 1e-5  # same residual
        assert (o.lora_B @ o.lora_A).abs().max().item() > 1e-2
    x = torch.randn(4, 12)
    assert (ours(x) - base(x)).abs().max().item() < 1e-5  # starts at the base model


def test_pissa_niter_is_low_rank_svd_and_converts_to_plain_lora() -> None:
    torch.manual_seed(3)
    base = nn.Sequential(nn.Linear(20, 16))
    with torch.no_grad():  # a decaying spectrum, as trained weights have (randomised SVD needs a gap)
        u, _, vh = torch.linalg.svd(torch.randn(16, 20), full_matrices=False)
        base[0].weight.copy_(u @ torch.diag(0.5 ** torch.arange(16.0)) @ vh)
    W = base[0].weight.detach().clone()
    model = lorakit.inject(copy.deepcopy(base), LoraConfig(r=4, alpha=8, targets=["0"], init="pissa_niter_8"))
    layer = model[0]
    s = layer.scaling
    top = torch.linalg.svdvals(W)[:4]
    assert torch.allclose(torch.linalg.svdvals(s * layer.lora_B @ layer.lora_A)[:4], top, rtol=1e-3)
    assert (layer.weight + s * layer.lora_B @ layer.lora_A - W).abs().max().item() < 1e-5
    init0 = initial_state(model)
    with torch.no_grad():  # "training"
        layer.lora_B.add_(0.1 * torch.randn_like(layer.lora_B))
    A0, B0 = init0["0"]
    A2, B2 = to_plain_lora(layer.lora_A.detach(), layer.lora_B.detach(), A0, B0)
    x = torch.randn(3, 20)
    plain = F.linear(x, W + s * B2 @ A2, layer.bias)  # the plain adapter on the untouched base
    assert (model(x) - plain).abs().max().item() < 1e-5


def test_gaussian_init_matches_peft_distribution() -> None:
    torch.manual_seed(4)
    model = lorakit.inject(nn.Sequential(nn.Linear(400, 300)), LoraConfig(r=8, targets=["0"], init="gaussian"))
    A = model[0].lora_A
    assert abs(A.std().item() - 1 / 8) < 0.01 and torch.count_nonzero(model[0].lora_B) == 0


def test_bad_init_names_the_field() -> None:
    with pytest.raises(LoraConfigError, match="init"):
        LoraConfig(r=2, targets=["x"], init="pissa_niter_x")
