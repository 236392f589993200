"""Inference variants timed in ONE process, interleaved rep by rep (base vs unmerged vs merged).

    python -m benchmarks.interleaved_inference --model smollm2 --threads 1      # greedy generation
    python -m benchmarks.interleaved_inference --model minilm --threads 1       # forward 32x128
    python -m benchmarks.interleaved_inference --variants base,lorakit-unmerged,peft-unmerged --batch 16
    python -m benchmarks.interleaved_inference --variants base-copy,lorakit-unmerged,lorakit-merged,base
    python -m benchmarks.interleaved_inference --variants lorakit-disabled,lorakit-unmerged,base
    python -m benchmarks.interleaved_inference --variants base,lorakit-disabled,lorakit-unmerged,lorakit-merged-same
    python -m benchmarks.interleaved_inference --variants lorakit-unmerged,lorakit-dora-unmerged,peft-dora-unmerged

The same workloads as :mod:`benchmarks.bench_inference`, but every variant's model lives in this
process and the calls alternate (base, lorakit-unmerged, lorakit-merged, base, ...), timed by this
process's CPU time (``--wall`` for wall time on a quiet machine), so machine-load drift between
processes does not enter the ratios. ``--batch`` sets the generation batch (default 1).
``base-copy`` is a deep copy of the base model, i.e. its weights in freshly allocated memory like
every adapted variant's (the loaded model's memory can be slower or faster than a copy's).
``lorakit-disabled`` is the ``lorakit-unmerged`` model itself run under
``lorakit.disable_adapters``: the base's arithmetic on the very same weight memory, so its ratio to
``lorakit-unmerged`` is the adapter's cost with memory placement taken out. ``lorakit-merged-same``
is that model merged in place before each of its runs (and unmerged before the others'; neither
timed): merged against unmerged on the same base weights.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
from torch import nn

import lorakit
from benchmarks.bench_inference import _randomize_b
from benchmarks.harness import interleave, ratio_table, setup_torch
from benchmarks.models import load

#: variants that run the ``lorakit-unmerged`` model itself (its weight memory, not a copy's), set up
#: untimed before each run: its adapters disabled per call, or merged in place
SAME_MEMORY = ("lorakit-disabled", "lorakit-merged-same")


def _variant(base: nn.Module, name: str, r: int) -> nn.Module:
    if name == "base":
        return base
    model = copy.deepcopy(base)
    if name == "base-copy":  # the base model's weights in fresh memory, as the adapted variants' are
        return model
    if name in ("peft-unmerged", "peft-dora-unmerged"):
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                           use_dora=name == "peft-dora-unmerged"))
        _randomize_b(model)
        return model.eval()
    lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=2 * r, targets="all-linear",
                                             use_dora=name == "lorakit-dora-unmerged"))
    _randomize_b(model)
    if name == "lorakit-merged":
        lorakit.merge(model)
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=("minilm", "smollm2"), default="smollm2")
    ap.add_argument("--variants", default="base,lorakit-unmerged,lorakit-merged")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--batch", type=int, default=None, help="rows (default: 1 for generation, 32 for minilm)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--wall", action="store_true", help="time wall clock (quiet machine) not CPU time")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    setup_torch(args.threads)
    base = load(args.model, args.smoke).eval()
    r = 8 if args.model == "minilm" else 16
    names = args.variants.split(",")
    models = {n: _variant(base, n, r) for n in names if n not in SAME_MEMORY}
    before: dict[str, Callable[[], object]] = {}
    if any(n in SAME_MEMORY for n in names):  # the unmerged model itself: same weight memory
        shared = models.get("lorakit-unmerged") or _variant(base, "lorakit-unmerged", r)
        for n in ("lorakit-unmerged", *SAME_MEMORY):
            if n in names:
                models[n] = shared
                before[n] = (lambda: lorakit.merge(shared)) if n == "lorakit-merged-same" else \
                    (lambda: lorakit.unmerge(shared))
        models = {n: models[n] for n in names}
    if args.model == "minilm":
        batch, seq = (2, 16) if args.smoke else (args.batch or 32, 128)
        ids = torch.randint(0, base.config.vocab_size, (batch, seq))
        what = f"forward {batch}x{seq}"

        def call(m: nn.Module) -> Callable[[], None]:
            return lambda: m(input_ids=ids)
    else:
        new = 4 if args.smoke else args.new_tokens
        ids = torch.randint(0, base.config.vocab_size, (args.batch or 1, args.prompt))
        base.generation_config.pad_token_id = base.generation_config.eos_token_id
        what = f"greedy generation, batch {ids.shape[0]}, prompt {ids.shape[1]}, {new} new tokens"

        def call(m: nn.Module) -> Callable[[], None]:
            m.generation_config.pad_token_id = m.generation_config.eos_token_id
            return lambda: m.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True)
    steps = {n: call(m) for n, m in models.items()}
    if "lorakit-disabled" in steps:
        plain = steps["lorakit-disabled"]
        model = models["lorakit-disabled"]

        def disabled() -> None:
            with lorakit.disable_adapters(model):
                plain()
        steps["lorakit-disabled"] = disabled
    reps, warmup = (1, 0) if args.smoke else (args.reps, args.warmup)
    with torch.inference_mode():
        med = interleave(steps, reps, warmup, args.wall, before)
    print(f"### {args.model} {what}, all-linear r={r}, interleaved in one process, "
          f"{torch.get_num_threads()} thread(s), {'wall' if args.wall else 'CPU'} time, "
          f"median of {reps} after {warmup} warm-up\n")
    print(ratio_table(med, digits=1))

if __name__ == "__main__":
    main()
