"""The fused path's dropout mask: a counter-based hash, applied by a small C++ kernel on CPU.

Element ``i`` (row-major index into the input) is kept when its 16-bit lane of
``fmix32((i // 2) * 0x9E3779B9 ^ seed)`` is at least ``threshold = round(p * 65536)``, lane
``i % 2`` (low, high half). Being a pure function of ``(seed, i)``, the mask is never stored:
forward writes ``x ⊙ keep`` and backward zeroes the dropped input-gradient elements, both in one
pass with no mask tensor. On CPU that pass is a C++ loop compiled on first use with
``torch.utils.cpp_extension`` (~50 s once, cached); CUDA tensors, a machine without a compiler, or
``LORAKIT_NO_EXTENSION=1`` use the same hash written with torch integer ops, so every path draws
the identical mask for a seed.

Why: with torch's CPU generator a mask costs a serial ``random_`` plus three passes (bit
extraction, comparison, conversion to floats) and the multiply. The kernel does it all in one
pass at the cost of a multiply (0.18 vs 1.25 ms for a 512×576 input on one thread).
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
from torch import Tensor

_GOLDEN = 0x9E3779B9
_M1, _M2 = 0x85EBCA6B, 0xC2B2AE35
LEVELS = 1 << 16  #: resolution of the drop probability (p is rounded to 1/65536)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
static inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16; h *= 0x85EBCA6Bu; h ^= h >> 13; h *= 0xC2B2AE35u; h ^= h >> 16; return h;
}
template <typename T> static void run(const T* x, T* o, int64_t n, uint32_t s, uint32_t thr) {
  const int64_t words = n / 2;  // two 16-bit lanes per 32-bit hash
  at::parallel_for(0, words, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const uint32_t h = fmix32((uint32_t)w * 0x9E3779B9u ^ s);
      const float k0 = (h & 0xFFFFu) >= thr ? 1.f : 0.f;
      const float k1 = (h >> 16) >= thr ? 1.f : 0.f;
      o[2 * w] = T(float(x[2 * w]) * k0);
      o[2 * w + 1] = T(float(x[2 * w + 1]) * k1);
    }
  });
  if (n & 1) {
    const uint32_t h = fmix32((uint32_t)words * 0x9E3779B9u ^ s);
    o[n - 1] = (h & 0xFFFFu) >= thr ? x[n - 1] : T(0);
  }
}
// out = x * keep(seed, threshold), element by element (out may be x: in place)
torch::Tensor apply_mask(torch::Tensor x, int64_t seed, int64_t threshold, torch::Tensor out) {
  TORCH_CHECK(x.is_contiguous() && out.is_contiguous() && x.numel() == out.numel(), "contiguous, same size");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "apply_mask", [&] {
    run<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.numel(), (uint32_t)seed,
                  (uint32_t)threshold);
  });
  return out;
}
"""

_state: dict[str, Any] = {"ext": None, "tried": False}
_lock = threading.Lock()
_log = logging.getLogger("lorakit")


def extension() -> Any | None:
    """The compiled CPU kernel, built on first call (None when it cannot be: no compiler, or
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
                except Exception as err:  # no compiler / ninja / headers: the torch-ops path is identical
                    _log.info("lorakit: CPU dropout kernel unavailable (%s); using torch ops", err)
                    _state["ext"] = None
            _state["tried"] = True
    return _state["ext"]


def _build() -> Any:
    """Compile (or load from torch's extension cache) the kernel for this CPU."""
    from torch.utils.cpp_extension import get_default_build_root, load_inline
    # -march=native: the cached binary is named after this CPU's model and flags (a cache shared
    # between machines never loads code built for instructions the CPU lacks) and this environment
    # (two venvs do not rebuild over each other's build directory)
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = "".join(line for line in open("/proc/cpuinfo") if line.startswith(("model name", "flags")))
    key = f"{cpu or platform.processor()}|{sys.prefix}|{torch.__version__}"  # one build per CPU and environment
    name = "lorakit_dropout_v2_" + hashlib.sha1(key.encode()).hexdigest()[:10]
    if not any(Path(get_default_build_root()).glob(f"*/{name}/{name}*.so")):  # torch's cache: no build needed
        sys.stderr.write("lorakit: building the CPU dropout kernel (first use on this machine, about a minute)\n")
    return load_inline(name, cpp_sources=[_SOURCE], functions=["apply_mask"],
                       extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)


def threshold(p: float) -> int:
    """Lanes below this are dropped."""
    return int(round(p * LEVELS))


def keep_mask(n: int, seed: int, p: float, device: torch.device | str = "cpu") -> Tensor:
    """The (n,) bool keep mask for ``seed``, by torch integer ops (the kernel's reference)."""
    m = 0xFFFFFFFF  # int64 arithmetic, reduced to 32 bits after each multiply
    w = torch.arange((n + 1) // 2, dtype=torch.int64, device=device)
    h = w.mul_(_GOLDEN).bitwise_and_(m).bitwise_xor_(seed & m)
    h ^= h >> 16
    h.mul_(_M1).bitwise_and_(m)
    h ^= h >> 13
    h.mul_(_M2).bitwise_and_(m)
    h ^= h >> 16
    lanes = torch.stack([h & 0xFFFF, h >> 16], -1).view(-1)[:n]
    return lanes >= threshold(p)


def _kernel_for(t: Tensor) -> Any | None:
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return None
    return extension()


def masked(x: Tensor, seed: int, p: float) -> Tensor:
    """``x ⊙ keep`` as a new contiguous tensor (the mask indexes ``x`` in row-major order)."""
    x = x.contiguous()
    ext = _kernel_for(x)
    if ext is not None:
        return ext.apply_mask(x, seed & 0xFFFFFFFF, threshold(p), torch.empty_like(x))
    return x * keep_mask(x.numel(), seed, p, x.device).view(x.shape).to(x.dtype)


def mask_(g: Tensor, seed: int, p: float) -> Tensor:
    """Zero the dropped elements of the contiguous ``g`` in place (dropout's backward)."""
    ext = _kernel_for(g)
    if ext is not None and g.is_contiguous():
        return ext.apply_mask(g, seed & 0xFFFFFFFF, threshold(p), g)
    return g.mul_(keep_mask(g.numel(), seed, p, g.device).view(g.shape).to(g.dtype))
