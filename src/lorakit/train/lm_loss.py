"""Training loss of a causal LM without its full (batch, length, vocab) logits (issue #19 section 6).

The decoder body runs to hidden states, only the positions with a target are gathered, and the output head
+ cross-entropy run on ``chunk_rows`` of them at a time, each chunk under ``torch.utils.checkpoint``: a chunk's
logits are freed after its loss and recomputed in backward (same RNG, same autocast state), so at most one
chunk of fp32 logits is alive. The result equals :func:`lorakit.train.evaluate.loss_sum` (``"generation"``:
summed token cross-entropy, same ``label_smoothing``); callers normalise by the global batch's target tokens
exactly as before. The head is the model's own ``get_output_embeddings()`` module, so a LoRA-adapted or
trainable-token head and a head tied to the input embedding get their gradients through it."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lorakit.train.batching import IGNORE

CHUNK_ROWS = 256


def lm_parts(model: Any) -> tuple[Any, Any] | None:
    """(decoder body, output head) of a plain causal LM, or None where logits need the model's own forward
    (logit soft-capping or scaling, no ``get_decoder``, or an FSDP2-sharded model)."""
    from lorakit.train.fsdp import is_sharded

    if is_sharded(model):  # FSDP2 gathers the root's embeddings and head only inside the model's own forward
        return None
    cfg = getattr(model, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None
    get_dec, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    if get_dec is None or get_head is None:
        return None
    body, head = get_dec(), get_head()
    return (body, head) if body is not None and head is not None else None


def supports_chunked_loss(model: Any) -> bool:
    """Whether :func:`lm_train_loss_sum` applies (a plain causal LM: body + head, no logit soft-capping)."""
    return lm_parts(model) is not None


def _chunk_loss(head: Any, rows: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return F.cross_entropy(head(rows).float(), target, reduction="sum", label_smoothing=label_smoothing)


def head_loss_sum(
    parts: tuple[Any, Any],
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    *,
    label_smoothing: float = 0.0,
    chunk_rows: int = CHUNK_ROWS,
    recompute: bool = False,
) -> torch.Tensor:
    """Summed next-token loss: the body to hidden states, the head + cross-entropy on the target rows only,
    ``chunk_rows`` at a time; with ``recompute`` each chunk runs under ``checkpoint`` (logits freed, redone
    in backward). An empty batch still runs one (empty) chunk, so the loss keeps a grad_fn."""
    body, head = parts
    hidden = body(**inputs).last_hidden_state[:, :-1]
    target = labels[:, 1:].to(hidden.device)
    keep = target != IGNORE
    rows, tgt = hidden[keep], target[keep]
    chunks = []
    for i in range(0, max(rows.size(0), 1), chunk_rows):
        args = (head, rows[i : i + chunk_rows], tgt[i : i + chunk_rows], label_smoothing)
        chunks.append(checkpoint(_chunk_loss, *args, use_reentrant=False) if recompute else _chunk_loss(*args))
    return torch.stack(chunks).sum()


def lm_train_loss_sum(
    model: Any,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    chunk_rows: int = CHUNK_ROWS,
) -> torch.Tensor:
    """Summed next-token loss with gradients, the head applied per checkpointed chunk of target rows."""
    parts = lm_parts(model)
    if parts is None:
        raise ValueError(
            f"lm_loss: {type(model).__name__} has no plain decoder body + output head "
            "(check supports_chunked_loss first)"
        )
    if chunk_rows < 1:
        raise ValueError(f"lm_loss: chunk_rows must be >= 1, got {chunk_rows}")
    return head_loss_sum(parts, inputs, labels, label_smoothing=label_smoothing, chunk_rows=chunk_rows,
                         recompute=True)
