"""Typed errors of the training tools; all derive from :class:`lorakit.errors.LoraError`."""

from __future__ import annotations

from lorakit.errors import LoraError


class TrainConfigError(LoraError, ValueError):
    """A training / CLI option has an invalid value; the message names the flag."""


class DataError(LoraError, ValueError):
    """A data file is missing, empty or malformed; the message names file and line."""


class UnknownTaskError(DataError):
    """The task name is not one of the known tasks."""


class ModelLoadError(LoraError, RuntimeError):
    """A model could not be found or loaded (missing package, directory without weights...)."""


class ResumeError(LoraError, ValueError):
    """``--resume`` points at a checkpoint that does not exist or belongs to another config."""


class UnsafeCheckpointError(ResumeError):
    """A checkpoint's pickle would build objects other than tensors and plain data (code execution): refused."""


class FSDPLaunchError(TrainConfigError):
    """``--fsdp`` outside torchrun; the message gives the torchrun command to use."""


class FSDPBlockError(TrainConfigError):
    """``--fsdp-block`` names a module class the model does not contain; the message lists those it does."""


class CollectiveTimeoutError(LoraError, RuntimeError):
    """A collective (all-reduce, all-gather, barrier...) did not complete within ``LORAKIT_DIST_TIMEOUT``:
    another rank died or is stuck. The message names the variable, its value and this rank."""


class SaveError(LoraError, RuntimeError):
    """A multi-process run: a file that rank 0 writes alone (``checkpoint.pt``, ``best.pt``, the final or best
    adapter, ``results.json``) could not be written there (disk full, permissions, a wrong path). Every rank
    raises it at once (they agree on rank 0's outcome: :func:`lorakit.train.distributed.rank0_save`), naming
    the file and rank 0's cause; the writes are atomic, so the previous file is intact."""


class FullSaveError(SaveError):
    """``--method full --fsdp``: writing the gathered model failed on rank 0 (disk full, permissions...). Every
    rank raises it at the same step of the save (they agree after each one); the previous output is intact."""
