"""Workload (b): MiniLM (all-MiniLM-L6-v2) sequence classification, batch 32×128, LoRA q,v r=8, train step.

    python -m benchmarks.bench_minilm
"""

from __future__ import annotations

import argparse

from benchmarks.harness import TRAIN_VARIANTS, Measured, main, time_it, variants
from benchmarks.models import train_step


def _run(args: argparse.Namespace, variant: str) -> Measured:
    step = train_step("minilm", variant, args, ("query", "value"), r=8, alpha=16, dropout=0.1,
                      batch=32, seq=128)
    return time_it(step, args.reps, args.warmup)


VARIANTS = variants(_run, TRAIN_VARIANTS)

if __name__ == "__main__":
    main("benchmarks.bench_minilm", "MiniLM seq-cls 32×128, LoRA q,v r=8 dropout 0.1, train step",
         VARIANTS, "floor")
