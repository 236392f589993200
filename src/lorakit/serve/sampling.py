"""Per-request sampling and text streaming: temperature, top-p, seed, stop strings, max_tokens.

::

    params = SamplingParams(max_tokens=32, temperature=0.7, top_p=0.9, seed=1, stop=("\\n",))
    gen = params.generator()
    token = sample(logits, params, gen)          # logits (vocab,) float32; greedy at temperature 0
    stream = TextStream(tokenizer, params.stop)
    delta, stopped = stream.push(token)          # text safe to send now; True once a stop string showed up

Stop strings are matched on the decoded text; text that could be the start of a stop string (and
an unfinished UTF-8 character) is held back until it can no longer turn into one, so a streamed
response never shows text that the final response cuts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    """OpenAI's sampling fields for one request (``n`` is always 1)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {self.max_tokens}", param="max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise InvalidRequestError(f"temperature must be in [0, 2], got {self.temperature}", param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if len(self.stop) > 4 or any(not s for s in self.stop):
            raise InvalidRequestError("stop: at most 4 non-empty strings", param="stop")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self) -> torch.Generator:
        """The request's own random stream (seeded, else from the OS); unaffected by other rows."""
        gen = torch.Generator()
        gen.manual_seed(self.seed if self.seed is not None else random.SystemRandom().getrandbits(63))
        return gen


def sample(logits: Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """Next token from one row's logits ``(vocab,)``: argmax at temperature 0, else top-p sampling."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(p, 0) - p < params.top_p          # the smallest prefix reaching top_p
        p = p * keep
        return int(idx[torch.multinomial(p / p.sum(), 1, generator=gen)])
    return int(torch.multinomial(probs, 1, generator=gen))


class TextStream:
    """Decodes a row's generated ids incrementally and watches for stop strings."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (text to send now, whether a stop string ended the text)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = text[:cut]
            return self._flush(), True
        self.text = text
        end = len(text) - self.hold
        while end > self.sent and text[end - 1] == "\ufffd":  # an unfinished multi-byte character
            end -= 1
        if end <= self.sent:
            return "", False
        delta, self.sent = text[self.sent:end], end
        return delta, False

    def _flush(self) -> str:
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta

    def finish(self) -> str:
        """The held-back rest, once the row ends for another reason (length, end of sequence)."""
        return self._flush()
