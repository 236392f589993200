"""Quantized weights as values: dequantize, requantize, snapshot / restore, bytes, description.

A 4-bit layer (bitsandbytes ``Linear4bit``) stores its weight as packed uint8 nibbles (two codes a
byte, blocks of ``blocksize`` values along the flattened (out, in) weight) plus one absmax per
block; with double quantization the absmaxes are themselves 8-bit with an fp32 absmax per 256
(``QuantState.state2``) and an ``offset``. An int8 layer (``Linear8bitLt``) stores (out, in) int8
codes and one fp32 scale per output row (``SCB``): ``W = CB * SCB / 127``.

Everything here works on the layer's tensors in place or returns new tensors; nothing keeps a
dequantized copy.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import backend as QB


@dataclass(frozen=True)
class QuantInfo:
    """How one layer is quantized; ``adapter_config.json`` records it (``lorakit_quantization``)."""

    quant_type: str  # "nf4" | "fp4" | "int8"
    blocksize: int | None = None  # 4-bit only
    double_quant: bool | None = None  # 4-bit only
    compute_dtype: str | None = None  # e.g. "bfloat16"; None: the input's dtype
    backend: str = "bitsandbytes"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantInfo:
        return cls(**{k: d.get(k) for k in ("quant_type", "blocksize", "double_quant", "compute_dtype")},
                   backend=str(d.get("backend", "bitsandbytes")))


def _dtype_name(dt: torch.dtype | None) -> str | None:
    return None if dt is None else str(dt).removeprefix("torch.")


def info(module: nn.Module) -> QuantInfo:
    """The :class:`QuantInfo` of a quantized layer."""
    kind = QB.kind_of(module)
    if kind is None:
        raise QB.QuantBackendError(f"{type(module).__name__} is not a quantized layer")
    cd = _dtype_name(QB.compute_dtype_of(module))
    if kind == "int8":
        return QuantInfo("int8", compute_dtype=cd)
    qs = QB.quant_state(module)
    return QuantInfo(kind, int(qs.blocksize), bool(qs.nested), cd)


# --- dequantize ---------------------------------------------------------------------------------
def _absmax(qs: Any) -> Tensor:
    """The fp32 per-block absmax (undoing double quantization)."""
    if not qs.nested:
        return qs.absmax.float()
    F = QB.bnb().functional
    return F.dequantize_blockwise(qs.absmax, qs.state2).float().add_(qs.offset)


def dequantize(module: nn.Module, dtype: torch.dtype = torch.float32) -> Tensor:
    """The layer's weight as a new dense (out, in) tensor of ``dtype``.

    In float32 every element is exactly ``code * absmax`` (int8: ``CB * SCB / 127``) as the backend
    computes it, so ``float32 -> dtype`` afterwards is the only rounding.
    """
    if QB.is_8bit(module):
        w = QB.bnb().functional.int8_vectorwise_dequant(QB.int8_codes(module), QB.int8_scales(module))
        return w if w.dtype == dtype else w.to(dtype)
    qs = QB.quant_state(module)
    if getattr(qs, "packing_format_for_cpu", False):
        raise QB.QuantBackendError(
            f"{type(module).__name__}: bitsandbytes repacked this weight for its CPU inference kernel "
            "(a forward of the bare layer under no_grad in eval mode); requantize it or reload the model")
    return dequantize_state(module.weight.data, qs, dtype)


def dequantize_state(data: Tensor, qs: Any, dtype: torch.dtype = torch.float32) -> Tensor:
    """Packed 4-bit ``data`` with its ``QuantState`` as a new dense ``qs.shape`` tensor of ``dtype``:
    bitsandbytes' kernel, or :func:`_dequantize_flat` where its CPU kernel is wrong."""
    if data.is_cpu and qs.shape[-1] % qs.blocksize:
        return _dequantize_flat(data, qs, dtype)
    if qs.dtype != dtype:
        qs = copy.copy(qs)  # same tensors, another output dtype: the C++ kernel writes dtype directly
        qs.dtype = dtype
    return QB.bnb().functional.dequantize_4bit(data, qs)


