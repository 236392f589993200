"""lorakit's loralib-compatible layers against the real ``loralib`` 0.1.2 and plain-PyTorch formulas."""

from __future__ import annotations

import copy
import math

import loralib
import peft
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
import lorakit as lora
from lorakit.errors import LoraConfigError

TOL = 1e-6

# (id, lorakit constructor, loralib constructor, input factory)
PAIRS = [
    ("linear", lambda m: m.Linear(6, 5, r=3, lora_alpha=6), lambda: torch.randn(4, 6)),
    ("linear-fifo", lambda m: m.Linear(6, 5, r=2, lora_alpha=3, fan_in_fan_out=True),
     lambda: torch.randn(2, 3, 6)),
    ("linear-nobias", lambda m: m.Linear(6, 5, r=4, lora_alpha=4, bias=False), lambda: torch.randn(4, 6)),
    ("embedding", lambda m: m.Embedding(11, 7, r=3, lora_alpha=6), lambda: torch.randint(0, 11, (3, 4))),
    ("embedding-pad", lambda m: m.Embedding(11, 7, r=2, lora_alpha=2, padding_idx=0),
     lambda: torch.tensor([[0, 1, 2], [3, 0, 10]])),
    ("merged", lambda m: m.MergedLinear(8, 12, r=2, lora_alpha=4, enable_lora=[True, False, True]),
     lambda: torch.randn(3, 8)),
    ("merged-fifo", lambda m: m.MergedLinear(8, 12, r=2, lora_alpha=4, enable_lora=[False, True, True],
                                             fan_in_fan_out=True), lambda: torch.randn(2, 3, 8)),
    ("conv2d", lambda m: m.Conv2d(3, 4, 3, r=2, lora_alpha=4, padding=1), lambda: torch.randn(2, 3, 5, 5)),
    ("conv2d-k1", lambda m: m.Conv2d(3, 4, 1, r=2, lora_alpha=2), lambda: torch.randn(2, 3, 5, 5)),
    ("conv1d-k1", lambda m: m.Conv1d(3, 4, 1, r=2, lora_alpha=2), lambda: torch.randn(2, 3, 7)),
]
IDS = [p[0] for p in PAIRS]


def _build(ctor, module, seed=0):
    torch.manual_seed(seed)
    return ctor(module)


