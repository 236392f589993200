"""Quantized base (issue 15 §5): SmolLM2-135M causal-LM train step, batch 4×128, LoRA r=16 α=32
dropout 0.05 on all 7 linear projections, on the fp32 base and on an NF4 (double-quantized) base,
lorakit vs PEFT + bitsandbytes on the same NF4 base. One fresh subprocess per variant.

    flock /tmp/team/bench.lock python -m benchmarks.bench_quant --threads 2

Variants: ``lorakit-fp32`` (the anchor), ``lorakit-nf4``, ``peft-nf4`` (PEFT's bitsandbytes
``Linear4bit`` LoRA layer on the identical base, built by ``lorakit.quantize_base``), ``floor-nf4``
(the NF4 base frozen, no LoRA, input grads on), ``lorakit-int8``; ``lorakit-nf4-stream`` /
``peft-nf4-stream``: the same NF4 base loaded as ``lorakit train --quantize nf4`` does (a meta-device
skeleton, each layer read from the safetensors copy and quantized, the float model never resident);
``lorakit-nf4-nocompile``: a counterfactual, ``lorakit-nf4`` with bitsandbytes imported while
``torch.compile`` refuses (``benchmarks/quant_import_cost.py``: its import-time wrappers then do not
import torch._inductor and networkx, ~40 MiB RSS); not lorakit's behaviour. ``micro-ours`` / ``micro-bnb``
time the base part alone (forward + input-gradient backward of the 1536×576 ``up_proj`` at 512 rows):
lorakit's dequantize-then-GEMM Function against ``bitsandbytes.matmul_4bit``.

Peak memory: every parameter is first copied out of the loader's mmap of the checkpoint (else the
file pages quantization read stay resident while any tensor uses the map). The table's peak is
``VmHWM`` from ``/proc/self/status`` after resetting it (``/proc/self/clear_refs``, after
``malloc_trim``) once the model is built and warmed up; the lifetime peak (``ru_maxrss``) is in the
notes as ``life_mib`` (on SmolLM2 both are the step's). ``adapted_base_mib`` is the resident bytes
of the adapted layers' base weights (codes and scales; fp32 weights for the fp32 base), ``ratio``
that against fp32.

GPU form (issue 15; ``benchmarks/run_gpu.sh``)::

    python -m benchmarks.bench_quant --device cuda --dtype bf16 --only lorakit-fp32 lorakit-nf4 peft-nf4 floor-nf4

``--device cuda`` loads the model onto the GPU before quantizing, so ``quantize_base`` runs
bitsandbytes' CUDA kernels, the step's input lives there, the clock reads after a synchronise and
the peak is ``torch.cuda.max_memory_allocated`` over the timed steps (weights included; the host's
RSS is in the notes as ``life_mib``). ``--dtype bf16``: the float base (``lorakit-fp32``, the anchor
name kept) is bf16, the quantized layers get ``compute_dtype=torch.bfloat16`` (lorakit dequantizes
into bf16, bitsandbytes' ``matmul_4bit`` computes in bf16) and the forward runs under bf16 autocast;
LoRA adapters stay fp32. The ``-stream`` variants measure the host's peak RSS of the streamed load
and stay CPU-only.
"""

from __future__ import annotations

import argparse
import ctypes
import resource
from pathlib import Path

import torch

from benchmarks.harness import CACHE, Measured, amp, device_of, dtype_of, main, smollm2_dir, time_it, variants
from benchmarks.models import SMOL_TARGETS, load

R, ALPHA, DROPOUT, BATCH, SEQ = 16, 32, 0.05, 4, 128


