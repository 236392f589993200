"""DoRA and LoRA bias on a quantized (bitsandbytes NF4 / FP4 / int8) base.

References: the plain-PyTorch formulas on the pure-torch dequantization of the conftest
(``W' = m (W0 + s B A) / ‖W0 + s B A‖`` row-wise; ``x W0ᵀ + b0 + s (B A x + b_B)``), and the real
PEFT + bitsandbytes layers on the same quantized base (files both ways, merge error).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import UnsupportedModuleError
from lorakit.quant import quantize_base
from lorakit.quant import weights as QW
from lorakit.quant.layer import QuantLinear
from lorakit.quant.variants import QuantDora, QuantLoraBias

from .conftest import Toy, assert_merged_once, reference_dequantize, toy_batch, train_toy

peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "up_proj", "down_proj"]
BIASED = ["q_proj", "down_proj"]  # the Toy's layers with a base bias (LoRA bias merges into it)


def _ids(n: int = 3, t: int = 11) -> torch.Tensor:
    return torch.randint(0, 48, (n, t), generator=torch.Generator().manual_seed(5))


def _perturb(model: nn.Module) -> None:
    """Non-zero B, magnitudes off the initial norm and non-zero LoRA biases: nothing is vacuous."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
            for name in ("lora_magnitude_vector", "lora_B_bias"):
                p = layer._parameters.get(name)
                if p is not None:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _adapted(toy: Toy, kind: str = "nf4", targets: list[str] = TARGETS, **kw) -> Toy:
    m = quantize_base(copy.deepcopy(toy), kind)
    lorakit.inject(m, lorakit.LoraConfig(r=4, alpha=8, targets=targets, **kw))
    _perturb(m)
    return m


def _dora_weight(layer: nn.Module, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """m (W0 + s B A) / ‖W0 + s B A‖ (row norm) from the pure-torch dequantization."""
    w = reference_dequantize(layer.quant_base).to(dtype) + layer.scaling * (
        layer.lora_B.detach().to(dtype) @ layer.lora_A.detach().to(dtype))
    return layer.lora_magnitude_vector.detach().to(dtype).view(-1, 1) * w / w.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_dora_forward_and_grads_are_the_plain_formula(toy: Toy, kind: str, fused: bool) -> None:
    m = _adapted(toy, kind, use_dora=True)
    layer = m.q_proj
    layer.lora_fused = fused  # False: the quantized layer's plain reference path
    assert isinstance(layer, QuantLinear) and isinstance(layer.lora_variant, QuantDora)
    A, B, mag = (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)
    x = torch.randn(2, 5, 64)
    # reference: plain torch, the norm detached (DoRA Section 4.3, as PEFT)
    w0 = reference_dequantize(layer.quant_base)
    ref = [t.detach().clone().requires_grad_(True) for t in (x, A, B, mag)]
    xr, Ar, Br, mr = ref
    wr = w0 + layer.scaling * Br @ Ar
    want = xr @ (mr.view(-1, 1) * wr / wr.detach().norm(dim=1, keepdim=True)).T + layer.bias.detach()
    xi = x.clone().requires_grad_(True)
    got = layer(xi)
    w = torch.linspace(-1, 1, got.numel()).view_as(got)
    (want * w).sum().backward()
    (got * w).sum().backward()
    assert torch.allclose(got, want, atol=2e-5, rtol=1e-5) and (want - xr @ w0.T).abs().max() > 1e-2
    for ours, theirs in zip((xi, A, B, mag), ref, strict=True):
        assert torch.allclose(ours.grad, theirs.grad, atol=2e-5, rtol=1e-4)
    assert layer.quant_base.weight.grad is None


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_lora_bias_forward_is_the_plain_formula(toy: Toy, kind: str) -> None:
    m = _adapted(toy, kind, targets=BIASED, lora_bias=True, dropout=0.0)
    layer = m.down_proj
    assert isinstance(layer.lora_variant, QuantLoraBias) and layer.lora_B_bias.abs().sum() > 0
    x = torch.randn(4, 128)
    w0 = reference_dequantize(layer.quant_base)
    want = x @ w0.T + layer.bias + layer.scaling * (x @ layer.lora_A.T @ layer.lora_B.T + layer.lora_B_bias)
    with torch.no_grad():
        assert torch.allclose(layer(x), want.detach(), atol=2e-5, rtol=1e-5)


def test_dora_dropout_matches_a_float_dora_layer_on_the_dequantized_weight(toy: Toy) -> None:
    """With dropout (the fused path's hashed mask, both dropout forms) the quantized layer is the
    float DoRA layer on deq(W0): same outputs and gradients."""
    from lorakit.variants.dora import set_dropout_form

    for form in ("lora-only", "peft"):
        q = _adapted(toy, use_dora=True, dropout=0.2)
        f = copy.deepcopy(toy)
        with torch.no_grad():
            for t in TARGETS:
                getattr(f, t).weight.copy_(reference_dequantize(getattr(q, t).quant_base))
        lorakit.inject(f, lorakit.LoraConfig(r=4, alpha=8, targets=TARGETS, use_dora=True, dropout=0.2))
        sd = lorakit.lora_state_dict(q)
        assert any("lora_magnitude_vector" in k for k in sd)
        f.load_state_dict(sd, strict=False)
        set_dropout_form(q, form)
        set_dropout_form(f, form)
        q.train(), f.train()
        outs = []
        for model in (q, f):
            x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
            torch.manual_seed(7)
            y = model.q_proj(x)
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            lay = model.q_proj
            outs.append((y.detach(), x.grad, lay.lora_A.grad, lay.lora_B.grad, lay.lora_magnitude_vector.grad))
        for a, b in zip(*outs, strict=True):
            assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), form
        q.eval()
        with torch.no_grad():  # the dropout was active
            x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(3))
            assert (q.q_proj(x) - outs[0][0]).abs().max() > 1e-3


