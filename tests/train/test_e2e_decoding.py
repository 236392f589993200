"""E2E decoding's n-gram blocking counts the generated text only (the LoRA paper's rule), never the prompt.

transformers' ``no_repeat_ngram_size`` also counts a decoder-only model's prompt, so with the default 4 the
trainer could not copy "5 out of 5" or "Crowne Plaza Hotel" from the meaning representation: the same
adapter scored 54.96 instead of 60.55 BLEU on the 55 dev MRs (issue #20 section 0, docs/reproduction.md).
A scripted model (logits forced to a planned continuation) makes the rule observable exactly.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from lorakit.train.batching import format_prompt, prompt_ids
from lorakit.train.evaluate import OutputNoRepeatNGram, generate

from .conftest import make_tiny_llama

MR = "name : Zizzi | customer rating : 5 out of 5"


def paper_banned(gen: list[int], n: int) -> set[int]:
    """Reference: tokens that would complete an n-gram already present in ``gen`` (generated tokens only)."""
    seen = {tuple(gen[i : i + n]) for i in range(len(gen) - n + 1)}
    if len(gen) < n - 1:
        return set()
    prefix = tuple(gen[len(gen) - n + 1 :]) if n > 1 else ()
    return {g[-1] for g in seen if g[:-1] == prefix}


@pytest.fixture(scope="module")
def scripted() -> tuple[Any, Any]:
    """A tiny Llama whose next-token logits are a plan: the planned token first, a fallback token second."""
    tok, base = make_tiny_llama()
    cls = type(base)

    class Scripted(cls):  # type: ignore[misc, valid-type]
        plan: list[int] = []
        start = 0
        fallback = 0

        def forward(self, *args: Any, **kw: Any) -> Any:
            out = super().forward(*args, **kw)
            t = kw["attention_mask"].shape[1] - self.start  # tokens generated so far
            logits = torch.zeros_like(out.logits)
            logits[..., self.fallback] = 5.0
            logits[..., self.plan[min(t, len(self.plan) - 1)]] = 10.0
            out.logits = logits
            return out

    model = Scripted(base.config).eval()
    model.load_state_dict(base.state_dict())
    return tok, model


def _run(tok: Any, model: Any, text: str, n: int) -> tuple[list[int], list[int]]:
    """(plan, generated ids) for the planned continuation ``text`` + EOS of the MR's prompt."""
    p = prompt_ids(tok, format_prompt(MR))
    model.plan = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    model.start = len(p)
    model.fallback = tok(" !", add_special_tokens=False)["input_ids"][0]
    out = generate(model, tok, [MR], num_beams=1, length_penalty=1.0, no_repeat_ngram_size=n,
                   max_new_tokens=len(model.plan) + 2, batch_size=1, device=torch.device("cpu"))[0]
    return model.plan, tok(" " + out, add_special_tokens=False)["input_ids"] if out else []


def test_copying_the_mr_is_not_blocked(scripted: tuple[Any, Any]) -> None:
    tok, model = scripted
    text = " Zizzi is rated 5 out of 5 ."
    p = prompt_ids(tok, format_prompt(MR))
    four = tok(" 5 out of 5", add_special_tokens=False)["input_ids"]
    assert len(four) >= 4 and any(p[i : i + 4] == four[:4] for i in range(len(p)))  # the prompt holds the 4-gram
    plan, got = _run(tok, model, text, n=4)
    assert got == plan[:-1]  # the whole planned text, copied 4-gram included (transformers' rule breaks it)
    assert _run(tok, model, text, n=0)[1] == got


def test_a_repeat_inside_the_output_is_still_blocked(scripted: tuple[Any, Any]) -> None:
    tok, model = scripted
    plan, got = _run(tok, model, " Zizzi is good . Zizzi is good .", n=4)
    expected: list[int] = []  # the paper's rule, by hand: a banned planned token gives way to the fallback
    for t in range(len(plan)):
        nxt = plan[t] if plan[t] not in paper_banned(expected, 4) else model.fallback
        if nxt == tok.eos_token_id:
            break
        expected.append(nxt)
    assert got == expected and got != plan[:-1]  # the repeated ". " was replaced


def test_processor_bans_exactly_the_papers_tokens() -> None:
    rng = random.Random(0)
    for n in (1, 2, 3, 4):
        for _ in range(50):
            start = rng.randint(0, 5)
            length = start + rng.randint(0, 12)
            rows = [[rng.randint(0, 5) for _ in range(length)] for _ in range(3)]
            ids = torch.tensor(rows)
            scores = OutputNoRepeatNGram(n, start)(ids, torch.zeros(3, 6))
            for row, r in enumerate(rows):
                assert set(torch.nonzero(scores[row] == -float("inf")).view(-1).tolist()) == paper_banned(r[start:], n)
