"""Two-process torchrun (gloo, CPU) gives the same losses as one process with the same global batch."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from .conftest import run_cli, tiny_train_args, train_losses


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(
    tmp_path: Path, tiny_bert: Path, sentiment_files: tuple[Path, Path]
) -> None:
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    common = {"max_eval_examples": 16, "max_steps": 5}
    env = {"CUDA_VISIBLE_DEVICES": ""}
    single = run_cli(
        *tiny_train_args(tiny_bert, sentiment_files, **common, batch_size=8, output_dir=tmp_path / "single"), env=env
    )
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = run_cli(
        *tiny_train_args(tiny_bert, sentiment_files, **common, batch_size=4, output_dir=tmp_path / "ddp"),
        launcher=[torchrun, "--standalone", "--nproc_per_node", "2"],
        env=env,
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
