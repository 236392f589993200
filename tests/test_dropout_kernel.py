"""lorakit.kernels.dropout: the C++ kernel and the torch-ops path draw the identical hashed mask."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.kernels import cpu as CK
from lorakit.kernels import dropout as DK

needs_kernel = pytest.mark.skipif(DK.extension() is None, reason="no C++ compiler for the CPU dropout kernel")


def _documented_keep(n: int, seed: int, p: float) -> torch.Tensor:
    """The module docstring's rule in plain Python integers, independent of both implementations:
    element i is kept when its 16-bit lane (i % 2: low, high) of fmix32((i // 2) * 0x9E3779B9 ^ seed)
    is at least round(p * 65536)."""
    m, thr, keep = 0xFFFFFFFF, round(p * 65536), []
    for i in range(n):
        h = ((i // 2) * 0x9E3779B9 & m) ^ (seed & m)
        h ^= h >> 16
        h = h * 0x85EBCA6B & m
        h ^= h >> 13
        h = h * 0xC2B2AE35 & m
        h ^= h >> 16
        keep.append((h >> 16 if i % 2 else h & 0xFFFF) >= thr)
    return torch.tensor(keep)


@pytest.mark.parametrize("p", [0.0, 0.3, 0.999])
def test_keep_mask_is_the_documented_hash(p: float) -> None:
    assert torch.equal(DK.keep_mask(1001, 0xC0FFEE, p), _documented_keep(1001, 0xC0FFEE, p))


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
    keep = _documented_keep(x.numel(), 99, 0.4).view(x.shape)  # element (i, j) is number i * 24 + j
    expect = torch.where(keep, x, torch.zeros(()))
    assert torch.equal(DK.masked(x, 99, 0.4), expect)
    g = x.clone()
    assert not g.is_contiguous()  # the in-place torch-ops path
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


class _CountMasks:
    """The extension with its ``apply_mask`` calls counted."""

    def __init__(self, ext: object) -> None:
        self.ext, self.calls = ext, 0

    def __getattr__(self, name: str) -> object:
        fn = getattr(self.ext, name)
        if name != "apply_mask":
            return fn

        def counted(*a: object) -> object:
            self.calls += 1
            return fn(*a)
        return counted


@needs_kernel
def test_fused_path_same_with_and_without_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _CountMasks(DK.extension())
    monkeypatch.setitem(CK._state, "ext", spy)
    with_kernel = _dropout_grads(3)
    assert spy.calls >= 3  # one forward mask shared by the two layers, one backward mask each
    monkeypatch.setitem(CK._state, "ext", None)
    monkeypatch.setitem(CK._state, "tried", True)
    assert DK.extension() is None
    without = _dropout_grads(3)
    for a, b in zip(with_kernel, without, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

