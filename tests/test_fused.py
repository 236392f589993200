"""The fused LoRA path (lorakit.kernels) against the plain reference path (lorakit.functional)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import lorakit
from lorakit import functional as LF
from lorakit.kernels import dispatch as FU
from lorakit.kernels import dropout as DR
from lorakit.kernels import fused as FK

N, D_IN, D_OUT, R = 12, 16, 24, 4


class MaskDropout(nn.Module):
    """Dropout with a given keep mask and scale: the plain path with the fused path's mask."""

    def __init__(self, keep: Tensor, scale: float) -> None:
        super().__init__()
        self.keep, self.scale = keep, scale

    def forward(self, x: Tensor) -> Tensor:
        return x * self.keep.to(x.dtype) * self.scale


def _mask_for(seed_state: int, shape: tuple[int, ...], p: float) -> Tensor:
    """The mask the fused path draws right after ``torch.manual_seed(seed_state)``."""
    torch.manual_seed(seed_state)
    return DR.dropout_mask(shape, p, DR.draw_seed())


def _layer(fifo: bool = False, p: float = 0.0, bias: bool = True, seed: int = 0) -> lorakit.Linear:
    torch.manual_seed(seed)
    layer = lorakit.Linear(D_IN, D_OUT, r=R, lora_alpha=8, lora_dropout=p, fan_in_fan_out=fifo,
                           merge_weights=False, bias=bias)
    nn.init.normal_(layer.lora_B)  # non-zero B so every gradient is exercised
    return layer


def _grads(fn, params: list[Tensor], x: Tensor) -> tuple[Tensor, list[Tensor | None]]:
    for t in [*params, x]:
        t.grad = None
    out = fn(x)
    torch.manual_seed(123)
    out.backward(torch.randn_like(out))
    return out.detach(), [None if t.grad is None else t.grad.clone() for t in [*params, x]]


def _assert_close(a: list[Tensor | None], b: list[Tensor | None], **tol: float) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b, strict=True):
        assert (u is None) == (v is None)
        if u is not None:
            torch.testing.assert_close(u, v, **tol)


def _plain(layer: lorakit.Linear, dropout: nn.Module | None = None):
    def run(x: Tensor) -> Tensor:
        return LF.lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling,
                              dropout, layer.fan_in_fan_out)
    return run