def _randomize_lora(a: nn.Module, b: nn.Module, seed: int = 1) -> None:
    """Give both layers the same non-zero A and B (B starts at zero, which would test nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("lora_A", "lora_B"):
            t = torch.randn(getattr(a, name).shape, generator=g) * 0.3
            getattr(a, name).copy_(t)
            getattr(b, name).copy_(t)


def _grads(layer: nn.Module, x: torch.Tensor):
    layer.zero_grad()
    x = x.clone().requires_grad_(x.is_floating_point())
    out = layer(x)
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    g = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    if x.is_floating_point():
        g["input"] = x.grad.clone()
    return out.detach(), g


@pytest.mark.parametrize("_id,ctor,inp", PAIRS, ids=IDS)
def test_same_keys_shapes_and_rng_stream(_id, ctor, inp):
    ours, ref = _build(ctor, lora), _build(ctor, loralib)
    sd_o, sd_r = ours.state_dict(), ref.state_dict()
    assert list(sd_o) == list(sd_r)
    for k in sd_r:
        assert sd_o[k].shape == sd_r[k].shape, k
        assert torch.equal(sd_o[k], sd_r[k]), f"{k}: different RNG stream at construction"
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == \
           {n for n, p in ref.named_parameters() if p.requires_grad}
    assert ours.scaling == ref.scaling


@pytest.mark.parametrize("_id,ctor,inp", PAIRS, ids=IDS)
def test_outputs_and_gradients_match_loralib(_id, ctor, inp):
    ours, ref = _build(ctor, lora), _build(ctor, loralib)
    _randomize_lora(ours, ref)
    ours.train(), ref.train()
    x = inp()
    out_o, g_o = _grads(ours, x)
    out_r, g_r = _grads(ref, x)
    assert (out_o - out_r).abs().max() <= TOL
    assert set(g_o) == set(g_r) and {"lora_A", "lora_B"} <= set(g_o)
    for k in g_r:
        assert (g_o[k] - g_r[k]).abs().max() <= TOL, k
    # eval() merges in both; the merged outputs agree, and agree with the unmerged ones
    ours.eval(), ref.eval()
    assert ours.merged and ref.merged
    with torch.no_grad():
        m_o, m_r = ours(x), ref(x)
    assert (m_o - m_r).abs().max() <= 1e-5
    assert (m_o - out_o).abs().max() <= 1e-5
    ours.train(), ref.train()
    assert not ours.merged and not ref.merged


@pytest.mark.parametrize("_id,ctor,inp", PAIRS, ids=IDS)
def test_state_dicts_load_both_ways(_id, ctor, inp):
    x = inp()
    ref = _build(ctor, loralib, seed=3)
    _randomize_lora(ref, ref, seed=4)
    ours = _build(ctor, lora, seed=9)
    ours.load_state_dict(ref.state_dict())  # full, strict
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() <= TOL
    # lora-only checkpoint (loralib.lora_state_dict) over a base with the same W0, strict=False
    ours2 = _build(ctor, lora, seed=3)
    res = ours2.load_state_dict(loralib.lora_state_dict(ref), strict=False)
    assert not res.unexpected_keys
    with torch.no_grad():
        assert (ours2(x) - ref(x)).abs().max() <= TOL
    # and the reverse
    back = _build(ctor, loralib, seed=3)
    res = back.load_state_dict(lora.lora_state_dict(ours2), strict=False)
    assert not res.unexpected_keys
    with torch.no_grad():
        assert (back(x) - ours2(x)).abs().max() <= TOL
    assert set(lora.lora_state_dict(ours2)) == set(loralib.lora_state_dict(ref))


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_mark_only_lora_and_lora_state_dict_match_loralib(bias):
    def net(m):
        torch.manual_seed(0)
        last = m.Linear(4, 3, r=2 if bias == "lora_only" else 0)  # r=0 + lora_only: see below
        return nn.Sequential(m.Linear(4, 4, r=2), nn.Linear(4, 4), last, nn.LayerNorm(3))

    ours, ref = net(lora), net(loralib)
    lora.mark_only_lora_as_trainable(ours, bias=bias)
    loralib.mark_only_lora_as_trainable(ref, bias=bias)
    assert [(n, p.requires_grad) for n, p in ours.named_parameters()] == \
           [(n, p.requires_grad) for n, p in ref.named_parameters()]
    assert list(lora.lora_state_dict(ours, bias=bias)) == list(loralib.lora_state_dict(ref, bias=bias))


def test_lora_only_bias_of_r0_layer_stays_frozen():
    """Deliberate deviation: loralib trains the bias of an r=0 layer under 'lora_only' but never saves
    it in lora_state_dict (so that training is lost); lorakit trains only biases of adapted layers."""
    net = nn.Sequential(lora.Linear(4, 4, r=2), lora.Linear(4, 3, r=0))
    lora.mark_only_lora_as_trainable(net, bias="lora_only")
    assert net[0].bias.requires_grad and not net[1].bias.requires_grad
    assert set(lora.lora_state_dict(net, bias="lora_only")) == {"0.lora_A", "0.lora_B", "0.bias"}


# --- where loralib is wrong ----------------------------------------------------------------------
def _conv_ref(layer: lorakit.ConvLoRA, x: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: conv(x, W0 + scale * (B A).view(W0.shape))."""
    w = layer.conv.weight
    delta = (layer.lora_B @ layer.lora_A).view(w.shape) * layer.scaling
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
    c = layer.conv
    return fn(x, w + delta, c.bias, c.stride, c.padding, c.dilation, c.groups)


CONV_FIXES = [
    ("conv1d-k3", lambda m: m.Conv1d(4, 6, 3, r=2, lora_alpha=4, padding=1), (2, 4, 9)),
    ("conv3d-k3", lambda m: m.Conv3d(2, 4, 3, r=2, lora_alpha=4, padding=1), (1, 2, 4, 5, 5)),
    ("conv2d-grouped", lambda m: m.Conv2d(4, 6, 3, r=2, lora_alpha=2, groups=2), (2, 4, 6, 6)),
    ("conv1d-grouped", lambda m: m.Conv1d(4, 8, 3, r=1, lora_alpha=2, groups=4), (2, 4, 9)),
]


