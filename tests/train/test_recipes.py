"""Every recipes/*.toml parses as a ``lorakit train --config`` file and starts: one optimizer step on a
tiny random model of the recipe's architecture and a few examples in the recipe's task layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.train.config import TrainConfig
from lorakit.train.data import get_task

from .conftest import REPO, make_tiny_bert, make_tiny_llama

RECIPES = sorted((REPO / "recipes").glob("*.toml"))


def _rows(task: str) -> list[dict]:
    spec = get_task(task)
    texts = ["a fine film", "dull and long", "it works well", "not good at all", "great fun", "bad plot"]
    rows = []
    for i, t in enumerate(texts):
        label: object = 2.5 + (i % 3) if spec.kind == "regression" else spec.labels[i % 2]
        row = {"text": t, "label": label}
        if len(spec.text_cols) == 2:
            row["text_pair"] = texts[-1 - i]
        rows.append(row)
    return rows


def test_there_are_recipes_for_each_paper_table() -> None:
    names = {p.stem for p in RECIPES}
    assert {"sst2-lora-paper", "mrpc-lora-paper", "cola-lora-paper", "rte-lora-paper", "stsb-lora-paper"} <= names
    assert {"e2e-lora-paper", "sst2-full-1epoch", "e2e-lora-1epoch-greedy", "sst2-lora-all-linear-1epoch"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_and_starts(recipe: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lorakit.train import e2e_metrics
    from lorakit.train.loop import Trainer

    values = TrainConfig.read_file(recipe)
    cfg = TrainConfig.build(values)  # the recipe alone is a valid config
    assert cfg.method in ("lora", "full", "head") and cfg.lr is not None
    spec = get_task(cfg.task)
    tiny = {"max_steps": 1, "batch_size": 2, "max_len": 32, "progress": False, "output_dir": str(tmp_path / "run")}
    if spec.kind == "generation":
        pytest.importorskip("transformers")
        from .test_e2e_path import MRS

        model = tmp_path / "llama"
        make_tiny_llama(model)
        data = tmp_path / "e2e.txt"
        lines = [f"{g.mr.replace('name : ', f'name : {k}')}||{r}\n" for k in "ABC" for g in MRS for r in g.refs]
        data.write_text("".join(lines))
        files = {"train_file": str(data), "e2e_dev_fraction": 0.34, "num_beams": 1, "max_new_tokens": 4}
        monkeypatch.setattr(e2e_metrics, "java_missing", lambda: "skipped in the recipe smoke test")
    else:
        model = make_tiny_bert(tmp_path / "bert", num_labels=max(1, spec.num_labels))
        train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
        for p in (train, dev):
            p.write_text("".join(json.dumps(r) + "\n" for r in _rows(cfg.task)))
        files = {"train_file": str(train), "eval_file": str(dev)}
    res = Trainer(TrainConfig.build({**values, **tiny, **files, "model": str(model)})).run()
    assert res["steps_run"] == 1 and res["method"] == cfg.method and res["task"] == spec.name
    ((name, value),) = res["paper_metric"].items()  # the paper's figure for the task, on the whole dev set
    assert name == {"mrpc": "accuracy", "cola": "matthews", "stsb": "pearson"}.get(spec.name, name)
    assert isinstance(value, float)
    if spec.kind != "generation":
        assert res["n_eval"] == 6  # the whole eval file, no subset
    assert res["peak_rss_train_mb"] > 0 and res["peak_rss_eval_mb"] > 0
