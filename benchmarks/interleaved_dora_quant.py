"""DoRA on an NF4 base (SmolLM2-135M, all 7 linears, r=16 α=32, dropout 0.05, B4×T128): train-step
CPU time of lorakit LoRA-NF4, lorakit DoRA-NF4 and PEFT + bitsandbytes DoRA-NF4, interleaved in one
process (:func:`benchmarks.harness.interleave`), so the ratios hold on a shared machine.

    OMP_NUM_THREADS=1 flock /tmp/team/bench.lock python -m benchmarks.interleaved_dora_quant --threads 1

Before each DoRA step the adapter tensors are touched in place (as an optimizer update does), so
lorakit's cached norm is recomputed every step (one dequantization of each W0 for it), as PEFT's is.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from benchmarks.harness import interleave, ratio_table, setup_torch, trainable
from benchmarks.models import SMOL_TARGETS, load

R, ALPHA, DROPOUT = 16, 32, 0.05
VARIANTS = ("lorakit-nf4", "lorakit-dora-nf4", "peft-dora-nf4")


def _step(variant: str, smoke: bool) -> Callable[[], None]:
    import lorakit

    model = load("smollm2", smoke)
    for p in model.parameters():
        p.requires_grad_(False)
        p.data = p.data.clone()
    lorakit.quantize_base(model, "nf4", skip=("lm_head",))
    dora = "dora" in variant
    if variant.startswith("lorakit"):
        lorakit.inject(model, lorakit.LoraConfig(r=R, alpha=ALPHA, dropout=DROPOUT, targets=list(SMOL_TARGETS),
                                                 use_dora=dora))
    else:
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                                           target_modules=list(SMOL_TARGETS), use_dora=True))
    model.train()  # (bitsandbytes repacks 4-bit weights for bf16 inference in eval mode)
    batch, seq = (2, 16) if smoke else (4, 128)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    params = trainable(model)

    def step() -> None:
        if dora:
            with torch.no_grad():
                for p in params:
                    p.add_(0)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for p in params:
            p.grad = None
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    setup_torch(args.threads)
    steps = {n: _step(n, args.smoke) for n in args.variants.split(",")}
    reps, warmup = (1, 0) if args.smoke else (args.reps, args.warmup)
    med = interleave(steps, reps, warmup)
    print(f"### SmolLM2-135M on NF4, interleaved in one process, {torch.get_num_threads()} thread(s), CPU time, "
          f"median of {reps} after {warmup} warm-up, LoRA dropout {DROPOUT}\n")
    print(ratio_table(med))


if __name__ == "__main__":
    main()
