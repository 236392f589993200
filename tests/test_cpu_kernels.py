"""lorakit.kernels.cpu: the decode kernels ``linear_rows`` and ``lora_add_`` and training's skinny
products against float64 references, their refusals, and their use by the layers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import lorakit
from lorakit.kernels import cpu as CK
from lorakit.kernels import decode as DE
from lorakit.kernels import dispatch as FU
from lorakit.kernels import fused as FK

needs_kernel = pytest.mark.skipif(CK.extension() is None, reason="no C++ compiler for the CPU kernels")


def _reference(out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    return (out.double() + s * (x.double() @ A.double().T) @ B.double().T).float()


@needs_kernel
@pytest.mark.parametrize("n,k,o,r", [(1, 576, 1536, 16), (1, 1536, 576, 8), (3, 64, 40, 13), (2, 5, 7, 1),
                                     (4, 13, 8, 40), (1, 8, 3, 3), (5, 100, 17, 9)])
def test_lora_add_matches_float64(n: int, k: int, o: int, r: int) -> None:
    g = torch.Generator().manual_seed(n * 1000 + r)
    x, A, B = torch.randn(n, k, generator=g), torch.randn(r, k, generator=g), torch.randn(o, r, generator=g)
    out = torch.randn(n, o, generator=g)
    expect = _reference(out, x, A, B, 0.75)
    assert CK.extension().lora_add_(out, x, A, B, 0.75) is True
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())


@needs_kernel
def test_lora_add_leading_dims() -> None:
    x, A, B = torch.randn(2, 1, 32), torch.randn(4, 32), torch.randn(24, 4)
    out = torch.randn(2, 1, 24)
    expect = _reference(out, x, A, B, 2.0)
    assert CK.extension().lora_add_(out, x, A, B, 2.0)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_lora_add_into_a_column_slice() -> None:
    """One slice of a fused qkv output: the kernel writes those columns and nothing else."""
    x, A, B = torch.randn(3, 24), torch.randn(4, 24), torch.randn(7, 4)
    full = torch.randn(3, 20)
    expect = full.clone()
    expect[:, 5:12] = _reference(full[:, 5:12], x, A, B, 0.5)
    assert CK.extension().lora_add_(full[:, 5:12], x, A, B, 0.5)
    torch.testing.assert_close(full, expect, rtol=1e-5, atol=1e-5)
    assert torch.equal(full[:, :5], expect[:, :5]) and torch.equal(full[:, 12:], expect[:, 12:])


@needs_kernel
@pytest.mark.parametrize("case", ["float64", "bf16", "strided-x", "grad-A", "rank-mismatch", "rows-mismatch",
                                  "huge-rank", "empty-rank", "strided-out"])
def test_lora_add_refuses_and_leaves_out_unchanged(case: str) -> None:
    x, A, B, out = torch.randn(2, 16), torch.randn(4, 16), torch.randn(8, 4), torch.randn(2, 8)
    if case == "float64":
        x, A, B, out = x.double(), A.double(), B.double(), out.double()
    elif case == "bf16":
        x, A, B, out = x.bfloat16(), A.bfloat16(), B.bfloat16(), out.bfloat16()
    elif case == "strided-x":
        x = torch.randn(16, 2).T
    elif case == "grad-A":  # with grad mode on, an in-place write autograd would not see
        A.requires_grad_(True)
    elif case == "rank-mismatch":
        B = torch.randn(8, 3)
    elif case == "rows-mismatch":
        out = torch.randn(3, 8)
    elif case == "strided-out":  # columns not unit-stride
        out = torch.randn(8, 2).T
    elif case == "huge-rank":
        A, B = torch.randn(1025, 16), torch.randn(8, 1025)
    else:
        A, B = torch.randn(0, 16), torch.randn(8, 0)
    before = out.clone()
    assert CK.extension().lora_add_(out, x, A, B, 1.0) is False
    assert torch.equal(out, before)


@needs_kernel
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_lora_add_takes_parameters_without_grad_mode(mode: Any) -> None:
    """Parameters keep ``requires_grad`` under no_grad/inference_mode; nothing is recorded there."""
    x, out = torch.randn(1, 16), torch.randn(1, 8)
    A, B = nn.Parameter(torch.randn(4, 16)), nn.Parameter(torch.randn(8, 4))
    expect = _reference(out, x, A.detach(), B.detach(), 1.5)
    with mode():
        assert CK.extension().lora_add_(out, x, A, B, 1.5) is True
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


class _Spy:
    """Wraps the extension; counts each kernel's calls and the calls it handled (True or a tensor)."""

    def __init__(self, ext: Any) -> None:
        self.ext = ext
        self.calls: dict[str, int] = {}
        self.handled: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        fn = getattr(self.ext, name)

        def counted(*args: Any) -> Any:
            out = fn(*args)
            self.calls[name] = self.calls.get(name, 0) + 1
            self.handled[name] = self.handled.get(name, 0) + (out is not None and out is not False)
            return out
        return counted

    def total(self) -> int:
        return sum(self.calls.values())


