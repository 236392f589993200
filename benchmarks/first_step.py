"""First-use stall: how long a fresh machine's first LoRA training steps take (issue 19 §3).

MiniLM-L6 (the ``lorakit demo`` model) with LoRA r=8 on query/value, batch 16 x 48 tokens, AdamW;
prints each step's wall time and whether the C++ CPU kernels were in use for it. ``--cold`` points
torch's extension cache (``TORCH_EXTENSIONS_DIR``) at a new empty directory first, so the kernels
must be compiled as on a fresh machine::

    python -m benchmarks.first_step --cold --steps 100              # the first-use case
    python -m benchmarks.first_step --cold --steps 30 --build wait  # as before issue 19: compile in step 1
    python -m benchmarks.first_step --steps 30                      # warm cache, for comparison

The last line is one JSON object (``first_step_s``, ``median_step_s``, ``kernel_from_step``...).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cold", action="store_true", help="use an empty extension cache (fresh machine)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--build", choices=("background", "wait"), default="background",
                   help="LORAKIT_EXTENSION_BUILD: compile a missing extension in the background (the default "
                        "since issue 19) or in the first step (the behaviour before)")
    p.add_argument("--wait-at-exit", action="store_true", help="wait for a background build before exiting")
    a = p.parse_args(argv)
    os.environ["LORAKIT_EXTENSION_BUILD"] = a.build
    if a.cold:
        os.environ["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="lorakit-ext-cold-")
    t_import = time.perf_counter()
    import torch
    from transformers import AutoModelForSequenceClassification

    import lorakit
    from lorakit.kernels import cpu as CK
    from lorakit.train.models import resolve

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(resolve("minilm").path), num_labels=2)
    lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=16, targets=["query", "value"], trainable=["classifier"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(1000, 20000, (16, 48))
    labels = torch.randint(0, 2, (16,))
    t_ready = time.perf_counter()
    times, with_kernel = [], []
    for _ in range(a.steps):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        with_kernel.append(CK.extension() is not None)
        print(f"step {len(times):3d}: {times[-1]:7.3f} s  kernels={'on' if with_kernel[-1] else 'off'}", flush=True)
    if a.wait_at_exit and hasattr(CK, "wait_for_extension"):
        CK.wait_for_extension()
    res = {
        "cold": a.cold, "threads": a.threads, "setup_s": round(t_ready - t_import, 2),
        "first_step_s": round(times[0], 3), "median_step_s": round(statistics.median(times[1:] or times), 3),
        "kernel_from_step": next((i + 1 for i, k in enumerate(with_kernel) if k), None),
        "steps_total_s": round(sum(times), 2),
    }
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
