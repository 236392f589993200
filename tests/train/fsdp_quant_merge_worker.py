"""Run by test_fsdp_compose.py under torchrun: merge / unmerge / disable_adapters of LoRA on an NF4 base that
``fsdp.shard`` sharded, against the same model unsharded in one process (its quantized merge is the reference).

Writes ``<out>/rank<R>.json`` with the measured differences (the test asserts on them).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

CFG = {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "down_proj"]}


def tiny(inject: bool = True) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit
    from lorakit.train.models import quantize_for_training

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2))
    quantize_for_training(m, "nf4")
    if not inject:
        return m
    lorakit.inject(m, lorakit.LoraConfig(**CFG))
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(m):
            layer.lora_B.normal_(std=0.2)  # large enough that the merged weight requantizes to new codes
    return m


def main(out: Path) -> None:
    import lorakit
    from lorakit.quant import backend as QB
    from lorakit.train import fsdp

    torch.set_num_threads(1)
    seconds = int(os.environ.get("LORAKIT_DIST_TIMEOUT", 120))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=seconds))
    rank, world = dist.get_rank(), dist.get_world_size()
    ctx = SimpleNamespace(rank=rank, world_size=world, device=torch.device("cpu"), local_rank=rank)
    ref, model = tiny(), tiny()
    fsdp.shard(model, SimpleNamespace(fsdp_block=None, fsdp_offload=False), ctx)
    x = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))

    def logits(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m(input_ids=x).logits

    def snap(m: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for _, layer in lorakit.lora_layers(m):
            q = layer.quant_base
            w = q.weight.to_local() if type(q.weight).__name__ == "DTensor" else q.weight.data
            out.append((w.clone(), QB.quant_state(q).absmax.clone()))
        return out

    before, before_ref = snap(model), snap(ref)
    y0, y0_ref = logits(model), logits(ref)
    with lorakit.disable_adapters(model), lorakit.disable_adapters(ref):
        y_off, y_off_ref = logits(model), logits(ref)
    lorakit.merge(model)
    lorakit.merge(ref)  # the single-process quantized merge
    y_m, y_m_ref = logits(model), logits(ref)
    merged = snap(model)
    lorakit.unmerge(model)
    y_u = logits(model)
    after = snap(model)
    lorakit.merge(model, keep_original=False)  # no copy kept: unmerge requantizes W - s B A
    lorakit.unmerge(model)
    y_u2 = logits(model)
    lorakit.unmerge(ref)
    lorakit.merge(ref, keep_original=False)
    lorakit.unmerge(ref)
    y_u2_ref = logits(ref)
    res = {
        "forward": float((y0 - y0_ref).abs().max()),
        "disabled": float((y_off - y_off_ref).abs().max()),
        "disabled_changes": float((y_off - y0).abs().max()),
        "merged_vs_ref_merged": float((y_m - y_m_ref).abs().max()),
        "merge_moved_output": float((y_m - y0).abs().max()),
        "ref_merge_moved_output": float((y_m_ref - y0_ref).abs().max()),
        "merge_changed_bytes": sum(int((a[0] != b[0]).sum()) for a, b in zip(before, merged, strict=True)),
        "merge_changed_absmax": any(not torch.equal(a[1], b[1]) for a, b in zip(before, merged, strict=True)),
        "unmerge_bits": all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                            for a, b in zip(before, after, strict=True)),
        "unmerged_vs_start": float((y_u - y0).abs().max()),
        "requant_unmerge_vs_start": float((y_u2 - y0).abs().max()),
        "requant_unmerge_vs_ref": float((y_u2 - y_u2_ref).abs().max()),
        "local_rows_of_ref": all(torch.equal(a[0], b[0][rank * -(-b[0].shape[0] // world):][:a[0].shape[0]])
                                 for a, b in zip(before, before_ref, strict=True)),  # FSDP2's dim-0 chunks
    }
    res.update(late(x))
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def late(x: torch.Tensor) -> dict[str, float]:
    """LoRA injected *after* fully_shard on the NF4 base (lorakit.sharded_inject), given an unsharded copy's
    factors: forward and merge as that copy."""
    from torch.distributed.fsdp import fully_shard

    import lorakit
    from lorakit.train import fsdp
    from lorakit.train.fsdp_alias import visible_bases

    ref, model = tiny(), tiny(inject=False)
    with visible_bases(model):
        for block in fsdp.find_blocks(model):
            fully_shard(block)
        fully_shard(model)
    lorakit.inject(model, lorakit.LoraConfig(**CFG))
    with torch.no_grad():
        for (_, a), (_, b) in zip(lorakit.lora_layers(model), lorakit.lora_layers(ref), strict=True):
            a.lora_A.copy_(b.lora_A)
            a.lora_B.copy_(b.lora_B)
        res = {"late_forward": float((model(input_ids=x).logits - ref(input_ids=x).logits).abs().max())}
        lorakit.merge(model)
        lorakit.merge(ref)
        res["late_merged"] = float((model(input_ids=x).logits - ref(input_ids=x).logits).abs().max())
        res["late_layers"] = sum(1 for _ in lorakit.lora_layers(model))
    return res


if __name__ == "__main__":
    main(Path(sys.argv[1]))
