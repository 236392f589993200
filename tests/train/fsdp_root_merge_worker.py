"""Run by test_fsdp_late.py under torchrun: ``lorakit.merge`` / ``unmerge`` on LoRA layers of FSDP2's *root*
unit after a forward under ``no_grad`` (which leaves the root's parameters unsharded) vs one unsharded process.

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


def tiny() -> torch.nn.Module:
    import lorakit

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    torch.manual_seed(1)
    lorakit.inject(m, lorakit.LoraConfig(r=2, alpha=4, targets=["0", "2"]))
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(m):
            layer.lora_B.normal_()  # a merge that moves the weights
    return m


def main(out: Path) -> None:
    from torch.distributed.fsdp import fully_shard

    import lorakit
    from lorakit.train.fsdp_alias import visible_bases

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=int(os.environ.get("LORAKIT_DIST_TIMEOUT", 60))))
    rank = dist.get_rank()
    ref, m = tiny(), tiny()
    with visible_bases(m):  # one unit, the root: every base weight in it
        fully_shard(m, ignored_params={p for p in m.parameters() if p.requires_grad})
    params = m._get_fsdp_state()._fsdp_param_groups[0].fsdp_params  # type: ignore[operator]
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    shards = [fp.sharded_param.to_local().clone() for fp in params]

    def fwd(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    res: dict[str, float | bool | list[str]] = {}
    fwd(m)
    res["state_before_merge"] = [fp.sharded_state.name for fp in params]
    lorakit.merge(m)
    lorakit.merge(ref)
    res["merge_wrote_shards"] = all(not torch.equal(fp.sharded_param.to_local(), s)
                                    for fp, s in zip(params, shards, strict=True) if fp.sharded_param.dim() == 2)
    res["merged_fwd"] = float((fwd(m) - fwd(ref)).abs().max())
    m.reshard()  # what any later reshard does: the merge must live in the shards
    full = m[0].weight.full_tensor()  # lorakit's Linear: the weight is its own (a DTensor, sharded)
    res["merged_weight"] = float((full - ref[0].weight).abs().max())
    res["merged_after_reshard"] = float((fwd(m) - fwd(ref)).abs().max())
    with lorakit.disable_adapters(m), lorakit.disable_adapters(ref):  # root gathered again: unmerge, re-merge
        res["disabled"] = float((fwd(m) - fwd(ref)).abs().max())
    m.reshard()
    res["remerged_after_reshard"] = float((fwd(m) - fwd(ref)).abs().max())
    fwd(m)  # unsharded again before unmerge
    lorakit.unmerge(m)
    lorakit.unmerge(ref)
    m.reshard()
    res["unmerge_bits"] = all(torch.equal(fp.sharded_param.to_local(), s) for fp, s in zip(params, shards, strict=True))
    res["unmerged_after_reshard"] = float((fwd(m) - fwd(ref)).abs().max())
    fwd(m)
    lorakit.merge(m, keep_original=False)
    lorakit.merge(ref, keep_original=False)
    fwd(m)
    lorakit.unmerge(m)  # W - s B A, recomputed from the shards
    lorakit.unmerge(ref)
    m.reshard()
    res["recomputed_unmerged"] = float((fwd(m) - fwd(ref)).abs().max())
    res.update(failed_broadcast(x))
    res.update(reinject(x))
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def failed_broadcast(x: torch.Tensor) -> dict[str, bool | str]:
    """inject after fully_shard whose broadcast of rank 0's factors fails (as a timed-out collective would):
    the model is left as it was (module types, FSDP2's records, no LoRA state); a later inject works."""
    from torch.distributed.fsdp import fully_shard

    import lorakit

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    fully_shard(m)
    with torch.no_grad():
        y0 = m(x)
    m.reshard()  # the root stays unsharded after a forward; inject refuses that state (tested elsewhere)
    records = [fp._module_info.module for fp in m._get_fsdp_state()._fsdp_param_groups[0].fsdp_params]  # type: ignore[operator]
    types = [type(mod).__name__ for mod in m.modules()]
    cfg = lorakit.LoraConfig(r=2, alpha=4, targets=["0", "2"])
    real = dist.broadcast

    def timed_out(*_: object, **__: object) -> None:
        raise RuntimeError("Timed out waiting 60000ms for recv operation to complete")

    dist.broadcast = timed_out  # type: ignore[assignment]
    try:
        lorakit.inject(m, cfg)
        error = "no error"
    except RuntimeError as exc:
        error = str(exc)
    finally:
        dist.broadcast = real
    after = [fp._module_info.module for fp in m._get_fsdp_state()._fsdp_param_groups[0].fsdp_params]  # type: ignore[operator]
    res: dict[str, bool | str] = {
        "failed_error": error,
        "failed_unchanged": types == [type(mod).__name__ for mod in m.modules()]
        and all(a is b for a, b in zip(records, after, strict=True))
        and not hasattr(m, "_lorakit_configs") and not hasattr(m, "_lorakit_requires_grad"),
        "failed_forward": bool(torch.equal(m(x).detach(), y0)),
    }
    m.reshard()
    lorakit.inject(m, cfg)
    res["retry_layers"] = sum(1 for _ in lorakit.lora_layers(m)) == 2
    res["retry_forward"] = bool(torch.equal(m(x).detach(), y0))  # B = 0: the base output
    return res


def reinject(x: torch.Tensor) -> dict[str, float | str]:
    """inject after fully_shard, unwrap, inject again (the base is then one of FSDP2's shared modules): it
    works and forwards as an unsharded model with the same factors."""
    from torch.distributed.fsdp import fully_shard

    import lorakit

    ref = tiny()
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    fully_shard(m)
    cfg = lorakit.LoraConfig(r=2, alpha=4, targets=["0", "2"])
    lorakit.inject(m, cfg)
    lorakit.unwrap(m)
    try:
        lorakit.inject(m, cfg)
    except lorakit.errors.UnsupportedModuleError as exc:
        return {"reinject": str(exc)}
    with torch.no_grad():
        for (_, a), (_, b) in zip(lorakit.lora_layers(m), lorakit.lora_layers(ref), strict=True):
            a.lora_A.copy_(b.lora_A)
            a.lora_B.copy_(b.lora_B)
        return {"reinject": "ok", "reinject_vs_ref": float((m(x) - ref(x)).abs().max())}


if __name__ == "__main__":
    main(Path(sys.argv[1]))