@pytest.mark.parametrize("_id,ctor,shape", CONV_FIXES, ids=[c[0] for c in CONV_FIXES])
def test_conv_kernels_and_groups_against_plain_pytorch(_id, ctor, shape):
    layer = _build(ctor, lora)
    _randomize_lora(layer, layer)
    x = torch.randn(shape)
    out, g = _grads(layer.train(), x)
    assert (out - _conv_ref(layer, x)).abs().max() <= 1e-5
    assert g["lora_A"].abs().sum() > 0 and g["lora_B"].abs().sum() > 0
    layer.eval()
    with torch.no_grad():
        assert (layer(x) - out).abs().max() <= 1e-5
    if "grouped" not in _id:  # loralib's (B A).view(weight.shape) fails for 1-d and 3-d kernels > 1
        with pytest.raises(RuntimeError):
            ref = _build(ctor, loralib)
            _randomize_lora(ref, ref)
            ref(x)


# the paper's scaling alpha / r of each CONV_FIXES entry, from its constructor arguments
CONV_SCALING = {"conv1d-k3": 4 / 2, "conv3d-k3": 4 / 2, "conv2d-grouped": 2 / 2, "conv1d-grouped": 2 / 1}


@pytest.mark.parametrize("_id,ctor,shape", CONV_FIXES, ids=[c[0] for c in CONV_FIXES])
def test_conv_lora_path_as_its_own_convolution(_id, ctor, shape):
    """Outside lorakit's delta_weight and scaling: conv(x, W0) + (alpha / r) conv(x, (B A).view(W0.shape)),
    the LoRA path as a separate F.conv (loralib's layout, the constructor's alpha and r), and the
    gradients autograd takes through that formula."""
    layer = _build(ctor, lora)
    _randomize_lora(layer, layer)
    x = torch.randn(shape)
    out, g = _grads(layer.train(), x)
    c = layer.conv
    w0, b0 = c.weight.detach(), c.bias.detach()
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w0.dim() - 2]
    geo = (c.stride, c.padding, c.dilation, c.groups)
    ref = fn(xr, w0, b0, *geo) + CONV_SCALING[_id] * fn(xr, (B @ A).view(w0.shape), None, *geo)
    (ref * torch.linspace(-1, 1, ref.numel()).view(ref.shape)).sum().backward()
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
    for name, want in (("lora_A", A.grad), ("lora_B", B.grad), ("input", xr.grad)):
        torch.testing.assert_close(g[name], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("conv,shape", [
    (lambda: nn.Conv1d(3, 5, 3, stride=2, padding=1), (2, 3, 9)),
    (lambda: nn.Conv3d(2, 4, (2, 3, 3), padding=1), (1, 2, 4, 5, 5)),
], ids=["conv1d-k3", "conv3d-k233"])
def test_injected_conv_kernel_gt1_is_peft_two_convolutions(conv, shape):
    """An injected Conv1d/Conv3d with kernel > 1 against PEFT's definition, written out: the LoRA path is
    a convolution with A as an (r, in, *k) kernel, then a 1x1 convolution with B; and the real PEFT with
    the same A and B gives the same output."""
    torch.manual_seed(0)
    base = nn.Sequential(conv())
    ours = lorakit.inject(copy.deepcopy(base), lorakit.LoraConfig(r=2, alpha=4, targets=["0"], init="random"))
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    layer, pl = ours[0], pm.base_model.model[0]
    c = base[0]
    w0 = c.weight.detach()
    with torch.no_grad():
        layer.lora_B.normal_()
        A = layer.lora_A.detach().view(2, *w0.shape[1:])  # (r, in, *k)
        B = layer.lora_B.detach().view(w0.shape[0], 2, *[1] * (w0.dim() - 2))  # (out, r, 1, ...)
        pl.lora_A["default"].weight.copy_(A)
        pl.lora_B["default"].weight.copy_(B)
        fn = {1: F.conv1d, 3: F.conv3d}[w0.dim() - 2]
        x = torch.randn(shape)
        lora_path = fn(fn(x, A, None, c.stride, c.padding, c.dilation), B)
        ref = fn(x, w0, c.bias, c.stride, c.padding, c.dilation) + (4 / 2) * lora_path
        torch.testing.assert_close(ours(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pm(x), ref, rtol=1e-5, atol=1e-5)


def test_conv_dropout_is_honoured_loralib_ignores_it():
    x = torch.randn(2, 3, 6, 6)
    ours = _build(lambda m: m.Conv2d(3, 4, 3, r=2, lora_alpha=4, lora_dropout=0.5), lora)
    plain = _build(lambda m: m.Conv2d(3, 4, 3, r=2, lora_alpha=4), lora)
    ref = _build(lambda m: m.Conv2d(3, 4, 3, r=2, lora_alpha=4, lora_dropout=0.5), loralib)
    for m in (ours, plain, ref):
        _randomize_lora(m, m)
    with torch.no_grad():
        torch.manual_seed(5)
        y = ours.train()(x)
        # plain PyTorch: conv(x, W0) + conv(dropout(x), delta), with the same dropout mask
        torch.manual_seed(5)
        xd = F.dropout(x, 0.5, training=True)
        delta = (ours.lora_B @ ours.lora_A).view(ours.conv.weight.shape) * ours.scaling
        expect = F.conv2d(x, ours.conv.weight, ours.conv.bias) + F.conv2d(xd, delta)
        assert (y - expect).abs().max() <= 1e-5
        assert (y - plain.train()(x)).abs().max() > 1e-3  # dropout changes the training output
        ref.train()  # loralib's train() returns None
        assert (ref(x) - plain(x)).abs().max() <= TOL  # loralib silently drops it
        assert (ours.eval()(x) - plain.eval()(x)).abs().max() <= 1e-5  # eval: identical


def test_merged_linear_fan_in_fan_out_against_plain_pytorch():
    x = torch.randn(3, 8)
    layer = _build(lambda m: m.MergedLinear(8, 12, r=2, lora_alpha=4, enable_lora=[True, False, True],
                                            fan_in_fan_out=True), lora)
    _randomize_lora(layer, layer)
    assert layer.weight.shape == (8, 12)  # stored (in, out) like GPT-2
    A, B, s = layer.lora_A, layer.lora_B, layer.scaling
    with torch.no_grad():
        delta = torch.zeros(12, 8)
        delta[0:4] = B[0:4] @ A[0:2]  # slice q gets (A_q, B_q)
        delta[8:12] = B[4:8] @ A[2:4]  # slice v gets (A_v, B_v); k stays frozen
        expect = x @ (layer.weight.T + delta * s).T + layer.bias
        assert (layer.train()(x) - expect).abs().max() <= 1e-5
        assert (layer.eval()(x) - expect).abs().max() <= 1e-5
    ref = _build(lambda m: m.MergedLinear(8, 12, r=2, lora_alpha=4, enable_lora=[True, False, True],
                                          fan_in_fan_out=True), loralib)
    _randomize_lora(ref, ref)
    ref.train()
    with torch.no_grad():  # measured: loralib 0.1.2 gets this case right too (the issue expected a bug)
        assert (ref(x) - expect).abs().max() <= 1e-5


@pytest.mark.parametrize("ctor", [
    lambda m: m.Linear(6, 5, r=2, lora_alpha=4),
    lambda m: m.Conv2d(3, 4, 3, r=2, lora_alpha=4),
    lambda m: m.MergedLinear(6, 9, r=2, lora_alpha=4, enable_lora=[True, False, True]),
], ids=["linear", "conv2d", "merged"])
def test_merged_state_dict_holds_w0_no_double_application(ctor):
    x = torch.randn(2, 6) if "Conv" not in repr(ctor(lora)) else torch.randn(2, 3, 5, 5)
    ours = _build(ctor, lora)
    _randomize_lora(ours, ours)
    w0 = {k: v.clone() for k, v in ours.state_dict().items()}
    expect = ours.train()(x).detach()
    ours.eval()
    assert ours.merged
    saved = ours.state_dict()
    wkey = "conv.weight" if "conv.weight" in saved else "weight"
    assert torch.equal(saved[wkey], w0[wkey])  # W0, not W0 + BA
    fresh = _build(ctor, lora, seed=7)
    fresh.load_state_dict(saved)
    with torch.no_grad():
        assert (fresh.eval()(x) - expect).abs().max() <= 1e-5
        assert (fresh.train()(x) - expect).abs().max() <= 1e-5
    # loading into a merged layer keeps it merged and consistent
    merged = _build(ctor, lora, seed=8).eval()
    merged.load_state_dict(saved)
    with torch.no_grad():
        assert merged.merged and (merged(x) - expect).abs().max() <= 1e-5
    # loralib: the merged state dict holds W0 + BA; a fresh model merges BA again
    ref = _build(ctor, loralib)
    _randomize_lora(ref, ref)
    ref.eval()
    ref_fresh = _build(ctor, loralib, seed=7)
    ref_fresh.load_state_dict(ref.state_dict())
    ref_fresh.eval()
    with torch.no_grad():
        double = (ref_fresh(x) - expect).abs().max()
    assert double > 1e-2, "loralib was expected to double-apply BA"


# --- argument checks -----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(r=-1), dict(r=1.5), dict(r=True), dict(r=2, lora_alpha=0),
                                    dict(r=2, lora_alpha=-1), dict(r=2, lora_dropout=1.0),
                                    dict(r=2, lora_dropout=-0.1)])
