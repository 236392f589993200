"""Run by test_fsdp.py under torchrun: the library API on an FSDP2-sharded model vs an unsharded copy.

Writes ``<out>/rank<R>.json`` with the measured differences (the test asserts on them).
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def tiny() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2))


def main(out: Path) -> None:
    from safetensors.torch import load_file
    from torch.distributed.fsdp import fully_shard

    import lorakit
    from lorakit.train import fsdp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    cfg = lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"])
    base, ref, model = tiny(), tiny(), tiny()
    lorakit.inject(ref, cfg)
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(ref):
            layer.lora_B.normal_()
    lorakit.inject(model, cfg)
    model.load_state_dict(ref.state_dict())
    for block in fsdp.find_blocks(model):
        fully_shard(block)
    fully_shard(model)
    x = torch.randint(0, 64, (2, 5))

    def diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
        with torch.no_grad():
            return float((a(input_ids=x).logits - b(input_ids=x).logits).abs().max())

    res: dict[str, float | bool] = {"forward": diff(model, ref)}
    with lorakit.disable_adapters(model):
        res["disabled_vs_base"] = diff(model, base)
    q = model.model.layers[0].self_attn.q_proj
    w0 = q.weight.to_local().clone()
    lorakit.merge(model)
    res["merged"] = diff(model, ref)
    res["merge_changed_weight"] = bool((q.weight.to_local() != w0).any())
    lorakit.unmerge(model)
    res["unmerged"] = diff(model, ref)
    res["unmerge_bits"] = bool(torch.equal(q.weight.to_local(), w0))

    fsdp.save_adapter(model, out / "sharded")
    if rank == 0:
        lorakit.save_adapter(ref, out / "plain")
    dist.barrier()
    a = load_file(str(out / "sharded/adapter_model.safetensors"))
    b = load_file(str(out / "plain/adapter_model.safetensors"))
    res["saved_same_keys"] = sorted(a) == sorted(b)
    res["saved"] = max(float((a[k] - b[k]).abs().max()) for k in a)

    with torch.no_grad():  # a different adapter, loaded into the sharded model's existing one
        for _, layer in lorakit.lora_layers(ref):
            layer.lora_A.mul_(-0.5)
    if rank == 0:
        lorakit.save_adapter(ref, out / "other")
    dist.barrier()
    fsdp.load_adapter(model, out / "other")
    res["loaded"] = diff(model, ref)

    late = tiny()  # inject after fully_shard: refused by name before anything changes
    for block in fsdp.find_blocks(late):
        fully_shard(block)
    fully_shard(late)
    before = [type(m).__name__ for m in late.modules()]
    try:
        lorakit.inject(late, cfg)
        res["late_inject"] = "no error"
    except lorakit.errors.UnsupportedModuleError as exc:
        res["late_inject"] = str(exc)
    res["late_unchanged"] = before == [type(m).__name__ for m in late.modules()]
    res["late_forward"] = diff(late, base)
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