def _dequantize_flat(data: Tensor, qs: Any, dtype: torch.dtype) -> Tensor:
    """4-bit dequantization with torch ops over the flattened weight (blocks run across rows).

    bitsandbytes 0.50's C++ CPU kernel assigns the wrong absmax to blocks that straddle rows: with
    ``in_features`` a multiple of 16 but not of ``blocksize`` (e.g. 32, 96, 160 with blocks of 64) its
    result is off by up to the full block scale (its own quantizer and CUDA kernels use flat blocks).
    Such layers take this path; the others the kernel (same values, bit for bit, where it is right).
    """
    packed = data.reshape(-1).view(torch.uint8)
    n = qs.shape[0] * qs.shape[1]
    codes = torch.stack([packed >> 4, packed & 0xF], 1).reshape(-1)[:n].long()  # high nibble first
    scale = _absmax(qs).repeat_interleave(qs.blocksize)[:n]
    return (qs.code.float()[codes] * scale).reshape(tuple(qs.shape)).to(dtype)


# --- requantize ----------------------------------------------------------------------------------
def quantize_4bit(w: Tensor, quant_type: str, blocksize: int, double_quant: bool, storage: torch.dtype,
                  dtype: torch.dtype) -> tuple[Tensor, Any]:
    """``w`` (out, in, any float dtype) to packed codes + a ``QuantState`` that dequantizes to ``dtype``."""
    F = QB.bnb().functional
    data, qs = F.quantize_4bit(w.contiguous(), blocksize=blocksize, compress_statistics=double_quant,
                               quant_type=quant_type, quant_storage=storage)
    qs.dtype = dtype
    return data, qs


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """``w`` (out, in) to int8 codes and per-row fp32 scales (LLM.int8()'s row-wise absmax / 127)."""
    F = QB.bnb().functional
    cb, scb, _ = F.int8_vectorwise_quant(w.contiguous().to(torch.float16) if w.is_cuda else w.contiguous())
    return cb, scb


def requantize_(module: nn.Module, w: Tensor) -> None:
    """Replace the layer's quantized weight by ``w`` quantized with the layer's own settings, in place:
    the same Parameter object (state-dict keys and references stay valid), new bytes and state."""
    weight = module.weight
    if QB.is_8bit(module):
        cb, scb = quantize_int8(w.float())
        _set_int8(module, cb, scb)
        return
    qs = QB.quant_state(module)
    data, new_qs = quantize_4bit(w, qs.quant_type, qs.blocksize, qs.nested, weight.data.dtype, qs.dtype)
    _set_4bit(module, data, new_qs)


def _set_4bit(module: nn.Module, data: Tensor, qs: Any) -> None:
    module.weight.data = data
    module.weight.quant_state = qs
    if hasattr(module, "quant_state"):
        module.quant_state = qs


def _set_int8(module: nn.Module, cb: Tensor, scb: Tensor) -> None:
    w = module.weight
    w.data = cb
    state = getattr(module, "state", None)
    if getattr(w, "SCB", None) is not None or state is None or state.SCB is None:
        w.CB, w.SCB = cb, scb
    else:  # bitsandbytes moved CB / SCB into the matmul state after a forward
        state.CB, state.SCB = cb, scb


# --- snapshot / restore (bit-exact unmerge) ------------------------------------------------------
@dataclass
class Snapshot:
    """The quantized bytes and state of one layer, as they were (kept by ``merge`` for ``unmerge``)."""

    data: Tensor
    state: Any  # QuantState (4-bit) or the SCB tensor (int8)

    @property
    def nbytes(self) -> int:
        return quantized_nbytes_of(self.data, self.state)


def snapshot(module: nn.Module) -> Snapshot:
    """References to the layer's current quantized tensors. :func:`requantize_` replaces the tensors
    rather than writing into them, so the snapshot costs nothing extra until the layer changes."""
    if QB.is_8bit(module):
        return Snapshot(QB.int8_codes(module), QB.int8_scales(module))
    return Snapshot(module.weight.data, QB.quant_state(module))


def restore(module: nn.Module, snap: Snapshot) -> None:
    """Put a :func:`snapshot` back: the layer then holds the original bytes, bit for bit."""
    if QB.is_8bit(module):
        _set_int8(module, snap.data, snap.state)
    else:
        _set_4bit(module, snap.data, snap.state)


