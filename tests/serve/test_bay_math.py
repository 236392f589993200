"""lorakit.serve.bay_math: each row's update from its own bay, against a plain-PyTorch per-row formula.

Every path of the planner: one bay on every row (plain matmuls), contiguous equal groups in bay order
(no gather), grouped with padding and base rows (gather + index_add), a subset of bays that is not a
prefix (weights gathered); decode-sized (T=1) and prefill-sized rows; in place and with autograd on.
"""

from __future__ import annotations

import pytest
import torch

from lorakit.serve.bay_math import embedding_delta, linear_delta, plan

N, R, IN, OUT = 5, 4, 12, 10  # 5 bays + the zero bay


def _bays(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(N + 1, R, IN, generator=g), torch.randn(N + 1, R, OUT, generator=g)
    A[N], B[N] = 0, 0
    return A, B


def _want(x: torch.Tensor, out: torch.Tensor, bays: list[int], A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    rows = []
    for i, b in enumerate(bays):
        d = torch.zeros_like(out[i]) if b == N else x[i] @ A[b].T @ B[b]
        rows.append(out[i] + d)
    return torch.stack(rows)


CASES = {
    "single": ([2, 2, 2, 2], "single"),
    "contiguous": ([0, 0, 1, 1, 2, 2], "contiguous"),
    "prefix-gathered": ([1, 0, N, 2, 0, 1, 1], "gather"),
    "subset": ([3, N, 1, 3], "gidx"),
    "one-row-each": ([3, 0, 2, 1, 4], "gather"),
}


@pytest.mark.parametrize("t_len", [1, 9])
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_linear_delta_equals_per_row_formula(case: str, grad: bool, t_len: int) -> None:
    bays, kind = CASES[case]
    A, B = _bays()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(bays), t_len, IN, generator=g)
    out = torch.randn(len(bays), t_len, OUT, generator=g)
    step = plan(bays, N, torch.device("cpu"))
    assert step is not None
    assert (step.single is not None) == (kind == "single")
    assert (step.gather is not None) == (kind in ("gather", "gidx"))
    assert (step.gidx is not None) == (kind == "gidx")
    want = _want(x, out, bays, A, B)
    with torch.set_grad_enabled(grad):
        got = linear_delta(x, out.clone(), step, A, B)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want, out)  # the update is not zero


def test_no_adapter_rows_plan_nothing() -> None:
    assert plan([N, N], N, torch.device("cpu")) is None


def test_embedding_delta_per_row() -> None:
    g = torch.Generator().manual_seed(2)
    num = 7
    A, B = torch.randn(N + 1, num, R, generator=g), torch.randn(N + 1, R, OUT, generator=g)
    A[N], B[N] = 0, 0
    bays = [1, N, 4, 1]
    ids = torch.randint(0, num, (4, 3), generator=g)
    out = torch.randn(4, 3, OUT, generator=g)
    step = plan(bays, N, torch.device("cpu"))
    assert step is not None
    want = torch.stack([out[i] + A[b][ids[i]] @ B[b] for i, b in enumerate(bays)])
    with torch.no_grad():
        got = embedding_delta(ids, out.clone(), step, A, B)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
