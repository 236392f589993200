"""Run by test_fsdp_compose.py under torchrun: ``fsdp.shard`` of a LoRA model on an NF4 (bitsandbytes) base
and on a float base, against an unsharded copy in the same process.

Writes ``<out>/rank<R>.json``: per base kind, the resident base bytes (distinct storages of the frozen
parameters, of the base modules the LoRA layers keep, and of the quantization states) as a fraction of the
unsharded copy's, whether those base modules still hold a whole weight, and the forward / gradient
differences of one training step.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist


def tiny(quantize: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit
    from lorakit.train.models import quantize_for_training

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2))
    if quantize:
        quantize_for_training(m, "nf4")
    lorakit.inject(m, lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(m):
            layer.lora_B.fill_(0.01)
    return m


def resident(model: torch.nn.Module) -> int:
    from torch.distributed.tensor import DTensor

    seen: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor):
            t = t._local_tensor if isinstance(t, DTensor) else t
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for m in model.modules():
        for mod in (m, *(m.__dict__.get("_lora_original") or ())):
            for p in mod.parameters(recurse=False):
                if not p.requires_grad:
                    add(p)
            qs = getattr(mod, "quant_state", None) or getattr(getattr(mod, "weight", None), "quant_state", None)
            for st in (qs, getattr(qs, "state2", None)):
                add(getattr(st, "absmax", None))
    return sum(seen.values())


def main(out: Path) -> None:
    import lorakit
    from lorakit.train import fsdp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    ctx = SimpleNamespace(rank=rank, world_size=world, device=torch.device("cpu"), local_rank=rank)
    res: dict[str, dict[str, float | bool]] = {}
    for kind in ("nf4", "float"):
        ref, model = tiny(kind == "nf4"), tiny(kind == "nf4")
        full = resident(model)
        sharded = fsdp.shard(model, SimpleNamespace(fsdp_block=None, fsdp_offload=False), ctx)
        bases = [layer._lora_original[0] for _, layer in lorakit.lora_layers(model)]
        r: dict[str, float | bool] = {
            "resident_of_full": resident(model) / full,
            "bases_whole": any(not isinstance(b.weight, torch.distributed.tensor.DTensor) for b in bases),
        }
        g = torch.Generator().manual_seed(1)
        batch = torch.randint(0, 128, (2 * world, 7), generator=g)
        mine = batch[2 * rank:2 * rank + 2]
        loss = sharded(input_ids=mine, labels=mine).loss
        loss.backward()
        loss_ref = ref(input_ids=batch, labels=batch).loss
        loss_ref.backward()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        r["loss_rel"] = abs(float(mean) / world - float(loss_ref)) / float(loss_ref)
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        r["grad"] = max(float((grads[n] - p.grad).abs().max()) for n, p in ref.named_parameters() if p.requires_grad)
        r["grad_scale"] = max(float(p.grad.abs().max()) for p in ref.parameters() if p.requires_grad)
        res[kind] = r
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
