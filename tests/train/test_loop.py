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

from .conftest import cli_env, run_cli, tiny_eval_options, tiny_train_args, tiny_train_options, train_losses


def tiny_cfg(model: str | Path, files: tuple[Path, Path], out: Path, **kw: object) -> TrainConfig:
    return TrainConfig.build(tiny_train_options(model, files, output_dir=out, **kw))


@pytest.mark.slow
def test_minilm_lora_few_steps(tmp_path: Path, sentiment_files: tuple[Path, Path]) -> None:
    import lorakit
    from lorakit.train.commands import load_for_task
    from lorakit.train.evaluate import evaluate

    options = {"max_train_examples": 32, "max_steps": 8, "batch_size": 4, "max_len": 32, "eval_every": 4}
    cfg = tiny_cfg("minilm", sentiment_files, tmp_path / "run", **options, lr=1e-3)
    trainer = Trainer(cfg)
    res = trainer.run()
    run = tmp_path / "run"
    for name in ("metrics.jsonl", "loss.png", "config.json", "results.json", "adapter/adapter_config.json"):
        assert (run / name).is_file(), name
    assert not (run / ckpt.CHECKPOINT).exists()  # removed once the run finished
    assert len(train_losses(run)) == 8 and all(l == l for l in train_losses(run))
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
    head_file = tmp_path / "head/head.safetensors"
    ev = run_eval(EvalConfig.build(tiny_eval_options(tiny_bert, sentiment_files, head=head_file)))
    assert ev["accuracy"] == pytest.approx(head["final"]["accuracy"])
    ev = run_eval(EvalConfig.build(tiny_eval_options(tmp_path / "full/model", sentiment_files)))
    assert ev["loss"] == pytest.approx(full["final"]["loss"], abs=1e-5)


