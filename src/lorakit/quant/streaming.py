"""``quantize_base`` on a meta-device skeleton: every layer quantized straight from the checkpoint file.

A model built by :func:`lorakit.train.meta_load.skeleton` has its checkpoint parameters on the meta
device and a plan of where each one lives in the memory-mapped safetensors file(s) (a GGUF source is
converted once to a cached safetensors copy there). :func:`lorakit.quantize_base` on such a model
reads each layer's float weight from the file, quantizes it and lets it go before the next one, so
the full float model is never resident: the load peaks at the quantized base plus one float weight
instead of the whole float model (SmolLM2-135M: 405 MiB of adapted fp32 weights never allocated).
Everything not quantized (embeddings, norms, biases, the head) is then materialised from the file
by :func:`materialise_rest` (ties kept), and the model is an ordinary CPU model. Under ``--fsdp``
(:data:`lorakit.train.meta_load.DEFER_REST` set on the skeleton) the rest stays on meta, to be read
shard by shard after ``fully_shard`` (:func:`lorakit.train.meta_load.materialise`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


def is_skeleton(model: nn.Module) -> bool:
    from ..train import meta_load

    return meta_load.is_skeleton(model)


def float_weights(model: nn.Module, found: list[tuple[str, nn.Module]]
                  ) -> Iterator[tuple[str, nn.Module, torch.Tensor]]:
    """(name, module, its float weight in the module's own layout) for each of ``found``, read one at a
    time from the skeleton's checkpoint (a weight the checkpoint lacks is the module's initialised one)."""
    from safetensors import safe_open

    from ..train import meta_load

    plan = getattr(model, meta_load.PLAN_ATTR)
    for name, m in found:
        entry = plan.get(f"{name}.weight")
        if entry is None:
            yield name, m, m.weight.detach()
            continue
        f, key = entry
        # the file opened (mapped) per tensor: the pages read leave the process's RSS when it is unmapped;
        # one map for the whole loop kept every float weight's pages resident until the end (SmolLM2-135M:
        # +415 MiB of RssFile at the peak of the load, measured)
        with safe_open(str(f), "pt") as fh:
            w = fh.get_tensor(key).to(m.weight.dtype)
        yield name, m, w


def materialise_rest(model: nn.Module, quantized: list[str]) -> None:
    """After the swap: read every parameter still on meta from the file, one at a time, into the same
    module slot; a tensor tied under several names (``lm_head.weight`` = the embedding) is read once and
    stays tied. The quantized layers are not touched (no ``to_empty``, no copy). The model stops being a
    skeleton."""
    from safetensors import safe_open

    from ..train import meta_load
    from ..train.errors import ModelLoadError

    if model.__dict__.get(meta_load.DEFER_REST):  # --fsdp: the rest is read shard by shard after fully_shard
        plan_left = model.__dict__[meta_load.PLAN_ATTR]
        for name in quantized:
            plan_left.pop(f"{name}.weight", None)  # now the quantized bytes, no longer the file's tensor
        return
    plan: dict[str, tuple[object, str]] = model.__dict__.pop(meta_load.PLAN_ATTR)
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.is_meta:
            aliases.setdefault(id(p), []).append(name)
    fresh: dict[int, nn.Parameter] = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        for pname, p in list(mod._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in fresh:
                name = next((n for n in aliases[id(p)] if n in plan), None)
                if name is None:
                    raise ModelLoadError(f"streaming quantized load: {aliases[id(p)][0]!r} is neither in the "
                                         f"checkpoint nor initialised (quantized: {len(quantized)} layers)")
                f, key = plan[name]
                with safe_open(str(f), "pt") as fh:  # mapped per tensor, as in float_weights
                    value = fh.get_tensor(key).to(p.dtype)
                fresh[id(p)] = nn.Parameter(value, requires_grad=p.requires_grad)
            mod._parameters[pname] = fresh[id(p)]
