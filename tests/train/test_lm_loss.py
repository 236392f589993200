"""The chunked, checkpointed training loss of a causal LM (issue #19 section 6) against the plain formula:
full logits + torch's F.cross_entropy, same loss and every trainable gradient, tied and untied heads."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit import LoraConfig
from lorakit.train.batching import IGNORE, collate, encode_lm
from lorakit.train.data import MRGroup
from lorakit.train.lm_loss import lm_train_loss_sum, supports_chunked_loss

from .conftest import make_tiny_llama

MRS = [
    MRGroup("name : Aromi | food : Thai | area : riverside", ["Aromi serves Thai food by the river ."]),
    MRGroup("name : Cotto | eatType : coffee shop", ["Cotto is a coffee shop .", "There is a coffee shop , Cotto ."]),
]


@pytest.fixture(scope="module")
def tok_model() -> tuple[Any, Any]:
    return make_tiny_llama()


def _adapted(base: Any, tied: bool) -> Any:
    """A copy of the tiny Llama with LoRA on q/v (+ the head when untied); tied: head = embedding, trainable."""
    import copy

    model = copy.deepcopy(base).train()
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
        model.config.tie_word_embeddings = True
        lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
        model.model.embed_tokens.weight.requires_grad_(True)
    else:
        lorakit.inject(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "lm_head"]))
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero B so that every factor has a non-zero gradient
        for name, p in model.named_parameters():
            if p.requires_grad and "embed" not in name:
                p.normal_(0, 0.1)
    return model


def _grads(model: Any) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_chunked_loss_and_gradients_equal_full_logits_cross_entropy(
    tok_model: Any, tied: bool, smoothing: float
) -> None:
    tok, base = tok_model
    model = _adapted(base, tied)
    assert supports_chunked_loss(model)
    if not tied:
        assert type(model.get_output_embeddings()) is not torch.nn.Linear  # the LoRA-adapted head is used
    batch = collate(encode_lm(MRS, tok, 128), tok.pad_token_id)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    n_tokens = int((labels[:, 1:] != IGNORE).sum())

    logits = model(**inputs).logits  # the plain formula, written out here
    ref = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
        ignore_index=IGNORE, reduction="sum", label_smoothing=smoothing,
    )
    (ref / n_tokens).backward()
    ref_g = _grads(model)

    seen: list[int] = []
    hook = model.get_output_embeddings().register_forward_hook(
        lambda m, i, o: seen.append(i[0].reshape(-1, i[0].size(-1)).size(0))
    )
    try:
        got = lm_train_loss_sum(model, inputs, labels, smoothing, chunk_rows=7)
        (got / n_tokens).backward()
    finally:
        hook.remove()
    got_g = _grads(model)

    assert float(got.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)
    assert got_g.keys() == ref_g.keys() and len(ref_g) >= 4
    if tied:
        assert "model.embed_tokens.weight" in ref_g
    for name, g in ref_g.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(got_g[name], g, rtol=1e-5, atol=1e-6, msg=name)
    # heads ran on target rows only, <= 7 at a time, each chunk twice (forward, recomputed in backward)
    assert max(seen) <= 7 and sum(seen) == 2 * n_tokens < 2 * inputs["input_ids"].numel()


def test_no_target_rows_still_backpropagates_zero(tok_model: Any) -> None:
    tok, base = tok_model
    model = _adapted(base, tied=False)
    batch = collate(encode_lm(MRS[:1], tok, 128), tok.pad_token_id)
    labels = torch.full_like(batch["labels"], IGNORE)
    loss = lm_train_loss_sum(model, {k: v for k, v in batch.items() if k != "labels"}, labels)
    loss.backward()
    assert float(loss) == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters() if p.requires_grad)
