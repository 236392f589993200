"""``lorakit train --method full --fsdp`` (2 gloo ranks) against a 1-process full fine-tune on the same global
batch and seed: the same loss at every step, and the saved HF sharded safetensors directory loads in
transformers with the 1-process run's weights; also after a rank is killed and the run resumed on 1 rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import run_cli, tiny_train_args, train_losses
from .test_fsdp import ENV, LOSS_REL, kill_a_rank_at_first_checkpoint, run_worker, torchrun

SHORT = {"max_train_examples": 48, "max_eval_examples": 8, "max_steps": 6, "save_every": 2, "method": "full"}
WEIGHT_ATOL = 1e-5  # measured 3.2e-7, 4.9e-7 resumed (AdamW on gradients averaged from two half-batch sums)


ENV_FULL = {**ENV, "LORAKIT_DIST_TIMEOUT": "120", "LORAKIT_MAX_SHARD_SIZE": "40KB"}  # force several files


@pytest.fixture(scope="module")
def full_reference(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path,
                   sentiment_files: tuple[Path, Path]) -> Path:
    """An unsharded 1-process full fine-tune, global batch 8."""
    ref = tmp_path_factory.mktemp("fsdp_full") / "single"
    res = run_cli(*tiny_train_args(tiny_bert, sentiment_files, **SHORT, batch_size=8, output_dir=ref), env=ENV)
    assert res.returncode == 0, res.stderr[-2000:]
    return ref


def assert_same_model(ref: Path, out: Path, tiny_bert: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    assert train_losses(out) == pytest.approx(train_losses(ref), rel=LOSS_REL)
    assert len(train_losses(out)) == SHORT["max_steps"]
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
    arch = json.loads((out / "model/config.json").read_text())["architectures"]
    assert arch == json.loads((ref / "model/config.json").read_text())["architectures"]


def test_config_names_the_model_class_not_fsdp2s_wrapper() -> None:
    """``fully_shard`` swaps the model's class for ``FSDP<Class>``; config.json's ``architectures`` must
    name the class ``save_pretrained`` would (a base checkpoint's own entry, e.g. ``BertModel``, is stale)."""
    from torch.distributed.fsdp import FSDPModule
    from transformers import BertForSequenceClassification

    from lorakit.train.fsdp_full import model_class_name

    wrapped = type("FSDPBertForSequenceClassification", (FSDPModule, BertForSequenceClassification), {})
    assert model_class_name(wrapped) == "BertForSequenceClassification"
    assert model_class_name(BertForSequenceClassification) == "BertForSequenceClassification"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_full_fine_tuning_sharded_equals_one_process(tmp_path: Path, full_reference: Path, tiny_bert: Path,
                                                     sentiment_files: tuple[Path, Path]) -> None:
    out = tmp_path / "fsdp"
    res = run_cli(*tiny_train_args(tiny_bert, sentiment_files, **SHORT, batch_size=4, fsdp=True, output_dir=out),
                  launcher=torchrun(2), env=ENV_FULL, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_model(full_reference, out, tiny_bert)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_full_fine_tuning_resumes_on_one_rank_after_a_kill(tmp_path: Path, full_reference: Path, tiny_bert: Path,
                                                          sentiment_files: tuple[Path, Path]) -> None:
    """kill -9 of one of 2 ranks after a checkpoint, then ``--resume`` on 1 rank (DCP reshards the whole
    model and AdamW's moments): the same losses and weights as the uninterrupted 1-process run."""
    out = tmp_path / "killed"
    args = tiny_train_args(tiny_bert, sentiment_files, **SHORT, batch_size=4, fsdp=True, output_dir=out)
    kill_a_rank_at_first_checkpoint(args, out, ENV_FULL, wait_s=150)
    import torch

    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and 2 <= state["step"] < SHORT["max_steps"]  # a real mid-run resume
    res = run_cli(*tiny_train_args(tiny_bert, sentiment_files, **SHORT, batch_size=8, fsdp=True, output_dir=out,
                                   resume=True), launcher=torchrun(1), env=ENV_FULL, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_model(full_reference, out, tiny_bert)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_save_failing_on_rank_0_stops_every_rank_at_once(tmp_path: Path) -> None:
    """A failure on rank 0 inside the sharded save (worker: fsdp_full_save_worker.py; an output file's write,
    the tokenizer, a wrong output path) raises FullSaveError on both ranks at that step, naming rank 0's
    cause; the previous output is untouched and the next save works. Before: rank 0 raised alone and rank 1
    stayed in the next all-gather (the collectives fell out of step: the worker crashed). The bound is the
    subprocess timeout (150 s, above LORAKIT_DIST_TIMEOUT=90): waiting for the dist timeout cannot pass."""
    for r in run_worker("fsdp_full_save_worker.py", tmp_path, timeout=150, LORAKIT_DIST_TIMEOUT="90"):
        assert sum(f.endswith(".safetensors") for f in r["files"]) > 1  # several output files: a mid-save failure
        assert r["file_write"].startswith("FullSaveError") and "model-00002-of-" in r["file_write"]
        assert "No space left on device (injected)" in r["file_write"]
        assert r["tokenizer"].startswith("FullSaveError") and "Permission denied (injected)" in r["tokenizer"]
        assert r["output_path"].startswith("FullSaveError") and "temporary directory" in r["output_path"]
        assert r["file_write_left_output"] and r["tokenizer_left_output"] and r["leftovers"] == []
        assert r["saved_again_same"]


def _weights(d: Path) -> dict:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(str(d)).state_dict()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_best_model_is_written_under_fsdp_as_by_one_process(tmp_path: Path, tiny_bert: Path,
                                                           sentiment_files: tuple[Path, Path]) -> None:
    """``--method full --fsdp --eval-every 2``: an eval that improves writes ``best/model`` gathered tensor by
    tensor (fsdp_full.save_best), as the 1-process run writes ``best/`` from best.pt: the same best step and
    metrics, the same weights (WEIGHT_ATOL), and they are not the final model's (an earlier step)."""
    import torch

    kw = {**SHORT, "eval_every": 2}
    ref, out = tmp_path / "single", tmp_path / "fsdp"
    res = run_cli(*tiny_train_args(tiny_bert, sentiment_files, **kw, batch_size=8, output_dir=ref), env=ENV)
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_cli(*tiny_train_args(tiny_bert, sentiment_files, **kw, batch_size=4, fsdp=True, output_dir=out),
                  launcher=torchrun(2), env=ENV_FULL, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    rr, ro = (json.loads((d / "results.json").read_text()) for d in (ref, out))
    assert rr["best"]["step"] < SHORT["max_steps"] and rr["saved_best"]  # the case under test: an earlier best
    assert ro["best"] == pytest.approx(rr["best"], rel=LOSS_REL)
    assert ro["saved_best"] == str(out / "best" / "model") and not (out / "best.pt").exists()
    index = json.loads((out / "best/model/model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded safetensors, as model/
    sa, sb, final = _weights(ref / "best/model"), _weights(out / "best/model"), _weights(out / "model")
    assert sorted(sa) == sorted(sb)
    worst = max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)
    assert worst <= WEIGHT_ATOL, worst
    assert any(not torch.equal(sb[k], final[k]) for k in sb)  # the best step's weights, not the final ones


def test_best_dir_kept_only_for_an_earlier_step(tmp_path: Path) -> None:
    """After the final save: ``best/model`` is the result only when the best eval is an earlier step (as the
    unsharded run's best/); a best at the final step (or none) removes a best/ left by an earlier eval."""
    from lorakit.train.fsdp_full import kept_best

    (tmp_path / "best/model").mkdir(parents=True)
    assert kept_best(tmp_path, {"step": 2}, 6) == tmp_path / "best/model"
    assert (tmp_path / "best/model").is_dir()
    assert kept_best(tmp_path, {"step": 6}, 6) is None and not (tmp_path / "best").exists()
    (tmp_path / "best/model").mkdir(parents=True)
    assert kept_best(tmp_path, {"step": None}, 6) is None and not (tmp_path / "best").exists()
