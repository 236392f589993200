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
from lorakit.train.evaluate import _lm_parts

CHUNK_ROWS = 256


def supports_chunked_loss(model: Any) -> bool:
    """Whether :func:`lm_train_loss_sum` applies (a plain causal LM: body + head, no logit soft-capping)."""
    return _lm_parts(model) is not None


def _chunk_loss(head: Any, rows: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    return F.cross_entropy(head(rows).float(), target, reduction="sum", label_smoothing=label_smoothing)


def lm_train_loss_sum(
    model: Any,
    inputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    chunk_rows: int = CHUNK_ROWS,
) -> torch.Tensor:
    """Summed next-token loss with gradients, the head applied per checkpointed chunk of target rows."""
    parts = _lm_parts(model)
    if parts is None:
        raise ValueError(
            f"lm_loss: {type(model).__name__} has no plain decoder body + output head "
            "(check supports_chunked_loss first)"
        )
    if chunk_rows < 1:
        raise ValueError(f"lm_loss: chunk_rows must be >= 1, got {chunk_rows}")
    body, head = parts
    hidden = body(**inputs).last_hidden_state[:, :-1]
    target = labels[:, 1:].to(hidden.device)
    keep = target != IGNORE
    rows, tgt = hidden[keep], target[keep]
    n = rows.size(0)
    # an empty batch still runs one (empty) chunk so the loss keeps a grad_fn, as cross_entropy's does
    chunks = [
        checkpoint(
            _chunk_loss, head, rows[i : i + chunk_rows], tgt[i : i + chunk_rows], label_smoothing,
            use_reentrant=False,
        )
        for i in range(0, max(n, 1), chunk_rows)
    ]
    return torch.stack(chunks).sum()
