"""FSDP2 vs DDP for LoRA training on CPU (gloo) or GPU (NCCL): per-rank base bytes, memory and step time.

Run under torchrun; every variant is measured in the same processes, one after the other, so the
ratios come from one run::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/bench_fsdp.py --model smollm2 --steps 6

Variants: ``ddp`` (the base replicated), ``fsdp`` (``lorakit.train.fsdp.shard``: base and LoRA sharded per
block) and ``fsdp-replicated`` (base sharded, LoRA kept whole on every rank via ``ignored_params``,
its gradients averaged by one flat all-reduce at the end of each backward). The model is
randomly initialised from the named shape (SmolLM2-135M's config by default), LoRA r=8 on q/v.

GPU form (issue 18; ``benchmarks/run_gpu.sh``), one process per GPU::

    torchrun --standalone --nproc_per_node 1 -m benchmarks.bench_fsdp --device cuda --batch 8 --seq 256

``--device cuda``: each rank uses ``cuda:LOCAL_RANK`` (``torch.cuda.set_device``), the process group
is NCCL, the model is moved to the GPU before wrapping (as ``lorakit train`` does; a ``--load``
skeleton is materialised there by ``fsdp.shard``), the clock reads after a synchronise, and each
rank's ``torch.cuda.max_memory_allocated`` over the variant (reset before it is built) is tabled.
``--dtype bf16`` runs the forward under bf16 autocast (all variants alike; weights stay fp32).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

SHAPES = {
    # SmolLM2-135M (HuggingFaceTB/SmolLM2-135M config.json)
    "smollm2": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
}


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build(shape: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, targets=["q_proj", "v_proj"]))
    return model


def local_bytes(model: nn.Module, trainable: bool) -> int:
    from torch.distributed.tensor import DTensor

    seen, total = set(), 0
    for p in model.parameters():
        if p.requires_grad != trainable or id(p) in seen:
            continue
        seen.add(id(p))
        t = p.to_local() if isinstance(p, DTensor) else p
        total += t.numel() * t.element_size()
    return total


def resident_base_bytes(model: nn.Module) -> int:
    """Bytes of the frozen base this rank keeps alive, by distinct storage: the registered frozen parameters
    (local shards), the base modules LoRA layers keep as ``_lora_original`` (their Parameters, which sharding
    must not leave whole) and bitsandbytes quantization states (absmax, code, nested state)."""
    from torch.distributed.tensor import DTensor

    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor) and not t.is_meta:
            t = t._local_tensor if isinstance(t, DTensor) else t
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for p in model.parameters():
        if not p.requires_grad:
            add(p)
    for m in model.modules():
        for mod in (m, *(m.__dict__.get("_lora_original") or ())):
            for p in mod.parameters(recurse=False):
                if not p.requires_grad:
                    add(p)
            for qs in (getattr(mod, "quant_state", None), getattr(getattr(mod, "weight", None), "quant_state", None)):
                for st in (qs, getattr(qs, "state2", None)):
                    for name in ("absmax", "code"):
                        add(getattr(st, name, None))
    return sum(seen.values())


def wrap(model: nn.Module, variant: str, ctx: Any) -> Any:
    from lorakit.train import fsdp

    if variant == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    cfg = SimpleNamespace(fsdp_block=None, fsdp_offload=False)
    return fsdp.shard(model, cfg, ctx, lora="replicated" if variant == "fsdp-replicated" else "sharded")


def load_like_trainer(preset: str, variant: str, ctx: Any, quantize: str | None = None) -> tuple[nn.Module, int]:
    """``preset``'s real weights loaded as ``lorakit train`` does: the full model on every rank (ddp) or
    the meta-device skeleton whose shards each rank reads after ``fully_shard`` (fsdp variants); LoRA r=8 q/v
    on an sst2-style classifier. Returns the model and the full base's bytes."""
    from lorakit.train import meta_load
    from lorakit.train.methods import apply_method
    from lorakit.train.models import load_model, resolve

    torch.manual_seed(0)
    src = resolve(preset)
    if variant == "ddp" and not quantize:
        model = load_model(src, "classification", 2)
    else:  # --quantize streams from the skeleton; under --fsdp the float rest waits on meta for its shards
        model = meta_load.skeleton(src, "classification", 2, ctx)
        if quantize and variant != "ddp":
            meta_load.defer_rest(model)
    if quantize:
        from lorakit.train.models import quantize_for_training

        quantize_for_training(model, quantize)
    apply_method(model, "lora", r=8, alpha=16, targets=["q_proj", "v_proj"])
    # not allocated yet (skeleton): the bytes the file's tensors will take
    pending = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad and p.is_meta)
    return model, resident_base_bytes(model) + pending


