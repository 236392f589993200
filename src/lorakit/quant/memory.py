"""Give back the float weights :func:`lorakit.quantize_base` replaced, so that they stop counting in RSS.

Two things keep memory resident after the float weights of the quantized layers are dropped
(measured on SmolLM2-135M, issue 15):

* **File pages.** A checkpoint loaded from safetensors holds its parameters as views into an mmap
  of the file. Quantizing reads every page of the replaced weights, and those pages stay resident
  for as long as the mapping lives, which is as long as any remaining tensor (embeddings, norms)
  is a view into it. :func:`own_file_backed` copies the remaining views into process memory, so
  the mapping, and with it the read pages, goes away with its last view.
* **Freed heap.** glibc keeps freed chunks below its mmap threshold (which grows up to 32 MiB as
  large blocks are freed) in its arenas instead of returning them to the kernel. After a GGUF
  load the replaced fp32 weights (405 MiB on SmolLM2) stayed resident that way. :func:`release_freed`
  runs the garbage collector and then ``malloc_trim(0)``, which hands the free pages back. It
  does nothing on a libc without ``malloc_trim``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from bisect import bisect_right
from pathlib import Path

import torch
from torch import nn

_PSEUDO = ("[", "anon_inode:", "/dev/", "/memfd:", "/SYSV")


def file_backed_ranges() -> list[tuple[int, int]]:
    """The sorted, merged (start, end) address ranges of this process's mappings of regular files
    (Linux ``/proc/self/maps``). Empty where that file does not exist."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    out: list[tuple[int, int]] = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or parts[5].startswith(_PSEUDO) or parts[5].endswith(" (deleted)"):
            continue
        lo, hi = (int(a, 16) for a in parts[0].split("-"))
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(hi, out[-1][1]))
        else:
            out.append((lo, hi))
    return out


def _inside(ptr: int, ranges: list[tuple[int, int]], starts: list[int]) -> bool:
    i = bisect_right(starts, ptr) - 1
    return i >= 0 and ptr < ranges[i][1]


def own_file_backed(model: nn.Module) -> int:
    """Copy every CPU parameter and buffer of ``model`` whose storage lies in a file mapping into
    process memory (the same Parameter objects, ``.data`` replaced; tied tensors stay tied).
    Returns the bytes copied."""
    ranges = file_backed_ranges()
    if not ranges:
        return 0
    starts = [lo for lo, _ in ranges]
    copies: dict[int, torch.Tensor] = {}
    copied = 0
    tensors = [t for _, t in (*model.named_parameters(remove_duplicate=False),
                              *model.named_buffers(remove_duplicate=False))]
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in copies:
            if not _inside(key, ranges, starts):
                continue
            own = torch.empty(storage.nbytes(), dtype=torch.uint8)
            own.copy_(torch.tensor([], dtype=torch.uint8).set_(storage))
            copies[key] = own
            copied += storage.nbytes()
        fresh = torch.empty(0, dtype=t.dtype).set_(copies[key].untyped_storage(), t.storage_offset(),
                                                   t.shape, t.stride())
        with torch.no_grad():
            t.data = fresh
    return copied


def release_freed() -> bool:
    """Collect garbage, then return free heap pages to the kernel (glibc ``malloc_trim(0)``).
    Returns whether ``malloc_trim`` ran."""
    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True
