"""Sampling and incremental detokenization against plain-PyTorch formulas (no server)."""

from __future__ import annotations

import pytest
import torch

from lorakit.serve.errors import InvalidRequestError
from lorakit.serve.sampling import SamplingParams, TextStream, sample


class CharTok:
    """One character per id (the inverse of ``ord``), as the toy tokenizer does."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def test_top_p_keeps_the_smallest_prefix_and_renormalises() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    p = SamplingParams(temperature=1.0, top_p=0.75)
    counts = torch.zeros(4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4000):
        counts[sample(logits, p, gen)] += 1
    freq = counts / counts.sum()
    assert freq[2:].sum() == 0                                    # 0.5 + 0.3 >= 0.75: two tokens kept
    assert abs(freq[0] - 0.5 / 0.8) < 0.03 and abs(freq[1] - 0.3 / 0.8) < 0.03


def test_temperature_and_seed() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0])
    assert sample(logits, SamplingParams(temperature=0.0), torch.Generator()) == 0
    p = SamplingParams(temperature=0.5, seed=11)
    a = [sample(logits, p, p.generator()) for _ in range(3)]
    assert len(set(a)) == 1                                       # the same seed, the same draw
    gen = torch.Generator().manual_seed(1)
    draws = torch.tensor([sample(logits, SamplingParams(temperature=2.0), gen) for _ in range(3000)])
    want = torch.softmax(logits / 2.0, 0)
    got = torch.bincount(draws, minlength=3).float() / 3000
    assert torch.allclose(got, want, atol=0.03)


@pytest.mark.parametrize("kw,param", [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"),
                                      ({"top_p": 0}, "top_p"), ({"stop": ("",)}, "stop")])
def test_bad_params_name_the_field(kw: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kw)
    assert e.value.param == param and param in str(e.value)


def test_stream_holds_back_a_possible_stop_string() -> None:
    s = TextStream(CharTok(), stop=("END",))
    out = [s.push(ord(c)) for c in "abcEN"]
    assert [d for d, _ in out] == ["", "", "a", "b", "c"]          # the last len("END") - 1 chars wait
    assert not any(stop for _, stop in out)
    assert s.push(ord("D")) == ("", True) and s.text == "abc"
    s2 = TextStream(CharTok(), stop=("END",))
    sent = "".join(s2.push(ord(c))[0] for c in "abEN!")
    assert sent + s2.finish() == "abEN!"                          # EN was not the start of END after all


def test_stream_holds_back_unfinished_characters() -> None:
    class Bytes:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return bytes(ids).decode("utf-8", errors="replace")

    s = TextStream(Bytes())
    sent = [s.push(b)[0] for b in "é!".encode()]
    assert sent == ["", "é", "!"]
