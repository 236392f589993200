"""``--fsdp --task e2e`` (a causal LM: training loss, dev loss and the final beam-search decoding all run
on the sharded model) on 2 gloo ranks against a plain 1-process run with the same global batch and seed.

The reference computes its LM loss chunked over target rows (:mod:`lorakit.train.lm_loss`); the sharded
run through the model's own forward (FSDP2 gathers the root's embeddings and head only there), so the
losses agree to fp32 round-off (``LOSS_REL``), not bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import cli_args, make_tiny_llama, run_cli, train_losses
from .test_cli import E2E_LINES
from .test_fsdp import ENV, LOSS_REL, assert_same_adapter, torchrun

E2E = {"task": "e2e", "e2e_dev_fraction": 0.25, "max_steps": 4, "lr": 1e-2, "log_every": 1, "eval_every": 2,
       "save_every": 100, "num_beams": 2, "max_new_tokens": 6, "max_len": 48, "progress": False}


def _records(run: Path, split: str) -> list[dict]:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["split"] == split]


@pytest.mark.slow
def test_fsdp_e2e_matches_single_process(tmp_path: Path) -> None:
    model = tmp_path / "llama"
    make_tiny_llama(model)  # SmolLM2's tokenizer, 2 random Llama blocks
    data = tmp_path / "e2e.txt"
    data.write_text(E2E_LINES)
    ref, out = tmp_path / "single", tmp_path / "fsdp"
    opts = {**E2E, "model": model, "train_file": data}
    res = run_cli(*cli_args("train", opts, batch_size=4, output_dir=ref), env=ENV)
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_cli(*cli_args("train", opts, batch_size=2, fsdp=True, output_dir=out), launcher=torchrun(2), env=ENV,
                  timeout=480)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = train_losses(ref), train_losses(out)
    assert len(a) == len(b) == E2E["max_steps"]
    assert b == pytest.approx(a, rel=LOSS_REL)
    ea, eb = _records(ref, "eval"), _records(out, "eval")
    assert [r["step"] for r in eb] == [r["step"] for r in ea] == [2, 4]
    assert [r["loss"] for r in eb] == pytest.approx([r["loss"] for r in ea], rel=LOSS_REL)
    assert_same_adapter(ref, out)
    # The decoding ran on the sharded model (every rank in lockstep): the same texts and scores.
    assert (out / "generations.txt").read_text() == (ref / "generations.txt").read_text()
    fa, fb = (json.loads((r / "results.json").read_text())["final"] for r in (ref, out))
    assert fb["n_mrs"] == fa["n_mrs"] == 3 and fb["bleu"] == pytest.approx(fa["bleu"], abs=1e-9)
