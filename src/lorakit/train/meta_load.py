"""Loading the base for ``--fsdp`` without materialising it: each rank holds only its shard.

:func:`skeleton` builds the model with its parameters on the meta device (buffers real; accelerate's
``init_empty_weights``), initialises the parameters the checkpoint lacks (a new task head) on the CPU as
``from_pretrained`` does (the model's ``_init_weights``, same RNG order), and notes where every other
parameter lives in the safetensors file(s). LoRA then goes on as usual (its factors on meta). In
:func:`lorakit.train.fsdp.shard`, :func:`real_trainables` gives the LoRA factors real values *before*
``fully_shard`` (Kaiming A / zero B, layer by layer: the draws a full load makes), and
:func:`materialise` runs *after* it: ``to_empty`` allocates each rank's shard only, then every rank
reads its rows of each tensor from the memory-mapped file (``safe_open(...).get_slice``). No rank
ever holds more than its shard plus one tensor's rows.

A GGUF source (the ``smollm2`` preset) is dequantized by transformers as a whole, so it is converted
once, in a child process (the ranks' memory stays low), to a float32 safetensors copy in
``$LORAKIT_CACHE_DIR`` (default ``~/.cache/lorakit``), which every later ``--fsdp`` run streams from.
Sources without safetensors weights (``*.bin``) keep the full load. Under ``--quantize`` the skeleton
is quantized layer by layer from the file (:mod:`lorakit.quant.streaming`); with ``--fsdp`` as well, the
quantized layers are whole on each rank until ``fully_shard`` (0.56 byte per weight for NF4) and the
float rest is read shard by shard as above.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.train.errors import ModelLoadError
from lorakit.train.models import ModelSource, set_pad_token_id

PLAN_ATTR = "_lorakit_meta_plan"  # on a skeleton: {param name: (file, key)}, consumed by materialise
# on a skeleton under --fsdp --quantize: quantize_base leaves the unquantized rest on meta (lorakit.quant.streaming)
DEFER_REST = "_lorakit_defer_rest"


# --- when --------------------------------------------------------------------------------------------
def applies(cfg: Any, src: ModelSource) -> bool:
    """Meta-device loading for this run: ``--fsdp`` and/or ``--quantize``, safetensors or GGUF weights.
    Under ``--quantize``, :func:`lorakit.quantize_base` streams the skeleton layer by layer
    (:mod:`lorakit.quant.streaming`), so the float model is never resident; with ``--fsdp`` too, the
    unquantized rest (embeddings, norms, head) then waits on meta for :func:`materialise` (:func:`defer_rest`)."""
    if not (cfg.fsdp or cfg.quantize) or os.environ.get("LORAKIT_FSDP_META", "1") == "0":
        return False
    return src.gguf_file is not None or bool(_safetensors(src.path))


def defer_rest(model: nn.Module) -> None:
    """``--fsdp --quantize``: let :func:`lorakit.quantize_base` quantize the skeleton's layers from the file
    and leave everything else on meta, so each rank later reads only its shard of the float rest."""
    setattr(model, DEFER_REST, True)


def is_skeleton(model: nn.Module) -> bool:
    return hasattr(model, PLAN_ATTR)


def _safetensors(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return [root / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [root / "model.safetensors"] if (root / "model.safetensors").is_file() else []


# --- GGUF: a float32 safetensors copy, made once ------------------------------------------------
def cache_root() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE_DIR") or Path.home() / ".cache" / "lorakit")


def gguf_cache_dir(src: ModelSource) -> Path:
    """Where the converted copy of ``src``'s GGUF file lives (named by its size and mtime)."""
    f = src.path / str(src.gguf_file)
    st = f.stat()
    return cache_root() / "gguf" / f"{f.stem}-{st.st_size}-{st.st_mtime_ns}"


def convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize ``gguf`` (transformers) and write it as ``dest/{config.json, model.safetensors}``, atomically."""
    from lorakit.atomic import atomic_dir
    from lorakit.train.models import _quiet_transformers, forget_gguf_quantization

    tf = _quiet_transformers()
    model = tf.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    forget_gguf_quantization(model)
    model = model.float()
    atomic_dir(dest, lambda d: model.save_pretrained(d))


def ensure_gguf_cache(src: ModelSource, ctx: Any) -> Path:
    """The converted copy (local rank 0 converts in a child process; the other ranks wait for it)."""
    import torch.distributed as dist

    dest = gguf_cache_dir(src)
    if ctx.local_rank == 0 and not (dest / "config.json").is_file():
        print(f"lorakit: converting {src.gguf_file} once to safetensors in {dest} (for --fsdp loading)",
              file=sys.stderr)
        code = "import sys; from pathlib import Path; from lorakit.train.meta_load import convert_gguf; " \
               "convert_gguf(Path(sys.argv[1]), Path(sys.argv[2]))"
        res = subprocess.run([sys.executable, "-c", code, str(src.path / str(src.gguf_file)), str(dest)],
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise ModelLoadError(f"converting {src.gguf_file} to {dest} failed: {res.stderr[-1500:]}")
    if dist.is_initialized():
        dist.barrier()
    if not (dest / "config.json").is_file():  # another node's local rank 0 converted into its own cache
        raise ModelLoadError(f"{dest} is missing on rank {ctx.rank}: $LORAKIT_CACHE_DIR must be node-local "
                             "or shared by every rank")
    return dest


# --- the skeleton ------------------------------------------------------------------------------------
def _file_keys(files: list[Path]) -> dict[str, Path]:
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            out.update(dict.fromkeys(fh.keys(), f))
    return out


def _key_for(name: str, keys: dict[str, Path], prefix: str) -> str | None:
    """The checkpoint key of parameter ``name`` (a base-model checkpoint lacks the head model's prefix)."""
    candidates = [name, f"{prefix}.{name}"]
    if prefix and name.startswith(prefix + "."):
        candidates.append(name[len(prefix) + 1:])
    return next((k for k in candidates if k in keys), None)


def _init_missing(model: nn.Module, missing: set[str]) -> None:
    """Give the parameters the checkpoint lacks real CPU values by the model's own ``_init_weights``,
    children before parents, as ``from_pretrained`` initialises missing keys (the same RNG draws)."""
    owners = {n.rpartition(".")[0] for n in missing}
    named = dict(model.named_modules())
    for mod_name in [n for n, _ in _post_order(model)]:
        if mod_name not in owners:
            continue
        mod = named[mod_name]
        for pname, p in list(mod._parameters.items()):
            if p is not None and p.is_meta:
                mod._parameters[pname] = nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
        with torch.no_grad():
            model._init_weights(mod)  # type: ignore[operator]


def _post_order(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        yield from _post_order(child, f"{prefix}.{name}" if prefix else name)
    yield prefix, module


def skeleton(src: ModelSource, kind: str, num_labels: int, ctx: Any) -> nn.Module:
    """The model of :func:`lorakit.train.models.load_model`, its checkpoint parameters on the meta device."""
    from accelerate import init_empty_weights

    from lorakit.train.models import _quiet_transformers

    root = ensure_gguf_cache(src, ctx) if src.gguf_file else src.path
    files = _safetensors(root)
    if not files:
        raise ModelLoadError(f"{root} has no model.safetensors(.index.json) to load shard by shard")
    tf = _quiet_transformers()
    kw: dict[str, Any] = {} if kind == "generation" else {"num_labels": num_labels}
    if kind == "regression":
        kw["problem_type"] = "regression"
    try:
        config = tf.AutoConfig.from_pretrained(str(root), local_files_only=True, **kw)
        cls = tf.AutoModelForCausalLM if kind == "generation" else tf.AutoModelForSequenceClassification
        with init_empty_weights(include_buffers=False):
            model = cls.from_config(config, dtype=torch.float32)
        model.tie_weights()  # as from_pretrained does: a tied head is the embedding, not a missing key
    except Exception as exc:  # transformers raises many types here
        raise ModelLoadError(f"cannot build a {kind} model from {root}: {exc}") from exc
    keys = _file_keys(files)
    prefix = getattr(model, "base_model_prefix", "") or ""
    plan: dict[str, tuple[Path, str]] = {}
    missing: set[str] = set()
    for name, _ in model.named_parameters():
        key = _key_for(name, keys, prefix)
        if key is None:
            missing.add(name)
        else:
            plan[name] = (keys[key], key)
    _check_shapes(model, plan)
    _init_missing(model, missing)
    set_pad_token_id(model)
    setattr(model, PLAN_ATTR, plan)
    return model


def _check_shapes(model: nn.Module, plan: dict[str, tuple[Path, str]]) -> None:
    from safetensors import safe_open

    params = dict(model.named_parameters())
    by_file: dict[Path, list[str]] = {}
    for name, (f, _) in plan.items():
        by_file.setdefault(f, []).append(name)
    for f, names in by_file.items():
        with safe_open(str(f), "pt") as fh:
            for n in names:
                shape = tuple(fh.get_slice(plan[n][1]).get_shape())
                if shape != tuple(params[n].shape):
                    raise ModelLoadError(f"{f}: tensor {plan[n][1]!r} has shape {shape}, the model's {n!r} "
                                         f"{tuple(params[n].shape)}")


# --- in fsdp.shard: LoRA before fully_shard, the base after ----------------------------------------
def real_trainables(model: nn.Module) -> None:
    """LoRA factors still on meta get CPU values as ``inject`` gives them (Kaiming-uniform A, zero B),
    layer by layer in module order: the same draws as a run that loaded the full model."""
    import lorakit

    for _, layer in lorakit.lora_layers(model):
        on_meta = False
        for pname in ("lora_A", "lora_B"):
            p = layer._parameters.get(pname)
            if p is not None and p.is_meta:
                on_meta = True
                layer._parameters[pname] = nn.Parameter(torch.zeros_like(p, device="cpu"),
                                                        requires_grad=p.requires_grad)
        if on_meta:  # a quantized base is real (lorakit.quant.streaming): its factors were drawn at inject
            layer.reset_lora_parameters()
    left = [n for n, p in model.named_parameters() if p.is_meta and n not in getattr(model, PLAN_ATTR)]
    if left:
        raise ModelLoadError(f"--fsdp meta loading: {left[:4]} are neither in the checkpoint nor LoRA factors")


def _local(p: torch.Tensor) -> tuple[torch.Tensor, int | None, int]:
    """(the tensor this rank stores, the sharded dim or None, the first global row it holds)."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(p, DTensor):
        return p, None, 0
    (place,) = p.placements
    if isinstance(place, Replicate):
        return p.to_local(), None, 0
    if not isinstance(place, Shard) or place.dim != 0:
        raise ModelLoadError(f"--fsdp meta loading: placement {place} is not supported (only Shard(0))")
    n, world = p.shape[0], p.device_mesh.size()
    chunk = -(-n // world)  # FSDP2 splits dim 0 as torch.chunk does
    return p.to_local(), 0, min(p.device_mesh.get_local_rank() * chunk, n)


def materialise(model: nn.Module, device: torch.device) -> None:
    """After ``fully_shard`` of a :func:`skeleton`: allocate every rank's shards and read them from the file."""
    from safetensors import safe_open

    plan: dict[str, tuple[Path, str]] = model.__dict__.pop(PLAN_ATTR)
    model.__dict__.pop(DEFER_REST, None)
    keep = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]
            if not t.is_meta}
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    by_file: dict[Path, list[str]] = {}
    for name, (f, _) in plan.items():
        by_file.setdefault(f, []).append(name)
    with torch.no_grad():
        for name, t in [*params.items(), *model.named_buffers()]:
            if name in keep:
                t.copy_(keep.pop(name))
        for f, names in by_file.items():
            for name in names:  # mapped per tensor: the pages read leave the RSS with the map
                with safe_open(str(f), "pt") as fh:
                    local, dim, start = _local(params[name])
                    sl = fh.get_slice(plan[name][1])
                    rows = sl[start:start + local.shape[0]] if dim == 0 else sl[:]
                    local.copy_(rows)
