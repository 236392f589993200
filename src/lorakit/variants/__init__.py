"""LoRA variants: small objects that change one layer's delta, forward and merge.

* :mod:`.base`: the interface (:class:`LoraVariant`) and :func:`attach` / :func:`detach`.
* :mod:`.dora`: DoRA (``use_dora=True``) for Linear, GPT-2 Conv1D, Embedding and Conv1d/2d/3d.
* :mod:`.bias`: LoRA bias (``lora_bias=True``) for Linear and Conv layers.
* :mod:`.init`: PiSSA / OLoRA initialisations (they rewrite W0 to the residual).

:func:`apply_spec` is what injection calls after building a layer.
"""

from __future__ import annotations

from torch import nn

from . import bias as _bias  # noqa: F401 - registers "lora_bias"
from . import dora as _dora  # noqa: F401 - registers "use_dora"
from .base import LoraVariant, attach, detach, register_variant, variant_of
from .init import apply_init, initial_state, is_weight_init, to_plain_lora

__all__ = ["LoraVariant", "apply_spec", "attach", "detach", "initial_state", "register_variant",
           "to_plain_lora", "variant_of"]


def apply_spec(layer: nn.Module, *, use_dora: bool = False, lora_bias: bool = False, init: str = "kaiming",
               where: str = "") -> nn.Module:
    """Apply a layer spec's init and variant to a freshly built LoRA layer (PEFT's order: the
    initialisation first, then the variant, so DoRA's magnitude is the norm of the initialised weight)."""
    if is_weight_init(init):
        apply_init(layer, init, where)
    if use_dora:
        attach(layer, "use_dora", where)
    elif lora_bias:
        attach(layer, "lora_bias", where)
    return layer
