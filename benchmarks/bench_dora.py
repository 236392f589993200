"""DoRA (issue 16): SmolLM2-135M causal-LM train step, batch 4×128, r=16 α=32 dropout 0.05 on all 7
linear projections; lorakit LoRA (the anchor) vs lorakit DoRA vs PEFT DoRA, on the float base and on
an NF4 base. One fresh subprocess per variant (the harness), so it takes ``--device cuda --dtype bf16``:
CUDA-synchronised timing and ``torch.cuda.max_memory_allocated``::

    python -m benchmarks.bench_dora --threads 2                                   # CPU, all variants
    python -m benchmarks.bench_dora --device cuda --dtype bf16 --batch 16         # the GPU form (run_gpu.sh)

The CPU ratios of ``docs/benchmarks.md`` (Variants) come from the interleaved scripts
(``benchmarks/interleaved.py``, ``benchmarks/interleaved_dora_quant.py``), which a shared 2-core
machine needs; this script is the same step one variant per process, for peak memory and a GPU.

Variants: ``lorakit`` (LoRA, the fused path), ``lorakit-dora`` (lorakit's default "lora-only"
dropout form), ``lorakit-dora-peft`` (PEFT's dropout form, a second base GEMM), ``peft-dora``;
``lorakit-nf4``, ``lorakit-dora-nf4``, ``peft-dora-nf4``: the same on the base quantized to NF4 by
``lorakit.quantize_base`` (PEFT then wraps bitsandbytes' ``Linear4bit``; with ``--dtype bf16`` the
quantized layers compute in bf16). Before each DoRA step the adapter tensors are touched in place
(as an optimizer update does), so lorakit's cached norm is recomputed every step, as PEFT's is.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.harness import Measured, device_of, dtype_of, main, time_it, trainable, variants
from benchmarks.models import SMOL_TARGETS, apply_variant, load, step_of

R, ALPHA, DROPOUT, BATCH, SEQ = 16, 32, 0.05, 4, 128
NAMES = ("lorakit", "lorakit-dora", "lorakit-dora-peft", "peft-dora", "lorakit-nf4", "lorakit-dora-nf4",
         "peft-dora-nf4")


def _run(args: argparse.Namespace, variant: str) -> Measured:
    import lorakit

    dev, dt = device_of(args), dtype_of(args)
    model = load("smollm2", args.smoke, dev, dt)
    nf4 = variant.endswith("-nf4")
    if nf4:
        for p in model.parameters():
            p.requires_grad_(False)
            p.data = p.data.clone()  # own memory, not views into the loader's mmap (see bench_quant)
        lorakit.quantize_base(model, "nf4", skip=("lm_head",), compute_dtype=None if dt == torch.float32 else dt)
    model = apply_variant(model, variant.removesuffix("-nf4"), SMOL_TARGETS, R, ALPHA, DROPOUT)
    model.train()  # (bitsandbytes repacks 4-bit weights for bf16 inference in eval mode)
    batch, seq = (2, 16) if args.smoke else (args.batch or BATCH, SEQ)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=dev)
    params = trainable(model)
    step = step_of(model, ids, ids, params, args, touch="dora" in variant)
    res = time_it(step, args.reps, args.warmup)
    res.extra = {"shape": f"{batch}x{seq}", "trainable": sum(p.numel() for p in params)}
    return res


VARIANTS = variants(_run, NAMES)

if __name__ == "__main__":
    main("benchmarks.bench_dora", "SmolLM2-135M 4×128 causal LM, DoRA vs LoRA r=16 α=32 p=0.05 all 7 linears",
         VARIANTS, "lorakit")
