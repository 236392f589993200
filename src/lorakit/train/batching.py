"""Tokenisation into features, padding collation, and the deterministic batch schedule.

The schedule is a pure function of (seed, step): epoch ``e`` uses a permutation drawn from a generator
seeded with ``seed`` and ``e``, and step ``s`` takes the ``s``-th slice of it. Resuming at step ``s``
therefore continues the data order exactly, and every rank of a distributed run agrees on the global
batch and takes its own contiguous part of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.train.data import Example, MRGroup

IGNORE = -100
# The E2E template: MR, a newline and a cue word; the text follows after a space. " =>" after a forced BOS
# (SmolLM2's is the chat-turn marker <|im_start|>) trained 7-8 BLEU worse at one epoch (issue #20 section 0,
# docs/reproduction.md).
E2E_SEPARATOR = "\nDescription:"


def format_prompt(mr: str) -> str:
    """The E2E training template: the meaning representation, then a separator; the text follows."""
    return mr.strip() + E2E_SEPARATOR


@dataclass
class Feature:
    """One tokenised example; ``units`` is what its loss is averaged over (1 or #target tokens)."""

    input_ids: list[int]
    label: int | float | list[int]
    token_type_ids: list[int] | None = None
    units: int = 1


def encode_classification(examples: Sequence[Example], tokenizer: Any, max_len: int) -> list[Feature]:
    """Tokenise single sentences or pairs (truncated to ``max_len``)."""
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples]
    kw: dict[str, Any] = {"truncation": True, "max_length": max_len}
    enc = tokenizer(texts, pairs, **kw) if any(p is not None for p in pairs) else tokenizer(texts, **kw)
    tti = enc.get("token_type_ids")
    return [
        Feature(enc["input_ids"][i], examples[i].label, tti[i] if tti is not None else None)
        for i in range(len(examples))
    ]


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a prompt exactly as training sees it: the tokenizer's own special tokens (a BOS only where
    the tokenizer adds one itself, as Llama's ``<s>``; SmolLM2's adds none), never a trailing EOS."""
    ids = list(tokenizer(prompt)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and ids and ids[-1] == eos and len(ids) > 1:
        ids = ids[:-1]
    return ids


def encode_lm(groups: Sequence[MRGroup], tokenizer: Any, max_len: int) -> list[Feature]:
    """One causal-LM feature per (MR, reference): ``prompt + " " + text + EOS``, loss on the text only."""
    feats: list[Feature] = []
    eos = tokenizer.eos_token or ""
    for g in groups:
        p_ids = prompt_ids(tokenizer, format_prompt(g.mr))
        for ref in g.refs:
            text_ids = tokenizer(" " + ref.strip() + eos, add_special_tokens=False)["input_ids"]
            ids = (p_ids + text_ids)[:max_len]
            labels = ([IGNORE] * len(p_ids) + text_ids)[:max_len]
            units = sum(1 for t in labels[1:] if t != IGNORE)
            if units == 0:
                continue  # the text was truncated away entirely
            feats.append(Feature(ids, labels, None, units))
    return feats


def collate(feats: Sequence[Feature], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of features into model inputs plus ``labels``."""
    width = max(len(f.input_ids) for f in feats)
    ids = torch.full((len(feats), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(feats), width), dtype=torch.long)
    out: dict[str, torch.Tensor] = {}
    for i, f in enumerate(feats):
        ids[i, : len(f.input_ids)] = torch.tensor(f.input_ids)
        mask[i, : len(f.input_ids)] = 1
    out["input_ids"], out["attention_mask"] = ids, mask
    if feats[0].token_type_ids is not None:
        tti = torch.zeros((len(feats), width), dtype=torch.long)
        for i, f in enumerate(feats):
            tti[i, : len(f.token_type_ids or [])] = torch.tensor(f.token_type_ids or [], dtype=torch.long)
        out["token_type_ids"] = tti
    first = feats[0].label
    if isinstance(first, list):
        labels = torch.full((len(feats), width), IGNORE, dtype=torch.long)
        for i, f in enumerate(feats):
            lab = f.label
            assert isinstance(lab, list)
            labels[i, : len(lab)] = torch.tensor(lab)
        out["labels"] = labels
    elif isinstance(first, float):
        out["labels"] = torch.tensor([float(f.label) for f in feats], dtype=torch.float)  # type: ignore[arg-type]
    else:
        out["labels"] = torch.tensor([int(f.label) for f in feats], dtype=torch.long)  # type: ignore[arg-type]
    return out


@dataclass(frozen=True)
class Schedule:
    """Which examples form global batch ``step``, and which part of it a rank processes."""

    n_examples: int
    micro_batch: int
    grad_accum: int
    world_size: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches per epoch (the last partial batch is dropped)."""
        return self.n_examples // self.global_batch

    def permutation(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n_examples, generator=gen).tolist()

    def global_indices(self, step: int) -> list[int]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        g = self.global_batch
        return self.permutation(epoch)[pos * g : (pos + 1) * g]

    def rank_micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """The ``grad_accum`` micro-batches of ``rank`` at ``step``."""
        per_rank = self.micro_batch * self.grad_accum
        mine = self.global_indices(step)[rank * per_rank : (rank + 1) * per_rank]
        return [mine[k * self.micro_batch : (k + 1) * self.micro_batch] for k in range(self.grad_accum)]
