"""Run by test_fsdp_late.py under torchrun: ``lorakit.inject`` *after* ``fully_shard`` vs inject before it
vs one unsharded process holding the whole batch.

Writes ``<out>/rank<R>.json`` with the measured differences (the test asserts on them).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

STEPS = 2


def tiny() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2))


def shard(model: torch.nn.Module, ignored: set | None = None) -> None:
    from torch.distributed.fsdp import fully_shard

    from lorakit.train import fsdp
    from lorakit.train.fsdp_alias import visible_bases

    with visible_bases(model):
        for block in fsdp.find_blocks(model):
            fully_shard(block, ignored_params=ignored)
        fully_shard(model, ignored_params=ignored)


def train(model: torch.nn.Module, rank: int, world: int, sharded: bool) -> list[float]:
    """STEPS SGD steps; a sharded model sees its rank's half of the batch (mean loss over ranks returned)."""
    from lorakit.train import fsdp

    params = [p for p in model.parameters() if p.requires_grad]
    call = fsdp.Sharded(model, params) if sharded else model
    opt = torch.optim.SGD(params, lr=2.0)
    losses = []
    for step in range(STEPS):
        batch = torch.randint(0, 64, (2 * world, 6), generator=torch.Generator().manual_seed(step))
        x = batch[rank * 2:(rank + 1) * 2] if sharded else batch
        loss = call(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        if sharded:
            dist.all_reduce(mean)
            mean /= world
        losses.append(float(mean))
    return losses


def main(out: Path) -> None:
    from safetensors.torch import load_file

    import lorakit
    from lorakit.train import fsdp

    torch.set_num_threads(1)
    seconds = int(os.environ.get("LORAKIT_DIST_TIMEOUT", 120))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=seconds))
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    base, ref, early, late = tiny(), tiny(), tiny(), tiny()
    x = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(9))
    torch.manual_seed(1)
    lorakit.inject(ref, cfg)
    torch.manual_seed(1)
    lorakit.inject(early, cfg)
    shard(early, {p for p in early.parameters() if p.requires_grad})  # replicated, as fsdp.shard's default
    shard(late)
    w_shard = late.model.layers[0].self_attn.q_proj.weight.to_local().clone()
    with torch.no_grad():  # a forward first: the root unit's parameters stay unsharded after it
        late(input_ids=x)
    torch.manual_seed(1 + rank)  # a different RNG state on each rank: inject broadcasts rank 0's factors
    lorakit.inject(late, cfg)

    def logits(m: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return m(input_ids=x).logits

    res: dict[str, float | bool | str] = {
        "late_layers": sum(1 for _ in lorakit.lora_layers(late)),
        "init_A": max(float((a.lora_A.detach() - b.lora_A.detach()).abs().max())
                      for (_, a), (_, b) in zip(lorakit.lora_layers(late), lorakit.lora_layers(ref), strict=True)),
        "trainable_same": sorted(n for n, p in late.named_parameters() if p.requires_grad)
        == sorted(n for n, p in ref.named_parameters() if p.requires_grad),
    }
    res["loss_ref"] = train(ref, rank, world, sharded=False)
    res["loss_early"] = train(early, rank, world, sharded=True)
    res["loss_late"] = train(late, rank, world, sharded=True)
    q = late.model.layers[0].self_attn.q_proj
    res["base_untouched"] = bool(torch.equal(q.weight.to_local(), w_shard))
    res["forward_late_ref"] = float((logits(late) - logits(ref)).abs().max())
    res["forward_late_early"] = float((logits(late) - logits(early)).abs().max())
    with lorakit.disable_adapters(late):
        res["disabled_vs_base"] = float((logits(late) - logits(base)).abs().max())
    res["trained_vs_base"] = float((logits(late) - logits(base)).abs().max())
    lorakit.merge(late)
    res["merge_changed_weight"] = bool((q.weight.to_local() != w_shard).any())
    res["merged_vs_ref"] = float((logits(late) - logits(ref)).abs().max())
    lorakit.unmerge(late)
    res["unmerge_bits"] = bool(torch.equal(q.weight.to_local(), w_shard))
    res["unmerged_vs_ref"] = float((logits(late) - logits(ref)).abs().max())

    fsdp.save_adapter(late, out / "late")
    if rank == 0:
        lorakit.save_adapter(ref, out / "ref")
    dist.barrier()
    a = load_file(str(out / "late/adapter_model.safetensors"))
    b = load_file(str(out / "ref/adapter_model.safetensors"))
    res["saved_keys"] = sorted(a) == sorted(b) and len(a) == 12
    res["saved"] = max(float((a[k] - b[k]).abs().max()) for k in a)

    bad = tiny()  # what still cannot work after sharding: refused by name, model unchanged
    shard(bad)
    before = [type(m).__name__ for m in bad.modules()]
    try:
        lorakit.inject(bad, lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj"], use_dora=True))
        res["dora_late"] = "no error"
    except lorakit.errors.UnsupportedModuleError as exc:
        res["dora_late"] = str(exc)
    res["dora_unchanged"] = before == [type(m).__name__ for m in bad.modules()]
    res["dora_forward"] = float((logits(bad) - logits(base)).abs().max())
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
