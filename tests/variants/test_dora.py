"""DoRA against the real PEFT (both directions, non-zero B, a magnitude that is not the norm) and
against the plain-PyTorch formula W' = m (W0 + s B A) / ||W0 + s B A||."""

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
from lorakit.variants import variant_of

from .conftest import EmbLin

peft = pytest.importorskip("peft", reason="peft is needed to compare DoRA with the reference implementation")


class _Wrap(nn.Module):
    def __init__(self, *mods: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _gpt2_conv1d() -> nn.Module:
    tr = pytest.importorskip("transformers.pytorch_utils", reason="transformers provides GPT-2's Conv1D")
    return _Wrap(tr.Conv1D(7, 6), nn.Tanh(), tr.Conv1D(5, 7))


# name -> (model builder, targets, input builder)
CASES = {
    "mlp": (lambda: _Wrap(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 5, bias=False)), ["body.0", "body.2"],
            lambda: torch.randn(4, 6)),
    "gpt2_conv1d": (_gpt2_conv1d, ["body.0", "body.2"], lambda: torch.randn(3, 6)),
    "embedding": (EmbLin, ["emb", "lin"], lambda: torch.randint(0, 20, (2, 5))),
    "conv1d": (lambda: _Wrap(nn.Conv1d(3, 4, 3, padding=1)), ["body.0"], lambda: torch.randn(2, 3, 9)),
    "conv2d": (lambda: _Wrap(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1)), ["body.0", "body.2"],
               lambda: torch.randn(2, 3, 6, 6)),
    "conv3d": (lambda: _Wrap(nn.Conv3d(2, 3, (1, 2, 2))), ["body.0"], lambda: torch.randn(2, 2, 2, 4, 4)),
}


def _perturb(model: nn.Module) -> None:
    """Random magnitudes and B so nothing is at its init value (no vacuous comparison)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "magnitude" in n:
                p.mul_(1 + 0.5 * torch.rand_like(p))
            elif "lora_B" in n or "lora_embedding_B" in n or "lora_embedding_A" in n:
                p.normal_(0, 0.3)


def _peft_model(base: nn.Module, targets: list[str]) -> nn.Module:
    cfg = peft.LoraConfig(r=2, lora_alpha=5, target_modules=targets, use_dora=True, init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    _perturb(pm)
    return pm


@pytest.mark.parametrize("case", list(CASES))
def test_peft_dora_adapter_loads_with_peft_outputs(case: str, tmp_path) -> None:
    torch.manual_seed(0)
    build, targets, inp = CASES[case]
    base = build()
    pm = _peft_model(base, targets)
    pm.save_pretrained(tmp_path / "peft")
    x = inp()
    pm.eval()
    want = pm(x)
    ours = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "peft").eval()
    assert all(variant_of(m) is not None for _, m in lora_layers(ours))
    got = ours(x)
    assert (got - want).abs().max().item() < 1e-5
    assert (got - base(x)).abs().max().item() > 1e-2  # the adapter really changes the output
    # gradients (train mode, no dropout): same magnitude / A / B gradients as PEFT's detached norm
    pm.train()
    ours.train()
    pm(x).square().sum().backward()
    ours(x).square().sum().backward()
    peft_grads = {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}
    for name, layer in lora_layers(ours):
        g = [v for k, v in peft_grads.items() if f".{name}.lora_magnitude_vector" in k][0]
        assert torch.allclose(layer.lora_magnitude_vector.grad.reshape(g.shape), g, rtol=1e-5, atol=1e-6)
        gb = [v for k, v in peft_grads.items() if f".{name}.lora_B" in k or f".{name}.lora_embedding_B" in k][0]
        assert torch.allclose(layer.lora_B.grad.reshape(gb.shape), gb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_lorakit_dora_adapter_loads_in_peft_with_our_outputs(case: str, tmp_path) -> None:
    torch.manual_seed(1)
    build, targets, inp = CASES[case]
    base = build()
    ours = lorakit.inject(copy.deepcopy(base), LoraConfig(r=2, alpha=5, targets=targets, use_dora=True))
    _perturb(ours)
    lorakit.save_adapter(ours, tmp_path / "ours")
    x = inp()
    ours.eval()
    want = ours(x)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    got = pm(x)
    assert (got - want).abs().max().item() < 1e-5
    assert (want - base(x)).abs().max().item() > 1e-3


def _formula_linear(layer: nn.Module) -> torch.Tensor:
    """W' = m (W0 + s B A) / ||W0 + s B A||_row, plain torch in float64, returned as fp32 (out, in)."""
    W0 = layer.weight.detach().double()
    W0 = W0.t() if layer.fan_in_fan_out else W0
    full = W0 + layer.scaling * layer.lora_B.detach().double() @ layer.lora_A.detach().double()
    return (layer.lora_magnitude_vector.detach().double()[:, None] * full / full.norm(dim=1, keepdim=True)).float()


