"""LoRA variants: small objects that change one layer's delta, forward and merge.

* :mod:`.base`: the interface (:class:`LoraVariant`) and :func:`attach` / :func:`detach`.
* :mod:`.dora`: DoRA (``use_dora=True``) for Linear, GPT-2 Conv1D, Embedding and Conv1d/2d/3d.
* :mod:`.bias`: LoRA bias (``lora_bias=True``) for Linear and Conv layers.
* :mod:`.init`: PiSSA / OLoRA initialisations (they rewrite W0 to the residual).
* :mod:`.grouped`: PEFT's layout of grouped-convolution LoRA (read; lorakit's converts on write).

:func:`apply_spec` is what injection calls after building a layer.
"""

from __future__ import annotations

from torch import nn

from . import bias as _bias  # noqa: F401 - registers "lora_bias"
from . import dora as _dora  # noqa: F401 - registers "use_dora"
from . import grouped as _grouped  # noqa: F401 - registers "peft_groups"
from .base import LoraVariant, attach, builder_for, detach, register_variant, variant_of
from .init import apply_init, check_init, initial_state, is_weight_init, to_plain_lora

__all__ = ["LoraVariant", "apply_spec", "attach", "check_spec", "detach", "initial_state", "is_weight_init",
           "register_variant", "to_plain_lora", "variant_of"]


def _is_loftq(init: str) -> bool:
    return isinstance(init, str) and init.startswith("loftq")


def _variant_name(use_dora: bool, lora_bias: bool) -> str | None:
    return "use_dora" if use_dora else "lora_bias" if lora_bias else None


def check_spec(layer: nn.Module, *, use_dora: bool = False, lora_bias: bool = False, init: str = "kaiming",
               where: str = "") -> None:
    """Raise (typed, naming ``where``) if :func:`apply_spec` would refuse this layer; changes nothing."""
    if _is_loftq(init):
        from ..quant.loftq import mark_loftq

        mark_loftq(layer, init, where, check_only=True)
    elif is_weight_init(init):
        check_init(layer, init, where)
    name = _variant_name(use_dora, lora_bias)
    if name is not None:
        builder_for(layer, name, where)


def apply_spec(layer: nn.Module, *, use_dora: bool = False, lora_bias: bool = False, init: str = "kaiming",
               where: str = "") -> nn.Module:
    """Apply a layer spec's init and variant to a freshly built LoRA layer (PEFT's order: the
    initialisation first, then the variant, so DoRA's magnitude is the norm of the initialised weight)."""
    if _is_loftq(init):
        from ..quant.loftq import mark_loftq

        mark_loftq(layer, init, where)  # quantize_base fits Q, A and B later
    elif is_weight_init(init):
        apply_init(layer, init, where)
    attach(layer, _variant_name(use_dora, lora_bias), where)
    return layer