def test_bad_layer_arguments(kwargs):
    with pytest.raises(LoraConfigError) as e:
        lora.Linear(4, 4, **kwargs)
    assert "Linear" in str(e.value)


def test_enable_lora_must_divide_out_features():
    with pytest.raises(LoraConfigError, match="enable_lora.*out_features=10"):
        lora.MergedLinear(4, 10, r=2, enable_lora=[True, False, True])


def test_r0_is_plain_layer():
    layer = _build(lambda m: m.Linear(4, 3, r=0), lora)
    ref = _build(lambda m: m.Linear(4, 3, r=0), loralib)
    assert list(layer.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 4)
    assert torch.equal(layer(x), ref(x))
    layer.eval()
    assert torch.equal(layer(x), ref(x))


def test_no_lambda_dropout_and_scaling():
    layer = lora.Linear(4, 3, r=4, lora_alpha=8)
    assert isinstance(layer.lora_dropout, nn.Identity)
    assert layer.scaling == 2.0
    inj = lora.Linear.from_module(nn.Linear(4, 3), r=4, lora_alpha=8, use_rslora=True)
    assert inj.scaling == pytest.approx(8 / math.sqrt(4))


@pytest.mark.parametrize("ctor", [lambda: lora.Embedding(5, 4, r=2, fan_in_fan_out=True),
                                  lambda: lora.Conv2d(3, 4, 3, r=2, fan_in_fan_out=True),
                                  lambda: lora.Conv1d(3, 4, 3, r=2, fan_in_fan_out=True)],
                         ids=["embedding", "conv2d", "conv1d"])
def test_fan_in_fan_out_on_a_layer_that_cannot_have_it(ctor):
    with pytest.raises(LoraConfigError, match="fan_in_fan_out=True is only valid for Linear"):
        ctor()
    lora.Embedding(5, 4, r=2, fan_in_fan_out=False)  # the harmless value is accepted


def test_each_forward_draws_a_fresh_dropout_mask():
    torch.manual_seed(0)
    layer = lora.Linear(16, 8, r=4, lora_alpha=8, lora_dropout=0.5)
    _randomize_lora(layer, layer)
    x = torch.randn(4, 16)
    with torch.no_grad():
        outs = torch.stack([layer.train()(x) for _ in range(2000)])
        expect = layer.eval()(x)
    assert not torch.equal(outs[0], outs[1])
    # Inverted dropout is unbiased: the mean is within 5 standard errors of the eval output.
    stderr = outs.std(0) / len(outs) ** 0.5
    assert ((outs.mean(0) - expect).abs() < 5 * stderr + 1e-6).all()