def test_no_dense_weight_is_saved_for_backward_with_dora(toy: Toy) -> None:
    m = _adapted(toy, use_dora=True, dropout=0.1)
    sizes: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        out = m(_ids())
    out.sum().backward()
    assert sizes and not {64 * 64, 64 * 128} & set(sizes)  # no (out, in) weight kept for backward
    assert all(getattr(m, t).lora_magnitude_vector.grad is not None for t in TARGETS)


@pytest.mark.parametrize(("variant", "kind"), [("use_dora", "nf4"), ("lora_bias", "nf4"), ("use_dora", "int8")])
def test_peft_adapter_on_a_quantized_base_loads_into_lorakit_and_back(toy: Toy, tmp_path: Path, variant: str,
                                                                      kind: str) -> None:
    targets = TARGETS if variant == "use_dora" else BIASED
    def base() -> Toy:  # each model its own quantization of the same weights (same codes): a deepcopied
        return quantize_base(copy.deepcopy(toy), kind)  # int8 layer loses bitsandbytes' attributes

    pm = peft.get_peft_model(base(), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, lora_dropout=0.0, **{variant: True}))
    assert type(pm.base_model.model.q_proj).__module__.startswith("peft.tuners.lora.bnb")
    with torch.no_grad():  # PEFT's magnitude starts at the norm and its LoRA bias at zero: move both
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name or "lora_B.default.bias" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    pm.train()  # (bitsandbytes repacks 4-bit weights for bf16 inference in eval mode on AVX512-BF16 CPUs)
    ids = _ids()
    with torch.no_grad():
        want = pm(ids)
    pm.save_pretrained(tmp_path / "peft")
    ours = lorakit.load_adapter(base(), tmp_path / "peft")
    cls = QuantDora if variant == "use_dora" else QuantLoraBias
    assert all(isinstance(layer.lora_variant, cls) for _, layer in lorakit.lora_layers(ours))
    with torch.no_grad():
        got = ours(ids)
        assert (want - got).abs().max() < 1e-5 * max(1.0, want.abs().max().item())
        assert (want - base()(ids)).abs().max() > 1e-2
    lorakit.save_adapter(ours, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that it ignores "lorakit_quantization"
        back = peft.PeftModel.from_pretrained(base(), tmp_path / "ours")
    back.train()
    with torch.no_grad():
        assert (back(ids) - got).abs().max() < 1e-5 * max(1.0, got.abs().max().item())


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_lorakit_trained_dora_adapter_loads_into_peft(toy: Toy, tmp_path: Path, kind: str) -> None:
    m = _adapted(toy, kind, use_dora=True, dropout=0.05)
    start = {t: getattr(m, t).lora_magnitude_vector.detach().clone() for t in TARGETS}
    losses = train_toy(m, 12)
    assert losses[-1] < 0.9 * losses[0]
    assert all((getattr(m, t).lora_magnitude_vector - start[t]).abs().max() > 1e-3 for t in TARGETS)
    lorakit.save_adapter(m, tmp_path / "a")
    base = quantize_base(copy.deepcopy(toy), kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(base, tmp_path / "a")
    pm.train()  # (no bf16 CPU repack by bitsandbytes) with every dropout off: the eval function
    for mod in pm.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.0
    m.eval()
    ids = toy_batch()
    with torch.no_grad():
        want = m(ids)
        assert (pm(ids) - want).abs().max() < 1e-5 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dora_merge_requantizes_once_and_unmerge_restores_bytes(toy: Toy, kind: str) -> None:
    m = _adapted(toy, kind, use_dora=True)
    layer = m.up_proj
    snaps = {t: QW.snapshot(getattr(m, t).quant_base) for t in TARGETS}
    exact = _dora_weight(layer)
    ids = _ids()
    with torch.no_grad():
        before = m(ids)
    lorakit.merge(m)
    assert layer.merged and not QW.same_bytes(layer.quant_base, snaps["up_proj"])
    # requantized once: the bytes are the quantization of the exact merged weight (fp32)
    probe = quantize_base(nn.Sequential(nn.Linear(64, 128, bias=False)), kind, skip=())[0]
    QW.requantize_(probe, exact.float())
    assert torch.equal(QW.dequantize(probe), QW.dequantize(layer.quant_base))
    ours = ((QW.dequantize(layer.quant_base).double() - exact).norm() / exact.norm()).item()
    with torch.no_grad():
        merged_out = m(ids)
        assert (merged_out - before).abs().max() < 0.2 * before.abs().max()
    lorakit.unmerge(m)
    assert all(QW.same_bytes(getattr(m, t).quant_base, snaps[t]) for t in TARGETS)  # bit for bit
    with torch.no_grad():
        assert torch.equal(m(ids), before)
    # PEFT's DoRA merge on the same quantized layer and adapter
    pm = peft.get_peft_model(quantize_base(copy.deepcopy(toy), kind),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=True))
    with torch.no_grad():
        for t in TARGETS:
            pl, ol = getattr(pm.base_model.model, t), getattr(m, t)
            pl.lora_A["default"].weight.copy_(ol.lora_A)
            pl.lora_B["default"].weight.copy_(ol.lora_B)
            pl.lora_magnitude_vector["default"].weight.copy_(ol.lora_magnitude_vector)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.merge_adapter()
    theirs_w = reference_dequantize(pm.base_model.model.up_proj.base_layer).double()
    theirs = ((theirs_w - exact).norm() / exact.norm()).item()
    print(f"\nDoRA {kind} merge error ||deq(Wm) - W'|| / ||W'||: lorakit {ours:.4%}, PEFT {theirs:.4%}")
    assert 0 < ours <= theirs * (1 + 1e-3)


def test_merge_without_a_kept_copy_unmerges_by_requantizing(toy: Toy) -> None:
    m = _adapted(toy, use_dora=True)
    w0 = reference_dequantize(m.q_proj.quant_base)
    lorakit.merge(m, keep_original=False)
    lorakit.unmerge(m)
    back = reference_dequantize(m.q_proj.quant_base)
    assert not m.q_proj.merged and 0 < ((back - w0).norm() / w0.norm()).item() < 0.15


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_merge_and_unload_rounds_the_exact_variant_weight_once(toy: Toy, dtype: torch.dtype) -> None:
    m = _adapted(toy, use_dora=True)
    exact = {t: _dora_weight(getattr(m, t)).to(dtype) for t in TARGETS}
    ids = _ids()
    with torch.no_grad():
        before = m(ids)
    plain = lorakit.merge_and_unload(m, dtype=dtype)
    assert_merged_once(plain, exact, dtype)
    if dtype == torch.float32:
        with torch.no_grad():
            assert torch.allclose(plain(ids), before, atol=1e-5, rtol=1e-5)
    b = _adapted(toy, targets=BIASED, lora_bias=True)
    want = {t: (getattr(b, t).bias.float() + getattr(b, t).scaling * getattr(b, t).lora_B_bias).detach().to(dtype)
            for t in BIASED}
    lorakit.merge(b)  # merged first: b0 comes from the variant's kept copy, not the merged bias
    plain = lorakit.merge_and_unload(b, dtype=dtype)
    assert all(torch.equal(getattr(plain, t).bias, want[t]) for t in BIASED)


def test_lora_bias_merge_and_unmerge_are_bit_exact(toy: Toy) -> None:
    m = _adapted(toy, targets=BIASED, lora_bias=True)
    biases = {t: getattr(m, t).bias.detach().clone() for t in BIASED}
    ids = _ids()
    with torch.no_grad():
        before = m(ids)
    lorakit.merge(m)
    with torch.no_grad():
        assert (m(ids) - before).abs().max() < 0.2 * before.abs().max()
        assert not torch.equal(m.q_proj.bias, biases["q_proj"])
    lorakit.unmerge(m)
    assert all(torch.equal(getattr(m, t).bias, biases[t]) for t in BIASED)
    with torch.no_grad():
        assert torch.equal(m(ids), before)


def test_dora_float_merge_and_unload_to_bf16_is_one_rounding() -> None:
    """The same merge_and_unload(dtype=) path on a float base (formerly refused for variants)."""
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(32, 48))
    lorakit.inject(f, lorakit.LoraConfig(r=4, alpha=8, targets=["0"], use_dora=True))
    _perturb(f)
    layer = f[0]
    w = layer.weight.double() + layer.scaling * (layer.lora_B.double() @ layer.lora_A.double())
    exact = (layer.lora_magnitude_vector.double().view(-1, 1) * w / w.norm(dim=1, keepdim=True)).to(torch.bfloat16)
    plain = lorakit.merge_and_unload(f, dtype=torch.bfloat16)
    assert torch.equal(plain[0].weight, exact.detach())


