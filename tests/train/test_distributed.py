"""Two-process torchrun (gloo, CPU) gives the same losses as one process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO


def train_losses(run: Path) -> list[float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["split"] == "train"]


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(
    tmp_path: Path, tiny_bert: Path, sentiment_files: tuple[Path, Path]
) -> None:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    common = [
        "train",
        "--task",
        "sst2",
        "--model",
        str(tiny_bert),
        "--train-file",
        str(sentiment_files[0]),
        "--eval-file",
        str(sentiment_files[1]),
        "--max-train-examples",
        "64",
        "--max-eval-examples",
        "16",
        "--max-steps",
        "5",
        "--max-len",
        "24",
        "--lr",
        "5e-3",
        "--log-every",
        "1",
        "--no-progress",
    ]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO / "src"),
        "CUDA_VISIBLE_DEVICES": "",
    }
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "lorakit",
            *common,
            "--batch-size",
            "8",
            "--output-dir",
            str(tmp_path / "single"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "lorakit",
            *common,
            "--batch-size",
            "4",
            "--output-dir",
            str(tmp_path / "ddp"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a, b = train_losses(tmp_path / "single"), train_losses(tmp_path / "ddp")
    assert len(b) == 5  # only rank 0 wrote records
    assert b == pytest.approx(a, rel=1e-5)
    ra = json.loads((tmp_path / "single/results.json").read_text())
    rb = json.loads((tmp_path / "ddp/results.json").read_text())
    assert rb["world_size"] == 2 and ra["world_size"] == 1
    assert rb["final"]["loss"] == pytest.approx(ra["final"]["loss"], rel=1e-5)
    conf = json.loads((tmp_path / "ddp/config.json").read_text())
    assert conf["global_batch"] == 8
