"""Model train-step variants timed in ONE process, interleaved rep by rep (a loaded machine's A/B).

    python -m benchmarks.interleaved --model minilm --threads 1
    python -m benchmarks.interleaved --model smollm2 --threads 1 --variants floor,lorakit,peft

The workload scripts run each variant in a fresh process, one after the other, which gives clean
peak-RSS figures but lets a change in the machine's load between variants move their ratios.
Here every variant's model is built in this process and the steps alternate (floor, lorakit,
..., floor, lorakit, ...), timed by this process's CPU time (with ``--threads 1`` other processes'
load hardly enters it), so the ratios hold up on a shared machine. No memory figures.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.harness import interleave, ratio_table, setup_torch
from benchmarks.models import SMOL_TARGETS, train_step

WORKLOADS = {  # same settings as bench_minilm / bench_smollm2
    "minilm": dict(targets=("query", "value"), r=8, alpha=16, dropout=0.1, batch=32, seq=128),
    "smollm2": dict(targets=SMOL_TARGETS, r=16, alpha=32, dropout=0.05, batch=4, seq=128),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=tuple(WORKLOADS), default="minilm")
    ap.add_argument("--variants", default="floor,lorakit,lorakit-plain,peft")
    ap.add_argument("--dropout", type=float, default=None, help="override the workload's LoRA dropout")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--wall", action="store_true", help="time wall clock (quiet machine, >1 thread) not CPU time")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    setup_torch(args.threads)
    w = dict(WORKLOADS[args.model])
    if args.dropout is not None:
        w["dropout"] = args.dropout
    names = args.variants.split(",")
    steps = {n: train_step(args.model, n, args, **w) for n in names}
    reps, warmup = (1, 0) if args.smoke else (args.reps, args.warmup)
    med = interleave(steps, reps, warmup, args.wall)
    print(f"### {args.model}, interleaved in one process, {torch.get_num_threads()} thread(s), "
          f"{'wall' if args.wall else 'CPU'} time, "
          f"median of {reps} after {warmup} warm-up, LoRA dropout {w['dropout']}\n")
    print(ratio_table(med))

if __name__ == "__main__":
    main()
