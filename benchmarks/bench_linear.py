"""Workload (a): one Linear, N=4096 tokens, D=768, r=8, forward + backward including the input grad.

    python -m benchmarks.bench_linear                # no dropout
    python -m benchmarks.bench_linear --dropout 0.1
    python -m benchmarks.bench_linear --device cuda --dtype bf16 --tokens 32768   # GPU form

With ``--dtype bf16`` the whole layer (LoRA included) and its input are bfloat16.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from benchmarks.harness import TRAIN_VARIANTS, Measured, device_of, dtype_of, main, time_it, variants


def _extra(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--rank", type=int, default=8)


def _run(args: argparse.Namespace, kind: str) -> Measured:
    n, d, r = (64, 32, 4) if args.smoke else (args.tokens, args.dim, args.rank)
    if kind in ("floor", "full"):
        layer: nn.Module = nn.Linear(d, d)
        layer.requires_grad_(kind == "full")
    elif kind.startswith("lorakit"):
        import lorakit
        layer = lorakit.Linear(d, d, r=r, lora_alpha=2 * r, lora_dropout=args.dropout, merge_weights=False)
        layer.lora_fused = kind == "lorakit"
        nn.init.normal_(layer.lora_B)
        layer.bias.requires_grad_(False)
    elif kind == "loralib":
        import loralib
        layer = loralib.Linear(d, d, r=r, lora_alpha=2 * r, lora_dropout=args.dropout, merge_weights=False)
        layer.bias.requires_grad_(False)
    else:  # peft
        import peft
        holder = nn.Sequential(nn.Linear(d, d))
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=args.dropout, target_modules=["0"])
        layer = peft.get_peft_model(holder, cfg)
    dev, dt = device_of(args), dtype_of(args)
    layer.to(device=dev, dtype=dt).train()
    x = torch.randn(n, d, device=dev, dtype=dt, requires_grad=True)
    g = torch.randn(n, d, device=dev, dtype=dt)

    def step() -> None:
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(g)
    return time_it(step, args.reps, args.warmup)


VARIANTS = variants(_run, TRAIN_VARIANTS)

if __name__ == "__main__":
    import sys
    n = sys.argv[sys.argv.index("--tokens") + 1] if "--tokens" in sys.argv else "4096"
    main("benchmarks.bench_linear", f"One Linear {n}×768, r=8, fwd+bwd incl. input grad", VARIANTS, "floor",
         extra=_extra)
