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

    res.update(named(out, rank, x))
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def named(out: Path, rank: int, x: torch.Tensor) -> dict[str, float | bool | str]:
    """Two adapters sharded with ``ignored_params=adapter_params``: switching, training the second one
    (each rank half the batch vs the whole batch in one unsharded copy), saving it by name; then the same
    model sharded without ``ignored_params``, which must be refused."""
    from safetensors.torch import load_file
    from torch.distributed.fsdp import fully_shard

    import lorakit
    from lorakit.train import fsdp

    def two() -> torch.nn.Module:
        m = tiny()
        lorakit.inject(m, lorakit.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
        lorakit.add_adapter(m, "b", lorakit.LoraConfig(r=2, alpha=4, targets=["q_proj", "k_proj"]))
        return m

    ref, model, plain = two(), two(), two()
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n or "lora_named_B" in n:
                p.normal_()
    model.load_state_dict(ref.state_dict())
    keep = fsdp.adapter_params(model)
    for block in fsdp.find_blocks(model):
        fully_shard(block, ignored_params=keep)
    fully_shard(model, ignored_params=keep)
    res: dict[str, float | bool | str] = {"named_forward": 0.0}
    with torch.no_grad():
        for name in ("b", "default", "b"):
            lorakit.set_adapter(model, name)
            lorakit.set_adapter(ref, name)
            d = float((model(input_ids=x).logits - ref(input_ids=x).logits).abs().max())
            res["named_forward"] = max(float(res["named_forward"]), d)
    before = {n: p.detach().clone() for n, p in ref.named_parameters() if "lora_named" in n}
    sharded = fsdp.Sharded(model, [p for p in model.parameters() if p in keep])
    opt_m = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    opt_r = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.5)
    world = dist.get_world_size()
    losses: list[tuple[float, float]] = []
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        batch = torch.randint(0, 64, (2 * world, 6), generator=g)
        mine = batch[rank * 2:(rank + 1) * 2]
        loss_m = sharded(input_ids=mine, labels=mine).loss
        loss_m.backward()
        loss_r = ref(input_ids=batch, labels=batch).loss
        loss_r.backward()
        for opt in (opt_m, opt_r):
            opt.step()
            opt.zero_grad()
        mean = loss_m.detach().clone()
        dist.all_reduce(mean)
        losses.append((float(mean) / world, float(loss_r)))
    res["named_loss_rel"] = max(abs(a - b) / abs(b) for a, b in losses)
    fsdp.save_adapter(model, out / "named_sharded", name="b")
    if rank == 0:
        lorakit.save_adapter(ref, out / "named_plain", name="b")
    dist.barrier()
    a = load_file(str(out / "named_sharded/adapter_model.safetensors"))
    b = load_file(str(out / "named_plain/adapter_model.safetensors"))
    res["named_saved_keys"] = sorted(a) == sorted(b) and len(a) == 8
    res["named_saved"] = max(float((a[k] - b[k]).abs().max()) for k in a)
    res["named_trained"] = min(float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters()
                               if "lora_named" in n)  # every tensor of "b" moved

    for block in fsdp.find_blocks(plain):  # no ignored_params: the adapters' Parameters get swapped
        fully_shard(block)
    fully_shard(plain)
    try:
        fsdp.save_adapter(plain, out / "never", name="b")
        res["named_unignored"] = "no error"
    except lorakit.errors.UnsupportedModuleError as exc:
        res["named_unignored"] = str(exc)
    res["named_unignored_wrote"] = (out / "never").exists()
    return res


if __name__ == "__main__":
    main(Path(sys.argv[1]))
