"""Where a LoRA train step's time goes beyond the frozen floor: torch-profiler op time by category.

    python -m benchmarks.profile_step --model smollm2 --threads 1 [--variants floor,lorakit,peft]

Each variant's step (the workloads of :mod:`benchmarks.interleaved`) runs ``--reps`` times under
``torch.profiler`` after a warm-up; ops are summed per step and sorted into categories by name and
shape: the base model's GEMMs (no dimension equal to the LoRA rank), LoRA's low-rank GEMMs (one
dimension a multiple of r up to 3r), dropout masks (RNG and comparison), elementwise ops, and the rest.
The profiler inflates op times (by 10-30 % here), so the last row gives the step's CPU time
without it; Python overhead is measured separately (see docs/benchmarks.md). The table shows each
category's ms per step and its difference to the floor, which is the profile behind the ratios in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.harness import setup_torch
from benchmarks.interleaved import WORKLOADS
from benchmarks.models import train_step

GEMMS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}
RNG = {"aten::random_", "aten::bernoulli_", "aten::uniform_", "aten::bitwise_and_", "aten::ge", "aten::lt",
       "aten::native_dropout", "aten::rand", "aten::rand_like"}
ELEMENTWISE = {"aten::mul", "aten::mul_", "aten::add", "aten::add_", "aten::copy_", "aten::where",
               "aten::masked_fill", "aten::div", "aten::cat", "aten::fill_", "aten::zero_"}


def category(name: str, shapes: list[list[int]], r: int) -> str:
    if name in GEMMS:
        dims = {d for s in shapes for d in s}
        return "LoRA low-rank GEMMs" if dims & {r, 2 * r, 3 * r} else "base GEMMs"
    if name in RNG:
        return "dropout masks (RNG, compare)"
    if name in ELEMENTWISE:
        return "elementwise (mask apply, adds, copies)"
    if name.startswith("aten::"):
        return "other ops (attention, norms, loss...)"
    return ""  # autograd nodes and Python-level ranges: their children are counted


def profile_variant(step: Callable[[], None], reps: int) -> dict[str, float]:
    step()
    t0 = time.process_time()
    for _ in range(reps):
        step()
    cpu = (time.process_time() - t0) * 1e3 / reps  # unprofiled
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(reps):
            step()
    out: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages(group_by_input_shape=True):
        cat = category(ev.key, [list(s) for s in ev.input_shapes if isinstance(s, (list, tuple))], RANK[0])
        if cat:
            out[cat] += ev.self_cpu_time_total / 1e3 / reps
    out["sum of profiled ops"] = sum(out.values())
    out["step CPU time without the profiler"] = cpu
    return out


RANK = [16]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=tuple(WORKLOADS), default="smollm2")
    ap.add_argument("--variants", default="floor,lorakit,peft")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    setup_torch(args.threads)
    w = dict(WORKLOADS[args.model])
    RANK[0] = w["r"]
    names = args.variants.split(",")
    res = {}
    for n in names:
        res[n] = profile_variant(train_step(args.model, n, args, **w), 1 if args.smoke else args.reps)
    cats = list(dict.fromkeys(c for v in res.values() for c in v))
    print(f"### {args.model} train step, profile by category, {torch.get_num_threads()} thread(s), "
          f"ms per step (CPU time)\n")
    head = " | ".join(f"{n} | {n} − {names[0]}" for n in names[1:])
    print(f"| category | {names[0]} | {head} |\n|---" * 1 + "|---" * (1 + 2 * (len(names) - 1)) + "|")
    for c in cats:
        base = res[names[0]].get(c, 0.0)
        cells = " | ".join(f"{res[n].get(c, 0.0):.0f} | {res[n].get(c, 0.0) - base:+.0f}" for n in names[1:])
        print(f"| {c} | {base:.0f} | {cells} |")


if __name__ == "__main__":
    main()
