"""The serving engine in process, no HTTP: CPU seconds of 16-request waves with 1 vs 16 distinct adapters.

SmolLM2-135M fp32, the all-linear r=16 adapters of ``bench_serve`` (``/tmp/lorakit-bench-adapters``),
the prompts of ``bench_serve`` (16-64 tokens), 32 new tokens (greedy), max batch 16, one torch thread;
each wave submits 16 requests at once and waits for all (prefills, decode steps, joins and leaves as in
the server). Timed with the process's CPU time, so a shared machine's waits are left out; ``--masked``
runs the engine on the masked bays of commit f9e00c3 (``bench_bays_ab``) for a same-machine A/B::

    OMP_NUM_THREADS=1 python -m benchmarks.bench_engine_cpu [--masked]
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter-dir", default="/tmp/lorakit-bench-adapters")
    ap.add_argument("--masked", action="store_true", help="the masked bays of commit f9e00c3")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from benchmarks.bench_serve import prompts
    from benchmarks.harness import smollm2_dir
    from lorakit.serve.adapters_pool import AdapterPool
    from lorakit.serve.app import ServeConfig, load_base
    from lorakit.serve.engine import Engine
    from lorakit.serve.sampling import SamplingParams

    model, tok = load_base(ServeConfig(model=smollm2_dir()))
    eng = Engine(model, tok, AdapterPool(model, args.adapter_dir, max_loaded=64), max_batch=16, threads=1)
    if args.masked:
        from benchmarks.bench_bays_ab import _old_bays

        eng.bays = _old_bays()(model, 16)
    eng.start()
    texts = [tok(t)["input_ids"] for t in prompts(tok, 16, 16, 64)]

    def wave(k: int, tokens: int = 32) -> tuple[float, float]:
        done = threading.Semaphore(0)

        def sink(ev: Any) -> None:
            if ev.kind != "token":
                done.release()

        c0, t0 = time.process_time(), time.perf_counter()
        for i, ids in enumerate(texts):
            eng.submit(ids, SamplingParams(max_tokens=tokens, temperature=0), f"a{i % k}", sink)
        for _ in texts:
            done.acquire()
        return time.perf_counter() - t0, time.process_time() - c0

    for k in (1, 16):
        wave(k, 2)  # adapters resident
    for _ in range(args.reps):
        for k in (1, 16):
            w, c = wave(k)
            print(f"{'masked' if args.masked else 'grouped'} k={k}: CPU {c:.1f} s (wall {w:.1f} s) "
                  f"for {16 * 32} tokens", flush=True)
    eng.shutdown(5)


if __name__ == "__main__":
    main()
