"""Fixtures for the training-tool tests: shared-data location and a tiny random BERT model dir."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def make_tiny_bert(path: Path, *, dropout: float = 0.0, num_labels: int = 2) -> Path:
    """A 2-layer, 32-wide randomly initialised BERT classifier using MiniLM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from lorakit.train.models import resolve

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=num_labels,
    )
    BertForSequenceClassification(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(str(resolve("minilm").path)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny BERT without dropout (exact comparisons)."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_bert_dropout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny BERT with dropout 0.1 (exercises RNG-state restore on resume)."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert_do"), dropout=0.1)


@pytest.fixture(scope="session")
def sentiment_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Train/test TSVs (SST-2 layout) cut from the bundled demo sample."""
    from lorakit.train.data import get_task, read_glue_tsv
    from lorakit.train.demo import _write_tsv, sample_path, split_sample

    d = tmp_path_factory.mktemp("sent")
    train, test = split_sample(read_glue_tsv(sample_path(), get_task("sst2")), 0.25, 0)
    _write_tsv(d / "train.tsv", train)
    _write_tsv(d / "test.tsv", test)
    return d / "train.tsv", d / "test.tsv"


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``python -m lorakit ARGS`` in a subprocess."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lorakit", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
    )
