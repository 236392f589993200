"""Workload (b): MiniLM (all-MiniLM-L6-v2) sequence classification, batch 32×128, LoRA q,v r=8, train step.

    python -m benchmarks.bench_minilm                 # LoRA dropout 0.1
    python -m benchmarks.bench_minilm --dropout 0     # no dropout (lorakit folds W' = W + sBA)
"""

from __future__ import annotations

import argparse

from benchmarks.harness import TRAIN_VARIANTS, Measured, main, time_it, variants
from benchmarks.models import train_step


def _extra(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--dropout", type=float, default=0.1)


def _run(args: argparse.Namespace, variant: str) -> Measured:
    step = train_step("minilm", variant, args, ("query", "value"), r=8, alpha=16, dropout=args.dropout,
                      batch=32, seq=128)
    return time_it(step, args.reps, args.warmup)


VARIANTS = variants(_run, TRAIN_VARIANTS)

if __name__ == "__main__":
    import sys
    p = sys.argv[sys.argv.index("--dropout") + 1] if "--dropout" in sys.argv else "0.1"
    main("benchmarks.bench_minilm", f"MiniLM seq-cls 32×128, LoRA q,v r=8 dropout {p}, train step",
         VARIANTS, "floor", extra=_extra)
