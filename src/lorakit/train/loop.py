"""The trainer behind ``lorakit train``: AdamW + linear warm-up/decay, accumulation, clipping, bf16,
gradient checkpointing, periodic eval with best-checkpoint keeping, exact resume, and DDP.

Loss normalisation: every optimizer step averages the summed loss over the *global* batch's units
(examples, or target tokens for E2E), so a run with N processes computes the same loss and gradient
as one process with the same global batch.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch

from lorakit.atomic import output_problem
from lorakit.train import checkpoint as ckpt
from lorakit.train import distributed as dd
from lorakit.train import fsdp, fsdp_full, meta_load, sharded_ckpt
from lorakit.train.batching import Schedule, collate, encode_classification, encode_lm
from lorakit.train.config import TrainConfig
from lorakit.train.data import TaskSpec, eval_digest, get_task, load_task_data, subsample
from lorakit.train.errors import DataError, TrainConfigError
from lorakit.train.evaluate import autocast, evaluate, loss_sum, model_inputs
from lorakit.train.finish import finish_run
from lorakit.train.lm_loss import lm_train_loss_sum, supports_chunked_loss
from lorakit.train.memory import PhasePeaks
from lorakit.train.methods import apply_method
from lorakit.train.models import load_model, load_tokenizer, resolve
from lorakit.train.optimization import build_optimizer, schedule_length
from lorakit.train.runlog import MetricsLog


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "bf16":
        return True
    return precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()


def better(metric: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new < old if metric == "loss" else new > old


class Trainer:
    """One training run; construct (validates data, config and resume state), then :meth:`run`."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.ctx = dd.setup()
        self.spec: TaskSpec = get_task(cfg.task)
        self.run_dir = cfg.run_dir()
        self.log = MetricsLog(self.run_dir, enabled=self.ctx.is_main)
        self._load_data()
        self.config_dict = {
            **cfg.to_dict(),
            "task": self.spec.name,
            "lr": cfg.resolved_lr(),
            "world_size": self.ctx.world_size,
        }
        self.resume_state = self._check_run_dir()
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        src = resolve(cfg.model)
        self.tokenizer = load_tokenizer(src)
        if cfg.fsdp and (self.ctx.device.type == "cpu" or cfg.fsdp_offload):
            dd.return_freed_host_memory()  # what fsdp.shard sets, from the load on (freed float weights go back)
        if meta_load.applies(cfg, src):  # --fsdp: parameters on meta; each rank reads its shard in fsdp.shard
            self.model = meta_load.skeleton(src, self.spec.kind, self.spec.num_labels, self.ctx)
            if cfg.fsdp and cfg.quantize:
                meta_load.defer_rest(self.model)
        else:
            self.model = load_model(src, self.spec.kind, self.spec.num_labels)
        if cfg.quantize:  # QLoRA: quantize the frozen base before LoRA goes on (lorakit.quant)
            from lorakit.train.models import quantize_for_training

            quantize_for_training(self.model, cfg.quantize)
        self.method_info = apply_method(
            self.model, cfg.method, r=cfg.r, alpha=cfg.alpha, dropout=cfg.lora_dropout, targets=cfg.targets,
            use_dora=cfg.use_dora, target_parameters=cfg.target_parameters,
        )
        self._encode()

    # ----------------------------------------------------------------------------------- set-up
    def _load_data(self) -> None:
        c = self.cfg
        train, dev = load_task_data(
            self.spec, c.data_dir, c.train_file, c.eval_file, seed=c.seed, dev_fraction=c.e2e_dev_fraction
        )
        self.train_raw = subsample(train, c.max_train_examples, c.seed)
        self.eval_raw = subsample(dev, c.max_eval_examples, c.eval_subset_seed)
        self.schedule = Schedule(
            self._n_train_units(), c.batch_size, c.grad_accum, self.ctx.world_size, c.seed
        )

    def _n_train_units(self) -> int:
        if self.spec.kind == "generation":
            return sum(len(g.refs) for g in self.train_raw)
        return len(self.train_raw)

    def _check_run_dir(self) -> dict[str, Any] | None:
        c, path = self.cfg, self.run_dir / ckpt.CHECKPOINT
        if self.schedule.steps_per_epoch == 0:
            raise DataError(
                f"{self.schedule.n_examples} training examples are fewer than one global batch "
                f"({self.schedule.global_batch}); lower --batch-size / --grad-accum"
            )
        problem = output_problem(self.run_dir, "directory")
        if problem:
            raise TrainConfigError(f"--output-dir: {problem}")
        if c.resume:
            if not path.is_file() and (self.run_dir / "results.json").is_file():
                raise TrainConfigError(f"--resume: the run in {self.run_dir} already finished")
            state = ckpt.load(path)
            if c.fsdp:
                sharded_ckpt.check_resumable(state, self.config_dict, self.schedule.global_batch, path)
            else:
                ckpt.check_resumable(state, self.config_dict, path)
            return state
        busy = path.is_file() or (self.run_dir / "results.json").is_file()
        if busy and not c.overwrite:
            raise TrainConfigError(
                f"--output-dir: {self.run_dir} already holds a run; pass --resume to continue "
                "it or --overwrite to start over"
            )
        return None

    def _encode(self) -> None:
        c, tok = self.cfg, self.tokenizer
        if self.spec.kind == "generation":
            self.train_feats = encode_lm(self.train_raw, tok, c.max_len)
            self.eval_feats = encode_lm(self.eval_raw, tok, c.max_len)
            if len(self.train_feats) != self.schedule.n_examples:
                self.schedule = Schedule(
                    len(self.train_feats), c.batch_size, c.grad_accum, self.ctx.world_size, c.seed
                )
        else:
            self.train_feats = encode_classification(self.train_raw, tok, c.max_len)
            self.eval_feats = encode_classification(self.eval_raw, tok, c.max_len)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    # ----------------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        """Train, evaluate, save; returns the results (also written to ``results.json`` by rank 0)."""
        c, ctx = self.cfg, self.ctx
        device = ctx.device
        model = self.model if meta_load.is_skeleton(self.model) else self.model.to(device)
        model.train()
        if c.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        bf16 = use_bf16(c.precision, device)
        # FSDP2 replaces the parameters by sharded DTensors, so it shards before the optimizer sees them.
        sharded = fsdp.shard(model, c, ctx, bf16=bf16) if c.fsdp else None
        spe = self.schedule.steps_per_epoch
        total, warmup = schedule_length(c, spe)
        params, opt, sched = build_optimizer(model, c, total, warmup)
        wrapped: Any = sharded or model
        if ctx.enabled and sharded is None:
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

        step, best = 0, {"value": None, "step": None}
        if self.resume_state is not None:
            st = self.resume_state
            if c.fsdp:
                sharded_ckpt.restore(self.run_dir, st, model, opt, sched, ctx)
            else:
                ckpt.restore(st, model, opt, sched, ctx.rank)
            step, best = st["step"], st["best"]
            self.log.reset(keep_until_step=step)
        else:
            torch.manual_seed(c.seed + 1 + ctx.rank)  # dropout streams differ per rank
            if ctx.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                for stale in (ckpt.CHECKPOINT, ckpt.BEST, "results.json"):
                    (self.run_dir / stale).unlink(missing_ok=True)
                shutil.rmtree(self.run_dir / "best", ignore_errors=True)
            self.log.reset()
        resolved = {
            **self.config_dict,
            "total_steps": total,
            "warmup_steps": warmup,
            "steps_per_epoch": spe,
            "global_batch": self.schedule.global_batch,
            "bf16": bf16,
            "device": str(device),
            "n_train": self.schedule.n_examples,
            "n_eval": len(self.eval_feats),
            "eval_digest": eval_digest(self.eval_raw),
            **self.method_info,
        }
        if ctx.is_main:
            ckpt.atomic_json(resolved, self.run_dir / "config.json")
        dd.barrier(ctx)

        bar = None
        if ctx.is_main and c.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=total,
                initial=step,
                desc=f"{self.spec.name}/{c.method}",
                unit="step",
                dynamic_ncols=True,
            )
        # DDP / FSDP need their wrapper's forward, so the chunked LM loss is for a single unwrapped model
        lm_chunked = self.spec.kind == "generation" and wrapped is model and supports_chunked_loss(model)
        self.peaks = PhasePeaks("train")
        t0 = time.perf_counter()
        win_t, win_n = time.perf_counter(), 0
        start_step = step
        while step < total:
            global_idx = self.schedule.global_indices(step)
            units = sum(self.train_feats[i].units for i in global_idx)
            micro = self.schedule.rank_micro_batches(step, ctx.rank)
            acc = torch.zeros((), device=device)
            for k, idx in enumerate(micro):
                batch = collate([self.train_feats[i] for i in idx], self.pad_id)
                sync = nullcontext() if (not ctx.enabled or k == len(micro) - 1) else wrapped.no_sync()
                with sync:
                    labels = batch["labels"].to(device)
                    with autocast(device, bf16):
                        if lm_chunked:  # no full-vocabulary logits kept for backward (#19 section 6)
                            loss = lm_train_loss_sum(model, model_inputs(batch, device), labels, c.label_smoothing)
                        else:
                            logits = wrapped(**model_inputs(batch, device)).logits
                    if not lm_chunked:
                        loss = loss_sum(logits, labels, self.spec.kind, c.label_smoothing)
                    (loss * (ctx.world_size / units)).backward()
                acc += loss.detach()
            step_loss = float(dd.all_sum(ctx, acc)) / units
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"loss became {step_loss} at step {step + 1}; lower --lr")
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, c.max_grad_norm if c.max_grad_norm > 0 else math.inf
            )
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            win_n += self.schedule.global_batch
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", ex_s=f"{win_n / (time.perf_counter() - win_t):.1f}")
            if step % c.log_every == 0 or step == total:
                now = time.perf_counter()
                self.log.append(
                    {
                        "split": "train",
                        "step": step,
                        "epoch": round(step / spe, 4),
                        "loss": step_loss,
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "examples_per_s": win_n / (now - win_t),
                        "elapsed_s": now - t0,
                    }
                )
                win_t, win_n = now, 0
            if c.eval_every and step % c.eval_every == 0 and step < total:
                self._eval_and_keep_best(step, best, bf16)
            if step % c.save_every == 0 and step < total:
                self._save_checkpoint(step, best, opt, sched)
        if bar is not None:
            bar.close()
        train_time = time.perf_counter() - t0
        final = self._eval_and_keep_best(step, best, bf16, last=True)
        results = finish_run(self, final, best, train_time, step, step - start_step, bf16)
        dd.barrier(ctx)
        dd.teardown(ctx)
        return results

    # ----------------------------------------------------------------------------------- pieces
    def _eval_and_keep_best(self, step: int, best: dict[str, Any], bf16: bool, last: bool = False) -> dict[str, float]:
        """Rank 0 evaluates; an improvement is written to ``best.pt`` (``--fsdp --method full``: ``best/model``
        directly, unless ``last``: the final model is saved anyway). Returns the metrics."""
        metric = "loss" if self.spec.kind == "generation" else self.spec.metric
        res: dict[str, float] = {}
        keep: Any = None  # DDP: rank 0's write of best.pt, agreed on below by every rank
        if self.ctx.is_main or self.cfg.fsdp:  # under FSDP every rank takes part in each forward
            with self.peaks.phase("eval"):
                res = evaluate(
                    self.model,
                    self.spec,
                    self.eval_feats,
                    pad_id=self.pad_id,
                    batch_size=self.cfg.eval_batch_size,
                    device=self.ctx.device,
                    bf16=bf16,
                )
            self.log.append({"split": "eval", "step": step, **res})
            improved = better(metric, res[metric], best["value"])
            if self.cfg.fsdp:  # every rank evaluated; rank 0 decides, the saves below are collectives
                improved = dd.broadcast_object(self.ctx, improved)
            if improved:
                best.update(value=res[metric], step=step, metrics=res)
                if self.cfg.fsdp and self.cfg.method == "full":
                    if not last:  # gathered tensor by tensor as model/ is; no best.pt (lorakit.train.fsdp_full)
                        fsdp_full.save_best(self, step)
                elif self.cfg.fsdp:
                    fsdp.save_best(self.model, step, res, self.run_dir / ckpt.BEST, self.ctx)
                else:
                    state = ckpt.trainable_state(self.model)
                    keep = partial(ckpt.save_best, self.run_dir / ckpt.BEST, step, res, state)
        if not self.cfg.fsdp:  # a failure on rank 0: SaveError on every rank (one process: its own error)
            best_pt = self.run_dir / ckpt.BEST
            dd.rank0_save(self.ctx, keep or (lambda: None), f"writing the best step's {best_pt}", best_pt)
        best.update(dd.broadcast_object(self.ctx, dict(best)))
        return res

    def _save_checkpoint(self, step: int, best: dict[str, Any], opt: Any, sched: Any) -> None:
        if self.cfg.fsdp:
            sharded_ckpt.save(self.run_dir, step, best, self.model, opt, sched, self.config_dict,
                              self.schedule.global_batch, self.ctx)
            return
        ckpt.save(self.run_dir, step, best, self.model, opt, sched, self.config_dict, self.ctx)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run ``lorakit train`` with a validated config; returns the results dict (empty on ranks > 0)."""
    with dd.named_timeouts():  # a collective past LORAKIT_DIST_TIMEOUT: CollectiveTimeoutError naming it
        return Trainer(cfg).run()
