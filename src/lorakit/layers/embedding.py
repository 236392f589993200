"""LoRA on ``nn.Embedding`` (loralib's ``Embedding``; A zero, B normal).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional as LF
from .base import LoraLayer, _adopt, _reject_fan_in_fan_out

_EMBEDDING_ATTRS = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                    "scale_grad_by_freq", "sparse")


class Embedding(LoraLayer, nn.Embedding):
    """``nn.Embedding`` with LoRA: A (r, num) starts at zero and B (dim, r) normal, as loralib."""

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 0, lora_alpha: float = 1,
                 merge_weights: bool = True, **kwargs: Any) -> None:
        _reject_fan_in_fan_out(type(self).__name__, kwargs)
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        self._init_lora(r, lora_alpha, 0.0, merge_weights)
        if r > 0:
            self._new_lora_params((r, num_embeddings), (embedding_dim, r))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.Embedding.reset_parameters(self)
        if hasattr(self, "lora_A"):
            self.reset_lora_parameters()

    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        if not self.has_lora:
            return
        with torch.no_grad():
            nn.init.normal_(self.lora_B)
            if init == "random":
                nn.init.normal_(self.lora_A)
            else:
                nn.init.zeros_(self.lora_A)

    @classmethod
    def from_module(cls, base: nn.Embedding, r: int, lora_alpha: float, lora_dropout: float = 0.0, *,
                    use_rslora: bool = False, init: str = "kaiming") -> Embedding:
        new = cls.__new__(cls)
        _adopt(new, base, _EMBEDDING_ATTRS)
        new._init_lora(r, lora_alpha, lora_dropout, merge_weights=False, use_rslora=use_rslora)
        new._new_lora_params((r, base.num_embeddings), (base.embedding_dim, r), freeze=False)
        new.reset_lora_parameters(init)
        return new

    def delta_weight(self) -> Tensor:
        return LF.lora_delta(self.lora_A, self.lora_B, self.scaling).transpose(0, 1)  # (num, dim)

    def forward(self, x: Tensor) -> Tensor:
        out = F.embedding(x, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                          self.scale_grad_by_freq, self.sparse)
        if not self.lora_active:
            return out
        variant = self.__dict__.get("lora_variant")  # lorakit.variants (DoRA)
        if variant is not None:
            return variant.forward(self, x, self.lora_A, self.lora_B)
        # Row lookup of A^T: (..., r). max_norm is not applied: it would rescale A in place.
        after_a = F.embedding(x, self.lora_A.transpose(0, 1), self.padding_idx, None, 2.0,
                              self.scale_grad_by_freq, self.sparse)
        after_a = self.lora_dropout(after_a)
        return out + ((after_a @ self.lora_B.transpose(0, 1)) * self.scaling).to(out.dtype)  # (..., dim)

    def _build_plain(self) -> nn.Module:
        plain = nn.Embedding.__new__(nn.Embedding)
        _adopt(plain, self, _EMBEDDING_ATTRS)
        del plain._lora_original
        return plain


