"""No first-use stall (issue 19 §3): a missing CPU extension is compiled in the background.

``lorakit.kernels.cpu.extension()`` returns None (the torch-ops path) while a child process compiles
the kernels, announces it in one stderr line, and returns the kernels once they are loaded;
``LORAKIT_EXTENSION_BUILD=wait`` (set by this suite's conftest) or :func:`wait_for_extension`
makes it deterministic. Switching over mid-training changes nothing beyond float32 rounding: the
dropout masks are bit-identical, the rank-r products (summed in another order) agree to rounding.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

import lorakit
from lorakit.kernels import cpu as CK
from lorakit.kernels import dropout as DK

REAL = CK.wait_for_extension()
needs_kernel = pytest.mark.skipif(REAL is None, reason="no C++ compiler for the CPU kernels")


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A never-tried extension state (restored afterwards) with a fake, slow compile."""
    saved = dict(CK._state)
    calls: dict[str, Any] = {"compile": 0, "load": 0, "release": threading.Event(), "started": threading.Event(),
                             "threads": set()}

    def compile_in_child(name: str) -> None:
        calls["compile"] += 1
        calls["threads"].add(threading.current_thread().name)
        calls["started"].set()
        assert calls["release"].wait(30)

    def load(name: str) -> object:
        calls["load"] += 1
        return calls.setdefault("ext", object())

    monkeypatch.setattr(CK, "_compile_in_child", compile_in_child)
    monkeypatch.setattr(CK, "_load", load)
    monkeypatch.setattr(CK, "_cached", lambda name: False)
    monkeypatch.delenv("LORAKIT_NO_EXTENSION", raising=False)
    monkeypatch.setenv(CK.BUILD_ENV, "background")
    CK._state.clear()
    CK._state.update(ext=None, tried=False, building=None)
    yield calls
    calls["release"].set()
    t = CK._state.get("building")
    if t is not None:
        t.join(10)
    CK._state.clear()
    CK._state.update(saved)


