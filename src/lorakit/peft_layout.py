"""PEFT's tensor layout: a lorakit layer's adapter as PEFT's keys and shapes, and back.

PEFT writes ``base_model.model.<module>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r)
(``lora_embedding_A/B`` for embeddings, conv kernels as ``(r, in, *k)`` / ``(out, r, 1, ...)``,
fused q/k/v slices as one zero-padded dense pair); variants add their own tensors
(``lora_magnitude_vector``, ``lora_B.bias``, PEFT's grouped-conv layout), and ``target_parameters``
layers sit under PEFT's nested ``base_layer`` wrappers (:mod:`lorakit.param_targets`). Reading and
writing whole adapter directories: :mod:`lorakit.formats`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import param_targets as _params
from .errors import AdapterFormatError
from .layers import ConvLoRA, Embedding, LoraLayer, MergedLinear
from .layers.mha import LoraMultiheadAttention
from .variants.grouped import to_peft_pair

__all__ = ["PREFIX", "dense_to_fused", "peft_name", "peft_tensors", "split_key", "to_layer_layout"]

PREFIX = "base_model.model."


# --- layer -> PEFT tensors -------------------------------------------------------------------
def peft_tensors(layer: LoraLayer) -> dict[str, Tensor]:
    """A layer's adapter in PEFT's key suffixes and shapes."""
    variant = layer.__dict__.get("lora_variant")
    if variant is not None and variant.owns_layout:  # e.g. PEFT's grouped-conv layout
        return variant.peft_tensors(layer)
    A, B = layer.lora_A.detach(), layer.lora_B.detach()
    if isinstance(layer, Embedding):
        return _with_variant(layer, {"lora_embedding_A": A, "lora_embedding_B": B})
    if isinstance(layer, ConvLoRA):
        raise AdapterFormatError(f"{type(layer).__name__}: loralib's convolution layout has no PEFT "
                                 "equivalent; save it with lorakit.lora_state_dict instead")
    if isinstance(layer, MergedLinear):
        A, B = _fused_to_dense(layer)
    if isinstance(layer, nn.modules.conv._ConvNd):
        w = layer.weight
        if layer.groups != 1:  # exact, as rank r * groups in PEFT's layout (lorakit.variants.grouped)
            return _with_variant(layer, dict(zip(("lora_A.weight", "lora_B.weight"),
                                                 to_peft_pair(A, B, w, layer.groups), strict=True)))
        A = A.view(A.shape[0], *w.shape[1:])  # (r, in, *k)
        B = B.view(*B.shape, *([1] * (w.dim() - 2)))  # (out, r, 1, ...)
    return _with_variant(layer, {"lora_A.weight": A, "lora_B.weight": B})


def peft_name(model: nn.Module, name: str) -> str:
    """PEFT's module path: an adapted MultiheadAttention's out_proj sits under its ``base_layer``."""
    parent, _, child = name.rpartition(".")
    layer = model.get_submodule(name)
    if isinstance(layer, _params.LoraParameter):  # target_parameters: PEFT nests one wrapper per parameter
        return _params.layer_peft_path(name, layer)
    if child == "out_proj" and isinstance(model.get_submodule(parent), LoraMultiheadAttention):
        return f"{parent}.base_layer.out_proj"
    return name


def _with_variant(layer: LoraLayer, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Add a variant's own tensors (DoRA's ``lora_magnitude_vector``, ``lora_B.bias``) under PEFT's names."""
    variant = layer.__dict__.get("lora_variant")
    return {**tensors, **variant.peft_tensors(layer)} if variant is not None else tensors


def _fused_to_dense(layer: MergedLinear) -> tuple[Tensor, Tensor]:
    """Write the fused slices as one rank r*k pair with a block-structured, zero-padded B."""
    k, n, r = sum(layer.enable_lora), len(layer.enable_lora), layer.r
    rows = layer.out_features // n
    B = layer.lora_B.detach().new_zeros((layer.out_features, r * k))
    for j, slice_idx in enumerate(i for i, e in enumerate(layer.enable_lora) if e):
        B[slice_idx * rows:(slice_idx + 1) * rows, j * r:(j + 1) * r] = layer.lora_B[j * rows:(j + 1) * rows]
    return layer.lora_A.detach(), B


def dense_to_fused(layer: MergedLinear, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    n, r = len(layer.enable_lora), layer.r
    rows = layer.out_features // n
    parts = [B[s * rows:(s + 1) * rows, j * r:(j + 1) * r]
             for j, s in enumerate(i for i, e in enumerate(layer.enable_lora) if e)]
    return A, torch.cat(parts, 0)


def to_layer_layout(layer: LoraLayer, key: str, t: Tensor) -> Tensor:
    """Inverse of :func:`peft_tensors` for one tensor (reshape conv kernels)."""
    target = layer.lora_A if key.endswith("A") or key.endswith("A.weight") else layer.lora_B
    return t.reshape(target.shape) if t.numel() == target.numel() else t



# --- PEFT tensors -> layer ------------------------------------------------------------------------
_LORA_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B",
                  "lora_magnitude_vector", "lora_B.bias")  # the last two: lorakit.variants


def split_key(key: str) -> tuple[str, str]:
    k = key[len(PREFIX):] if key.startswith(PREFIX) else key
    k = k.replace(".base_layer.", ".")
    for s in _LORA_SUFFIXES:
        for adapter_suffix in ("", ".default"):
            full = s.replace(".weight", adapter_suffix + ".weight") if s.endswith(".weight") else s + adapter_suffix
            if k.endswith("." + full):
                return k[: -len(full) - 1], s
    return k, ""
