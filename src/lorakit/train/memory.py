"""Peak resident memory per phase (train steps vs eval / generation), and memory-sized eval batches.

Linux keeps a process's peak RSS in ``VmHWM`` and lets the process reset it (``echo 5 >
/proc/self/clear_refs``), so each phase's own peak can be measured; elsewhere the lifetime peak
(``ru_maxrss``) is all there is, and every phase reports it.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import Any

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def _lifetime_peak_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux


def peak_rss_mb() -> float:
    """Peak RSS (MiB) since the last :func:`reset_peak_rss` (or process start)."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _lifetime_peak_mb()


def reset_peak_rss() -> bool:
    """Restart the peak at the current RSS; False where the platform cannot (peaks stay lifetime)."""
    try:
        _CLEAR.write_text("5")
        return True
    except OSError:
        return False


class PhasePeaks:
    """Track the peak RSS of named phases: ``with peaks.phase("eval"): ...``; the time before construction
    counts as ``before``, the rest as ``base``."""

    def __init__(self, base: str = "train", before: str = "setup") -> None:
        self.base = base
        self.peaks: dict[str, float] = {before: peak_rss_mb()}  # model load, data encoding, ...
        self.per_phase = reset_peak_rss()

    def _note(self, name: str) -> None:
        self.peaks[name] = max(self.peaks.get(name, 0.0), peak_rss_mb())

    def phase(self, name: str) -> Any:
        tracker = self

        class _Phase:
            def __enter__(self) -> None:
                tracker._note(tracker.base)
                reset_peak_rss()

            def __exit__(self, *exc: object) -> None:
                tracker._note(name)
                reset_peak_rss()

        return _Phase()

    def report(self) -> dict[str, float]:
        """``peak_rss_<phase>_mb`` for every phase seen, and the overall ``peak_rss_mb``."""
        self._note(self.base)
        out = {f"peak_rss_{k}_mb": round(v, 1) for k, v in self.peaks.items()}
        out["peak_rss_mb"] = round(max([_lifetime_peak_mb(), *self.peaks.values()]), 1)
        out["peak_rss_per_phase"] = self.per_phase  # type: ignore[assignment]
        return out


def generation_batch_size(model: Any, requested: int, num_beams: int, max_tokens: int, budget_mb: float) -> int:
    """Prompts per ``generate`` call so that its KV cache and per-step logits stay within ``budget_mb``.

    Per sequence (``num_beams`` per prompt): the fp32 KV cache of ``max_tokens`` positions, plus about
    four vocabulary-wide fp32 rows (logits, log-softmax, beam scores, their copy) per step.
    """
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    heads = getattr(cfg, "num_attention_heads", 1) or 1
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or (getattr(cfg, "hidden_size", 0) or 0) // heads
    vocab = getattr(cfg, "vocab_size", 0) or 0
    per_seq = 2 * layers * kv_heads * head_dim * 4 * max_tokens + 4 * vocab * 4
    if per_seq <= 0:
        return requested
    seqs = int(budget_mb * 2**20 // per_seq)
    return max(1, min(requested, seqs // max(1, num_beams)))
