"""LoRA on ``nn.MultiheadAttention``: its packed in-projection and its out-projection (PEFT's layout).

::

    in_proj_weight (3E, E)  +  s B A        lora_A (r, E), lora_B (3E, r)      on this module
    out_proj.weight (E, E)  +  s' B' A'     an injected lorakit Linear          as ``out_proj``

``nn.MultiheadAttention.forward`` reads ``in_proj_weight`` and ``out_proj.weight`` directly (it
never calls ``out_proj``), so the unmerged forward runs the stock forward with both weights
replaced by ``W0 + s B A`` (``torch.func.functional_call``: differentiable, nothing copied into the
Parameters). As in PEFT there is no LoRA dropout on this layer. Keys stay
``<mha>.in_proj_weight`` / ``<mha>.out_proj.weight``; PEFT's file keys are ``<mha>.lora_A.weight``
and ``<mha>.base_layer.out_proj.lora_A.weight``. Only packed projections (kdim = vdim = embed_dim).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as LF
from ..errors import UnsupportedModuleError
from .base import LoraLayer

_ATTRS = ("embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout", "batch_first", "head_dim",
          "add_zero_attn")


class LoraMultiheadAttention(LoraLayer, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` sharing the wrapped module's Parameters, LoRA on both projections."""

    _weight_key = "in_proj_weight"

    @classmethod
    def from_module(cls, base: nn.MultiheadAttention, r: int, lora_alpha: float, lora_dropout: float = 0.0, *,
                    use_rslora: bool = False, init: str = "kaiming") -> LoraMultiheadAttention:
        if not base._qkv_same_embed_dim:
            raise UnsupportedModuleError("MultiheadAttention with kdim/vdim != embed_dim (separate q/k/v "
                                         "weights) is not supported; PEFT does not support it either")
        from .linear import Linear

        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for a in _ATTRS:
            setattr(new, a, getattr(base, a))
        for name, p in base._parameters.items():
            new.register_parameter(name, p)
        for a in ("bias_k", "bias_v"):  # plain None attributes unless add_bias_kv
            if a not in base._parameters:
                setattr(new, a, getattr(base, a))
        new.training = base.training
        new._lora_original = (base,)
        new._init_lora(r, lora_alpha, 0.0, merge_weights=False, use_rslora=use_rslora)
        e = base.embed_dim
        new._new_lora_params((r, e), (3 * e, r), freeze=False)
        new.reset_lora_parameters(init)
        new.out_proj = Linear.from_module(base.out_proj, r, lora_alpha, 0.0, use_rslora=use_rslora, init=init)
        return new

    def _weight_param(self) -> nn.Parameter:
        return self.in_proj_weight

    def _bias_param(self) -> nn.Parameter | None:
        return self.in_proj_bias

    def delta_weight(self) -> Tensor:
        return LF.lora_delta(self.lora_A, self.lora_B, self.scaling)  # (3E, E)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.__dict__.get("_lora_in_call"):  # inside functional_call: the stock forward
            return nn.MultiheadAttention.forward(self, query, key, value, *args, **kwargs)
        subs: dict[str, Tensor] = {}
        if self.lora_active:
            w = self.in_proj_weight
            subs["in_proj_weight"] = w + ((self.lora_B @ self.lora_A) * self.scaling).to(w.dtype)
        op = self.out_proj
        if isinstance(op, LoraLayer) and op.lora_active:
            w = op.weight
            subs["out_proj.weight"] = w + ((op.lora_B @ op.lora_A) * op.scaling).to(w.dtype)
        if not subs:
            return nn.MultiheadAttention.forward(self, query, key, value, *args, **kwargs)
        self.__dict__["_lora_in_call"] = True
        try:
            return torch.func.functional_call(self, subs, (query, key, value, *args), kwargs)
        finally:
            self.__dict__["_lora_in_call"] = False

    def to_plain(self) -> nn.Module:
        self.unmerge()
        base = self._lora_original[0]
        op = self.out_proj
        base.out_proj = op.to_plain() if isinstance(op, LoraLayer) else op
        return base

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, r={self.r}, lora_alpha={self.lora_alpha}"