def test_quantize_after_inject_keeps_the_dora_adapter(toy: Toy) -> None:
    f = copy.deepcopy(toy)
    lorakit.inject(f, lorakit.LoraConfig(r=4, alpha=8, targets=TARGETS, use_dora=True))
    _perturb(f)
    mag = f.q_proj.lora_magnitude_vector
    quantize_base(f, "nf4")
    layer = f.q_proj
    assert isinstance(layer, QuantLinear) and isinstance(layer.lora_variant, QuantDora)
    assert layer.lora_magnitude_vector is mag
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ _dora_weight(layer, torch.float32).T + layer.bias, atol=2e-5)


def test_variants_that_cannot_work_on_a_quantized_base_are_refused_naming_the_module(toy: Toy) -> None:
    q = quantize_base(copy.deepcopy(toy), "nf4")
    before = {k: v.clone() for k, v in q.state_dict().items()}
    with pytest.raises(UnsupportedModuleError, match=r"up_proj.*bias=None"):  # no base bias to merge into
        lorakit.inject(q, lorakit.LoraConfig(r=4, alpha=8, targets=TARGETS, lora_bias=True))
    assert not list(lorakit.lora_layers(q))
    after = q.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    fused = lorakit.LoraConfig(r=4, alpha=8, targets=["up_proj"], fused={"up_proj": (True, False)}, use_dora=True)
    with pytest.raises(UnsupportedModuleError, match=r"up_proj.*fused quantized projection"):
        lorakit.inject(q, fused)
    assert not list(lorakit.lora_layers(q))


