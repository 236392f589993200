"""Same-process A/B of a 16-row decode step: the masked bays (commit f9e00c3) vs rows grouped by bay.

SmolLM2-135M fp32, the all-linear r=16 adapters of ``bench_serve`` (``/tmp/lorakit-bench-adapters``),
1 / 8 / 16 distinct adapters on 16 rows (rows not in bay order), a 48-token prefill then the median of
8 decode steps, both implementations interleaved ``--reps`` times in one process, timed with the
process's CPU time on one thread (a shared machine's waits left out). The old ``slots.py`` is read
from git::

    OMP_NUM_THREADS=1 python -m benchmarks.bench_bays_ab
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

OLD = "f9e00c3"


def _old_bays() -> Any:
    src = subprocess.run(["git", "show", f"{OLD}:src/lorakit/serve/slots.py"], check=True, capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parent.parent).stdout
    path = Path(tempfile.mkdtemp()) / "slots_masked.py"
    path.write_text(src.replace("from .errors import", "from lorakit.serve.errors import"))
    spec = importlib.util.spec_from_file_location("slots_masked", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["slots_masked"] = mod
    spec.loader.exec_module(mod)
    return mod.AdapterBays


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter-dir", default="/tmp/lorakit-bench-adapters")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import lorakit
    from benchmarks.harness import smollm2_dir
    from lorakit.serve.app import ServeConfig, load_base
    from lorakit.serve.kv import new_cache
    from lorakit.serve.slots import AdapterBays

    model, _ = load_base(ServeConfig(model=smollm2_dir()))
    for i in range(16):
        lorakit.load_adapter(model, f"{args.adapter_dir}/a{i}", name=f"a{i}")
    impls = {f"masked ({OLD})": _old_bays()(model, 16), "grouped": AdapterBays(model, 16)}
    ids = torch.randint(100, 1000, (16, 48), generator=torch.Generator().manual_seed(0))

    def run(bays: Any, names: list[str]) -> tuple[float, float]:
        with torch.no_grad():
            t = time.process_time()
            with bays.rows(names):
                cache = model(input_ids=ids, past_key_values=new_cache(), use_cache=True,
                              logits_to_keep=1).past_key_values
            pre, x, ts = time.process_time() - t, ids[:, -1:], []
            for _ in range(args.steps):
                t = time.process_time()
                with bays.rows(names):
                    cache = model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1).past_key_values
                ts.append(time.process_time() - t)
        return 1e3 * sorted(ts)[len(ts) // 2], 1e3 * pre

    res: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for _ in range(args.reps):
        for label, bays in impls.items():
            for k in (1, 8, 16):
                names = [f"a{(i * 5) % k}" for i in range(16)]
                for n in names:
                    bays.acquire(n)
                res.setdefault((label, k), []).append(run(bays, names))
                for n in names:
                    bays.release(n)
    for (label, k), v in res.items():
        print(f"{label} k={k}: decode step " + " ".join(f"{a:.0f}" for a, _ in v) + " ms CPU; prefill 16x48 "
              + " ".join(f"{b:.0f}" for _, b in v) + " ms CPU", flush=True)


if __name__ == "__main__":
    main()
