"""The trainer: a real MiniLM run, methods, accumulation, errors before training, resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lorakit.train import checkpoint as ckpt
from lorakit.train.config import TrainConfig
from lorakit.train.errors import DataError, ModelLoadError, ResumeError, TrainConfigError
from lorakit.train.loop import Trainer, train

from .conftest import REPO


def losses(run: Path) -> list[float]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["split"] == "train"]


def tiny_cfg(model: Path, files: tuple[Path, Path], out: Path, **kw: object) -> TrainConfig:
    base = {
        "task": "sst2",
        "model": str(model),
        "train_file": str(files[0]),
        "eval_file": str(files[1]),
        "output_dir": str(out),
        "max_steps": 6,
        "batch_size": 8,
        "max_len": 24,
        "lr": 5e-3,
        "log_every": 1,
        "progress": False,
        "max_train_examples": 64,
        "max_eval_examples": 32,
    }
    return TrainConfig.build({**base, **kw})


@pytest.mark.slow
def test_minilm_lora_few_steps(tmp_path: Path, sentiment_files: tuple[Path, Path]) -> None:
    import lorakit
    from lorakit.train.commands import load_for_task
    from lorakit.train.evaluate import evaluate

    cfg = TrainConfig.build(
        {
            "task": "sst2",
            "model": "minilm",
            "train_file": str(sentiment_files[0]),
            "eval_file": str(sentiment_files[1]),
            "max_train_examples": 32,
            "max_eval_examples": 32,
            "max_steps": 8,
            "batch_size": 4,
            "max_len": 32,
            "output_dir": str(tmp_path / "run"),
            "eval_every": 4,
            "lr": 1e-3,
            "log_every": 1,
            "progress": False,
        }
    )
    trainer = Trainer(cfg)
    res = trainer.run()
    run = tmp_path / "run"
    for name in ("metrics.jsonl", "loss.png", "config.json", "results.json", "adapter/adapter_config.json"):
        assert (run / name).is_file(), name
    assert not (run / ckpt.CHECKPOINT).exists()  # removed once the run finished
    assert len(losses(run)) == 8 and all(l == l for l in losses(run))
    assert res["trainable_params"] == 74_498 and res["trainable_fraction"] < 0.004
    conf = json.loads((run / "config.json").read_text())
    assert (
        conf["targets"] == ["query", "value"] and conf["heads"] == ["classifier"] and conf["total_steps"] == 8
    )
    # The saved adapter (LoRA + classifier) reproduces the trained model's eval numbers on a fresh model.
    fresh, _ = load_for_task("minilm", "classification", 2, str(run / "adapter"))
    again = evaluate(
        fresh, trainer.spec, trainer.eval_feats, pad_id=0, batch_size=32, device=torch.device("cpu")
    )
    assert again["accuracy"] == pytest.approx(res["final"]["accuracy"])
    assert again["loss"] == pytest.approx(res["final"]["loss"], abs=1e-5)
    assert len(list(lorakit.lora_layers(fresh))) == 12


def test_methods_full_and_head(tmp_path: Path, tiny_bert: Path, sentiment_files: tuple[Path, Path]) -> None:
    from lorakit.train.commands import run_eval
    from lorakit.train.config import EvalConfig

    full = train(tiny_cfg(tiny_bert, sentiment_files, tmp_path / "full", method="full", max_steps=2))
    head = train(tiny_cfg(tiny_bert, sentiment_files, tmp_path / "head", method="head", max_steps=2))
    assert full["trainable_params"] == full["total_params"]
    assert head["trainable_params"] == 32 * 2 + 2
    assert (tmp_path / "full/model/config.json").is_file()
    ev = run_eval(
        EvalConfig.build(
            {
                "task": "sst2",
                "model": str(tiny_bert),
                "head": str(tmp_path / "head/head.safetensors"),
                "eval_file": str(sentiment_files[1]),
                "max_eval_examples": 32,
                "max_len": 24,
            }
        )
    )
    assert ev["accuracy"] == pytest.approx(head["final"]["accuracy"])
    ev = run_eval(
        EvalConfig.build(
            {
                "task": "sst2",
                "model": str(tmp_path / "full/model"),
                "eval_file": str(sentiment_files[1]),
                "max_eval_examples": 32,
                "max_len": 24,
            }
        )
    )
    assert ev["loss"] == pytest.approx(full["final"]["loss"], abs=1e-5)


def test_grad_accumulation_matches_big_batch(
    tmp_path: Path, tiny_bert: Path, sentiment_files: tuple[Path, Path]
) -> None:
    train(tiny_cfg(tiny_bert, sentiment_files, tmp_path / "a", batch_size=8, grad_accum=1, max_steps=4))
    train(tiny_cfg(tiny_bert, sentiment_files, tmp_path / "b", batch_size=4, grad_accum=2, max_steps=4))
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-5)


def test_errors_come_before_training(
    tmp_path: Path, tiny_bert: Path, sentiment_files: tuple[Path, Path]
) -> None:
    with pytest.raises(TrainConfigError, match="--task: unknown task 'mnli'; known tasks"):
        TrainConfig.build({"task": "mnli"})
    with pytest.raises(TrainConfigError, match="--r: must be >= 1"):
        TrainConfig.build({"r": 0})
    with pytest.raises(TrainConfigError, match="--lr: expected float"):
        TrainConfig.build({"lr": "fast"})
    with pytest.raises(DataError, match="fewer than one global batch"):
        Trainer(tiny_cfg(tiny_bert, sentiment_files, tmp_path / "x", max_train_examples=4))
    empty = tmp_path / "empty_model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="has no weights"):
        Trainer(tiny_cfg(empty, sentiment_files, tmp_path / "y"))
    with pytest.raises(ResumeError, match="no checkpoint"):
        Trainer(tiny_cfg(tiny_bert, sentiment_files, tmp_path / "z", resume=True))
    # A checkpoint from another config is refused, naming the differing option.
    run = tmp_path / "r"
    train(tiny_cfg(tiny_bert, sentiment_files, run, max_steps=4, save_every=2))
    state = torch.load(run / "best.pt", weights_only=False)  # any file; fabricate a checkpoint
    digest, keep = ckpt.fingerprint(
        {**tiny_cfg(tiny_bert, sentiment_files, run).to_dict(), "lr": 5e-3, "world_size": 1, "task": "sst2"}
    )
    ckpt.atomic_save({"fingerprint": digest, "config": keep, **state}, run / ckpt.CHECKPOINT)
    with pytest.raises(ResumeError, match=r"--r: checkpoint 8 vs now 4"):
        Trainer(tiny_cfg(tiny_bert, sentiment_files, run, resume=True, r=4))
    with pytest.raises(TrainConfigError, match="already holds a run"):
        Trainer(tiny_cfg(tiny_bert, sentiment_files, run))


SLOW_STEP = (
    "import sys, time, torch\n"
    "orig = torch.optim.AdamW.step\n"
    "def slow(self, *a, **k):\n"
    "    time.sleep(0.25)\n"
    "    return orig(self, *a, **k)\n"
    "torch.optim.AdamW.step = slow\n"
    "from lorakit.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_resume_after_kill_9_matches_uninterrupted(
    tmp_path: Path, tiny_bert_dropout: Path, sentiment_files: tuple[Path, Path]
) -> None:
    args = [
        "train",
        "--task",
        "sst2",
        "--model",
        str(tiny_bert_dropout),
        "--train-file",
        str(sentiment_files[0]),
        "--eval-file",
        str(sentiment_files[1]),
        "--max-train-examples",
        "64",
        "--max-eval-examples",
        "32",
        "--max-steps",
        "12",
        "--batch-size",
        "8",
        "--max-len",
        "24",
        "--lr",
        "5e-3",
        "--lora-dropout",
        "0.1",
        "--log-every",
        "1",
        "--save-every",
        "2",
        "--eval-every",
        "3",
        "--no-progress",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    ref = subprocess.run(
        [sys.executable, "-m", "lorakit", *args, "--output-dir", str(tmp_path / "ref")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert ref.returncode == 0, ref.stderr[-2000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_STEP, *args, "--output-dir", str(run)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 180
    while time.time() < deadline:
        if (run / "metrics.jsonl").is_file() and len(losses(run)) >= 7 and (run / ckpt.CHECKPOINT).is_file():
            break
        assert proc.poll() is None, "training finished before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "results.json").exists()
    resumed_from = torch.load(run / ckpt.CHECKPOINT, weights_only=False)["step"]
    assert 4 <= resumed_from < 12

    # Resuming with a different learning rate is refused; the same config continues.
    bad = subprocess.run(
        [sys.executable, "-m", "lorakit", *args, "--output-dir", str(run), "--resume", "--lr", "1e-3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert bad.returncode == 2 and "--lr: checkpoint 0.005 vs now 0.001" in bad.stderr
    res = subprocess.run(
        [sys.executable, "-m", "lorakit", *args, "--output-dir", str(run), "--resume"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert res.returncode == 0, res.stderr[-2000:]

    assert losses(run) == pytest.approx(losses(tmp_path / "ref"), rel=1e-6, abs=1e-7)
    assert len(losses(run)) == 12
    a = json.loads((run / "results.json").read_text())
    b = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert a["final"] == pytest.approx(b["final"]) and a["best"] == pytest.approx(b["best"])
    from safetensors.torch import load_file

    wa = load_file(str(run / "adapter/adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "ref/adapter/adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)