def measure(variant: str, args: argparse.Namespace, ctx: Any) -> dict[str, Any]:
    cuda = ctx.device.type == "cuda"
    if cuda:  # this variant's peak: reset once the previous one is gone
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)
    if args.load:
        model, full_base = load_like_trainer(args.load, variant, ctx, args.quantize)
    else:
        model = build(args.model)
        if args.quantize:
            from lorakit.train.models import quantize_for_training

            quantize_for_training(model, args.quantize)
        full_base = resident_base_bytes(model)
    rss_loaded = rss_mb()
    if cuda and not any(p.is_meta for p in model.parameters()):  # a skeleton is materialised by fsdp.shard
        model.to(ctx.device)
    wrapped = wrap(model, variant, ctx)
    gc.collect()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(ctx.rank)
    vocab = SHAPES[args.model]["vocab_size"]
    times = []
    for step in range(args.steps + 1):
        x = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(ctx.device)
        labels = torch.randint(0, 2, (args.batch,), generator=g).to(ctx.device) if args.load else x
        if cuda:
            torch.cuda.synchronize(ctx.device)
        t0 = time.perf_counter()
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss = wrapped(input_ids=x, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(ctx.device)
        dist.barrier()
        if step:  # the first step warms up
            times.append(time.perf_counter() - t0)
    out = {
        "variant": variant,
        "base_bytes_full": full_base,
        "base_bytes_rank": resident_base_bytes(model),
        "lora_bytes_rank": local_bytes(model, trainable=True),
        "rss_mb_loaded": rss_loaded,  # after loading (and LoRA), before sharding
        "rss_mb_after": rss_mb(),
        "step_s": statistics.median(times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # this process so far
    }
    if cuda:  # weights, optimizer state, activations: this variant from its build on
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**20
    del wrapped, model, opt, params
    gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--variants", nargs="+", default=["ddp", "fsdp", "fsdp-replicated"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--quantize", choices=["nf4", "fp4", "int8"], default=None,
                    help="quantize the base first (bitsandbytes), as `lorakit train --quantize` does")
    ap.add_argument("--device", default="cpu", help="cpu (gloo), or cuda: cuda:LOCAL_RANK on each rank, NCCL")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: the forward under bf16 autocast (weights and LoRA stay fp32)")
    ap.add_argument("--json", default=None, help="rank 0 also writes the rows here")
    ap.add_argument("--load", default=None, help="a preset (smollm2) loaded as `lorakit train` loads it: full "
                    "model per rank for ddp (streamed quantize with --quantize), meta-device skeleton + per-rank "
                    "shards for fsdp; one variant per launch, so that each rank's peak RSS is that variant's")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file by torchrun, too
    from benchmarks.harness import device_of

    device = device_of(args)  # a clear stop when --device cuda has no GPU, before the process group
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=300))
    ctx = SimpleNamespace(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device,
                          local_rank=local_rank)
    rows = [measure(v, args, ctx) for v in args.variants]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    every = [None] * ctx.world_size
    dist.all_gather_object(every, rows)
    if ctx.rank == 0:
        gpu = (f" device={torch.cuda.get_device_name(ctx.device)} backend={dist.get_backend()}"
               if ctx.device.type == "cuda" else f" backend={dist.get_backend()}")
        print(f"world={ctx.world_size} model={args.model} batch/rank={args.batch} seq={args.seq} "
              f"dtype={args.dtype}{gpu} peak_rss_mb={peak:.0f}")
        cuda = ctx.device.type == "cuda"
        print("variant          base MiB/rank  of full  lora KiB/rank  rss MiB after  step s (slowest rank)  x first"
              + ("  max_memory_allocated MiB (largest rank)" if cuda else ""))
        anchor = max(rk[0]["step_s"] for rk in every)
        for i, r in enumerate(rows):
            step = max(rk[i]["step_s"] for rk in every)
            print(f"{r['variant']:<16} {r['base_bytes_rank'] / 2**20:13.1f}  "
                  f"{r['base_bytes_rank'] / r['base_bytes_full']:7.3f}  {r['lora_bytes_rank'] / 1024:13.1f}  "
                  f"{r['rss_mb_after']:13.0f}  {step:21.3f}  {step / anchor:7.3f}"
                  + (f"  {max(rk[i]['cuda_peak_mib'] for rk in every):39.0f}" if cuda else ""))
        for i, r in enumerate(rows):
            print(f"{r['variant']}: per rank peak RSS MiB " + ", ".join(f"{rk[i]['peak_rss_mb']:.0f}" for rk in every)
                  + "; RSS after load MiB " + ", ".join(f"{rk[i]['rss_mb_loaded']:.0f}" for rk in every)
                  + "; base MiB/rank " + ", ".join(f"{rk[i]['base_bytes_rank'] / 2**20:.1f}" for rk in every)
                  + ("; max_memory_allocated MiB per rank " + ", ".join(f"{rk[i]['cuda_peak_mib']:.0f}" for rk in every)
                     if "cuda_peak_mib" in r else ""))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"world": ctx.world_size, "ranks": every}, fh, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