@needs_kernel
@pytest.mark.parametrize("kind", ["linear", "fifo", "merged", "merged-fifo"])
def test_decode_rows_use_the_kernel_and_match_without_it(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    torch.manual_seed(0)
    fifo = kind.endswith("fifo")
    if kind.startswith("merged"):  # GPT-2's c_attn: q and v adapted, k not
        layer: nn.Module = lorakit.MergedLinear(48, 3 * 80, r=8, lora_alpha=16, enable_lora=[True, False, True],
                                                fan_in_fan_out=fifo, merge_weights=False, bias=True)
    else:
        layer = lorakit.Linear(48, 80, r=8, lora_alpha=16, fan_in_fan_out=fifo, merge_weights=False)
    nn.init.normal_(layer.lora_B)
    layer.eval()
    spy = _Spy(CK.extension())
    monkeypatch.setitem(CK._state, "ext", spy)
    xs = [torch.randn(1, 1, 48), torch.randn(DE.KERNEL_ROWS, 48), torch.randn(DE.KERNEL_ROWS + 1, 48)]
    with torch.no_grad():
        got = [layer(x) for x in xs]
    # the first two inputs have at most KERNEL_ROWS rows: the whole layer in one call, or for a
    # fused qkv the base in one call and one low-rank call per adapted slice
    assert spy.handled.get("linear_rows") == spy.calls.get("linear_rows") == 2
    lora_calls = 4 if kind.startswith("merged") else 0
    assert spy.handled.get("lora_add_", 0) == spy.calls.get("lora_add_", 0) == lora_calls
    monkeypatch.setitem(CK._state, "ext", None)  # the ATen path
    with torch.no_grad():
        for x, y in zip(xs, got, strict=True):
            torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("fifo", [False, True])
def test_merged_layer_decodes_through_the_kernel_and_disabled_is_the_base(monkeypatch: pytest.MonkeyPatch,
                                                                          fifo: bool) -> None:
    """A merged layer decodes with the kernel (never slower than unmerged); with adapters disabled
    the layer is bit for bit the base ``F.linear``, kernel or not."""
    torch.manual_seed(1)
    layer = lorakit.Linear(40, 24, r=4, lora_alpha=8, fan_in_fan_out=fifo, merge_weights=False)
    nn.init.normal_(layer.lora_B)
    layer.eval()
    x = torch.randn(2, 40)
    w0 = layer.weight.detach().clone()
    w0 = w0.T if fifo else w0
    with torch.no_grad():
        unmerged = layer(x)
        lorakit.merge(layer)
        spy = _Spy(CK.extension())
        monkeypatch.setitem(CK._state, "ext", spy)
        merged = layer(x)
        assert spy.handled == {"linear_rows": 1}
        torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
        expect = torch.nn.functional.linear(x.double(), layer.weight.double().T if fifo else layer.weight.double(),
                                            layer.bias.double())
        torch.testing.assert_close(merged.double(), expect, rtol=1e-5, atol=1e-5)
        lorakit.unmerge(layer)
        with lorakit.disable_adapters(layer):
            base = layer(x)
        assert torch.equal(base, torch.nn.functional.linear(x, w0, layer.bias))
        assert spy.handled == {"linear_rows": 1}  # the disabled call used no kernel
        with FU.disabled():  # lorakit.fused.disabled() turns the kernel off for merged layers too
            lorakit.merge(layer)
            layer(x)
            assert spy.total() == 1


def _linear_reference(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, A: torch.Tensor | None,
                      B: torch.Tensor | None, s: float) -> torch.Tensor:
    out = x.double() @ W.double().T
    if b is not None:
        out = out + b.double()
    if A is not None and B is not None:
        out = out + s * (x.double() @ A.double().T) @ B.double().T
    return out


@needs_kernel
@pytest.mark.parametrize("n,k,o,r,bias,fifo,threads", [
    (1, 576, 1536, 16, False, False, 1), (1, 1536, 576, 16, True, False, 2), (4, 576, 192, 8, True, False, 2),
    (3, 37, 13, 5, True, False, 1), (2, 9, 100, 0, False, False, 1), (16, 20, 11, 3, True, False, 2),
    (1, 768, 2304, 8, True, True, 1), (4, 768, 2304, 8, True, True, 2), (3, 37, 13, 5, False, True, 2),
    (1, 7, 5, 0, True, True, 1), (2, 3072, 768, 4, True, True, 2)])
def test_linear_rows_matches_float64(n: int, k: int, o: int, r: int, bias: bool, fifo: bool, threads: int) -> None:
    """Every row-block and column tail, both weight layouts (fan_in_fan_out: the transpose of a
    contiguous (in, out) weight), with and without the low-rank update, one and two threads."""
    g = torch.Generator().manual_seed(n * 7 + k + o + r)
    x = torch.randn(n, 1, k, generator=g)
    W = torch.randn(k, o, generator=g).T if fifo else torch.randn(o, k, generator=g)
    b = torch.randn(o, generator=g) if bias else None
    A = torch.randn(r, k, generator=g) if r else None
    B = torch.randn(o, r, generator=g) if r else None
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = CK.extension().linear_rows(x, W, b, A, B, 0.6)
    finally:
        torch.set_num_threads(old)
    expect = _linear_reference(x, W, b, A, B, 0.6)
    assert out is not None and out.shape == (n, 1, o) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expect, rtol=1e-5, atol=2e-6 * expect.abs().max().item())