def test_a_missing_extension_builds_in_the_background(fresh: dict[str, Any],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # the fake compile cannot end before ``release`` is set (below): returning None here means the
    # caller did not wait for it (no wall-clock bound, which a loaded machine breaks)
    assert CK.extension() is None  # at once: the caller takes the torch-ops path
    assert CK.extension() is None
    assert not fresh["release"].is_set() and CK._state["building"] is not None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "background" in err and "CPU kernels" in err, err  # one line, once
    assert fresh["started"].wait(30)  # the build thread may not have run yet
    assert fresh["threads"] == {"lorakit-cpu-build"}
    fresh["release"].set()
    assert CK.wait_for_extension(10) is fresh["ext"]
    assert CK.extension() is fresh["ext"]  # switched over
    assert fresh["compile"] == 1 and fresh["load"] == 1
    assert capsys.readouterr().err == ""


def test_wait_for_extension_times_out_while_building(fresh: dict[str, Any]) -> None:
    assert CK.wait_for_extension(0.05) is None
    fresh["release"].set()
    assert CK.wait_for_extension(10) is fresh["ext"]


def test_wait_mode_builds_in_the_caller(fresh: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CK.BUILD_ENV, "wait")
    fresh["release"].set()
    assert CK.extension() is fresh["ext"]
    assert fresh["threads"] == set() and fresh["load"] == 1 and CK._state["building"] is None


def test_a_cached_extension_loads_at_once(fresh: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(CK, "_cached", lambda name: True)
    assert CK.extension() is fresh["ext"]
    assert fresh["compile"] == 0 and capsys.readouterr().err == ""


def test_the_cache_is_found_where_torch_puts_it(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    name = CK._name()
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert not CK._cached(name)
    (tmp_path / name).mkdir()
    (tmp_path / name / f"{name}.so").write_bytes(b"")
    assert CK._cached(name) and not CK._cached(name + "x")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setattr("torch.utils.cpp_extension.get_default_build_root", lambda: str(tmp_path / "root"))
    assert not CK._cached(name)
    (tmp_path / "root" / "py311_cpu" / name).mkdir(parents=True)
    (tmp_path / "root" / "py311_cpu" / name / f"{name}.so").write_bytes(b"")
    assert CK._cached(name)


def test_a_failed_background_build_leaves_torch_ops(fresh: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(name: str) -> None:
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(CK, "_compile_in_child", broken)
    assert CK.extension() is None
    assert CK.wait_for_extension(10) is None
    assert CK._state["tried"] and CK.extension() is None and fresh["load"] == 0


def test_disabled_by_environment_starts_nothing(fresh: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAKIT_NO_EXTENSION", "1")
    assert CK.extension() is None and CK.wait_for_extension() is None
    assert fresh["compile"] == 0 and fresh["load"] == 0 and CK._state["building"] is None


@needs_kernel
def test_the_child_process_build_and_switch_for_real(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real child (``python -m lorakit.kernels.cpu``) against the warm cache: it exits at once,
    the thread loads the module, and callers switch to it."""
    saved = dict(CK._state)
    monkeypatch.setenv(CK.BUILD_ENV, "background")
    monkeypatch.setattr(CK, "_cached", lambda name: False)
    CK._state.clear()
    CK._state.update(ext=None, tried=False, building=None)
    try:
        assert CK.extension() is None
        ext = CK.wait_for_extension(120)
        assert ext is not None and all(hasattr(ext, f) for f in CK._FUNCTIONS)
        x = torch.randn(64, 40)
        assert torch.equal(ext.apply_mask(x, 7, DK.threshold(0.3), torch.empty_like(x)),
                           x * DK.keep_mask(x.numel(), 7, 0.3).view(x.shape))
    finally:
        CK._state.clear()
        CK._state.update(saved)


# --- switching over mid-run changes nothing beyond rounding ------------------------------------------
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(384, 384)
        self.b = nn.Linear(384, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _train(base: nn.Module, x: torch.Tensor, kernels_from: int,
           steps: int = 5) -> tuple[list[float], list[torch.Tensor]]:
    saved = dict(CK._state)
    torch.manual_seed(1)  # the dropout seeds
    model = copy.deepcopy(base)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    try:
        for step in range(steps):
            CK._state.update(ext=REAL if step >= kernels_from else None, tried=True)
            loss = model(x.clone()).pow(2).mean()  # a fresh input tensor per step: a fresh mask group
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    finally:
        CK._state.clear()
        CK._state.update(saved)
    return losses, [model.a.lora_A.detach(), model.a.lora_B.detach()]


@needs_kernel
def test_switching_to_the_kernels_mid_training_matches_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lorakit.kernels.fused.GRAD_PRODUCT_MIN_ELEMENTS", 0)  # the kernels take every product
    monkeypatch.setattr("lorakit.kernels.fused.SKINNY_MIN_ELEMENTS", 0)
    torch.manual_seed(0)
    base = lorakit.inject(Block(), lorakit.LoraConfig(r=8, alpha=16, targets=["a"], dropout=0.1, init="random"))
    x = torch.randn(256, 384)
    torch_ops, kernels, switched = _train(base, x, 99), _train(base, x, 0), _train(base, x, 2)
    # the kernels did run: their sums round differently somewhere (else this test would prove nothing)
    differs = [not torch.equal(a, b) for a, b in zip(kernels[1], torch_ops[1], strict=True)]
    assert kernels[0] != torch_ops[0] or any(differs)
    for run in (kernels, switched):
        assert run[0] == pytest.approx(torch_ops[0], rel=1e-6)
        for got, want in zip(run[1], torch_ops[1], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
    assert not all(torch.equal(a, b) for a, b in zip(kernels[1], base_lora(base), strict=True))  # it did train


def base_lora(model: nn.Module) -> list[torch.Tensor]:
    return [model.a.lora_A.detach(), model.a.lora_B.detach()]


@needs_kernel
def test_the_dropout_forward_is_bit_identical_with_and_without_the_kernels() -> None:
    torch.manual_seed(0)
    layer = lorakit.inject(nn.Sequential(nn.Linear(96, 80)),
                           lorakit.LoraConfig(r=4, alpha=8, targets=["0"], dropout=0.25, init="random")).train()
    x = torch.randn(33, 96)
    saved = dict(CK._state)
    outs = []
    try:
        for ext in (None, REAL):
            CK._state.update(ext=ext, tried=True)
            torch.manual_seed(5)
            outs.append(layer(x.clone()))
    finally:
        CK._state.clear()
        CK._state.update(saved)
    assert torch.equal(outs[0], outs[1])
    # and it is dropout: the plain formula with the mask the fused path applies for that seed
    torch.manual_seed(5)
    seed = DK.draw_seed()
    keep = DK.dropout_mask(x.shape, 0.25, seed, dtype=torch.float32)
    lin = layer[0]
    ref = x @ lin.weight.T + lin.bias + lin.scaling * ((x * keep * DK.keep_scale(0.25)) @ lin.lora_A.T) @ lin.lora_B.T
    torch.testing.assert_close(outs[0], ref, rtol=1e-5, atol=1e-5)
