"""Merged export as Hugging Face sharded safetensors, streamed tensor by tensor (``lorakit merge --max-shard-size``).

The base checkpoint's tensors are read one at a time from its safetensors file(s) (memory-mapped),
each adapted weight gets ``W + scale * B A`` (fp32, rounded once to W's dtype, like
:func:`lorakit.merge`), the adapter's trained heads replace theirs, and the result is written to
``model-0000K-of-0000M.safetensors`` files of at most ``max_shard_size`` bytes plus
``model.safetensors.index.json``, which ``transformers.AutoModel*.from_pretrained`` loads. At no time
is more than one output shard (and one input tensor) in memory, so the export of a base that had
to be trained sharded (``--fsdp``) fits on one host of modest memory.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from lorakit.atomic import atomic_dir
from lorakit.checks import check_finite
from lorakit.train.errors import TrainConfigError

PREFIX = "base_model.model."
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``"2GB"`` / ``"500MiB"`` / ``"123456"`` -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise TrainConfigError(f"--max-shard-size: {text!r} is not a size such as 2GB, 500MB or 1048576")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def base_files(model_dir: Path) -> list[Path]:
    """The base's safetensors files (single file or the shards named by its index)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise TrainConfigError(f"--model: {model_dir} has no model.safetensors(.index.json) to stream from")


def _adapter(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    cfg_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise TrainConfigError(f"--adapter: {path} lacks adapter_config.json / adapter_model.safetensors")
    tensors = load_file(str(weights))
    check_finite(tensors, f"--adapter: {weights}", TrainConfigError, hint="merging it would write a NaN/inf model")
    return json.loads(cfg_file.read_text()), tensors


def _scale(cfg: dict[str, Any], module: str, r: int) -> float:
    def pick(pattern: dict[str, Any], default: Any) -> Any:
        for key, val in pattern.items():
            if module == key or module.endswith("." + key):
                return val
        return default

    alpha = float(pick(cfg.get("alpha_pattern") or {}, cfg["lora_alpha"]))
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def plan_updates(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], keys: set[str]
                 ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float]], dict[str, torch.Tensor]]:
    """``{base key: (A, B, scale)}`` for the adapted weights and ``{base key: tensor}`` for saved heads.

    Adapter module names are matched to base keys as they are or without the model's leading prefix
    (a ``bert.``-less base checkpoint); an unmatched LoRA module is an error naming it. A head the base
    checkpoint lacks (the task's new ``classifier`` on an encoder's bare checkpoint, as the ``minilm``
    preset's) is added under its model name, where ``from_pretrained`` of the task's class finds it.
    """
    def base_key(name: str) -> str:
        for cand in (name, name.partition(".")[2]):
            if cand in keys:
                return cand
        raise TrainConfigError(f"--adapter: {name!r} has no tensor in the base checkpoint (e.g. {sorted(keys)[:3]})")

    lora: dict[str, dict[str, torch.Tensor]] = {}
    heads: dict[str, torch.Tensor] = {}
    for k, t in tensors.items():
        name = k[len(PREFIX):] if k.startswith(PREFIX) else k
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", name)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = t
        elif "lora_embedding" in name:
            raise TrainConfigError("--max-shard-size: embedding adapters are not supported by the streamed export")
        else:  # a trained head: replaces the base's tensor, or is new (a task head the base lacks)
            head = name.replace(".modules_to_save.default", "")
            heads[base_key(head) if head.partition(".")[2] in keys or head in keys else head] = t
    updates = {}
    for module, ab in lora.items():
        if len(ab) != 2:
            raise TrainConfigError(f"--adapter: {module!r} has {sorted(ab)} but not "
                                   f"{sorted({'lora_A', 'lora_B'} - set(ab))}: the adapter file is incomplete")
        A, B = ab["lora_A"], ab["lora_B"]
        updates[base_key(module + ".weight")] = (A, B, _scale(cfg, module, A.shape[0]))
    return updates, heads


