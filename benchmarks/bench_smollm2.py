"""Workload (c): SmolLM2-135M causal-LM train step, batch 4×128, LoRA r=16 α=32 dropout 0.05 on all
7 linear projections.

    python -m benchmarks.bench_smollm2
"""

from __future__ import annotations

import argparse

from benchmarks.harness import TRAIN_VARIANTS, Measured, main, time_it, variants
from benchmarks.models import SMOL_TARGETS, train_step


def _run(args: argparse.Namespace, variant: str) -> Measured:
    step = train_step("smollm2", variant, args, SMOL_TARGETS, r=16, alpha=32, dropout=0.05, batch=4, seq=128)
    return time_it(step, args.reps, args.warmup)


VARIANTS = variants(_run, TRAIN_VARIANTS)

if __name__ == "__main__":
    main("benchmarks.bench_smollm2", "SmolLM2-135M 4×128 causal LM, LoRA r=16 α=32 p=0.05 all 7 linears",
         VARIANTS, "floor")
