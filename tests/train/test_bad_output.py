"""The training tools' writers and readers refuse bad paths and non-finite weights (issue 19 §1).

An output path of the wrong kind (``--output`` / ``--output-dir`` that is a regular file, an eval
``--output`` that is a directory) fails with a typed error *before* the model is loaded, leaving the
file as it was; a checkpoint or head file holding NaN/inf is refused on ``--resume`` / ``--head``,
naming the tensor.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lorakit
from lorakit.errors import LoraError
from lorakit.train import checkpoint as ckpt
from lorakit.train.config import DemoConfig, EvalConfig, MergeConfig, TrainConfig
from lorakit.train.errors import ResumeError, TrainConfigError

from .conftest import tiny_eval_options, tiny_train_options


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture
def tiny_adapter(tiny_bert: Path, tmp_path: Path) -> Path:
    """A LoRA adapter for the tiny BERT, with the lorakit_train.json that ``lorakit merge`` reads."""
    from transformers import BertForSequenceClassification

    model = lorakit.inject(BertForSequenceClassification.from_pretrained(tiny_bert),
                           lorakit.LoraConfig(r=2, alpha=4, targets=["query", "value"]))
    path = lorakit.save_adapter(model, tmp_path / "adapter")
    (path / "lorakit_train.json").write_text(json.dumps({"model": str(tiny_bert), "task": "sst2"}))
    return path


@pytest.mark.parametrize("overwrite", [False, True])
def test_merge_output_that_is_a_file_is_refused(tiny_adapter: Path, tmp_path: Path, overwrite: bool,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit.train import commands

    out = tmp_path / "merged"
    out.write_text("keep me")
    before = tree(tmp_path)
    monkeypatch.setattr(commands, "load_for_task", _never)  # refused before loading anything
    with pytest.raises(LoraError, match="merged") as info:
        commands.run_merge(MergeConfig.build({"adapter": str(tiny_adapter), "output": str(out),
                                              "overwrite": overwrite}))
    assert "--output" in str(info.value)
    assert tree(tmp_path) == before


def test_merge_output_below_a_file_is_refused(tiny_adapter: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit.train import commands

    (tmp_path / "models").write_text("keep me")
    before = tree(tmp_path)
    monkeypatch.setattr(commands, "load_for_task", _never)
    with pytest.raises(LoraError, match="models"):
        commands.run_merge(MergeConfig.build({"adapter": str(tiny_adapter), "output": str(tmp_path / "models" / "m")}))
    assert tree(tmp_path) == before


def test_merge_overwrite_replaces_a_model_directory_atomically(tiny_adapter: Path, tmp_path: Path) -> None:
    from lorakit.train.commands import run_merge

    out = tmp_path / "merged"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    run_merge(MergeConfig.build({"adapter": str(tiny_adapter), "output": str(out), "overwrite": True}))
    assert (out / "config.json").is_file() and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]  # no temporary left behind


def _never(*args: object, **kwargs: object) -> None:
    raise AssertionError("the model was loaded although the output path is unusable")


def test_train_output_dir_that_is_a_file_is_refused_before_loading(
        tiny_bert: Path, sentiment_files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit.train import loop

    run = tmp_path / "run"
    run.write_text("keep me")
    monkeypatch.setattr(loop, "load_model", _never)
    with pytest.raises(TrainConfigError, match="--output-dir.*run"):
        loop.Trainer(TrainConfig.build(tiny_train_options(tiny_bert, sentiment_files, output_dir=run)))
    assert run.read_text() == "keep me"


def test_eval_output_that_is_a_directory_is_refused_before_loading(
        tiny_bert: Path, sentiment_files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit.train import commands

    (tmp_path / "metrics.json").mkdir()
    monkeypatch.setattr(commands, "load_for_task", _never)
    with pytest.raises(TrainConfigError, match="--output.*metrics.json"):
        commands.run_eval(EvalConfig.build(tiny_eval_options(tiny_bert, sentiment_files,
                                                             output=tmp_path / "metrics.json")))
    assert tree(tmp_path) == {"metrics.json": None}


def test_demo_output_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    from lorakit.train.demo import run_demo

    (tmp_path / "demo").write_text("keep me")
    with pytest.raises(TrainConfigError, match="--output-dir.*demo"):
        run_demo(DemoConfig.build({"output_dir": str(tmp_path / "demo"), "progress": False}))
    assert tree(tmp_path) == {"demo": b"keep me"}


# --- non-finite weights on the way in ---------------------------------------------------------------
def _poisoned_checkpoint(path: Path, where: str) -> None:
    good = {"bert.layer.0.query.lora_A": torch.randn(2, 8), "classifier.weight": torch.randn(2, 8)}
    state = {"step": 3, "fingerprint": "x", "config": {}, "best": {}, "rng": [],
             "trainable": dict(good), "optimizer": {"state": {0: {"step": torch.tensor(3.0),
                                                                   "exp_avg": torch.zeros(2, 8)}},
                                                     "param_groups": []}, "scheduler": {}}
    if where == "trainable":
        state["trainable"]["classifier.weight"][1, 2] = math.nan
    else:
        state["optimizer"]["state"][0]["exp_avg"][0, 0] = math.inf
    ckpt.atomic_save(state, path)


@pytest.mark.parametrize(("where", "name"), [("trainable", "classifier.weight"), ("optimizer", "exp_avg")])
def test_resume_refuses_a_checkpoint_with_non_finite_tensors(tmp_path: Path, where: str, name: str) -> None:
    path = tmp_path / ckpt.CHECKPOINT
    _poisoned_checkpoint(path, where)
    with pytest.raises(ResumeError, match=name) as info:
        ckpt.load(path)
    assert "not finite" in str(info.value) and str(path) in str(info.value)


class _RunsCode:
    """Unpickling this calls ``exec``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("name", [ckpt.CHECKPOINT, ckpt.BEST])
