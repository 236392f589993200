"""Exact merge (paper Section 4.1: no inference latency once BA is folded into W).

``merge`` computes ``W + scale * B A`` in fp32 and rounds once to the weight's dtype, so a bf16 or
fp16 weight is within one rounding of the exact sum. It keeps a copy of each adapted weight, which
is what lets ``unmerge`` restore the original bits in every dtype (cost: one extra copy of the
adapted weights while merged). ``merge_and_unload`` keeps no copy: it returns a plain model.
"""

from __future__ import annotations

import torch
from torch import nn

from .checks import takes_model
from .inject import _set_module, forget_injection, lora_layers
from .sharded_inject import reshard
from .tokens import bake as _bake_tokens


@takes_model
def merge(model: nn.Module, keep_original: bool = True) -> nn.Module:
    """Fold every active LoRA update into its weight. Merging twice is a no-op.

    On a quantized base each layer requantizes ``dequant(W0) + s B A`` once and keeps W0's quantized
    bytes for :func:`unmerge` (:mod:`lorakit.quant.layer`).
    """
    from .quant import records as QR
    from .quant import sharded as QSH

    QR.check_merge(model, "merge")
    QSH.check_model(model)  # FSDP2-sharded quantized layers: what merges there (lorakit.quant.sharded)
    reshard(model)  # FSDP2: the shards are written, not a gathered copy left by a no_grad forward
    for _, layer in lora_layers(model):
        if not layer.lora_disabled:
            layer.merge(keep_original=keep_original)
    return model


@takes_model
def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`, restoring the original weights bit for bit. No-op when not merged."""
    reshard(model)
    for _, layer in lora_layers(model):
        layer.unmerge()
    return model


@takes_model
def merge_and_unload(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Merge and replace every LoRA layer by its plain module; returns the plain model.

    ``dtype`` (e.g. ``torch.bfloat16``): the adapted layers' weights become ``W0 + s B A`` computed
    in fp32 and rounded once into ``dtype``. A quantized base always gives plain float layers this
    way (W0 dequantized exactly; default dtype: the one it was quantized from) and its remaining
    quantized layers are dequantized too. Variants (DoRA, LoRA bias) merge with their own arithmetic
    before that one rounding (:func:`lorakit.quant.merging.merged_plain`). With ``dtype`` the whole
    returned model is in ``dtype`` (the other float parameters and buffers cast as ``Module.to`` does), so
    it runs as it is; without it every non-adapted tensor keeps its dtype.
    """
    from .errors import ArgumentTypeError
    from .quant import merging as QM
    from .quant import records as QR

    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ArgumentTypeError(f"merge_and_unload: dtype must be a floating torch.dtype (e.g. torch.bfloat16) "
                                f"or None, got {dtype!r}")
    QR.check_merge(model, "merge_and_unload")
    quantized = False
    for name, layer in list(lora_layers(model)):
        if dtype is not None or QM.is_quant_lora(layer):
            quantized = quantized or QM.is_quant_lora(layer)
            plain = QM.merged_plain(layer, dtype)
        else:
            if not layer.merged and not layer.lora_disabled:
                layer.merge(keep_original=False)
            layer._lora_w0 = None
            layer.merged = False  # the merged weight now *is* the plain module's weight
            plain = layer.to_plain()
        if not name:
            return plain
        _set_module(model, name, plain)
    if quantized or dtype is not None:
        QM.dequantize_rest(model, dtype)
    _bake_tokens(model)  # trainable tokens: the rows into the weights, hooks removed
    forget_injection(model)
    if dtype is not None:  # the merged layers are dtype already (no second rounding): the rest follows
        model.to(dtype)
    return model
