"""loralib checkpoints: ``torch.save(loralib.lora_state_dict(model))`` read safely (tensors only,
never unpickling code), every key and shape checked before the model changes."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .checks import check_finite, require_path, takes_model
from .errors import AdapterFormatError, AdapterMismatchError, AdapterNotFoundError

__all__ = ["load_loralib_checkpoint"]


@takes_model
def load_loralib_checkpoint(model: nn.Module, path: str | os.PathLike, *, allow_nonfinite: bool = False) -> nn.Module:
    """Load ``torch.save(loralib.lora_state_dict(model))`` safely (``weights_only=True``).

    Keys must all exist in the model with the same shapes, and values be finite unless
    ``allow_nonfinite=True``; nothing is changed otherwise.
    """
    path = require_path(path, "load_loralib_checkpoint", "the checkpoint path")
    if not path.is_file():
        raise AdapterNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise AdapterFormatError(f"{path}: not a tensors-only torch checkpoint ({e})") from None
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise AdapterFormatError(f"{path}: expected a state dict of tensors")
    if not allow_nonfinite:
        check_finite(sd, path)
    own = model.state_dict()
    problems = [f"{k}: unexpected key" for k in sd if k not in own]
    problems += [f"{k}: shape {tuple(v.shape)} in the file, the model has {tuple(own[k].shape)}"
                 for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if problems:
        raise AdapterMismatchError(f"{path}: checkpoint does not fit the model:\n  " + "\n  ".join(problems))
    model.load_state_dict(dict(sd), strict=False)
    return model
