"""Many adapters in one model.

* :mod:`.registry` — per-layer slots, the model's registry, switching (``set_adapter``,
  ``use_adapter``, ``disable_adapters``); imports neither formats nor mixed batches.
* :mod:`.manage` — ``add_adapter`` / ``delete_adapter`` (stage every slot, then commit).
* :mod:`.named_io` — the public ``save_adapter`` / ``load_adapter`` (by name, over :mod:`lorakit.formats`).
* :mod:`.mixed`, :mod:`.batched` — mixed-adapter batches (each row its own adapter).
"""

from . import registry
from .manage import add_adapter, delete_adapter
from .mixed import batch_adapters, install_kwarg_hooks
from .named_io import load_adapter, load_named_adapter, save_adapter, save_named_adapter
from .registry import BASE, DEFAULT, Slot, active_adapters, disable_adapters, list_adapters, set_adapter, use_adapter

registry.ON_NEW_REGISTRY.append(install_kwarg_hooks)  # model(..., adapter_names=[...]) on every registry

__all__ = [
    "BASE", "DEFAULT", "Slot", "active_adapters", "add_adapter", "batch_adapters", "delete_adapter",
    "disable_adapters", "list_adapters", "load_adapter", "load_named_adapter", "save_adapter", "save_named_adapter",
    "set_adapter", "use_adapter",
]
