"""The E2E data / collation / generation path on a tiny random Llama with SmolLM2's tokenizer, and the
bounded eval memory of #19 section 6 (chunked loss, memory-sized generation batches, per-phase peaks)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lorakit.train.batching import IGNORE, collate, encode_lm, format_prompt, prompt_ids
from lorakit.train.data import MRGroup
from lorakit.train.evaluate import generate, lm_loss_sum_chunked, loss_sum
from lorakit.train.memory import PhasePeaks, generation_batch_size

from .conftest import make_tiny_llama

MRS = [
    MRGroup("name : Aromi | food : Thai | area : riverside", ["Aromi serves Thai food by the river ."]),
    MRGroup("name : Cotto | eatType : coffee shop", ["Cotto is a coffee shop .", "There is a coffee shop , Cotto ."]),
    MRGroup("name : Zizzi | priceRange : cheap | customer rating : 5 out of 5 | near : Burger King", ["Zizzi ."]),
]


@pytest.fixture(scope="module")
def tok_model() -> tuple[Any, Any]:
    return make_tiny_llama()


def test_training_features_end_in_a_supervised_eos_and_prompt_matches_generation(tok_model: Any) -> None:
    tok, _ = tok_model
    assert tok.pad_token_id == tok.eos_token_id  # SmolLM2: padding must not mask the EOS target
    feats = encode_lm(MRS, tok, 128)
    batch = collate(feats, tok.pad_token_id)
    for i, f in enumerate(feats):
        n = len(f.input_ids)
        assert batch["labels"][i, n - 1] == tok.eos_token_id  # the text's EOS is a target ...
        assert (batch["labels"][i, n:] == IGNORE).all()  # ... padding is not
        assert f.units == sum(1 for t in f.label if t != IGNORE)  # type: ignore[union-attr]
    # what generation feeds is exactly the supervised prefix of training
    for g, f in zip([m for m in MRS for _ in m.refs], feats, strict=True):
        p = prompt_ids(tok, format_prompt(g.mr))
        assert f.input_ids[: len(p)] == p and all(t == IGNORE for t in f.label[: len(p)])  # type: ignore[index]
        assert f.label[len(p)] != IGNORE  # type: ignore[index]
        # no forced BOS: SmolLM2's tokenizer adds none, and its bos_token <|im_start|> is a chat-turn marker
        assert tok.bos_token_id not in p and p == tok(format_prompt(g.mr))["input_ids"]
        assert tok.decode(p).endswith("\nDescription:")


def test_batched_left_padded_generation_equals_one_by_one(tok_model: Any) -> None:
    tok, model = tok_model
    kw = dict(num_beams=1, length_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=8, device=torch.device("cpu"))
    prompts = [m.mr for m in MRS]
    batched = generate(model, tok, prompts, batch_size=3, **kw)
    single = [generate(model, tok, [p], batch_size=1, **kw)[0] for p in prompts]
    assert batched == single and all(batched)


def test_chunked_eval_loss_equals_full_logits_and_never_builds_them(tok_model: Any) -> None:
    tok, model = tok_model
    batch = collate(encode_lm(MRS, tok, 128), tok.pad_token_id)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        full = loss_sum(model(**inputs).logits, batch["labels"], "generation")
        head = model.get_output_embeddings()
        seen: list[int] = []
        hook = head.register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, i[0].size(-1)).size(0)))
        try:
            chunked = lm_loss_sum_chunked(model, inputs, batch["labels"], chunk_rows=5)
        finally:
            hook.remove()
    assert float(chunked) == pytest.approx(float(full), rel=1e-5)
    n_targets = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert max(seen) <= 5 and sum(seen) == n_targets < batch["input_ids"].numel()


def test_generation_batch_is_sized_by_memory(tok_model: Any) -> None:
    _, model = tok_model
    c = model.config
    per_seq = 2 * c.num_hidden_layers * 1 * (32 // 2) * 4 * 100 + 4 * c.vocab_size * 4
    assert generation_batch_size(model, 64, 4, 100, 40 * per_seq / 2**20) == 10  # 40 sequences / 4 beams
    assert generation_batch_size(model, 64, 1, 100, 1e6) == 64  # never above the requested batch
    assert generation_batch_size(model, 64, 8, 100, 0.001) == 1


def test_phase_peaks_separate_train_and_eval() -> None:
    peaks = PhasePeaks("train")
    if not peaks.per_phase:
        pytest.skip("this platform cannot reset the peak RSS (no /proc/self/clear_refs)")
    with peaks.phase("eval"):
        big = torch.ones(300 * 2**20 // 4)  # 300 MiB, touched
        del big
    rep = peaks.report()
    assert rep["peak_rss_eval_mb"] - rep["peak_rss_train_mb"] > 200
    assert rep["peak_rss_mb"] >= rep["peak_rss_eval_mb"]