def _reset_peak() -> bool:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _adapted_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(resident bytes of the adapted layers' base weights, the same weights in fp32)."""
    from lorakit.quant import weights as QW
    from lorakit.quant.planning import base_module

    got = fp32 = 0
    for name, m in model.named_modules():
        if not name.endswith(SMOL_TARGETS):
            continue
        base = base_module(getattr(m, "base_layer", m))
        if not hasattr(base, "in_features"):
            continue
        got += QW.weight_nbytes(base)
        fp32 += base.in_features * base.out_features * 4
    return got, fp32


def _streamed(quant: str, smoke: bool) -> torch.nn.Module:
    """What ``lorakit train --quantize`` loads: a meta-device skeleton quantized layer by layer from the
    safetensors copy (``lorakit.quant.streaming``); the float model is never resident."""
    from types import SimpleNamespace

    import lorakit
    from lorakit.train import meta_load
    from lorakit.train.models import ModelSource

    src = Path(smollm2_dir())
    if smoke:  # the 2-layer slice, saved once
        src = Path(CACHE / "smollm2-2layers")
        if not (src / "config.json").is_file():
            load("smollm2", True).save_pretrained(src)
    model = meta_load.skeleton(ModelSource(src), "generation", 2, SimpleNamespace(local_rank=0, rank=0))
    model.config.use_cache = False
    lorakit.quantize_base(model, quant, skip=("lm_head",))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _build(variant: str, args: argparse.Namespace) -> torch.nn.Module:
    import lorakit

    if variant.endswith("-nocompile"):  # counterfactual: bitsandbytes imported without its torch.compile
        from benchmarks.quant_import_cost import import_bnb_without_compile

        import_bnb_without_compile()
        variant = variant.removesuffix("-nocompile")
    dev, dt = device_of(args), dtype_of(args)
    if variant.endswith("-stream"):
        if dev.type != "cpu":
            raise SystemExit(f"{variant}: the streamed load measures the host's peak RSS; CPU only (--device cpu)")
        model = _streamed(variant.split("-")[1], args.smoke)
    else:
        model = load("smollm2", args.smoke, dev, dt)  # on a GPU quantize_base then runs bitsandbytes' CUDA kernels
    for p in model.parameters():
        p.requires_grad_(False)
        # own memory instead of views into the loader's mmap of the checkpoint: otherwise the pages that
        # quantization read stay resident (the map lives while any tensor, e.g. the embedding, uses it)
        p.data = p.data if variant.endswith("-stream") else p.data.clone()
    if variant.endswith(("nf4", "int8")):
        lorakit.quantize_base(model, "int8" if variant.endswith("int8") else "nf4", skip=("lm_head",),
                              compute_dtype=None if dt == torch.float32 else dt)
    if variant.startswith("lorakit"):
        lorakit.inject(model, lorakit.LoraConfig(r=R, alpha=ALPHA, dropout=DROPOUT, targets=list(SMOL_TARGETS)))
    elif variant.startswith("peft"):
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                                           target_modules=list(SMOL_TARGETS)))
    elif variant.startswith("floor"):
        model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    model.train()
    return model


def _step_run(args: argparse.Namespace, variant: str) -> Measured:
    model = _build(variant, args)
    batch, seq = (2, 16) if args.smoke else (args.batch or BATCH, SEQ)
    dev = device_of(args)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=dev)
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with amp(args):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for p in params:
            p.grad = None

    step()
    reset = _reset_peak()
    res = time_it(step, args.reps, args.warmup)
    got, fp32 = _adapted_bytes(model)
    res.extra = {"life_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                 "adapted_base_mib": round(got / 2**20, 1), "ratio": round(got / max(fp32, 1), 4),
                 "trainable": sum(p.numel() for p in params)}
    if dev.type == "cuda":  # time_it's peak: torch.cuda.max_memory_allocated over the timed steps
        res.extra["base"] = f"{args.dtype} on {dev}"
    elif reset:
        res.peak_mib = _hwm_mib()
    else:
        res.extra["peak"] = "lifetime (clear_refs unavailable)"
    return res


def _micro_run(args: argparse.Namespace, variant: str) -> Measured:
    """The base part alone: forward and input-gradient backward through a 1536×576 NF4 weight."""
    import bitsandbytes as bnb

    from lorakit.quant import quantize_base
    from lorakit.quant import weights as QW
    from lorakit.quant.autograd import quant_lora_linear

    dev, dt = device_of(args), dtype_of(args)
    out_f, in_f, n = (64, 32, 8) if args.smoke else (1536, 576, (args.batch or BATCH) * SEQ)
    lin = torch.nn.Linear(in_f, out_f, bias=False, device=dev, dtype=dt)
    q = quantize_base(torch.nn.Sequential(lin), "nf4", skip=())[0]  # dequantizes into dt
    x = torch.randn(n, in_f, device=dev, dtype=dt, requires_grad=True)
    g = torch.randn(n, out_f, device=dev, dtype=dt)
    qs = q.weight.quant_state

    def ours() -> None:
        y = quant_lora_linear(x, None, None, None, lambda dt: QW.dequantize(q, dt), None, 0.0, 0.0,
                              ((0, out_f),), 0)
        y.backward(g)
        x.grad = None

    def theirs() -> None:
        y = bnb.matmul_4bit(x, q.weight.t(), quant_state=qs)
        y.backward(g)
        x.grad = None

    fn = ours if variant == "micro-ours" else theirs
    for _ in range(3):
        fn()
    res = time_it(fn, max(args.reps, 20), args.warmup)
    w = QW.dequantize(q, dt)
    import time
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(20):
        QW.dequantize(q, dt)
    sync()
    res.extra = {"dequant_ms": round((time.perf_counter() - t0) / 20 * 1e3, 3), "shape": f"{out_f}x{in_f}",
                 "rows": n, "numel": w.numel()}
    return res


VARIANTS = {**variants(_step_run, ("lorakit-fp32", "lorakit-nf4", "peft-nf4", "floor-nf4", "lorakit-int8",
                                   "lorakit-nf4-stream", "peft-nf4-stream", "lorakit-nf4-nocompile")),
            **variants(_micro_run, ("micro-ours", "micro-bnb"))}

if __name__ == "__main__":
    main("benchmarks.bench_quant", "SmolLM2-135M 4×128 causal LM, LoRA r=16 α=32 p=0.05 all 7 linears, "
         "quantized base", VARIANTS, "lorakit-fp32")
