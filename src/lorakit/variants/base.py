"""The variant interface: what a LoRA variant may change in a layer, and nothing else.

A plain LoRA layer computes ``h = W0 x + s B A dropout(x)`` and merges ``W0 + s B A``. A *variant*
(DoRA, LoRA bias, ...) is one small object stored on the layer as ``layer.lora_variant`` that
changes exactly three things::

    layer.forward(x)        ->  variant.forward(layer, x, A, B)            (unmerged, adapter active)
    layer.merge()           ->  variant.merged_weight(layer, W0_fp32, dW_fp32)   (then one rounding)
    layer.unmerge()         ->  variant.unmerged_weight(layer, W_fp32, dW_fp32)  (without the kept copy)

plus its own trainable tensors (registered on the layer with a ``lora_`` prefix, so
``mark_only_lora_as_trainable`` and the optimizer see them) and how they are named in a PEFT adapter
file (:meth:`LoraVariant.peft_tensors` / :meth:`LoraVariant.load_peft_tensors`). The layer classes,
the fused fast path and the merge code hold no variant-specific branches: a layer with
``lora_variant is None`` is plain LoRA, any other layer asks its variant.

Adding a variant: subclass :class:`LoraVariant` in its own module under ``lorakit.variants`` and
register a builder with :func:`register_variant`; :func:`attach` picks it from the layer's spec.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LoraConfigError, UnsupportedModuleError

__all__ = ["LoraVariant", "attach", "builder_for", "detach", "refuse_named", "register_variant", "variant_of"]


class LoraVariant:
    """Base class: the plain-LoRA behaviour of every hook. Subclasses override what they change."""

    #: PEFT config flag this variant stands for (``"use_dora"``, ``"lora_bias"``).
    name: str = "lora"
    #: True when :meth:`peft_tensors` gives the whole PEFT layout (``lora_A`` / ``lora_B`` included).
    owns_layout: bool = False

    # --- parameters ---------------------------------------------------------------------------
    def attach(self, layer: nn.Module) -> None:
        """Create the variant's tensors on ``layer`` (called once, after ``lora_A``/``lora_B`` exist)."""

    def detach(self, layer: nn.Module) -> None:
        """Remove what :meth:`attach` registered (the layer becomes plain LoRA again)."""

    def trainable(self, layer: nn.Module) -> list[Tensor]:
        """The variant's own trainable tensors on ``layer`` (named adapters toggle their grads)."""
        return []

    def peft_tensors(self, layer: nn.Module) -> dict[str, Tensor]:
        """Extra tensors of a PEFT adapter file, by key suffix (``lora_magnitude_vector``)."""
        return {}

    def load_peft_tensors(self, layer: nn.Module, tensors: dict[str, Tensor]) -> None:
        """Copy tensors read from a PEFT file (same suffixes as :meth:`peft_tensors`); shapes are
        checked by the caller against :meth:`peft_tensors`."""

    # --- the three behaviours -----------------------------------------------------------------
    def forward(self, layer: nn.Module, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        """The layer's output while unmerged and active."""
        raise NotImplementedError

    def check_merge(self, layer: nn.Module) -> None:
        """Raise (typed) when this layer cannot be merged; called before anything changes."""

    def merged_weight(self, layer: nn.Module, w0: Tensor, delta: Tensor) -> Tensor:
        """The merged weight in fp32 from ``w0`` (fp32, stored layout) and the LoRA update ``delta``."""
        return w0 + delta

    def unmerged_weight(self, layer: nn.Module, w: Tensor, delta: Tensor) -> Tensor:
        """Inverse of :meth:`merged_weight` (used only when the original weight was not kept)."""
        return w - delta

    def after_merge(self, layer: nn.Module, keep_original: bool) -> None:
        """Called once the weight is merged: merge anything else (a bias)."""

    def after_unmerge(self, layer: nn.Module) -> None:
        """Called once the weight is unmerged: undo :meth:`after_merge`."""

    def unmerged_state(self, layer: nn.Module) -> dict[str, Tensor]:
        """State-dict entries (``{"bias": b0}``) a merged layer must save instead of its merged ones."""
        return {}

    def describe(self) -> str:
        return self.name


Builder = Callable[[nn.Module], LoraVariant]
#: variant name -> builder(layer) returning the instance for that layer type (or raising).
_BUILDERS: dict[str, Builder] = {}


def register_variant(name: str, builder: Builder) -> None:
    """Teach :func:`attach` a variant: ``builder(layer)`` returns a :class:`LoraVariant` for that layer."""
    _BUILDERS[name] = builder


def variant_of(layer: nn.Module) -> LoraVariant | None:
    """The layer's variant, or ``None`` for plain LoRA."""
    return layer.__dict__.get("lora_variant")


def builder_for(layer: nn.Module, name: str, where: str = "") -> LoraVariant:
    """The variant object ``name`` for ``layer`` (not attached); raises, naming the module
    ``where``, when the variant is not defined for this layer type."""
    if name not in _BUILDERS:
        raise LoraConfigError(f"unknown LoRA variant {name!r}; known: {sorted(_BUILDERS)}")
    if variant_of(layer) is not None:
        raise LoraConfigError(f"{where or type(layer).__name__}: already has the variant "
                              f"{variant_of(layer).describe()!r}; one variant per layer")
    build = _BUILDERS[name]
    if getattr(layer, "quant_base", None) is not None:  # bitsandbytes base: the quantized-base forms
        from ..quant.variants import quant_variant

        def build(lay: nn.Module) -> LoraVariant:
            return quant_variant(lay, name)
    try:
        return build(layer)
    except UnsupportedModuleError as e:
        raise UnsupportedModuleError(f"{where}: {e}" if where else str(e)) from None


def attach(layer: nn.Module, name: str | None, where: str = "") -> LoraVariant | None:
    """Give ``layer`` the variant ``name`` (``None``: plain LoRA). Raises before changing the layer
    when the variant does not support this layer type, naming the module ``where``."""
    if name is None:
        return None
    variant = builder_for(layer, name, where)
    if getattr(layer, "merged", False):
        raise LoraConfigError(f"{where or type(layer).__name__}: unmerge the layer before adding {name}")
    with torch.no_grad():
        variant.attach(layer)
    layer.__dict__["lora_variant"] = variant
    return variant


def detach(layer: nn.Module) -> None:
    """Drop the layer's variant (unmerging first), making it plain LoRA."""
    variant = variant_of(layer)
    if variant is None:
        return
    layer.unmerge()  # type: ignore[operator]
    variant.detach(layer)
    del layer.__dict__["lora_variant"]


def refuse_named(model: nn.Module, config: Any, what: str) -> None:
    """Named adapters (``add_adapter``, ``load_adapter(name=)``) keep one (A, B) pair per adapter plus,
    for DoRA, a magnitude vector: refuse other variant configs, or a model whose layers carry one."""
    flags = [f for f in ("lora_bias", "trainable_tokens") if getattr(config, f, False)]
    if flags:
        raise UnsupportedModuleError(f"{what}: {flags[0]} is supported for the model's first adapter "
                                     "(inject / load_adapter without name=), not for named adapters yet")
    for name, m in model.named_modules():
        v = variant_of(m)
        if v is not None and v.name != "use_dora":
            raise UnsupportedModuleError(f"{what}: module {name!r} has a {v.describe()} adapter; named adapters "
                                         "next to a variant are not supported yet (unwrap or merge_and_unload first)")


def dropout_active(layer: nn.Module) -> bool:
    """True when the layer's LoRA dropout changes its input (training with p > 0)."""
    d: Any = layer._modules.get("lora_dropout")
    return layer.training and d is not None and not isinstance(d, nn.Identity) and d.p > 0
