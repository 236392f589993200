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
OpenMP through torch's own runtime) and cached under a name hashed from the CPU model and flags,
the environment and the torch version. Without a compiler, or with ``LORAKIT_NO_EXTENSION=1``,
:func:`extension` returns None and every caller uses torch ops.

No first-use stall: the compile takes about a minute (40 s of CPU, 78 s wall on the shared 2-core
machine), so when the cache lacks the module the first call starts it in a child process,
announces it in one stderr line and returns None; the callers run torch ops, which give the same
results (the same dropout masks, bit for bit; the rank-r products to float32 rounding, summed in
another order), and switch to the kernels once the child is done and the module loaded. The child
finishes the cache even if the run ends first. ``LORAKIT_EXTENSION_BUILD=wait`` compiles in the
first caller instead (tests; runs that must not switch paths midway); :func:`wait_for_extension`
waits for a background build; :func:`build` compiles now (images, install scripts).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

#: the C++ source, a real file shipped with the package (``kernels/csrc/cpu_kernels.cpp``)
_SOURCE_FILE = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
_SOURCE = _SOURCE_FILE.read_text(encoding="utf-8")

#: the extension's functions
_FUNCTIONS = ("apply_mask", "lora_add_", "linear_rows", "rows_mm_t", "rows_t_mm")

#: ``LORAKIT_EXTENSION_BUILD``: ``background`` (the default) compiles a missing extension in a child
#: process while the callers run torch ops; ``wait`` compiles it in the first caller (tests, benchmarks,
#: runs that must not switch paths midway).
BUILD_ENV = "LORAKIT_EXTENSION_BUILD"

_state: dict[str, Any] = {"ext": None, "tried": False, "building": None}
_lock = threading.Lock()
_log = logging.getLogger("lorakit")


def extension() -> Any | None:
    """The compiled CPU kernels, or None: unavailable (no compiler, ``LORAKIT_NO_EXTENSION=1``), or
    still compiling in the background on this machine's first use (the callers' torch ops give the
    same results; they switch to the kernels once loaded)."""
    if _state["tried"]:
        return _state["ext"]
    if _state["building"] is not None:
        return None
    with _lock:
        if not _state["tried"] and _state["building"] is None:
            _start()
    return _state["ext"]


def wait_for_extension(timeout: float | None = None) -> Any | None:
    """Start the kernels if needed and wait up to ``timeout`` seconds (None: for good) for a
    background build; returns :func:`extension`'s result then."""
    extension()
    building = _state["building"]
    if building is not None:
        building.join(timeout)
    return _state["ext"] if _state["tried"] else None


def _start() -> None:
    """Load the cached kernels, or compile them here (``wait``) or in the background (called under ``_lock``)."""
    if os.environ.get("LORAKIT_NO_EXTENSION", "") not in ("", "0"):
        _state["ext"], _state["tried"] = None, True
        return
    name = _name()
    cached = _cached(name)
    if cached or os.environ.get(BUILD_ENV, "background") == "wait":
        if not cached:
            sys.stderr.write("lorakit: building the CPU kernels (first use on this machine, about a minute)\n")
        _state["ext"] = _load_or_none(name)
        _state["tried"] = True
        return
    sys.stderr.write("lorakit: compiling the CPU kernels in the background (first use on this machine, about a "
                     "minute); torch ops until they are ready, same results\n")
    thread = threading.Thread(target=_build_in_background, args=(name,), name="lorakit-cpu-build", daemon=True)
    _state["building"] = thread
    thread.start()


def _build_in_background(name: str) -> None:
    t0 = time.perf_counter()
    try:
        _compile_in_child(name)
        ext = _load(name)
    except Exception as err:  # noqa: BLE001 - a failed build leaves the torch-ops path, as without a compiler
        _log.info("lorakit: CPU kernels unavailable (%s); using torch ops", err)
        ext = None
    else:
        _log.info("lorakit: CPU kernels ready after %.0f s; switching from torch ops", time.perf_counter() - t0)
    _state["ext"] = ext
    _state["tried"] = True
    _state["building"] = None


def _compile_in_child(name: str) -> None:
    """Compile into torch's extension cache in a child process (this file run as a script).

    A child, not a thread: the compile keeps going, and finishes the cache for the next run, when
    this process ends or is interrupted first (its own session: Ctrl-C in the terminal reaches only
    the parent).
    """
    with tempfile.TemporaryFile() as log:  # this file as a script: torch only, the very same source and name
        rc = subprocess.call([sys.executable, __file__, name], stdin=subprocess.DEVNULL, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        if rc != 0:
            log.seek(0)
            tail = log.read().decode(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"the build exited with status {rc}: {' | '.join(tail)}")


def _name() -> str:
    """The cached module's name: this CPU (model and flags: ``-march=native`` code never loads on a CPU
    that lacks its instructions), this environment (two venvs never rebuild over each other), torch
    and the source."""
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = "".join(line for line in open("/proc/cpuinfo") if line.startswith(("model name", "flags")))
    key = f"{cpu or platform.processor()}|{sys.prefix}|{torch.__version__}|{_SOURCE}"
    return "lorakit_cpu_" + hashlib.sha1(key.encode()).hexdigest()[:12]


def _cached(name: str) -> bool:
    """Whether torch's extension cache already holds the built module (loading it takes ~0.3 s): under
    ``$TORCH_EXTENSIONS_DIR/NAME/`` when that is set, else under the default root's ``pyXY_cpu/NAME/``."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    pattern = f"{name}/{name}*.so" if root else f"*/{name}/{name}*.so"
    return any(Path(root or get_default_build_root()).glob(pattern))


def build() -> Any | None:
    """Compile the kernels now, in this thread (or load them from the cache); None without a compiler.

    For images and install scripts, so that no run ever compiles:
    ``python -c "import lorakit.kernels.cpu as k; k.build()"``.
    """
    name = _name()
    ext = _load_or_none(name)
    _state["ext"], _state["tried"] = ext, True
    return ext


def _load_or_none(name: str) -> Any | None:
    try:
        return _load(name)
    except Exception as err:  # no compiler / ninja / headers: the torch-ops paths agree
        _log.info("lorakit: CPU kernels unavailable (%s); using torch ops", err)
        return None


def _load(name: str) -> Any:
    """Compile (or load from torch's extension cache) the kernels for this CPU."""
    from torch.utils.cpp_extension import load_inline

    return load_inline(name, cpp_sources=[_SOURCE], functions=list(_FUNCTIONS),
                       extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)


if __name__ == "__main__":  # the background build's child: python .../kernels/cpu.py NAME
    if len(sys.argv) > 1 and sys.argv[1] != _name():
        sys.exit(f"lorakit: asked to build {sys.argv[1]}, this file builds {_name()}")
    _load(_name())