@needs_kernel
@pytest.mark.parametrize("case", ["float64", "bf16", "strided-x", "grad-W", "strided-W", "bias-size",
                                  "bias-dtype", "A-without-B", "rank-mismatch", "in-mismatch", "rows", "no-rows"])
def test_linear_rows_refuses(case: str) -> None:
    x, W, b = torch.randn(2, 16), torch.randn(8, 16), torch.randn(8)
    A, B = torch.randn(4, 16), torch.randn(8, 4)
    if case == "float64":
        x, W, b, A, B = x.double(), W.double(), b.double(), A.double(), B.double()
    elif case == "bf16":
        x, W = x.bfloat16(), W.bfloat16()
    elif case == "strided-x":
        x = torch.randn(16, 2).T
    elif case == "grad-W":  # with grad mode on: autograd must see the computation
        W.requires_grad_(True)
    elif case == "strided-W":  # neither (out, in) rows nor the transpose of contiguous (in, out)
        W = torch.randn(8, 32)[:, ::2]
    elif case == "bias-size":
        b = torch.randn(9)
    elif case == "bias-dtype":
        b = b.double()
    elif case == "A-without-B":
        B = None
    elif case == "rank-mismatch":
        B = torch.randn(8, 3)
    elif case == "in-mismatch":
        W = torch.randn(8, 17)
    elif case == "rows":
        x = torch.randn(17, 16)
    else:
        x = torch.randn(0, 16)
    assert CK.extension().linear_rows(x, W, b, A, B, 1.0) is None


