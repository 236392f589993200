"""``python benchmarks/lifetime_peak.py train ...``: ``lorakit`` with the trainer's per-phase peak-RSS resets
switched off, printing this process's lifetime peak RSS (``ru_maxrss``) at exit, e.g. once per torchrun rank::

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 --no-python \\
        python benchmarks/lifetime_peak.py train --task sst2 --model smollm2 --quantize nf4 --max-steps 3 --fsdp

(``lorakit.train.memory`` resets ``VmHWM`` between phases, which also lowers what ``ru_maxrss`` / ``time -v``
report at exit to the last phase's peak.)
"""

from __future__ import annotations

import atexit
import os
import resource
import runpy
import sys

import lorakit.train.memory as memory


def _report() -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"rank {os.environ.get('RANK')} lifetime_peak_rss_mib {peak:.1f}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    memory.reset_peak_rss = lambda: False  # type: ignore[assignment]
    atexit.register(_report)
    sys.argv = ["lorakit", *sys.argv[1:]]
    runpy.run_module("lorakit", run_name="__main__", alter_sys=True)
