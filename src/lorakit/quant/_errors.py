"""Temporary home of the quantization errors until they move into :mod:`lorakit.errors`."""

from __future__ import annotations

from ..errors import AdapterMismatchError, LoraError


class QuantizationError(LoraError, ValueError):
    """A quantization request is invalid: unknown type, bad compute dtype, model already quantized."""


class QuantBackendError(LoraError, ImportError):
    """The quantization backend (bitsandbytes) is missing or cannot run this layer."""


class QuantMismatchError(AdapterMismatchError):
    """An adapter was recorded on a base quantized differently from the model it is merged into."""


class QuantMismatchWarning(UserWarning):
    """An adapter is loaded onto a base quantized differently from the one it was trained on."""