def test_linear_matches_formula_forward_merge_and_bit_exact_unmerge() -> None:
    torch.manual_seed(2)
    model = _Wrap(nn.Linear(16, 12))
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["body.0"], use_dora=True))
    _perturb(model)
    layer = model.body[0]
    x = torch.randn(5, 16)
    Wp = _formula_linear(layer)
    want = F.linear(x, Wp, layer.bias)
    assert (model(x) - want).abs().max().item() < 1e-5
    w0 = layer.weight.detach().clone()
    lorakit.merge(model)
    assert (layer.weight - Wp).abs().max().item() < 1e-6  # fp32: the merged weight is the formula's
    assert (model(x) - want).abs().max().item() < 1e-5
    lorakit.unmerge(model)
    assert torch.equal(layer.weight, w0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_merge_is_one_rounding_of_the_fp32_result_and_unmerge_bit_exact(dtype: torch.dtype) -> None:
    torch.manual_seed(3)
    model = _Wrap(nn.Linear(64, 48)).to(dtype)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["body.0"], use_dora=True))
    _perturb(model)
    layer = model.body[0]
    exact = _formula_linear(layer)
    w0 = layer.weight.detach().clone()
    lorakit.merge(model)
    off = (layer.weight != exact.to(dtype)).float().mean().item()
    assert off == 0.0, f"{100 * off:.2f}% of merged elements are not the one rounding of the exact result"
    lorakit.unmerge(model)
    assert torch.equal(layer.weight, w0)
    lorakit.merge(model, keep_original=False)  # PEFT's way: divide by the cached factor
    lorakit.unmerge(model)
    assert (layer.weight.float() - w0.float()).abs().max().item() < 0.05


@pytest.mark.parametrize("form", ["peft", "lora-only", "lora-only-plain"])
def test_dropout_training_forms_match_their_formula_with_gradients(form: str) -> None:
    """Both dropout forms against plain torch: outputs and every gradient (x, A, B, m, bias);
    "lora-only" with the fused path's hashed mask (one autograd node) and with nn.Dropout."""
    from lorakit.kernels.dropout import draw_seed, dropout_mask, keep_scale
    from lorakit.variants.dora import set_dropout_form

    torch.manual_seed(4)
    model = _Wrap(nn.Linear(10, 6))
    lorakit.inject(model, LoraConfig(r=2, alpha=4, dropout=0.5, targets=["body.0"], use_dora=True))
    _perturb(model)
    if form == "peft":
        assert set_dropout_form(model, "peft") == 1
    layer = model.body[0].train()
    layer.bias.requires_grad_(True)  # exercise the bias gradient too
    layer.lora_fused = form != "lora-only-plain"
    x = torch.randn(3, 4, 10, requires_grad=True)
    torch.manual_seed(9)
    got = model(x)
    got.square().sum().backward()
    mine = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    gx = x.grad.clone()
    x.grad = None
    torch.manual_seed(9)
    if form == "lora-only":
        d = x * dropout_mask(x.shape, 0.5, draw_seed(), dtype=x.dtype) * keep_scale(0.5)
    else:
        d = F.dropout(x, 0.5, training=True)
    W0, s = layer.weight.detach(), layer.scaling
    A, B = layer.lora_A.detach().clone().requires_grad_(), layer.lora_B.detach().clone().requires_grad_()
    m, b = layer.lora_magnitude_vector.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    f = m / (W0 + s * B.detach() @ A.detach()).norm(dim=1)
    lora = s * (d @ A.t() @ B.t())
    if form == "peft":
        want = F.linear(x, W0, b) + (f - 1) * F.linear(d, W0) + f * lora
    else:
        want = f * (F.linear(x, W0) + lora) + b
    assert (got - want).abs().max().item() < 1e-5
    want.square().sum().backward()
    assert torch.allclose(gx, x.grad, rtol=1e-5, atol=1e-5)
    for name, ref in [("lora_A", A), ("lora_B", B), ("lora_magnitude_vector", m), ("bias", b)]:
        assert torch.allclose(mine[f"body.0.{name}"], ref.grad, rtol=1e-5, atol=1e-5), name
    with pytest.raises(LoraConfigError, match="lora-only"):
        set_dropout_form(model, "dropped")


def test_fan_in_fan_out_generation_and_factored_norm_match_formula() -> None:
    """GPT-2 Conv1D (weight stored (in, out)): grad-mode, no_grad decoding rows and the factored
    norm all agree with W' = m (W0 + s B A) / ||W0 + s B A|| in float64."""
    torch.manual_seed(8)
    model = _gpt2_conv1d()
    lorakit.inject(model, LoraConfig(r=2, alpha=5, targets=["body.0", "body.2"], use_dora=True))
    _perturb(model)
    layer = model.body[0]
    want_n = (layer.weight.detach().double().t()
              + layer.scaling * layer.lora_B.detach().double() @ layer.lora_A.detach().double()).norm(dim=1)
    for rows in (1, 3, 40):
        x = torch.randn(rows, 6)
        with torch.no_grad():
            fast = model(x)
        slow = model(x)
        assert (fast - slow).abs().max().item() < 1e-5
    assert torch.allclose(variant_of(layer)._norm.view(-1).double(), want_n, rtol=1e-6)


