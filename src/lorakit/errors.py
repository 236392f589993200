"""Typed errors. Every lorakit failure raises a subclass of :class:`LoraError`.

Each message names the module, key or file at fault and says what would be valid. A call that
raises leaves the model and the files on disk as they were.
"""

from __future__ import annotations


class LoraError(Exception):
    """Base class of every lorakit error."""


class LoraConfigError(LoraError, ValueError):
    """A configuration value is invalid (rank, alpha, dropout, bias mode, unknown field...)."""


class TargetNotFoundError(LoraError, LookupError):
    """A target pattern matched no module of the model."""


class UnsupportedModuleError(LoraError, TypeError):
    """A matched module has a type lorakit cannot adapt."""


class UnsupportedParameterError(UnsupportedModuleError):
    """A ``target_parameters`` entry names a parameter LoRA cannot adapt (not 2-D / 3-D floating point)."""


class AlreadyInjectedError(LoraError, ValueError):
    """LoRA was asked to wrap a module that is already a LoRA layer."""


class AdapterFormatError(LoraError, ValueError):
    """An adapter file is missing pieces, truncated, corrupt or of an unknown format."""


class AdapterMismatchError(LoraError, ValueError):
    """An adapter does not fit the model: shapes, ranks, dtypes or module coverage differ."""


class AdapterNotFoundError(LoraError, FileNotFoundError):
    """An adapter path does not exist."""


class UnknownAdapterError(LoraError, LookupError):
    """An adapter name is not registered on the model (the message lists the known ones)."""


class DuplicateAdapterError(LoraError, ValueError):
    """An adapter name is already taken on the model."""


class ActiveAdapterError(LoraError, ValueError):
    """The operation is not allowed on an active adapter (delete it after switching away)."""


class MixedBatchError(LoraError, ValueError):
    """A mixed-adapter batch does not fit: per-row names and batch size differ, or a layer can't do it."""


class ArgumentTypeError(LoraError, TypeError):
    """A public function got an argument of the wrong kind (e.g. a path that is not a str / PathLike)."""


class NotAModuleError(ArgumentTypeError):
    """A function that takes a model got something that is not an ``nn.Module`` instance."""


class NonFiniteTensorError(AdapterFormatError):
    """Weights being read hold NaN or inf (the message names each tensor; ``allow_nonfinite=True`` opts out)."""


class QuantizationError(LoraError, ValueError):
    """A quantization request is invalid: unknown type, bad compute dtype, a model already quantized."""


class QuantBackendError(LoraError, ImportError):
    """The quantization backend (bitsandbytes, ``pip install 'lorakit[quant]'``) is missing or cannot run."""


class QuantMismatchError(AdapterMismatchError):
    """An adapter was recorded on a base quantized differently from the model it is merged into."""


class QuantMismatchWarning(UserWarning):
    """An adapter is loaded onto a base quantized differently from the one it was trained on."""


class OutputPathError(LoraError, FileExistsError):
    """An output path exists as the wrong kind (a file where a directory goes, or the reverse, or a file
    among its parents); nothing was written."""
