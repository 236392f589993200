"""Loss, evaluation and E2E beam-search generation."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lorakit.train import metrics
from lorakit.train.batching import IGNORE, Feature, collate, format_prompt, prompt_ids
from lorakit.train.data import MRGroup, TaskSpec
from lorakit.train.e2e_metrics import e2e_scores
from lorakit.train.lm_loss import CHUNK_ROWS, head_loss_sum, lm_parts
from lorakit.train.memory import generation_batch_size


class OutputNoRepeatNGram:
    """Logits processor: forbid a token that would repeat an ``n``-gram of the *generated* text, the LoRA paper's
    E2E rule (its ``gpt2_beam.py`` bans n-grams of the decoded history only).

    transformers' ``no_repeat_ngram_size`` also counts the prompt of a decoder-only model, so for E2E it forbids
    copying any 4 tokens of the meaning representation ("5 out of 5", "Crowne Plaza Hotel", "more than £30"):
    the same adapter lost 5.6 BLEU on the dev MRs that way (issue #20 section 0, docs/reproduction.md).
    ``start`` is where the generated tokens begin in ``input_ids`` (the left-padded prompt width)."""

    def __init__(self, n: int, start: int) -> None:
        self.n, self.start = n, start

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        n = self.n
        gen = input_ids[:, self.start :]
        length = gen.shape[1]
        if n <= 0 or length < n - 1:
            return scores
        for row, toks in enumerate(gen.tolist()):
            tail = toks[length - n + 1 :] if n > 1 else []
            banned = {toks[i + n - 1] for i in range(length - n + 1) if toks[i : i + n - 1] == tail}
            if banned:
                scores[row, list(banned)] = -float("inf")
        return scores


def loss_sum(
    logits: torch.Tensor, labels: torch.Tensor, kind: str, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Summed (not averaged) loss of a batch, so that callers can normalise by global units."""
    logits = logits.float()
    if kind == "regression":
        return F.mse_loss(logits.view(-1), labels.float(), reduction="sum")
    if kind == "generation":
        shifted = logits[:, :-1].reshape(-1, logits.size(-1))
        target = labels[:, 1:].reshape(-1)
        return F.cross_entropy(
            shifted, target, ignore_index=IGNORE, reduction="sum", label_smoothing=label_smoothing
        )
    return F.cross_entropy(logits, labels, reduction="sum", label_smoothing=label_smoothing)


def lm_loss_sum_chunked(
    model: Any, inputs: dict[str, torch.Tensor], labels: torch.Tensor, chunk_rows: int = CHUNK_ROWS
) -> torch.Tensor:
    """Summed next-token loss of a causal LM without its full (batch, length, vocab) logits: the head runs
    only on positions that have a target, ``chunk_rows`` of them at a time. Equals :func:`loss_sum`."""
    parts = lm_parts(model)
    if parts is None:
        return loss_sum(model(**inputs).logits, labels, "generation")
    return head_loss_sum(parts, inputs, labels, chunk_rows=chunk_rows)


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast when enabled, a no-op context otherwise."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}


@torch.no_grad()
def evaluate(
    model: Any,
    spec: TaskSpec,
    feats: Sequence[Feature],
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    bf16: bool = False,
) -> dict[str, float]:
    """Dev metrics: the task metrics (classification/regression) or the mean token loss (generation)."""
    was_training = model.training
    model.eval()
    preds: list[Any] = []
    golds: list[Any] = []
    total, units = 0.0, 0
    for i in range(0, len(feats), batch_size):
        chunk = feats[i : i + batch_size]
        batch = collate(chunk, pad_id)
        labels = batch["labels"].to(device)
        with autocast(device, bf16):
            if spec.kind == "generation":  # no full-vocabulary logits kept (#19 section 6)
                total += float(lm_loss_sum_chunked(model, model_inputs(batch, device), labels))
                units += sum(f.units for f in chunk)
                continue
            logits = model(**model_inputs(batch, device)).logits
        total += float(loss_sum(logits, labels, spec.kind))
        units += sum(f.units for f in chunk)
        if spec.kind == "classification":
            preds += logits.argmax(-1).tolist()
            golds += labels.tolist()
        elif spec.kind == "regression":
            preds += logits.float().view(-1).tolist()
            golds += labels.tolist()
    model.train(was_training)
    out = {"loss": total / max(units, 1)}
    if spec.kind == "classification":
        out.update(metrics.classification_metrics(spec.name, preds, golds))
    elif spec.kind == "regression":
        out.update(metrics.regression_metrics(preds, golds))
    return out


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    num_beams: int,
    length_penalty: float,
    no_repeat_ngram_size: int,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
    bf16: bool = False,
    template: bool = True,
    progress: bool = False,
    memory_mb: float | None = None,
    synced: bool = False,
) -> list[str]:
    """Beam-search continuations of ``prompts`` (left-padded batches); returns the new text only.
    ``no_repeat_ngram_size`` counts the generated text only, never the prompt (:class:`OutputNoRepeatNGram`).

    With ``memory_mb``, ``batch_size`` is lowered so that one call's KV cache and logits fit in it.
    ``synced``: every rank of an FSDP-sharded model decodes the same prompts in lockstep (transformers'
    ``synced_gpus``: a rank that has finished keeps taking part in the others' forwards)."""
    if memory_mb:
        longest = max((len(prompt_ids(tokenizer, format_prompt(p) if template else p)) for p in prompts), default=0)
        batch_size = generation_batch_size(model, batch_size, num_beams, longest + max_new_tokens, memory_mb)
    from transformers import LogitsProcessorList

    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id
    outs: list[str] = []
    starts = range(0, len(prompts), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", unit="batch")
    for i in starts:
        ids = [
            prompt_ids(tokenizer, format_prompt(p) if template else p) for p in prompts[i : i + batch_size]
        ]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        with autocast(device, bf16):
            gen = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                num_beams=num_beams,
                length_penalty=length_penalty,
                logits_processor=LogitsProcessorList([OutputNoRepeatNGram(no_repeat_ngram_size, width)]),
                no_repeat_ngram_size=0,  # transformers' own would count the prompt
                max_new_tokens=max_new_tokens,
                early_stopping=True,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
                synced_gpus=synced,
            )
        for row in gen[:, width:]:
            outs.append(" ".join(tokenizer.decode(row, skip_special_tokens=True).split()))
    model.train(was_training)
    return outs


def score_e2e(
    model: Any, tokenizer: Any, groups: Sequence[MRGroup], *, with_meteor: bool = True, **gen_kw: Any
) -> tuple[dict[str, float], list[str]]:
    """Generate one text per MR and score the paper's five E2E metrics against all references of each MR
    (METEOR is None where Java is missing; see :mod:`lorakit.train.e2e_metrics`)."""
    hyps = generate(model, tokenizer, [g.mr for g in groups], **gen_kw)
    scores = e2e_scores(hyps, [g.refs for g in groups], with_meteor=with_meteor)
    return {**scores, "n_mrs": float(len(groups))}, hyps


def decoding(cfg: Any) -> dict[str, Any]:
    """The beam-search options (and eval batch size) of a train / eval / generate config."""
    return {
        "num_beams": cfg.num_beams,
        "length_penalty": cfg.length_penalty,
        "no_repeat_ngram_size": cfg.no_repeat_ngram_size,
        "max_new_tokens": cfg.max_new_tokens,
        "batch_size": cfg.eval_batch_size,
        "memory_mb": getattr(cfg, "gen_memory_mb", None),
    }
