"""Workload (d): inference with an all-linear adapter, unmerged and merged, as a ratio to the base model.

    python -m benchmarks.bench_inference --model minilm     # forward latency, batch 32×128, r=8
    python -m benchmarks.bench_inference --model smollm2    # greedy generation, 16-token prompt, 32 tokens
    python -m benchmarks.bench_inference --model smollm2 --device cuda --dtype bf16 --batch 16   # GPU form
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from benchmarks.harness import Measured, amp, device_of, dtype_of, main, time_it, variants
from benchmarks.models import load


def _extra(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    ap.add_argument("--new-tokens", type=int, default=32)


def _randomize_b(model: nn.Module) -> None:
    """Non-zero adapters (B starts at zero), so merged and unmerged really differ from the base."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)


def _run(args: argparse.Namespace, variant: str) -> Measured:
    dev = device_of(args)
    model = load(args.model, args.smoke, dev, dtype_of(args))
    r = 8 if args.model == "minilm" else 16
    if variant.startswith("lorakit"):
        import lorakit
        lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=2 * r, targets="all-linear"))
        _randomize_b(model)
        if variant.endswith("merged") and not variant.endswith("unmerged"):
            lorakit.merge(model)
    elif variant.startswith("peft"):
        import peft
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear")
        model = peft.get_peft_model(model, cfg)
        _randomize_b(model)
        if variant == "peft-merged":
            model = model.merge_and_unload()
    model.to(dev).eval()
    if args.model == "minilm":
        batch, seq = (2, 16) if args.smoke else (args.batch or 32, 128)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=dev)

        def step() -> None:
            with torch.inference_mode(), amp(args):
                model(input_ids=ids)
    else:
        new = 4 if args.smoke else args.new_tokens
        ids = torch.randint(0, model.config.vocab_size, (args.batch or 1, 16), device=dev)
        model.generation_config.pad_token_id = model.generation_config.eos_token_id

        def step() -> None:
            with torch.inference_mode(), amp(args):
                model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True)
    return time_it(step, args.reps, args.warmup)


VARIANTS = variants(_run, ("base", "lorakit-unmerged", "lorakit-merged", "peft-unmerged", "peft-merged"))

if __name__ == "__main__":
    import sys
    which = "smollm2 greedy generation" if "smollm2" in sys.argv else "MiniLM forward 32×128"
    main("benchmarks.bench_inference", f"Inference, all-linear adapter: {which}", VARIANTS, "base",
         extra=_extra)