def test_a_checkpoint_whose_pickle_runs_code_is_refused_unrun(tmp_path: Path, name: str) -> None:
    from lorakit.train.errors import UnsafeCheckpointError

    marker, path = tmp_path / "ran.txt", tmp_path / name
    torch.save({"step": 1, "trainable": {"w": torch.ones(2)}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=str(path)):
        ckpt.load(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: the plain unpickler runs it
    assert marker.read_text() == "ran"


def test_a_real_checkpoint_loads_under_weights_only(tmp_path: Path) -> None:
    """Everything lorakit writes (RNG states, AdamW and schedule state) is plain data."""
    import random

    from lorakit.train.distributed import DistContext
    from lorakit.train.optimization import build_optimizer

    model = nn.Linear(4, 2)
    _, opt, sched = build_optimizer(model, TrainConfig.build({}), total=10, warmup=2)  # the loop's own
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    sched.step()
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    ckpt.save(tmp_path, 1, {"value": 0.5, "step": 1}, model, opt, sched, {"task": "sst2", "lr": 1e-3}, ctx)
    state = ckpt.load(tmp_path / ckpt.CHECKPOINT)
    assert torch.equal(state["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert state["rng"][0]["python"] == random.getstate() and state["step"] == 1
    assert state["scheduler"] == sched.state_dict()


def _dcp_run(run: Path) -> tuple[nn.Module, torch.optim.Optimizer, object, object]:
    """A one-process ``--fsdp``-style checkpoint (DCP directory + checkpoint.pt) of a LoRA'd Linear."""
    from lorakit.train import sharded_ckpt
    from lorakit.train.distributed import DistContext
    from lorakit.train.optimization import build_optimizer

    torch.manual_seed(0)
    model = lorakit.inject(nn.Sequential(nn.Linear(8, 8)), lorakit.LoraConfig(r=2, alpha=4, targets=["0"]))
    _, opt, sched = build_optimizer(model, TrainConfig.build({}), total=10, warmup=0)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    sharded_ckpt.save(run, 2, {"value": None}, model, opt, sched, {"task": "sst2"}, 8, ctx)
    return model, opt, sched, ctx


def test_dcp_resume_refuses_non_finite_shards_and_leaves_the_model(tmp_path: Path) -> None:
    from lorakit.train import sharded_ckpt

    model, opt, sched, ctx = _dcp_run(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    name, lora_b = next((n, p) for n, p in model.named_parameters() if n.endswith("lora_B"))
    with torch.no_grad():  # a diverged step's checkpoint: NaN in lora_B, then the live weights restored
        lora_b[0, 0] = math.nan
        sharded_ckpt.save(tmp_path, 3, {"value": None}, model, opt, sched, {"task": "sst2"}, 8, ctx)
        lora_b.copy_(before[name])
    state = ckpt.load(tmp_path / ckpt.CHECKPOINT)  # checkpoint.pt itself holds no weights under --fsdp
    with pytest.raises(ResumeError, match=rf"model\.{name.replace('.', '[.]')}: 1 of 16 values are not finite"):
        sharded_ckpt.restore(tmp_path, state, model, opt, sched, ctx)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_dcp_metadata_whose_pickle_runs_code_is_refused_unrun(tmp_path: Path) -> None:
    from lorakit.train import sharded_ckpt
    from lorakit.train.errors import UnsafeCheckpointError

    model, opt, sched, ctx = _dcp_run(tmp_path)
    state = ckpt.load(tmp_path / ckpt.CHECKPOINT)
    sharded_ckpt.restore(tmp_path, state, model, opt, sched, ctx)  # the genuine metadata passes
    marker = tmp_path / "ran.txt"
    (tmp_path / state["dcp"] / ".metadata").write_bytes(__import__("pickle").dumps(_RunsCode(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"builtins\.exec"):
        sharded_ckpt.restore(tmp_path, state, model, opt, sched, ctx)
    assert not marker.exists()


def test_resume_from_a_poisoned_run_fails_before_loading_the_model(
        tiny_bert: Path, sentiment_files: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit.train import loop

    run = tmp_path / "run"
    run.mkdir()
    _poisoned_checkpoint(run / ckpt.CHECKPOINT, "trainable")
    monkeypatch.setattr(loop, "load_model", _never)
    with pytest.raises(ResumeError, match=r"classifier\.weight"):
        loop.Trainer(TrainConfig.build(tiny_train_options(tiny_bert, sentiment_files, output_dir=run, resume=True)))


@pytest.mark.parametrize("shards", [None, "1MB"], ids=["merge_and_unload", "streamed-shards"])
def test_merge_refuses_a_non_finite_adapter(tiny_adapter: Path, tmp_path: Path, shards: str | None) -> None:
    from safetensors.torch import load_file

    from lorakit.train.commands import run_merge

    st = tiny_adapter / "adapter_model.safetensors"
    tensors = load_file(str(st))
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    tensors[key][0, 0] = math.nan
    save_file(tensors, str(st))
    opts = {"adapter": str(tiny_adapter), "output": str(tmp_path / "merged"), "max_shard_size": shards}
    with pytest.raises(LoraError, match=key.split("model.", 2)[-1].replace(".", r"\.")):
        run_merge(MergeConfig.build({k: v for k, v in opts.items() if v is not None}))
    assert not (tmp_path / "merged").exists()


def test_head_file_with_non_finite_weights_is_refused(tmp_path: Path) -> None:
    from lorakit.train.methods import load_head

    model = nn.Sequential(nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {"0.weight": torch.full((2, 4), -math.inf), "0.bias": torch.zeros(2)}
    save_file(bad, str(tmp_path / "head.safetensors"))
    with pytest.raises(TrainConfigError, match=r"0\.weight: 8 of 8"):
        load_head(model, tmp_path / "head.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