def test_dora_with_a_bf16_compute_dtype_autocast_and_disable(toy: Toy) -> None:
    """compute_dtype=bf16 and bf16 autocast: the fp32 formula to bf16 accuracy, fp32 grads on m, A, B;
    disable_adapters gives the bare quantized base."""
    ref = _adapted(toy, use_dora=True)
    c = quantize_base(copy.deepcopy(toy), "nf4", compute_dtype=torch.bfloat16)
    lorakit.inject(c, lorakit.LoraConfig(r=4, alpha=8, targets=TARGETS, use_dora=True))
    c.load_state_dict(lorakit.lora_state_dict(ref), strict=False)
    x = torch.randn(3, 64)
    want = x @ _dora_weight(ref.q_proj, torch.float32).T + ref.q_proj.bias
    out = c.q_proj(x)
    out.sum().backward()
    assert out.dtype == torch.float32 and (out - want).abs().max() < 0.03 * want.abs().max()
    assert all(p.grad is not None and p.grad.dtype == torch.float32
               for p in (c.q_proj.lora_A, c.q_proj.lora_B, c.q_proj.lora_magnitude_vector))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        yb = ref.q_proj(x)
    assert yb.dtype == torch.bfloat16 and (yb.float() - want).abs().max() < 0.03 * want.abs().max()
    with torch.no_grad(), lorakit.disable_adapters(ref):
        base = x @ reference_dequantize(ref.q_proj.quant_base).T + ref.q_proj.bias
        assert torch.allclose(ref.q_proj(x), base, atol=2e-5) and (base - want).abs().max() > 1e-2


def test_dora_gradient_checkpointing_gives_the_same_grads(toy: Toy) -> None:
    from torch.utils.checkpoint import checkpoint

    m = _adapted(toy, use_dora=True)
    x = torch.randn(2, 6, 64)
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        y = checkpoint(m.q_proj, x, use_reentrant=False) if ckpt else m.q_proj(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads.append([p.grad.clone() for p in (m.q_proj.lora_A, m.q_proj.lora_B, m.q_proj.lora_magnitude_vector)])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6) and a.abs().max() > 0


@pytest.mark.parametrize("variant", ["use_dora", "lora_bias"])
def test_plan_counts_the_variant_tensors_as_inject_makes_them(toy: Toy, variant: str) -> None:
    targets = TARGETS if variant == "use_dora" else BIASED
    for model in (quantize_base(copy.deepcopy(toy), "nf4"), copy.deepcopy(toy)):  # quantized and float base
        cfg = lorakit.LoraConfig(r=4, alpha=8, targets=targets, **{variant: True})
        p = lorakit.plan(model, cfg)
        lorakit.inject(model, cfg)
        made = sum(t.numel() for t in model.parameters() if t.requires_grad)
        extra = sum(t.numel() for n, t in model.named_parameters() if "magnitude" in n or "lora_B_bias" in n)
        assert extra > 0 and p.trainable == made