def _merged(w: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, fan_in_fan_out: bool) -> torch.Tensor:
    delta = (B.float().flatten(1) @ A.float().flatten(1)) * scale  # (out, in)
    delta = delta.T if fan_in_fan_out else delta
    return (w.float() + delta.reshape(w.shape)).to(w.dtype)


def export(model_dir: Path, adapter: Path, out: Path, max_shard_size: int, config_updates: dict[str, Any],
           overwrite: bool = False) -> Path:
    """Write the merged model to ``out`` as sharded safetensors + index + config (atomically)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg, tensors = _adapter(adapter)
    files = base_files(model_dir)
    owner: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            owner.update({k: f for k in fh.keys()})
    updates, heads = plan_updates(cfg, tensors, set(owner))
    new_heads = [k for k in heads if k not in owner]
    tied = [k for k in new_heads if k.rsplit(".", 2)[-2:-1] == ["lm_head"]]
    if tied and json.loads((model_dir / "config.json").read_text()).get("tie_word_embeddings", True):
        raise TrainConfigError(f"--adapter: trains {tied[0]!r}, which the base checkpoint lacks because its config "
                               "ties it to the input embeddings (from_pretrained would drop the trained head); "
                               "merge without --max-shard-size")
    fifo = bool(cfg.get("fan_in_fan_out"))
    if out.exists() and not overwrite:
        raise TrainConfigError(f"--output: {out} exists; pass --overwrite to replace it")

    def fill(tmp: Path) -> None:
        shards: list[list[str]] = [[]]
        size = 0
        for key in [*owner, *new_heads]:  # first pass: the shard layout, by byte size, in the checkpoint's order
            if key in owner:
                with safe_open(str(owner[key]), "pt") as fh:
                    sl = fh.get_slice(key)
                    nbytes = math.prod(sl.get_shape()) * _itemsize(sl.get_dtype())
            else:
                nbytes = heads[key].numel() * heads[key].element_size()
            if shards[-1] and size + nbytes > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append(key)
            size += nbytes
        n = len(shards)
        weight_map, total = {}, 0
        for i, keys in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            part: dict[str, torch.Tensor] = {}
            for key in keys:
                if key not in owner:  # a new head, in the adapter's dtype
                    part[key] = heads[key].contiguous()
                    weight_map[key] = name
                    total += heads[key].numel() * heads[key].element_size()
                    continue
                with safe_open(str(owner[key]), "pt") as fh:
                    t = fh.get_tensor(key)
                if key in updates:
                    t = _merged(t, *updates[key], fifo)
                elif key in heads:
                    t = heads[key].to(t.dtype)
                part[key] = t.contiguous()
                weight_map[key] = name
                total += t.numel() * t.element_size()
            save_file(part, str(tmp / name), {"format": "pt"})
            del part
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
        conf = json.loads((model_dir / "config.json").read_text())
        conf.update(config_updates)
        (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True))
        for extra in model_dir.iterdir():  # tokenizer and generation files ride along
            if extra.is_file() and not extra.name.endswith(".safetensors") and extra.name not in (
                "config.json", "model.safetensors.index.json"
            ):
                shutil.copy2(extra, tmp / extra.name)

    atomic_dir(out, fill)
    return out


def _itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}.get(
        dtype, 4
    )


def export_task(model_name: str, spec: Any, cfg: Any) -> Path:
    """``lorakit merge --max-shard-size``: the base of a preset or directory, the task's head config."""
    from lorakit.train.models import resolve

    src = resolve(model_name)
    updates: dict[str, Any] = {}
    if spec.kind != "generation":
        n = spec.num_labels
        updates = {"id2label": {str(i): f"LABEL_{i}" for i in range(n)},
                   "label2id": {f"LABEL_{i}": i for i in range(n)}}
        if spec.kind == "regression":
            updates["problem_type"] = "regression"
    return export(Path(src.path), Path(cfg.adapter), Path(cfg.output), parse_size(cfg.max_shard_size), updates,
                  overwrite=cfg.overwrite)
