"""The quantization backend (bitsandbytes), imported lazily, and what a quantized layer looks like.

``import lorakit`` never imports bitsandbytes: layers are recognised by their class name and
module (``bitsandbytes.nn.Linear4bit`` / ``Linear8bitLt`` and subclasses such as ``LinearNF4``),
as :func:`lorakit.layers.is_conv1d_like` recognises GPT-2's ``Conv1D``. Only the functions that
quantize or dequantize call :func:`bnb`, which names the extra to install when it is missing.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..errors import QuantBackendError

#: The quantization types :func:`lorakit.quantize_base` accepts.
QUANT_TYPES = ("nf4", "fp4", "int8")
#: The dtypes a quantized layer may compute in (dequantize into, and run the matmul in).
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_FOUR_BIT = ("Linear4bit", "LinearNF4", "LinearFP4")
_EIGHT_BIT = ("Linear8bitLt",)


def bnb() -> ModuleType:
    """The ``bitsandbytes`` module, or a :class:`QuantBackendError` saying how to install it."""
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401 - the submodule the helpers use
    except ImportError as e:  # the package or one of its own dependencies
        raise QuantBackendError(
            "quantized bases need bitsandbytes, which is not installed: pip install 'lorakit[quant]' "
            f"(or pip install bitsandbytes); import failed with: {e}") from e
    return bitsandbytes


def _bnb_class(module: nn.Module, names: tuple[str, ...]) -> bool:
    for t in type(module).__mro__:
        if t.__name__ in names and t.__module__.startswith("bitsandbytes"):
            return True
    return False


def is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear layer (NF4 or FP4), by class, without importing bitsandbytes."""
    return _bnb_class(module, _FOUR_BIT)


def is_8bit(module: nn.Module) -> bool:
    """A bitsandbytes LLM.int8() linear layer."""
    return _bnb_class(module, _EIGHT_BIT)


def is_quantized(module: nn.Module) -> bool:
    """A quantized linear layer lorakit can put LoRA on (4-bit or int8 bitsandbytes)."""
    return is_4bit(module) or is_8bit(module)


def quant_state(module: nn.Module) -> Any:
    """The 4-bit layer's ``QuantState`` (on the weight; bitsandbytes mirrors it on the module)."""
    qs = getattr(module.weight, "quant_state", None)
    if qs is None:
        qs = getattr(module, "quant_state", None)
    if qs is None:
        raise QuantBackendError(f"{type(module).__name__} has no quantization state: its weight was never "
                                "quantized (bitsandbytes quantizes on .to(device)); use lorakit.quantize_base")
    return qs


def int8_scales(module: nn.Module) -> torch.Tensor:
    """The int8 layer's per-row scales ``SCB`` (bitsandbytes moves them to ``module.state`` on first use)."""
    scb = getattr(module.weight, "SCB", None)
    if scb is None:
        scb = getattr(getattr(module, "state", None), "SCB", None)
    if scb is None:
        raise QuantBackendError(f"{type(module).__name__} holds no int8 scales (SCB): its weight is not "
                                "quantized (has_fp16_weights=True or never moved to a device)")
    return scb


def int8_codes(module: nn.Module) -> torch.Tensor:
    """The int8 layer's (out, in) int8 codes."""
    w = module.weight
    if w.dtype == torch.int8:
        return w.data
    cb = getattr(getattr(module, "state", None), "CB", None)
    if cb is None:
        raise QuantBackendError(f"{type(module).__name__}: weight is {w.dtype}, not int8 codes")
    return cb


def kind_of(module: nn.Module) -> str | None:
    """``"nf4"``, ``"fp4"``, ``"int8"`` for a quantized layer, else None."""
    if is_8bit(module):
        return "int8"
    if is_4bit(module):
        # bitsandbytes mirrors the state on the module; FSDP2 swaps the Params4bit weight for a plain shard
        qs = getattr(module.weight, "quant_state", None) or getattr(module, "quant_state", None)
        return str(getattr(qs, "quant_type", None) or getattr(module.weight, "quant_type", "fp4"))
    return None


def features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a quantized layer (its weight is packed, not (out, in))."""
    return int(module.in_features), int(module.out_features)


def compute_dtype_of(module: nn.Module) -> torch.dtype | None:
    """The layer's configured compute dtype (None: the input's dtype)."""
    cd = getattr(module, "compute_dtype", None)
    return cd if isinstance(cd, torch.dtype) else None
