"""Same-process A/B microbenchmark of the fused path's variants on one Linear (fwd + bwd incl. input grad).

    python -m benchmarks.micro_fused                          # N=4096, D=768, r=8, no dropout
    python -m benchmarks.micro_fused --dropout 0.1 --threads 1
    python -m benchmarks.micro_fused --tokens 1024,2048,4096  # where folding W' = W + sBA starts to pay

Unlike the workload scripts (one fresh process per variant), every variant runs in this one process,
interleaved rep by rep, so that a loaded machine slows them all alike; it reports the median wall
time and the median CPU time of this process (with ``--threads 1`` the CPU time hardly depends on
other processes' load, which makes it the better A/B signal on a shared machine).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import lorakit
from lorakit.kernels import fused as FK


def _variants(n: int, d: int, r: int, p: float) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    layer = lorakit.Linear(d, d, r=r, lora_alpha=2 * r, lora_dropout=p, merge_weights=False)
    nn.init.normal_(layer.lora_B)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    layer.train()
    x = torch.randn(n, d, requires_grad=True)
    g = torch.randn(n, d)

    def run(fused: bool, fold: float) -> Callable[[], None]:
        def step() -> None:
            x.grad = layer.lora_A.grad = layer.lora_B.grad = None
            layer.lora_fused, FK.FOLD_ROWS_FACTOR = fused, fold
            layer(x).backward(g)
        return step

    def floor() -> None:
        x.grad = None
        nn.functional.linear(x, layer.weight, layer.bias).backward(g)
    out = {"floor": floor, "plain": run(False, FK.FOLD_ROWS_FACTOR), "fused-add": run(True, float("inf"))}
    if p == 0.0:
        out["fused-fold"] = run(True, 0.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="4096", help="comma-separated N values")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fold_default = FK.FOLD_ROWS_FACTOR
    ns = [64] if args.smoke else [int(v) for v in args.tokens.split(",")]
    d, r, reps = (32, 4, 2) if args.smoke else (args.dim, args.rank, args.reps)
    print("| N | variant | median wall ms | × floor | median CPU ms | × floor |\n|---|---|---|---|---|---|")
    for n in ns:
        fns = _variants(n, d, r, args.dropout)
        wall: dict[str, list[float]] = {k: [] for k in fns}
        cpu: dict[str, list[float]] = {k: [] for k in fns}
        for f in fns.values():  # warm-up
            f()
            f()
        for _ in range(reps):
            for k, f in fns.items():
                w0, c0 = time.perf_counter(), time.process_time()
                f()
                cpu[k].append((time.process_time() - c0) * 1e3)
                wall[k].append((time.perf_counter() - w0) * 1e3)
        FK.FOLD_ROWS_FACTOR = fold_default
        mw = {k: statistics.median(v) for k, v in wall.items()}
        mc = {k: statistics.median(v) for k, v in cpu.items()}
        for k in fns:
            print(f"| {n} | {k} | {mw[k]:.1f} | {mw[k] / mw['floor']:.3f} | {mc[k]:.1f} | "
                  f"{mc[k] / mc['floor']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
