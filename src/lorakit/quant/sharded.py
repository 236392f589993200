"""``merge`` / ``unmerge`` of a 4-bit LoRA layer whose packed weight FSDP2 sharded (a DTensor).

Under ``fully_shard`` each rank holds only its rows of the packed NF4/FP4 bytes between forwards, while
the quantization state (absmax, code) stays whole on every rank (``lorakit.train.fsdp``). Requantizing
needs the whole weight, so :func:`merge` all-gathers the packed bytes (one layer at a time, a collective:
call ``lorakit.merge`` on every rank), dequantizes them with the shared state, requantizes
``W0 + s B A`` with the layer's own settings (the same arithmetic as the unsharded
:meth:`lorakit.quant.layer.QuantLinear.merge`, deterministic, so every rank computes the same bytes and
state), and writes back its own rows in place (FSDP2's next all-gather then sees them). It keeps this
rank's original rows and the original state, so :func:`unmerge` restores them bit for bit (cost: 1/N
of the layer's packed bytes per rank). Without the kept copy ``unmerge`` requantizes ``W - s B A``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from . import backend as QB
from . import weights as QW


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module``'s weight is an FSDP2 shard (a DTensor)."""
    return type(module.weight).__name__ == "DTensor"


def _dense(q: nn.Module, packed: Tensor) -> Tensor:
    return QW.dequantize_state(packed, QB.quant_state(q), torch.float32)


def _write(q: nn.Module, full: Tensor, state: Any) -> None:
    """This rank's rows of the packed ``full`` bytes into the sharded weight, in place; ``state`` everywhere
    the layer's state is read (the sharded Parameter, the module: FSDP2's gathered weight is a new tensor)."""
    from torch.distributed.tensor import distribute_tensor

    w = q.weight
    mine = distribute_tensor(full.to(w.dtype), w.device_mesh, w.placements, src_data_rank=None)  # no collective
    with torch.no_grad():
        w.to_local().copy_(mine.to_local())
    _set_state(q, state)


def _set_state(q: nn.Module, state: Any) -> None:
    q.weight.quant_state = state
    q.quant_state = state


def check_model(model: nn.Module) -> None:
    """:func:`check` on every sharded quantized LoRA layer of ``model``, before ``lorakit.merge`` changes any."""
    from ..inject import lora_layers
    from .merging import is_quant_lora

    for _, layer in lora_layers(model):
        if is_quant_lora(layer) and not layer.lora_disabled and is_sharded(layer.quant_base):  # type: ignore[attr-defined]
            check(layer)


def check(layer: nn.Module) -> None:
    """Only 4-bit layers without a variant merge sharded (int8 keeps per-row scales FSDP2 would shard too)."""
    from ..errors import UnsupportedModuleError

    q = layer.quant_base  # type: ignore[attr-defined]
    if not QB.is_4bit(q) or layer.__dict__.get("lora_variant") is not None:
        raise UnsupportedModuleError(
            f"merge of a sharded quantized layer ({type(q).__name__}, variant "
            f"{type(layer.__dict__.get('lora_variant')).__name__}): only plain LoRA on a 4-bit (NF4/FP4) base "
            "merges under fully_shard; merge an unsharded copy (lorakit merge of the saved adapter)")


def merge(layer: Any, keep_original: bool) -> None:
    """The sharded :meth:`QuantLinear.merge` (collective)."""
    check(layer)
    q = layer.quant_base
    with torch.no_grad():
        mine = q.weight.to_local().clone()
        state = QB.quant_state(q)
        full = q.weight.full_tensor()  # the packed bytes of the whole layer (all-gather)
        merged = layer._merged_dense(_dense(q, full)).float()
        data, new_state = QW.quantize_4bit(merged, state.quant_type, state.blocksize, state.nested, full.dtype,
                                           state.dtype)
        _write(q, data, new_state)
    layer._lora_qsnap = QW.Snapshot(mine, state) if keep_original else None
    layer.merged = True


def unmerge(layer: Any) -> None:
    """The sharded :meth:`QuantLinear.unmerge`: this rank's original rows and state put back, bit for bit."""
    q = layer.quant_base
    snap = layer._lora_qsnap
    with torch.no_grad():
        if snap is not None:
            q.weight.to_local().copy_(snap.data)
            _set_state(q, snap.state)
        else:
            state = QB.quant_state(q)
            full = q.weight.full_tensor()
            w0 = layer._unmerged_dense(_dense(q, full)).float()
            data, new_state = QW.quantize_4bit(w0, state.quant_type, state.blocksize, state.nested, full.dtype,
                                               state.dtype)
            _write(q, data, new_state)
    layer._lora_qsnap = None
    layer.merged = False