@needs_kernel
def test_linear_rows_takes_a_row_strided_weight() -> None:
    """Rows of W with a gap between them (a view of every other row) are read in place."""
    x, W, b = torch.randn(3, 16), torch.randn(16, 16)[::2], torch.randn(8)
    out = CK.extension().linear_rows(x, W, b, None, None, 0.0)
    assert out is not None
    torch.testing.assert_close(out.double(), _linear_reference(x, W, b, None, None, 0.0), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_training_and_autograd_never_use_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = lorakit.Linear(16, 8, r=2, merge_weights=False)
    spy = _Spy(CK.extension())
    monkeypatch.setitem(CK._state, "ext", spy)
    layer(torch.randn(1, 16)).sum().backward()  # A and B require grad: the autograd Function
    assert spy.total() == 0 and layer.lora_A.grad is not None


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAKIT_NO_EXTENSION", "1")
    monkeypatch.setitem(CK._state, "tried", False)
    monkeypatch.setitem(CK._state, "ext", "sentinel")
    assert CK.extension() is None


# --- training's skinny products ----------------------------------------------------------------
@needs_kernel
@pytest.mark.parametrize("N,k,r", [(1, 5, 1), (37, 768, 8), (300, 100, 16), (64, 33, 3), (2000, 48, 32)])
def test_rows_mm_t_matches_float64(N: int, k: int, r: int) -> None:
    g = torch.Generator().manual_seed(N + k + r)
    X, M = torch.randn(N, k, generator=g), torch.randn(r, k, generator=g)
    got = CK.extension().rows_mm_t(X, M)
    torch.testing.assert_close(got, (X.double() @ M.double().T).float(), rtol=1e-5, atol=1e-4)
    wide = torch.randn(N, k + 7, generator=g)  # rows strided: a column slice of a wider tensor
    torch.testing.assert_close(CK.extension().rows_mm_t(wide[:, 3:3 + k], M),
                               (wide[:, 3:3 + k].double() @ M.double().T).float(), rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("N,o,r", [(1, 5, 8), (17, 13, 8), (600, 40, 16), (1000, 768, 8), (257, 7, 32), (48, 1, 16)])
def test_rows_t_mm_matches_float64(N: int, o: int, r: int, threads: int) -> None:
    """Every register-block width (r = 8, 16, 32), leftover columns, leftover rows, one or several
    per-thread accumulators."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(N + o + r)
        wide, T = torch.randn(N, o + 4, generator=gen), torch.randn(N, r, generator=gen)
        G = wide[:, 2:2 + o]  # strided rows
        got = CK.extension().rows_t_mm(G, T)
    finally:
        torch.set_num_threads(saved)
    assert got.shape == (o, r) and got.is_contiguous()
    torch.testing.assert_close(got, (G.double().T @ T.double()).float(), rtol=1e-5, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("case", ["rank-4", "float64", "strided-T", "rows-mismatch", "grad"])
def test_skinny_kernels_refuse(case: str) -> None:
    X, M, T = torch.randn(20, 16), torch.randn(8, 16), torch.randn(20, 8)
    if case == "rank-4":  # rows_mm_t takes any rank, rows_t_mm only 8, 16, 32
        T = torch.randn(20, 4)
        assert CK.extension().rows_mm_t(X, torch.randn(4, 16)) is not None
    elif case == "float64":
        X, M, T = X.double(), M.double(), T.double()
    elif case == "strided-T":
        T = torch.randn(8, 20).T
        M = torch.randn(16, 8).T
    elif case == "rows-mismatch":
        T = torch.randn(21, 8)
        M = torch.randn(8, 15)
    else:
        X.requires_grad_(True)
    assert CK.extension().rows_t_mm(X, T) is None
    if case != "rank-4":
        assert CK.extension().rows_mm_t(X, M) is None


@needs_kernel
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("kind", ["linear", "fifo", "merged"])
def test_fused_gradients_with_skinny_kernels(monkeypatch: pytest.MonkeyPatch, p: float, fold: bool, kind: str) -> None:
    """The training step with every rank-r product in the kernels equals the same step in ATen
    (same dropout mask: same seed), gradients to fp32 round-off."""
    torch.manual_seed(0)
    if kind == "merged":
        layer: nn.Module = lorakit.MergedLinear(40, 3 * 24, r=8, lora_alpha=16, lora_dropout=p,
                                                enable_lora=[True, False, True], merge_weights=False)
    else:
        layer = lorakit.Linear(40, 56, r=16, lora_alpha=32, lora_dropout=p, fan_in_fan_out=kind == "fifo",
                               merge_weights=False)
    nn.init.normal_(layer.lora_B)
    layer.weight.requires_grad_(False)
    monkeypatch.setattr(FK, "FOLD_ROWS_FACTOR", 0.0 if fold else float("inf"))
    x = torch.randn(3, 70, 40)
    g = torch.randn(3, 70, layer.out_features)

    def step(min_elements: float) -> list[torch.Tensor]:
        monkeypatch.setattr(FK, "SKINNY_MIN_ELEMENTS", min_elements)
        monkeypatch.setattr(FK, "GRAD_PRODUCT_MIN_ELEMENTS", min_elements)
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(5)  # the same dropout seed for both runs
        layer.lora_A.grad = layer.lora_B.grad = None
        out = layer(xi)
        out.backward(g)
        return [out.detach(), xi.grad, layer.lora_A.grad, layer.lora_B.grad]

    spy = _Spy(CK.extension())
    monkeypatch.setitem(CK._state, "ext", spy)
    with_kernels = step(0)
    assert spy.handled.get("rows_mm_t", 0) > 0 and spy.handled.get("rows_t_mm", 0) > 0
    in_aten = step(float("inf"))
    for a, b in zip(with_kernels, in_aten, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@needs_kernel
def test_default_thresholds_route_smollm2_grad_products_to_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """At the default thresholds a 512-row SmolLM2 projection's weight-gradient products ``Gᵀ T``
    run in ``rows_t_mm`` (faster than MKL there), while ``X Aᵀ`` (cache-resident) stays in ATen."""
    spy = _Spy(CK.extension())
    monkeypatch.setitem(CK._state, "ext", spy)
    layer = lorakit.Linear(576, 1536, r=16, lora_alpha=32, merge_weights=False)
    nn.init.normal_(layer.lora_B)
    layer.weight.requires_grad_(False)
    layer(torch.randn(4, 128, 576, requires_grad=True)).backward(torch.randn(4, 128, 1536))
    assert spy.handled.get("rows_t_mm", 0) == 2  # grad B (G = g) and grad A (G = x)
    assert spy.handled.get("rows_mm_t", 0) == 0