def test_grad_accumulation_matches_big_batch(
    tmp_path: Path, tiny_bert: Path, sentiment_files: tuple[Path, Path]
) -> None:
    train(tiny_cfg(tiny_bert, sentiment_files, tmp_path / "a", batch_size=8, grad_accum=1, max_steps=4))
    train(tiny_cfg(tiny_bert, sentiment_files, tmp_path / "b", batch_size=4, grad_accum=2, max_steps=4))
    assert train_losses(tmp_path / "a") == pytest.approx(train_losses(tmp_path / "b"), rel=1e-5)


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
    state = torch.load(run / "best.pt", weights_only=True)  # any file; fabricate a checkpoint
    digest, keep = ckpt.fingerprint(
        {**tiny_cfg(tiny_bert, sentiment_files, run).to_dict(), "lr": 5e-3, "world_size": 1, "task": "sst2"}
    )
    ckpt.atomic_save({"fingerprint": digest, "config": keep, **state}, run / ckpt.CHECKPOINT)
    with pytest.raises(ResumeError, match=r"--r: checkpoint 8 vs now 4"):
        Trainer(tiny_cfg(tiny_bert, sentiment_files, run, resume=True, r=4))
    # A checkpoint whose fingerprint hashed --save-every / --log-every (before they were known not to
    # change results) still resumes when only those differ.
    old = {**tiny_cfg(tiny_bert, sentiment_files, run).to_dict(), "world_size": 1, "task": "sst2", "save_every": 7}
    old = {k: v for k, v in sorted(old.items()) if k not in ckpt.NON_RESULT_KEYS | {"save_every"}} | {"save_every": 7}
    import hashlib
    digest = hashlib.sha256(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()[:16]
    ckpt.check_resumable({"fingerprint": digest, "config": old}, {**old, "save_every": 3, "log_every": 2}, run)
    with pytest.raises(ResumeError, match=r"--lr: checkpoint"):
        ckpt.check_resumable({"fingerprint": digest, "config": old}, {**old, "save_every": 3, "lr": 1.0}, run)
    with pytest.raises(TrainConfigError, match="already holds a run"):
        Trainer(tiny_cfg(tiny_bert, sentiment_files, run))


def test_eval_subset_does_not_follow_the_training_seed(
    tmp_path: Path, tiny_bert: Path, sentiment_files: tuple[Path, Path]
) -> None:
    from lorakit.train.commands import run_eval
    from lorakit.train.config import EvalConfig
    from lorakit.train.data import read_examples, subsample

    runs = {name: tmp_path / name for name in ("s0", "s1", "e2")}
    kw = {"max_eval_examples": 16, "max_steps": 2}
    t0, t1 = (Trainer(tiny_cfg(tiny_bert, sentiment_files, runs[f"s{s}"], seed=s, **kw)) for s in (0, 1))
    t2 = Trainer(tiny_cfg(tiny_bert, sentiment_files, runs["e2"], eval_subset_seed=2, **kw))
    assert t0.train_raw != t1.train_raw  # --seed does pick another training subset ...
    assert len(t0.eval_raw) == 16 and t0.eval_raw == t1.eval_raw  # ... but not another dev subset
    assert len(t2.eval_raw) == 16 and t2.eval_raw != t0.eval_raw
    # The default keeps the subset that seed-0 runs drew before the option existed (--seed + 1).
    dev = list(read_examples(sentiment_files[1], t0.spec))
    assert t0.eval_raw == subsample(dev, 16, 1)
    for t in (t0, t1, t2):
        t.run()
    conf = {name: json.loads((run / "config.json").read_text()) for name, run in runs.items()}
    assert [c["n_eval"] for c in conf.values()] == [16, 16, 16]
    assert conf["s0"]["eval_digest"] == conf["s1"]["eval_digest"] != conf["e2"]["eval_digest"]
    assert (conf["s0"]["seed"], conf["s1"]["eval_subset_seed"], conf["e2"]["eval_subset_seed"]) == (0, 1, 2)
    # lorakit eval draws the same subset whatever its --seed, and follows --eval-subset-seed.
    for seed, subset_seed, run in ((0, None, "s0"), (7, None, "s1"), (0, 2, "e2")):
        opts = tiny_eval_options(tiny_bert, sentiment_files, max_eval_examples=16, eval_subset_seed=subset_seed)
        ev = run_eval(EvalConfig.build({**opts, "seed": seed}))
        assert (ev["n"], ev["eval_digest"]) == (16, conf[run]["eval_digest"])


# The run stops inside its 8th optimizer step (7 steps logged, the step-6 checkpoint written) until it is
# killed: the kill lands at the same point on a fast or a slow, loaded machine (a sleep per step raced it).
HALT_AT_STEP_8 = (
    "import sys, time, torch\n"
    "orig = torch.optim.AdamW.step\n"
    "calls = [0]\n"
    "def halting(self, *a, **k):\n"
    "    calls[0] += 1\n"
    "    if calls[0] == 8:\n"
    "        time.sleep(600)\n"
    "    return orig(self, *a, **k)\n"
    "torch.optim.AdamW.step = halting\n"
    "from lorakit.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_resume_after_kill_9_matches_uninterrupted(
    tmp_path: Path, tiny_bert_dropout: Path, sentiment_files: tuple[Path, Path]
) -> None:
    args = tiny_train_args(
        tiny_bert_dropout, sentiment_files, max_steps=12, lora_dropout=0.1, save_every=2, eval_every=3
    )
    ref = run_cli(*args, "--output-dir", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr[-2000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", HALT_AT_STEP_8, *args, "--output-dir", str(run)],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if (run / "metrics.jsonl").is_file() and len(train_losses(run)) >= 7 and (run / ckpt.CHECKPOINT).is_file():
                break
            assert proc.poll() is None, "training ended before it could be killed"
            time.sleep(0.05)
        assert len(train_losses(run)) == 7
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "results.json").exists()
    resumed_from = torch.load(run / ckpt.CHECKPOINT, weights_only=True)["step"]
    assert resumed_from == 6  # steps 7 and 8 are redone

    # Resuming with a different learning rate is refused; the same config continues, at another
    # checkpoint cadence too (--save-every does not change results).
    bad = run_cli(*args, "--output-dir", str(run), "--resume", "--lr", "1e-3")
    assert bad.returncode == 2 and "--lr: checkpoint 0.005 vs now 0.001" in bad.stderr
    res = run_cli(*args, "--output-dir", str(run), "--resume", "--save-every", "5")
    assert res.returncode == 0, res.stderr[-2000:]

    assert train_losses(run) == pytest.approx(train_losses(tmp_path / "ref"), rel=1e-6, abs=1e-7)
    assert len(train_losses(run)) == 12
    a = json.loads((run / "results.json").read_text())
    b = json.loads((tmp_path / "ref" / "results.json").read_text())
    assert a["final"] == pytest.approx(b["final"]) and a["best"] == pytest.approx(b["best"])
    from safetensors.torch import load_file

    wa = load_file(str(run / "adapter/adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "ref/adapter/adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)
