"""lorakit's compiled CPU kernels: one small C++ extension, built on first use and cached.

Each kernel replaces a chain of ATen calls whose dispatch, extra passes or memory traffic were the
measured cost (docs/benchmarks.md):

* ``apply_mask(x, seed, threshold, out)``: ``out = x ⊙ keep`` for the fused path's hashed dropout
  mask (:mod:`lorakit.kernels.dropout` defines the hash and its torch-ops reference), one parallel
  pass with no mask tensor; ``out`` may be ``x`` (dropout's backward, in place). float32 hashes
  eight words (16 elements) per AVX2 step: the compiler's own vectorisation gave up when ``out``
  aliases ``x``, and the in-place backward mask ran 4× slower than the forward (426 vs 95 µs at
  512×576, one thread).
* ``linear_rows(x, W, b, A, B, s)``: a whole adapted linear layer, ``x Wᵀ + b + s (x Aᵀ) Bᵀ``, for
  ≤ 16 float32 rows in one call (A and B None: the base layer, a merged layer's forward). W is
  (out, in) with unit column stride, or the transpose of a contiguous (in, out) weight
  (``fan_in_fan_out``). Token-by-token decoding streams every weight from DRAM once per token; this
  AVX2 matrix-vector product reads it at close to bandwidth, where torch's batch-1 ``F.linear``
  (MKL's GEMM entry) is ~25 % slower on one thread and does not scale to two
  (``python -m benchmarks.micro_decode --cold``). The low-rank part runs inside each thread's share
  of the outputs. None (nothing allocated) for inputs it does not take.
* ``lora_add_(out, x, A, B, s) -> bool``: ``out += s (x Aᵀ) Bᵀ`` for a few float32 rows (``out``
  contiguous or a 2-d column slice: one slice of a fused qkv output), the
  no-grad low-rank update of token-by-token decoding in one call instead of three BLAS calls plus an
  add (1.5–8 µs instead of 11–17 µs per projection on one thread). It returns False, touching
  nothing, for any input it does not handle (dtype, device, layout, autograd), and the caller takes
  the ATen path.
* ``rows_mm_t(X, M)`` (``X Mᵀ``, (N, r)) and ``rows_t_mm(G, T)`` (``Gᵀ T``, (o, r)): the rank-r
  products of LoRA's training step for inputs larger than the caches, where MKL runs these skinny
  shapes at about a third of memory bandwidth (``x Aᵀ`` 1.8 vs 3.8 ms, ``gᵀ t`` 1.2 vs 2.8 ms at
  4096×768, r=8, one thread). None for inputs they do not take.

The extension is compiled with ``torch.utils.cpp_extension.load_inline`` (``-O3 -march=native``,
OpenMP through torch's own runtime; ~50 s once, announced on stderr) and cached under a name
hashed from the CPU model and flags, the environment and the torch version. Without a compiler, or
with ``LORAKIT_NO_EXTENSION=1``, :func:`extension` returns None and every caller uses torch ops.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
import threading
from pathlib import Path
from typing import Any

import torch

#: the C++ source, a real file shipped with the package (``kernels/csrc/cpu_kernels.cpp``)
_SOURCE_FILE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
_SOURCE = _SOURCE_FILE.read_text(encoding="utf-8")

#: the extension's functions
_FUNCTIONS = ("apply_mask", "lora_add_", "linear_rows", "rows_mm_t", "rows_t_mm")

_state: dict[str, Any] = {"ext": None, "tried": False}
_lock = threading.Lock()
_log = logging.getLogger("lorakit")


def extension() -> Any | None:
    """The compiled CPU kernels, built on first call (None when they cannot be: no compiler, or
    ``LORAKIT_NO_EXTENSION=1``)."""
    if _state["tried"]:
        return _state["ext"]
    with _lock:
        if not _state["tried"]:
            if os.environ.get("LORAKIT_NO_EXTENSION", "") not in ("", "0"):
                _state["ext"] = None
            else:
                try:
                    _state["ext"] = _build()
                except Exception as err:  # no compiler / ninja / headers: the torch-ops paths agree
                    _log.info("lorakit: CPU kernels unavailable (%s); using torch ops", err)
                    _state["ext"] = None
            _state["tried"] = True
    return _state["ext"]


def _build() -> Any:
    """Compile (or load from torch's extension cache) the kernels for this CPU."""
    from torch.utils.cpp_extension import get_default_build_root, load_inline
    # -march=native: the cached binary is named after this CPU's model and flags (a cache shared
    # between machines never loads code built for instructions the CPU lacks) and this environment
    # (two venvs do not rebuild over each other's build directory)
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = "".join(line for line in open("/proc/cpuinfo") if line.startswith(("model name", "flags")))
    key = f"{cpu or platform.processor()}|{sys.prefix}|{torch.__version__}|{_SOURCE}"
    name = "lorakit_cpu_" + hashlib.sha1(key.encode()).hexdigest()[:12]
    if not any(Path(get_default_build_root()).glob(f"*/{name}/{name}*.so")):  # torch's cache: no build needed
        sys.stderr.write("lorakit: building the CPU kernels (first use on this machine, about a minute)\n")
    return load_inline(name, cpp_sources=[_SOURCE], functions=list(_FUNCTIONS),
                       extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
