"""The running batch's KV cache: one row per request, left-padded to a common length.

Rows join (their prefill cache is left-padded and concatenated), leave (rows selected away) and the
columns that every remaining row has as padding are trimmed, so the cache never holds more than the
longest running row. ``mask`` (rows, L) marks each row's real positions; the model sees it as its
``attention_mask`` and each row's own position ids, so a row's attention is the same as alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def _layers(cache: Any) -> list[Any]:
    return list(cache.layers)


def _pad_left(t: Tensor, n: int) -> Tensor:
    """(B, H, L, D) -> (B, H, n + L, D) with zeros in front."""
    return F.pad(t, (0, 0, n, 0)) if n else t


def new_cache() -> Any:
    from transformers import DynamicCache

    return DynamicCache()


class BatchCache:
    """The transformers ``DynamicCache`` of the running rows plus their attention mask."""

    def __init__(self) -> None:
        self.cache: Any = None
        self.mask: Tensor | None = None   # (rows, L) long, 1 = real token

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def add(self, cache: Any, mask: Tensor) -> None:
        """Append the rows of a prefill ``cache`` (its ``mask`` (b, Lp)) below the running rows."""
        if self.cache is None or self.mask is None or self.rows == 0:
            self.cache, self.mask = cache, mask
            return
        L, Lp = self.mask.shape[1], mask.shape[1]
        n = max(L, Lp)
        for old, new in zip(_layers(self.cache), _layers(cache), strict=True):
            old.keys = torch.cat([_pad_left(old.keys, n - L), _pad_left(new.keys, n - Lp)])
            old.values = torch.cat([_pad_left(old.values, n - L), _pad_left(new.values, n - Lp)])
        self.mask = torch.cat([F.pad(self.mask, (n - L, 0)), F.pad(mask, (n - Lp, 0))])

    def grow(self) -> Tensor:
        """The mask for the next decode step (one more real column per row); becomes the cache's mask."""
        assert self.mask is not None
        self.mask = F.pad(self.mask, (0, 1), value=1)
        return self.mask

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in this order); trim columns that are padding in all of them."""
        if self.mask is None:
            return
        if not rows:
            self.cache, self.mask = None, None
            return
        if rows != list(range(self.rows)):
            idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
            for layer in _layers(self.cache):
                layer.keys, layer.values = layer.keys[idx], layer.values[idx]
            self.mask = self.mask[idx]
        lead = int((self.mask.cumsum(1) == 0).sum(1).min())  # padding columns every row has in front
        if lead:
            for layer in _layers(self.cache):
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
            self.mask = self.mask[:, lead:]