def same_bytes(module: nn.Module, snap: Snapshot) -> bool:
    """Whether the layer's quantized tensors equal the snapshot's, bit for bit."""
    now = snapshot(module)
    if not torch.equal(now.data, snap.data):
        return False
    return all(torch.equal(a, b) for a, b in zip(_state_tensors(now.state), _state_tensors(snap.state), strict=True))


# --- bytes ---------------------------------------------------------------------------------------
def _state_tensors(state: Any) -> list[Tensor]:
    if isinstance(state, Tensor):
        return [state]
    out = [state.absmax, state.code]
    if state.nested:
        out += [state.offset, state.state2.absmax, state.state2.code]
    return [t for t in out if isinstance(t, Tensor)]


def quantized_nbytes_of(data: Tensor, state: Any) -> int:
    return data.numel() * data.element_size() + sum(t.numel() * t.element_size() for t in _state_tensors(state))


def weight_nbytes(module: nn.Module) -> int:
    """Resident bytes of the layer's weight: the codes and their scales for a quantized layer
    (shared 16-entry code books included), ``numel * element_size`` for a float one."""
    if QB.is_quantized(module):
        snap = snapshot(module)
        return quantized_nbytes_of(snap.data, snap.state)
    w = getattr(module, "weight", None)
    if w is None:  # e.g. nn.MultiheadAttention (in_proj_weight): its own parameters
        return sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return w.numel() * w.element_size()


def estimate_nbytes(numel: int, quant_type: str, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes a (out, in) weight of ``numel`` elements takes once quantized (for ``plan``)."""
    if quant_type == "int8":
        return numel  # + one fp32 scale per row, which the caller adds (it knows the rows)
    blocks = -(-numel // blocksize)
    absmax = blocks + 4 * -(-blocks // 256) + 4 + 256 * 4 if double_quant else 4 * blocks
    return (numel + 1) // 2 + absmax + 16 * 4


def ensure_unpacked(module: nn.Module) -> None:
    """Undo bitsandbytes' CPU inference repacking (``packing_format_for_cpu``, made by a bare
    ``Linear4bit`` forward under no_grad in eval mode on AVX512-BF16 CPUs), with its own inverse."""
    qs = getattr(module.weight, "quant_state", None) if QB.is_4bit(module) else None
    if qs is not None and getattr(qs, "packing_format_for_cpu", False):
        F = QB.bnb().functional
        data, qs = F._convert_weight_packed_for_cpu_inverse(module.weight.data, qs)
        _set_4bit(module, data, qs)


# --- state-dict entries (bitsandbytes' own keys) -------------------------------------------------
@dataclass
class StateEntries:
    """Quantization-state entries read from a state dict for one layer."""

    keys: list[str]
    values: dict[str, Tensor]


def state_entries(module: nn.Module, snap: Snapshot, prefix: str, destination: dict) -> None:
    """Write the quantization state of ``snap`` under bitsandbytes' keys (as its layers save them)."""
    if QB.is_8bit(module):
        destination[prefix + "SCB"] = snap.state.detach()
        destination[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)
        return
    for k, v in snap.state.as_dict(packed=True).items():
        destination[prefix + "weight." + k] = v.detach() if isinstance(v, Tensor) else v


def take_state_entries(module: nn.Module, state_dict: dict, prefix: str) -> StateEntries | None:
    """The quantization-state entries of this layer in ``state_dict``, or None when it has none."""
    if QB.is_8bit(module):
        names = [prefix + "SCB", prefix + "weight_format"]
    else:
        names = [k for k in state_dict if k.startswith(prefix + "weight.")]
    found = [k for k in names if k in state_dict]
    if not found:
        return None
    cut = len(prefix) if QB.is_8bit(module) else len(prefix) + len("weight.")
    return StateEntries(found, {k[cut:]: state_dict[k] for k in found})


def load_state_entries(module: nn.Module, entries: StateEntries) -> None:
    """Install a layer's quantization state read by :func:`take_state_entries`."""
    if QB.is_8bit(module):
        scb = entries.values.get("SCB")
        if scb is not None:
            _set_int8(module, module.weight.data, scb.detach().to(module.weight.device, torch.float32).clone())
        return
    F = QB.bnb().functional
    qs = F.QuantState.from_dict(dict(entries.values), device=module.weight.device)
    _set_4bit(module, module.weight.data, qs)