def test_norm_is_detached_and_cached_when_nothing_changes() -> None:
    torch.manual_seed(5)
    model = _Wrap(nn.Linear(8, 8))
    lorakit.inject(model, LoraConfig(r=2, alpha=4, targets=["body.0"], use_dora=True))
    layer = model.body[0]
    v = variant_of(layer)
    x = torch.randn(2, 8)
    with torch.no_grad():
        model(x)
        n1 = v._norm
        model(x)
        assert v._norm is n1  # cached: same tensor object
        layer.lora_B.add_(0.1)
        model(x)
        assert v._norm is not n1  # B changed (version bump): recomputed
    assert not v._norm.requires_grad


def test_dora_refused_where_not_defined() -> None:
    model = _Wrap(nn.Linear(6, 6))
    with pytest.raises(UnsupportedModuleError, match="fused"):
        lorakit.inject(model, LoraConfig(r=2, targets=["body.0"], use_dora=True, fused={"body.0": (True, False)}))
    assert not list(lora_layers(model))  # nothing changed
    with pytest.raises(LoraConfigError, match="lora_bias"):
        LoraConfig(r=2, targets=["x"], use_dora=True, lora_bias=True)


def test_named_adapters_and_mixed_batches_refuse_lora_bias_but_take_dora() -> None:
    from lorakit.errors import MixedBatchError

    model = _Wrap(nn.Linear(6, 6))
    lorakit.inject(model, LoraConfig(r=2, targets=["body.0"], lora_bias=True))
    with pytest.raises(UnsupportedModuleError, match="LoRA bias"):
        lorakit.add_adapter(model, "b", LoraConfig(r=2, targets=["body.0"]))
    with pytest.raises(MixedBatchError, match="LoRA bias"):
        with lorakit.batch_adapters(model, ["default", "base"]):
            model(torch.randn(2, 6))
    plain = lorakit.inject(_Wrap(nn.Linear(6, 6)), LoraConfig(r=2, targets=["body.0"]))
    with pytest.raises(UnsupportedModuleError, match="lora_bias"):
        lorakit.add_adapter(plain, "b", LoraConfig(r=2, targets=["body.0"], lora_bias=True))
    lorakit.add_adapter(plain, "d", LoraConfig(r=2, targets=["body.0"], use_dora=True))  # test_dora_named.py
    assert lorakit.list_adapters(plain) == ["default", "d"]


@pytest.mark.parametrize("case", ["mlp", "embedding", "conv2d"])
def test_merge_and_unload_gives_plain_model_with_dora_outputs(case: str) -> None:
    torch.manual_seed(6)
    build, targets, inp = CASES[case]
    model = lorakit.inject(build(), LoraConfig(r=2, alpha=5, targets=targets, use_dora=True))
    _perturb(model)
    x = inp()
    want = model.eval()(x)
    plain = lorakit.merge_and_unload(model)
    assert not list(lora_layers(plain))
    assert (plain(x) - want).abs().max().item() < 1e-5


def test_state_dict_of_merged_model_holds_w0_and_reloads() -> None:
    torch.manual_seed(7)
    model = lorakit.inject(_Wrap(nn.Linear(6, 5)), LoraConfig(r=2, targets=["body.0"], use_dora=True))
    _perturb(model)
    x = torch.randn(3, 6)
    want = model(x)
    w0 = model.body[0].weight.detach().clone()
    lorakit.merge(model)
    sd = model.state_dict()
    assert torch.equal(sd["body.0.weight"], w0) and "body.0.lora_magnitude_vector" in sd
    fresh = lorakit.inject(_Wrap(nn.Linear(6, 5)), LoraConfig(r=2, targets=["body.0"], use_dora=True))
    fresh.load_state_dict(sd)
    assert (fresh(x) - want).abs().max().item() < 1e-5


def test_no_grad_factor_cache_follows_magnitude_and_lora_updates() -> None:
    """Generation caches m / n: an in-place update of m, B or W0 (as an optimizer step) must show."""
    torch.manual_seed(10)
    model = _Wrap(nn.Linear(12, 7))
    lorakit.inject(model, LoraConfig(r=2, alpha=4, targets=["body.0"], use_dora=True))
    _perturb(model)
    layer = model.body[0].eval()
    x = torch.randn(1, 12)
    with torch.no_grad():
        for change in (lambda: None, lambda: layer.lora_magnitude_vector.mul_(1.5),
                       lambda: layer.lora_B.add_(0.2), lambda: layer.weight.mul_(0.9)):
            change()
            want = F.linear(x, _formula_linear(layer), layer.bias)
            assert (model(x) - want).abs().max().item() < 1e-5
            assert (model(x.double().float()) - want).abs().max().item() < 1e-5  # cache hit