@pytest.fixture(params=["add", "fold"])
def fold(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run a test with the low-rank product added per row ("add") and folded into W' ("fold")."""
    monkeypatch.setattr(FK, "FOLD_ROWS_FACTOR", 0.0 if request.param == "fold" else float("inf"))
    return request.param == "fold"


@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize("train", ["lora", "bias", "full"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_linear_matches_plain(fifo: bool, train: str, p: float, fold: bool) -> None:
    layer = _layer(fifo, p)
    layer.weight.requires_grad_(train == "full")
    layer.bias.requires_grad_(train in ("bias", "full"))
    x = torch.randn(2, N // 2, D_IN, requires_grad=True)
    params = [layer.weight, layer.bias, layer.lora_A, layer.lora_B]
    torch.manual_seed(7)
    out_f, g_f = _grads(layer, params, x)
    drop = MaskDropout(_mask_for(7, tuple(x.shape), p), DR.keep_scale(p)) if p else None
    out_p, g_p = _grads(_plain(layer, drop), params, x)
    torch.testing.assert_close(out_f, out_p, rtol=1e-5, atol=1e-5)
    _assert_close(g_f, g_p, rtol=1e-5, atol=1e-5)
    if train == "lora":
        assert layer.weight.grad is None and layer.bias.grad is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (no GPU on this machine)")
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_cuda_matches_plain(p: float, autocast: bool, fold: bool) -> None:
    """On a GPU: the mask comes from a CUDA generator seeded from the CPU-drawn seed; fused = plain."""
    layer = _layer(p=p).cuda()
    layer.bias.requires_grad_(False)
    x = torch.randn(2, N // 2, D_IN, device="cuda", requires_grad=True)
    params = [layer.lora_A, layer.lora_B]
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)
    tol = dict(rtol=3e-2, atol=1e-1) if autocast else dict(rtol=1e-4, atol=1e-4)
    torch.manual_seed(7)
    with amp:
        out_f, g_f = _grads(layer, params, x)
    torch.manual_seed(7)
    keep = DR.dropout_mask(tuple(x.shape), p, DR.draw_seed(), device="cuda") if p else None
    drop = MaskDropout(keep, DR.keep_scale(p)) if p else None
    with amp:
        out_p, g_p = _grads(_plain(layer, drop), params, x)
    torch.testing.assert_close(out_f.float(), out_p.float(), **tol)
    _assert_close(g_f, g_p, **tol)


def test_no_input_grad_when_not_needed() -> None:
    layer = _layer()
    layer.weight.requires_grad_(False)
    x = torch.randn(N, D_IN)
    layer(x).sum().backward()
    assert layer.lora_A.grad is not None and layer.weight.grad is None


@pytest.mark.parametrize("fifo", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_merged_linear_matches_plain(fifo: bool, p: float, fold: bool) -> None:
    torch.manual_seed(0)
    layer = lorakit.MergedLinear(D_IN, 3 * D_OUT, r=R, lora_alpha=8, lora_dropout=p,
                                 enable_lora=[True, False, True], fan_in_fan_out=fifo, merge_weights=False)
    nn.init.normal_(layer.lora_B)
    layer.bias.requires_grad_(True)
    x = torch.randn(N, D_IN, requires_grad=True)
    params = [layer.bias, layer.lora_A, layer.lora_B]
    torch.manual_seed(3)
    out_f, g_f = _grads(layer, params, x)
    drop = MaskDropout(_mask_for(3, tuple(x.shape), p), DR.keep_scale(p)) if p else None

    def plain(x: Tensor) -> Tensor:
        return LF.fused_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling,
                               layer.enable_lora, layer._lora_cols, drop, fifo)
    out_p, g_p = _grads(plain, params, x)
    torch.testing.assert_close(out_f, out_p, rtol=1e-5, atol=1e-5)
    _assert_close(g_f, g_p, rtol=1e-5, atol=1e-5)


def test_siblings_share_one_mask_and_match_plain() -> None:
    p = 0.25
    layers = [_layer(p=p, seed=i) for i in range(3)]  # q, k, v reading the same tensor
    x = torch.randn(N, D_IN, requires_grad=True)
    params = [t for m in layers for t in (m.lora_A, m.lora_B)]

    def fused(x: Tensor) -> Tensor:
        h = x * 1.0  # one non-leaf tensor read by the three projections
        return sum(m(h) for m in layers)
    torch.manual_seed(5)
    out_f, g_f = _grads(fused, params, x)
    keep = _mask_for(5, tuple(x.shape), p)
    drop = MaskDropout(keep, DR.keep_scale(p))
    out_p, g_p = _grads(lambda x: sum(_plain(m, drop)(x) for m in layers), params, x)
    torch.testing.assert_close(out_f, out_p, rtol=1e-5, atol=1e-5)
    _assert_close(g_f, g_p, rtol=1e-5, atol=3e-5)  # x.grad sums three paths in another order


def test_dropout_mask_statistics() -> None:
    keep = DR.dropout_mask((256, 256), 0.1, 1)
    assert abs(1 - keep.float().mean().item() - 0.1) < 0.005
    assert torch.equal(keep, DR.dropout_mask((256, 256), 0.1, 1))
    assert not torch.equal(keep, DR.dropout_mask((256, 256), 0.1, 2))


def test_saved_activations_are_compact() -> None:
    """With dropout, backward keeps the masked input (once, shared by the siblings, in place of x) and
    the (N, r) intermediates, no mask copies."""
    p = 0.1
    layers = [_layer(p=p, seed=i) for i in range(3)]
    for m in layers:
        m.weight.requires_grad_(False)
        m.bias.requires_grad_(False)
    x = torch.randn(64, D_IN, requires_grad=True)
    saved: list[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sum(m(x) for m in layers)
    params = {t.data_ptr() for m in layers for t in (m.weight, m.lora_A, m.lora_B)}
    activations = {t.data_ptr(): t.numel() * t.element_size() for t in saved if t.data_ptr() not in params}
    assert x.data_ptr() not in activations
    assert sorted(activations.values()) == [64 * R * 4] * 3 + [x.numel() * 4]
    expected = x.numel() * 4 + 3 * 64 * R * 4  # masked x once + three (N, r) intermediates
    assert sum(activations.values()) == expected


def test_bf16_autocast_matches_plain(fold: bool) -> None:
    layer = _layer()
    x = torch.randn(N, D_IN, requires_grad=True)
    params = [layer.lora_A, layer.lora_B]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_f, g_f = _grads(layer, params, x)
        out_p, g_p = _grads(_plain(layer), params, x)
    assert out_f.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in g_f if g is not None)
    torch.testing.assert_close(out_f.float(), out_p.float(), rtol=2e-2, atol=5e-2)
    _assert_close(g_f, g_p, rtol=3e-2, atol=1e-1)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_bf16_autocast_input_grad_matches_plain(p: float, fold: bool) -> None:
    """Under bf16 autocast, with dropout too: output, x / A / B grads match the plain path."""
    layer = _layer(p=p)
    x = torch.randn(4 * N, D_IN, requires_grad=True)
    params = [layer.lora_A, layer.lora_B]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.manual_seed(9)
        out_f, g_f = _grads(layer, params, x)
        drop = MaskDropout(_mask_for(9, tuple(x.shape), p), DR.keep_scale(p)) if p else None
        out_p, g_p = _grads(_plain(layer, drop), params, x)
    assert out_f.dtype == torch.bfloat16 and g_f[-1] is not None and g_f[-1].dtype == torch.float32
    torch.testing.assert_close(out_f.float(), out_p.float(), rtol=2e-2, atol=5e-2)
    for u, v in zip(g_f, g_p, strict=True):  # bf16 sums of 48 rounded terms: error scales with the terms
        assert (u - v).abs().max() <= 3e-2 * v.abs().max(), (u - v).abs().max()


def test_drop_probability_near_one_takes_the_plain_path() -> None:
    """p that rounds to 65536/65536 would drop everything and divide by zero: nn.Dropout handles it."""
    layer = _layer(p=0.3)
    layer.lora_dropout.p = 1.0 - 1e-6  # set on the module directly (LoraConfig rejects p >= 1)
    x = torch.randn(N, D_IN, requires_grad=True)
    assert not FU.fused_eligible(x, layer.weight, layer.lora_A, layer.lora_dropout)
    out = layer(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    layer.lora_dropout.p = 0.999  # still representable: fused
    assert FU.fused_eligible(x, layer.weight, layer.lora_A, layer.lora_dropout)


def test_float_mask_equals_bool_mask() -> None:
    keep = DR.dropout_mask((33, 7), 0.2, 5)
    assert torch.equal(DR.dropout_mask((33, 7), 0.2, 5, dtype=torch.float32), keep.float())
    assert torch.equal(DR.dropout_mask((33, 7), 0.2, 5, dtype=torch.bfloat16), keep.bfloat16())


def test_bf16_base_without_autocast_falls_back() -> None:
    layer = _layer().to(torch.bfloat16)
    layer.lora_A.data = layer.lora_A.data.float()
    layer.lora_B.data = layer.lora_B.data.float()
    x = torch.randn(N, D_IN, dtype=torch.bfloat16)
    assert not FU.fused_eligible(x, layer.weight, layer.lora_A, layer.lora_dropout)
    torch.testing.assert_close(layer(x), _plain(layer)(x))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradient_checkpointing(p: float, fold: bool) -> None:
    layers = nn.ModuleList([_layer(p=p, seed=i) for i in range(2)])
    block = nn.Sequential(layers[0], nn.Tanh(), nn.Linear(D_OUT, D_IN))

    def run(x: Tensor) -> Tensor:
        return layers[1](block(x))
    x = torch.randn(N, D_IN, requires_grad=True)
    params = [t for m in layers for t in (m.lora_A, m.lora_B)]
    torch.manual_seed(11)
    out_c, g_c = _grads(lambda x: checkpoint(run, x, use_reentrant=False), params, x)
    torch.manual_seed(11)
    out_e, g_e = _grads(run, params, x)
    with FU.disabled():  # the plain path with the same masks
        torch.manual_seed(11)
        k0 = DR.dropout_mask((N, D_IN), p, DR.draw_seed())
        k1 = DR.dropout_mask((N, D_IN), p, DR.draw_seed())
        saved = [m.lora_dropout for m in layers]
        layers[0].lora_dropout, layers[1].lora_dropout = (MaskDropout(k0, DR.keep_scale(p)),
                                                          MaskDropout(k1, DR.keep_scale(p)))
        try:
            out_p, g_p = _grads(run, params, x)
        finally:
            layers[0].lora_dropout, layers[1].lora_dropout = saved
    torch.testing.assert_close(out_c, out_e)
    _assert_close(g_c, g_e, rtol=1e-6, atol=1e-6)
    if p:
        torch.testing.assert_close(out_e, out_p, rtol=1e-5, atol=1e-5)
        _assert_close(g_e, g_p, rtol=1e-5, atol=1e-5)


def test_inference_and_switches(fold: bool) -> None:
    layer = _layer(p=0.2)
    layer.eval()
    x = torch.randn(N, D_IN)
    with torch.no_grad():
        ref = _plain(layer)(x)
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
        with FU.disabled():
            assert not FU.fused_eligible(x, layer.weight, layer.lora_A, layer.lora_dropout)
            torch.testing.assert_close(layer(x), ref)
    layer.lora_fused = False
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref)


def test_custom_dropout_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dropout module the fused path does not reproduce (AlphaDropout) takes the plain path: the
    layers' one entry, ``linear_forward``, hands back None, and the output is the plain reference's
    with AlphaDropout's own draw."""
    layer = _layer()
    layer.lora_dropout = nn.AlphaDropout(0.1)
    handled: list[bool] = []
    real = FU.linear_forward

    def spy(*a: object, **k: object) -> Tensor | None:
        out = real(*a, **k)
        handled.append(out is not None)
        return out
    monkeypatch.setattr(FU, "linear_forward", spy)
    x = torch.randn(N, D_IN)
    torch.manual_seed(5)
    out = layer(x)
    assert handled == [False]  # the layer asked the fast path once, and it declined
    torch.manual_seed(5)
    ref = LF.lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, 8 / R, nn.AlphaDropout(0.1))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_torch_compile_fullgraph_no_dropout(fold: bool) -> None:
    torch._dynamo.reset()
    layer = _layer()
    x = torch.randn(N, D_IN, requires_grad=True)
    params = [layer.lora_A, layer.lora_B]
    out_c, g_c = _grads(torch.compile(layer, fullgraph=True, backend="aot_eager"), params, x)
    out_e, g_e = _grads(layer, params, x)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    _assert_close(g_c, g_e, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_compile_fullgraph_dropout() -> None:
    """Compiled, the fused path still drops (its mask is then torch.rand's): with W = 0, b = 0,
    A = B = I and scaling 1 the layer's output is dropout(x) itself and the input gradient of a
    ones upstream gradient is the mask times 1/(1-p), so the share dropped, the kept elements' scale
    and the backward's use of the forward's mask are read off directly."""
    torch._dynamo.reset()
    p, d, n = 0.2, 16, 512
    torch.manual_seed(0)
    layer = lorakit.Linear(d, d, r=d, lora_alpha=d, lora_dropout=p, merge_weights=False)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
        layer.lora_A.copy_(torch.eye(d))
        layer.lora_B.copy_(torch.eye(d))
    x = torch.randn(n, d, requires_grad=True)
    out = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    out.backward(torch.ones_like(out))
    dropped = out.detach() == 0
    assert abs(dropped.float().mean().item() - p) < 0.03  # 8192 draws: 5 standard deviations
    scale = DR.keep_scale(p)
    torch.testing.assert_close(out.detach()[~dropped], x.detach()[~dropped] * scale, rtol=1e-6, atol=0)
    assert torch.equal(x.grad == 0, dropped)  # backward drops exactly the forward's elements
    torch.testing.assert_close(x.grad[~dropped], torch.full_like(x.grad[~dropped], scale), rtol=1e-6, atol=0)


def test_fold_is_chosen_by_size_and_only_without_dropout(monkeypatch: pytest.MonkeyPatch) -> None:
    """W' = W + s B A is built when the rows outnumber the widths enough, never with dropout."""
    assert FK.fold_pays(4096, 768, 768) and not FK.fold_pays(512, 576, 1536) and not FK.fold_pays(1, 768, 768)
    calls: list[tuple[int, ...]] = []
    real = FK.folded_weight

    def spy(w: Tensor, *a: object) -> Tensor:
        calls.append(tuple(w.shape))
        return real(w, *a)
    monkeypatch.setattr(FK, "folded_weight", spy)
    for p, n, expect in [(0.0, 16 * D_OUT, 2), (0.0, 2, 0), (0.3, 16 * D_OUT, 0)]:
        calls.clear()
        layer = _layer(p=p)
        x = torch.randn(n, D_IN, requires_grad=True)
        layer(x).sum().backward()  # fold: W' built in forward and rebuilt in backward (not saved)
        assert len(calls) == expect, (p, n, calls)
        with torch.no_grad():
            calls.clear()
            layer.eval()
            layer(x)
            assert len(calls) == (1 if n > 2 else 0)


def test_fold_saves_no_weight_sized_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    """The folded weight is rebuilt in backward, not kept: saved activations are x and (N, r)."""
    monkeypatch.setattr(FK, "FOLD_ROWS_FACTOR", 0.0)
    layer = _layer()
    layer.weight.requires_grad_(False)
    x = torch.randn(64, D_IN, requires_grad=True)
    saved: list[Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    params = {t.data_ptr() for t in (layer.weight, layer.lora_A, layer.lora_B)}
    sizes = sorted(t.numel() for t in saved if t.data_ptr() not in params)
    assert sizes == [64 * R, 64 * D_IN]


@pytest.mark.parametrize("rows", [(1,), (2, 1), (63,), (4, 16), (3, 50), (40 * D_OUT,)])
@pytest.mark.parametrize("kind", ["linear", "fifo", "merged", "no-bias"])
def test_no_grad_forward_matches_reference_at_every_row_count(rows: tuple[int, ...], kind: str) -> None:
    """The no-grad paths (few rows: three calls; many rows: addmm_ or the folded weight) equal the
    reference math for Linear, fan_in_fan_out, MergedLinear and bias-free layers."""
    torch.manual_seed(1)
    if kind == "merged":
        layer: nn.Module = lorakit.MergedLinear(D_IN, 3 * D_OUT, r=R, lora_alpha=8, enable_lora=[True, False, True],
                                                merge_weights=False)
    else:
        layer = lorakit.Linear(D_IN, D_OUT, r=R, lora_alpha=8, fan_in_fan_out=kind == "fifo", merge_weights=False,
                               bias=kind != "no-bias")
    nn.init.normal_(layer.lora_B)
    layer.eval()
    x = torch.randn(*rows, D_IN)
    with torch.no_grad():
        got = layer(x)
        if kind == "merged":
            ref = LF.fused_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling,
                                  layer.enable_lora, layer._lora_cols)
        else:
            ref = LF.lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling,
                                 None, layer.fan_in_fan_out)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dropout", ["identity", "eval", "p0-train", "custom-eval"])
@pytest.mark.parametrize("setting", ["fp32", "autocast-bf16", "bf16-base"])
def test_no_grad_entry_matches_plain_path(dropout: str, setting: str) -> None:
    """The specialised no-grad entry of ``linear_forward`` gives what the plain path gives, for every
    dropout module and dtype setting it must accept or hand on."""
    torch.manual_seed(3)
    layer = lorakit.Linear(D_IN, D_OUT, r=R, lora_alpha=8, lora_dropout=0.3, merge_weights=False)
    nn.init.normal_(layer.lora_B)
    layer.lora_dropout = {"identity": nn.Identity(), "eval": nn.Dropout(0.3).eval(), "p0-train": nn.Dropout(0.0),
                          "custom-eval": nn.AlphaDropout(0.3).eval()}[dropout]
    x = torch.randn(3, D_IN)
    if setting == "bf16-base":
        layer.to(torch.bfloat16)  # x stays fp32: mixed dtypes without autocast take the plain path
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if setting == "autocast-bf16" else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        if setting == "bf16-base":
            with pytest.raises(RuntimeError):  # the plain path's own error for mixed dtypes
                layer(x)
            return
        got = layer(x)
        with FU.disabled():
            ref = layer(x)
    tol = 2e-2 if setting == "autocast-bf16" else 1e-5
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)
