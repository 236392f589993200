"""What a finished ``lorakit train`` run leaves behind: the final adapter (and the best step's, when
that is an earlier one), E2E generations, ``results.json`` with per-phase peak memory, the loss plot;
then the resumable checkpoint is removed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lorakit.train import checkpoint as ckpt
from lorakit.train import distributed as dd
from lorakit.train import fsdp, fsdp_full, sharded_ckpt
from lorakit.train.data import PAPER_METRIC
from lorakit.train.evaluate import decoding, generate, score_e2e
from lorakit.train.memory import PhasePeaks, peak_rss_mb
from lorakit.train.methods import result_path, save_result
from lorakit.train.runlog import plot_loss

if TYPE_CHECKING:
    from lorakit.train.loop import Trainer


def peak_memory_mb(device: torch.device, peaks: PhasePeaks | None = None) -> dict[str, float]:
    """Peak RSS overall and (with ``peaks``) of the train steps and of eval / generation separately."""
    out = peaks.report() if peaks is not None else {"peak_rss_mb": peak_rss_mb()}
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def run_meta(t: Trainer) -> dict[str, Any]:
    """What a saved result records of its run (``lorakit_train.json``)."""
    c = t.cfg
    return {
        "task": t.spec.name,
        "model": c.model,
        "method": c.method,
        "num_labels": t.spec.num_labels,
        "kind": t.spec.kind,
        "seed": c.seed,
        "max_len": c.max_len,
    }


def finish_run(
    t: Trainer,
    final: dict[str, float],
    best: dict[str, Any],
    train_time: float,
    step: int,
    steps_run: int,
    bf16: bool,
) -> dict[str, Any]:
    """Save and score the trained model (rank 0); returns the results (empty on other ranks).

    Under torchrun every rank agrees on the outcome of each file rank 0 writes alone (the final and the best
    adapter, ``results.json``): a failure there raises :class:`~lorakit.train.errors.SaveError` on every rank
    at once (:func:`lorakit.train.distributed.rank0_save`), the previous files intact."""
    c, ctx = t.cfg, t.ctx
    meta = run_meta(t)
    decoded = None
    if c.fsdp and c.method == "full":  # tensor by tensor into HF sharded safetensors (lorakit.train.fsdp_full)
        meta_text = json.dumps(meta, indent=2, default=str)
        saved = fsdp_full.save_model(t.model, t.tokenizer, t.run_dir / "model", meta_text, ctx)
    elif c.fsdp:  # every rank gathers the (small) trainable tensors; rank 0 saves as from an unsharded model
        with fsdp.gathered(t.model):
            saved = _save(t, t.run_dir, meta)
        if t.spec.kind == "generation":  # sharded: every rank takes part in each forward of the decoding
            decoded = _decode(t, bf16, synced=ctx.enabled)
        fsdp.gather_trainables(t.model)
    else:
        saved = _save(t, t.run_dir, meta)
    best_path = _save_best(t, best, step, meta)
    if ctx.is_main and not c.fsdp and t.spec.kind == "generation":
        decoded = _decode(t, bf16, synced=False)
    results: dict[str, Any] = {}
    if ctx.is_main:
        if decoded is not None:
            gen, hyps = decoded
            (t.run_dir / "generations.txt").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
            final = {**final, **gen}
            t.log.append({"split": "generate", "step": step, **gen})
        results = {
            "task": t.spec.name,
            "method": c.method,
            "model": c.model,
            "final": final,
            "best": {"step": best.get("step"), **(best.get("metrics") or {})},
            "metric": t.spec.metric,
            "paper_metric": {PAPER_METRIC[t.spec.name]: final.get(PAPER_METRIC[t.spec.name])},
            "n_eval": len(t.eval_raw),
            "trainable_params": t.method_info["trainable_params"],
            "total_params": t.method_info["total_params"],
            "trainable_fraction": t.method_info["trainable_fraction"],
            "train_time_s": train_time,
            "steps_run": steps_run,
            "world_size": ctx.world_size,
            "saved": str(saved),
            "saved_best": str(best_path) if best_path else None,
            **peak_memory_mb(ctx.device, t.peaks),
        }
    path, plot = t.run_dir / "results.json", t.run_dir / "loss.png"
    dd.rank0_save(ctx, lambda: ckpt.atomic_json(results, path), f"writing {path}", path)
    dd.rank0_save(ctx, lambda: _wrap_up(t), f"writing {plot}", plot)  # then the checkpoint is removed
    return results


def _wrap_up(t: Trainer) -> None:
    """Rank 0, once ``results.json`` is written: the loss plot, then the resumable checkpoint removed."""
    plot_loss(t.log.records(), t.run_dir / "loss.png", None if t.spec.kind == "generation" else t.spec.metric)
    (t.run_dir / ckpt.CHECKPOINT).unlink(missing_ok=True)
    if t.cfg.fsdp:
        sharded_ckpt.cleanup(t.run_dir)


def _save(t: Trainer, dest: Path, meta: dict[str, Any]) -> Path | None:
    """``save_result`` by rank 0 (returns its path there, None elsewhere); every rank agrees on its outcome."""
    path = result_path(t.cfg.method, dest)
    return dd.rank0_save(t.ctx, lambda: save_result(t.model, t.tokenizer, t.cfg.method, dest, meta),
                         f"saving {path}", path)


def _save_best(t: Trainer, best: dict[str, Any], step: int, meta: dict[str, Any]) -> Path | None:
    """The best step's weights (when it is an earlier step than the final one) saved to ``best/`` from
    ``best.pt`` by rank 0 (its path there, None elsewhere); ``--fsdp --method full``: ``best/model``
    was written at the improving eval (:func:`fsdp_full.kept_best`)."""
    if t.cfg.fsdp and t.cfg.method == "full":
        return fsdp_full.kept_best(t.run_dir, best, step) if t.ctx.is_main else None
    if best.get("step") in (None, step):  # the same on every rank (broadcast after each eval)
        return None

    def write() -> Path | None:
        if not (t.run_dir / ckpt.BEST).is_file():
            return None
        state = ckpt.load(t.run_dir / ckpt.BEST)
        current = ckpt.trainable_state(t.model)
        ckpt.load_trainable_state(t.model, state["trainable"])
        try:
            return save_result(t.model, t.tokenizer, t.cfg.method, t.run_dir / "best", meta)
        finally:
            ckpt.load_trainable_state(t.model, current)

    path = result_path(t.cfg.method, t.run_dir / "best")
    return dd.rank0_save(t.ctx, write, f"saving the best step's {path}", path)


def _decode(t: Trainer, bf16: bool, synced: bool) -> tuple[dict[str, float], list[str]] | None:
    """The E2E dev MRs decoded and scored by rank 0; with ``synced`` (FSDP) the other ranks decode the same
    MRs in lockstep, taking part in each sharded forward, and return None."""
    c = t.cfg
    groups = t.eval_raw[: c.gen_max_mrs] if c.gen_max_mrs else t.eval_raw
    kw = {**decoding(c), "device": t.ctx.device, "bf16": bf16, "progress": c.progress and t.ctx.is_main,
          "synced": synced}
    with t.peaks.phase("eval"):
        if not t.ctx.is_main:
            generate(t.model, t.tokenizer, [g.mr for g in groups], **kw)
            return None
        return score_e2e(t.model, t.tokenizer, groups, **kw)
