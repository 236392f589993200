"""What ``import bitsandbytes`` adds to a process that has already run the fp32 ``bench_quant`` step
(issue 15 §5): RSS (after ``malloc_trim``) and new modules per import step, in the order bitsandbytes'
own import reaches them. Not timed: run it beside anything.

    PYTHONPATH=. python benchmarks/quant_import_cost.py
    PYTHONPATH=. python benchmarks/quant_import_cost.py --no-import-compile

The steps are ``networkx``, ``torch._inductor.compile_fx`` (what one ``torch.compile(fn)`` call
imports; bitsandbytes 0.50's ``backends/default/ops.py`` makes four at import, through its
``_try_torch_compile`` decorator), one ``torch.compile`` wrapper, then ``bitsandbytes`` itself.
``--no-import-compile`` is a counterfactual, not something lorakit does: ``torch.compile`` raises
during ``import bitsandbytes`` (its decorator then keeps the plain functions), which shows what an
upstream fix (compile on first call) would save.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from collections import Counter
from pathlib import Path

import torch

_LIBC = ctypes.CDLL("libc.so.6")


def rss_mib() -> float:
    _LIBC.malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _fp32_step() -> None:
    from benchmarks import bench_quant as BQ

    model = BQ._build("lorakit-fp32", argparse.Namespace(smoke=False))
    ids = torch.randint(0, model.config.vocab_size, (BQ.BATCH, BQ.SEQ))
    model(input_ids=ids, labels=ids).loss.backward()


def _refusing_compile(*_: object, **__: object) -> None:
    raise RuntimeError("counterfactual: no torch.compile at import")


def import_bnb_without_compile() -> None:
    """``import bitsandbytes`` with ``torch.compile`` refusing (a counterfactual for measurements, not
    lorakit's behaviour): bitsandbytes' import-time wrappers keep the plain functions, so torch._inductor
    and networkx are not imported. A no-op where bitsandbytes is imported already."""
    real = torch.compile
    torch.compile = _refusing_compile  # type: ignore[assignment]
    try:
        import bitsandbytes  # noqa: F401
    finally:
        torch.compile = real


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-import-compile", action="store_true",
                    help="torch.compile raises during import bitsandbytes (a counterfactual)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    _fp32_step()
    print(f"after the fp32 step: RSS {rss_mib():.1f} MiB; loaded already: torch._dynamo "
          f"{'torch._dynamo' in sys.modules}, sympy {'sympy' in sys.modules}, "
          f"torch._inductor.compile_fx {'torch._inductor.compile_fx' in sys.modules}")
    steps = [("bitsandbytes", import_bnb_without_compile if a.no_import_compile
              else lambda: __import__("bitsandbytes"))]
    if not a.no_import_compile:
        steps = [("networkx", lambda: __import__("networkx")),
                 ("torch._inductor.compile_fx", lambda: __import__("torch._inductor.compile_fx")),
                 ("torch.compile(fn)", lambda: torch.compile(lambda x: x))] + steps
    total = 0.0
    for name, fn in steps:
        before, mods = rss_mib(), set(sys.modules)
        fn()
        new = set(sys.modules) - mods
        d = rss_mib() - before
        total += d
        top = Counter(m.split(".")[0] for m in new).most_common(4)
        print(f"{name:28s} +{d:5.1f} MiB  {len(new):4d} modules  {top}")
    print(f"total +{total:.1f} MiB")


if __name__ == "__main__":
    main()
