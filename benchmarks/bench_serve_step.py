"""One decode step of a 16-row batch with k distinct adapters: ``AdapterBays`` vs ``lorakit.batch_adapters``.

SmolLM2-135M fp32, the all-linear r=16 adapters of ``bench_serve`` (``/tmp/lorakit-bench-adapters``,
made by it), a 48-token prefill, then the median of ``--steps`` decode steps (KV cache growing).
``batch_adapters`` keeps one set of adapters here, so its stacks stay cached (its best case).
``--cpu-time`` times with the process's CPU time instead of the wall clock (use it with ``--threads 1``:
on a shared machine it leaves out the time the process waited for a core)::

    flock /tmp/team/bench.lock python -m benchmarks.bench_serve_step --threads 2
    OMP_NUM_THREADS=1 python -m benchmarks.bench_serve_step --threads 1 --cpu-time --steps 10
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter-dir", default="/tmp/lorakit-bench-adapters")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cpu-time", action="store_true", help="CPU time of the process, not wall time")
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 8, 16],
                    help="distinct adapters on the 16 rows (0: the base model on every row)")
    args = ap.parse_args()
    clock = time.process_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)
    import lorakit
    from benchmarks.harness import smollm2_dir
    from lorakit.serve.app import ServeConfig, load_base
    from lorakit.serve.kv import new_cache
    from lorakit.serve.slots import AdapterBays

    model, _ = load_base(ServeConfig(model=smollm2_dir()))
    for i in range(16):
        lorakit.load_adapter(model, f"{args.adapter_dir}/a{i}", name=f"a{i}")
    bays = AdapterBays(model, 16)
    ids = torch.randint(100, 1000, (16, 48), generator=torch.Generator().manual_seed(0))

    def step_ms(names: list[str], ctx: Callable[[list[str]], Any]) -> float:
        with torch.no_grad():
            with ctx(names):
                cache = model(input_ids=ids, past_key_values=new_cache(), use_cache=True,
                              logits_to_keep=1).past_key_values
            x, ts = ids[:, -1:], []
            for _ in range(args.steps):
                t = clock()
                with ctx(names):
                    cache = model(input_ids=x, past_key_values=cache, use_cache=True,
                                  logits_to_keep=1).past_key_values
                ts.append(clock() - t)
        return 1e3 * sorted(ts)[len(ts) // 2]

    for k in args.counts:
        names = [f"a{i % k}" if k else "base" for i in range(16)]
        held = [n for n in names if n != "base"]
        for n in held:
            bays.acquire(n)
        new = step_ms(names, lambda nm: bays.rows(nm))
        for n in held:
            bays.release(n)
        old = step_ms(names, lambda nm: lorakit.batch_adapters(model, nm))
        print(f"k={k}: AdapterBays {new:.1f} ms, batch_adapters (cached set) {old:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
