"""Implementations of ``lorakit eval``, ``generate`` and ``merge`` (``train`` lives in :mod:`.loop`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lorakit.atomic import atomic_dir, atomic_write, output_problem
from lorakit.train.batching import encode_classification, encode_lm
from lorakit.train.config import EvalConfig, GenerateConfig, MergeConfig
from lorakit.train.data import eval_digest, get_task, load_task_data, read_e2e, read_examples, subsample
from lorakit.train.errors import TrainConfigError
from lorakit.train.evaluate import decoding, evaluate, generate, score_e2e
from lorakit.train.loop import use_bf16
from lorakit.train.memory import PhasePeaks
from lorakit.train.methods import load_head, read_meta
from lorakit.train.models import load_model, load_tokenizer, resolve


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_for_task(
    model: str, kind: str, num_labels: int, adapter: str | None, head: str | None = None
) -> Any:
    """Base model (+ LoRA adapter, + head weights) and tokenizer, ready for inference."""
    src = resolve(model)
    tok = load_tokenizer(src)
    net = load_model(src, kind, num_labels)
    if adapter:
        import lorakit

        if not Path(adapter).is_dir():
            raise TrainConfigError(f"--adapter: {adapter} is not a directory")
        from lorakit.train.models import quantize_like_adapter

        quantize_like_adapter(net, adapter)  # a QLoRA adapter runs on the base quantized as in training
        lorakit.load_adapter(net, adapter)
    if head:
        load_head(net, head)
    net.eval()
    return net, tok


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    """Score a model (+ adapter) on the task's dev set or on ``--eval-file``."""
    spec = get_task(cfg.task)
    if cfg.eval_file:
        data = read_examples(cfg.eval_file, spec)
    else:
        _, data = load_task_data(spec, cfg.data_dir, seed=cfg.seed, dev_fraction=cfg.e2e_dev_fraction)
    data = subsample(list(data), cfg.max_eval_examples, cfg.eval_subset_seed)
    problem = output_problem(cfg.output, "file") if cfg.output else None
    if problem:
        raise TrainConfigError(f"--output: {problem}")
    model, tok = load_for_task(cfg.model, spec.kind, spec.num_labels, cfg.adapter, cfg.head)
    device = _device()
    model.to(device)
    bf16 = use_bf16(cfg.precision, device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    peaks = PhasePeaks("other", before="load")  # the model load's peak apart from scoring's
    with peaks.phase("eval"):
        if spec.kind == "generation":
            feats = encode_lm(data, tok, cfg.max_len)
            res = evaluate(
                model, spec, feats, pad_id=pad, batch_size=cfg.eval_batch_size, device=device, bf16=bf16
            )
            scores, _ = score_e2e(model, tok, data, **decoding(cfg), device=device, bf16=bf16, progress=True)
            res.update(scores)
        else:
            feats = encode_classification(data, tok, cfg.max_len)
            res = evaluate(
                model, spec, feats, pad_id=pad, batch_size=cfg.eval_batch_size, device=device, bf16=bf16
            )
    res.update(peaks.report())
    res = {"task": spec.name, "n": len(data), "eval_digest": eval_digest(data), **res}
    if cfg.output:
        text = json.dumps(res, indent=2)
        atomic_write(cfg.output, lambda fh: fh.write(text), mode="w")
    return res


def run_generate(cfg: GenerateConfig) -> list[str]:
    """Beam-search generations for ``--prompt`` / ``--input-file`` MRs."""
    prompts = list(cfg.prompt)
    if cfg.input_file:
        if cfg.raw:
            lines = Path(cfg.input_file).read_text(encoding="utf-8").splitlines()
            prompts += [ln for ln in lines if ln.strip()]
        else:
            prompts += [g.mr for g in _read_mrs(cfg.input_file)]
    model, tok = load_for_task(cfg.model, "generation", 0, cfg.adapter)
    device = _device()
    model.to(device)
    return generate(
        model,
        tok,
        prompts,
        **decoding(cfg),
        device=device,
        template=not cfg.raw,
    )


def _read_mrs(path: str) -> list[Any]:
    """MRs of a file: E2E lines (``mr||ref``) or bare MRs one per line."""
    text = Path(path).read_text(encoding="utf-8")
    if "||" in text:
        return read_e2e(path)
    from lorakit.train.data import MRGroup

    return [MRGroup(ln.strip()) for ln in text.splitlines() if ln.strip()]


def run_merge(cfg: MergeConfig) -> Path:
    """Base model + adapter -> merged plain transformers model directory (``save_pretrained``)."""
    import lorakit

    meta = read_meta(cfg.adapter)
    model_name = cfg.model or meta.get("model")
    task_name = cfg.task or meta.get("task")
    if not model_name:
        raise TrainConfigError("--model: not recorded with the adapter; pass the base model")
    if not task_name:
        raise TrainConfigError("--task: not recorded with the adapter; pass the task it was trained for")
    spec = get_task(task_name)
    out = Path(cfg.output)
    problem = output_problem(out, "directory")
    if problem:
        raise TrainConfigError(f"--output: {problem}")
    if out.exists() and not cfg.overwrite:
        raise TrainConfigError(f"--output: {out} exists; pass --overwrite to replace it")
    if cfg.max_shard_size:  # streamed into sharded safetensors, never building the model
        from lorakit.train.sharded_export import export_task

        return export_task(model_name, spec, cfg)
    model, tok = load_for_task(model_name, spec.kind, spec.num_labels, cfg.adapter)
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    merged = lorakit.merge_and_unload(model, dtype=dtypes.get(cfg.dtype or ""))
    if cfg.quantize_output:
        from lorakit.quant.export import quantize_for_export

        quantize_for_export(merged, cfg.quantize_output)

    def fill(d: Path) -> None:
        merged.save_pretrained(d)
        tok.save_pretrained(d)

    atomic_dir(out, fill)  # a crash or a failed save leaves the old --output as it was
    return out
