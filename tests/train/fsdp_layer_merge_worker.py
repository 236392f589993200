"""Run by test_fsdp_late.py under torchrun: the paths that write a base weight *without* going through
``lorakit.merge`` (a direct ``layer.merge()`` / ``layer.unmerge()``, ``load_adapter`` into a merged model,
a mixed-adapter batch re-merging on exit, ``target_parameters``' LoraParameter) on LoRA layers of FSDP2's
root unit after a forward under ``no_grad`` (the root then holds the gathered copy) vs the same calls on one
unsharded process.

Each case ends with ``model.reshard()`` (what any later reshard does) and compares the outputs: a write that
went into the gathered copy is lost there. Writes ``<out>/rank<R>.json`` (the test asserts on it).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from fsdp_root_merge_worker import tiny  # noqa: E402  (the same model and factors)


def tiny_params() -> torch.nn.Module:
    """``target_parameters`` (a LoraParameter on the first Linear's bare weight), factors that move it."""
    import lorakit

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    torch.manual_seed(1)
    lorakit.inject(m, lorakit.LoraConfig(r=2, alpha=4, target_parameters=["0.weight"]))
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(m):
            layer.lora_B.normal_()
    return m


def sharded(build: object = tiny) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    from lorakit.train.fsdp_alias import visible_bases

    m = build()  # type: ignore[operator]
    with visible_bases(m):  # one unit, the root: every base weight in it
        fully_shard(m, ignored_params={p for p in m.parameters() if p.requires_grad})
    return m


def main(out: Path) -> None:
    import lorakit

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=int(os.environ.get("LORAKIT_DIST_TIMEOUT", 60))))
    rank = dist.get_rank()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))

    def fwd(model: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    def states(model: torch.nn.Module) -> list[str]:
        return [fp.sharded_state.name for fp in model._get_fsdp_state()._fsdp_param_groups[0].fsdp_params]

    def diff(m: torch.nn.Module, ref: torch.nn.Module) -> float:
        m.reshard()
        return float((fwd(m) - fwd(ref)).abs().max())

    res: dict[str, object] = {}

    def case(name: str, fn: object) -> None:
        try:
            res.update(fn())  # type: ignore[operator]
        except RuntimeError as exc:  # e.g. torch's "mixed torch.Tensor and DTensor" on a lost merge's W0 copy
            res[name] = f"error: {str(exc).splitlines()[0][:200]}"

    def layer_level() -> dict[str, object]:
        ref, m = tiny(), sharded()
        fwd(m)
        r: dict[str, object] = {"state_before": states(m)}
        for model in (m, ref):  # the layer-level API, no lorakit.merge around it
            for _, layer in lorakit.lora_layers(model):
                layer.merge()
        r["layer_merge"] = diff(m, ref)
        r["layer_merge_vs_base"] = float((fwd(m) - fwd(base())).abs().max())
        fwd(m)
        for model in (m, ref):
            for _, layer in lorakit.lora_layers(model):
                layer.unmerge()
        r["layer_unmerge"] = diff(m, ref)
        return r

    def load_into_merged() -> dict[str, object]:  # each layer unmerges, takes the file's factors, re-merges
        ref, m, other = tiny(), sharded(), tiny()
        with torch.no_grad():
            for _, layer in lorakit.lora_layers(other):
                layer.lora_B.mul_(-2.0)
        if rank == 0:
            lorakit.save_adapter(other, out / "other")
        dist.barrier()
        lorakit.merge(m)
        lorakit.merge(ref)
        fwd(m)
        for model in (m, ref):
            lorakit.load_adapter(model, out / "other")
        return {"load_into_merged": diff(m, ref),
                "load_vs_other": float((fwd(m) - fwd(lorakit.merge(other))).abs().max())}

    def mixed_batch() -> dict[str, object]:  # a merged model: unmerged on entry, re-merged on exit
        ref, m = tiny(), sharded()
        for model in (m, ref):
            lorakit.add_adapter(model, "b", lorakit.LoraConfig(r=2, alpha=4, targets=["0", "2"]))
            lorakit.merge(model)
        fwd(m)
        rows = ["default", "b", "base"]
        with lorakit.batch_adapters(m, rows), lorakit.batch_adapters(ref, rows):
            r: dict[str, object] = {"mixed_rows": float((fwd(m) - fwd(ref)).abs().max())}
        r["mixed_exit_remerged"] = diff(m, ref)
        return r

    def param_targets() -> dict[str, object]:  # LoraParameter.merge; load_adapter's param_targets.copy_loaded
        ref, m, other = tiny_params(), sharded(tiny_params), tiny_params()
        fwd(m)
        for model in (m, ref):
            for _, layer in lorakit.lora_layers(model):
                layer.merge()
        r: dict[str, object] = {"param_merge": diff(m, ref)}
        with torch.no_grad():
            for _, layer in lorakit.lora_layers(other):
                layer.lora_B.mul_(-2.0)
        if rank == 0:
            lorakit.save_adapter(other, out / "other_params")
        dist.barrier()
        fwd(m)
        for model in (m, ref):
            lorakit.load_adapter(model, out / "other_params")
        r["param_load_into_merged"] = diff(m, ref)
        r["param_load_vs_other"] = float((fwd(m) - fwd(lorakit.merge(other))).abs().max())
        return r

    case("layer_merge", layer_level)
    case("param_merge", param_targets)
    case("load_into_merged", load_into_merged)
    case("mixed_exit_remerged", mixed_batch)
    (out / f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def base() -> torch.nn.Module:
    """The base alone (LoRA removed): a merge that was lost leaves the output equal to it."""
    import lorakit

    m = tiny()
    lorakit.unwrap(m)
    return m


if __name__ == "__main__":
    main(Path(sys.argv[1]))
