"""lorakit.kernels.dropout: the C++ kernel and the torch-ops path draw the identical hashed mask."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.kernels import cpu as CK
from lorakit.kernels import dropout as DK

needs_kernel = pytest.mark.skipif(DK.extension() is None, reason="no C++ compiler for the CPU dropout kernel")


@needs_kernel
@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4097])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_kernel_equals_torch_ops(n: int, dtype: torch.dtype) -> None:
    x = torch.randn(n).to(dtype)
    keep = DK.keep_mask(n, 123456789, 0.3)
    expect = torch.where(keep, x, torch.zeros((), dtype=dtype))
    assert torch.equal(DK.masked(x, 123456789, 0.3), expect)
    g = x.clone()
    assert DK.mask_(g, 123456789, 0.3) is g and torch.equal(g, expect)  # in place


@needs_kernel
@pytest.mark.parametrize("n", [15, 16, 17, 33, 70001])
@pytest.mark.parametrize("p", [0.0, 0.05, 0.5, 0.999])
def test_vectorised_kernel_is_bitwise_x_times_keep(n: int, p: float) -> None:
    """float32 runs 16 elements per AVX2 step (and several threads beyond 32k elements): the result is
    ``x * keep`` bit for bit, signed zeros, inf * 0 = NaN and the scalar tail included, in place or not."""
    x = torch.randn(n)
    x[::7], x[3::11] = float("inf"), -0.0
    expect = x * DK.keep_mask(n, 0xDEADBEEF, p).float()
    for got in (DK.masked(x, 0xDEADBEEF, p), DK.mask_(x.clone(), 0xDEADBEEF, p)):
        assert torch.equal(got.isnan(), expect.isnan())
        ok = ~expect.isnan()
        assert torch.equal(got[ok].view(torch.int32), expect[ok].view(torch.int32))


def test_mask_statistics_and_seeds() -> None:
    keep = DK.keep_mask(1 << 20, 7, 0.1)
    assert abs(1 - keep.float().mean().item() - 0.1) < 0.002
    pairs = keep[: (1 << 20)].view(-1, 2).float()  # the two lanes of one hash are independent
    assert abs((pairs[:, 0] * pairs[:, 1]).mean().item() - 0.9 ** 2) < 0.002
    assert torch.equal(keep, DK.keep_mask(1 << 20, 7, 0.1))
    assert (keep != DK.keep_mask(1 << 20, 8, 0.1)).float().mean() > 0.15  # another seed: another mask
    assert DK.keep_mask(100, 7, 0.0).all() and not DK.keep_mask(100, 7, 1.0).any()
    assert DK.keep_scale(0.1) == DK.LEVELS / (DK.LEVELS - round(0.1 * DK.LEVELS))


def test_non_contiguous_input_uses_row_major_order() -> None:
    x = torch.randn(24, 10).t()  # (10, 24), transposed strides
    expect = x * DK.dropout_mask(x.shape, 0.4, 99, dtype=x.dtype)
    assert torch.equal(DK.masked(x, 99, 0.4), expect)
    g = x.clone()  # non-contiguous: the torch-ops path
    assert torch.equal(DK.mask_(g, 99, 0.4), expect)


def _dropout_grads(seed: int) -> list[torch.Tensor]:
    torch.manual_seed(0)
    layers = [lorakit.Linear(16, 24, r=4, lora_alpha=8, lora_dropout=0.3, merge_weights=False) for _ in range(2)]
    for m in layers:
        torch.nn.init.normal_(m.lora_B)
    x = torch.randn(12, 16, requires_grad=True)
    torch.manual_seed(seed)
    h = x * 1.0
    sum(m(h) for m in layers).square().sum().backward()
    return [t.grad for m in layers for t in (m.lora_A, m.lora_B)] + [x.grad]


def test_fused_path_same_with_and_without_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    with_kernel = _dropout_grads(3)
    monkeypatch.setitem(CK._state, "ext", None)
    monkeypatch.setitem(CK._state, "tried", True)
    without = _dropout_grads(3)
    for a, b in zip(with_kernel, without, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

