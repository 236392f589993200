"""Microbenchmark of the no-grad low-rank update for a few rows (token-by-token decoding).

    python -m benchmarks.micro_decode --threads 1                 # rows 1,2,4,8,16,32; SmolLM2's shapes
    python -m benchmarks.micro_decode --rows 1 --rank 8 --threads 2

Times ``out += s (x Aᵀ) Bᵀ`` two ways on hot caches, in one process: ``lorakit.cpu_kernels``'
``lora_add_`` (one C++ call) and the ATen composition ``out.add_(F.linear(F.linear(x, A), B),
alpha=s)`` (three calls), min over repeats of the mean of ``--number`` calls, in µs per call.
This sets :data:`lorakit.fused.KERNEL_ROWS`.
"""

from __future__ import annotations

import argparse
import timeit

import torch
import torch.nn.functional as F

from benchmarks.harness import setup_torch
from lorakit import cpu_kernels

SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576))  #: SmolLM2-135M's (in, out) projections


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8,16,32", help="comma-separated row counts")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--number", type=int, default=1000)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    setup_torch(args.threads)
    ext = cpu_kernels.extension()
    if ext is None:
        raise SystemExit("micro_decode: the CPU kernels are unavailable (no compiler, or LORAKIT_NO_EXTENSION=1)")
    number, reps = (10, 1) if args.smoke else (args.number, 5)
    r, s = args.rank, 2.0
    print(f"### no-grad low-rank update, r={r}, {torch.get_num_threads()} thread(s), µs per call\n")
    print("| rows | in→out | kernel | ATen | ATen ÷ kernel |\n|---|---|---|---|---|")
    for n in (int(v) for v in args.rows.split(",")):
        for k, o in SHAPES:
            x, A, B, out = torch.randn(n, k), torch.randn(r, k), torch.randn(o, r), torch.randn(n, o)
            t_k = min(timeit.repeat(lambda: ext.lora_add_(out, x, A, B, s), number=number, repeat=reps))
            t_a = min(timeit.repeat(lambda: out.add_(F.linear(F.linear(x, A), B), alpha=s),
                                    number=number, repeat=reps))
            print(f"| {n} | {k}→{o} | {t_k / number * 1e6:.1f} | {t_a / number * 1e6:.1f} | {t_a / t_k:.2f} |")


if __name__ == "__main__":
    main()
