"""``lorakit train --method full --fsdp`` (2 gloo ranks) against a 1-process full fine-tune on the same global
batch and seed: the same loss at every step, and the saved HF sharded safetensors directory loads in
transformers with the 1-process run's weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import run_cli, tiny_train_args, train_losses
from .test_fsdp import ENV, LOSS_REL, torchrun

SHORT = {"max_train_examples": 48, "max_eval_examples": 8, "max_steps": 4, "save_every": 100, "method": "full"}
WEIGHT_ATOL = 1e-5  # measured 4.5e-7 (AdamW on gradients averaged over two half-batch sums vs one sum)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_full_fine_tuning_sharded_equals_one_process(tmp_path: Path, tiny_bert: Path,
                                                     sentiment_files: tuple[Path, Path]) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    ref, out = tmp_path / "single", tmp_path / "fsdp"
    res = run_cli(*tiny_train_args(tiny_bert, sentiment_files, **SHORT, batch_size=8, output_dir=ref), env=ENV)
    assert res.returncode == 0, res.stderr[-2000:]
    env = {**ENV, "LORAKIT_DIST_TIMEOUT": "120", "LORAKIT_MAX_SHARD_SIZE": "40KB"}  # force several files
    res = run_cli(*tiny_train_args(tiny_bert, sentiment_files, **SHORT, batch_size=4, fsdp=True, output_dir=out),
                  launcher=torchrun(2), env=env, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = train_losses(ref), train_losses(out)
    assert len(a) == len(b) == SHORT["max_steps"]
    assert b == pytest.approx(a, rel=LOSS_REL)
    index = json.loads((out / "model/model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    m_ref = AutoModelForSequenceClassification.from_pretrained(str(ref / "model"))
    m_out = AutoModelForSequenceClassification.from_pretrained(str(out / "model"))
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=2)
    sa, sb, s0 = m_ref.state_dict(), m_out.state_dict(), base.state_dict()
    assert sorted(sa) == sorted(sb)
    worst = max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)
    assert worst <= WEIGHT_ATOL, worst
    moved = [k for k in sa if k in s0 and "embeddings.position_ids" not in k and not torch.equal(sa[k], s0[k])]
    assert len(moved) > len(sa) // 2  # the base really trained (not only the head)
    assert (out / "model/config.json").is_file() and (out / "model/tokenizer_config.json").is_file()
