"""lorakit.cpu_kernels: the decode kernel ``lora_add_`` against a float64 reference, its refusals, and
its use by the layers' no-grad path."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import lorakit
from lorakit import cpu_kernels as CK
from lorakit import fused as FU

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
    """Wraps the extension and counts ``lora_add_`` calls."""

    def __init__(self, ext: Any) -> None:
        self.ext, self.calls, self.handled = ext, 0, 0

    def lora_add_(self, *args: Any) -> bool:
        self.calls += 1
        done = self.ext.lora_add_(*args)
        self.handled += done
        return done


@needs_kernel
@pytest.mark.parametrize("kind", ["linear", "fifo", "merged", "merged-fifo"])
def test_decode_rows_use_the_kernel_and_match_without_it(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    torch.manual_seed(0)
    fifo = kind.endswith("fifo")
    if kind.startswith("merged"):  # GPT-2's c_attn: q and v adapted, k not
        layer: nn.Module = lorakit.MergedLinear(48, 3 * 80, r=8, lora_alpha=16, enable_lora=[True, False, True],
                                                fan_in_fan_out=fifo, merge_weights=False)
    else:
        layer = lorakit.Linear(48, 80, r=8, lora_alpha=16, fan_in_fan_out=fifo, merge_weights=False)
    nn.init.normal_(layer.lora_B)
    layer.eval()
    spy = _Spy(CK.extension())
    monkeypatch.setitem(CK._state, "ext", spy)
    xs = [torch.randn(1, 1, 48), torch.randn(FU.KERNEL_ROWS, 48), torch.randn(FU.KERNEL_ROWS + 1, 48)]
    with torch.no_grad():
        got = [layer(x) for x in xs]
    per_call = 2 if kind.startswith("merged") else 1  # one call per adapted slice
    assert spy.calls == spy.handled == 2 * per_call  # the first two inputs: at most KERNEL_ROWS rows
    monkeypatch.setitem(CK._state, "ext", None)  # the ATen path
    with torch.no_grad():
        for x, y in zip(xs, got, strict=True):
            torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_training_and_autograd_never_use_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = lorakit.Linear(16, 8, r=2, merge_weights=False)
    spy = _Spy(CK.extension())
    monkeypatch.setitem(CK._state, "ext", spy)
    layer(torch.randn(1, 16)).sum().backward()  # A and B require grad: the autograd Function
    assert spy.calls == 0 and layer.lora_A.grad is not None


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAKIT_NO_EXTENSION", "1")
    monkeypatch.setitem(CK._state, "tried", False)
    monkeypatch.setitem(CK._state, "ext", "sentinel")
    assert CK.extension() is None
