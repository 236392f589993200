"""Issue #20 section 0: one saved E2E adapter decoded under each n-gram rule, scored on the same dev MRs.

* ``none``: no n-gram blocking (the issue's plain loop);
* ``output4``: no repeated 4-gram of the *generated* text (the paper's rule, lorakit's default now);
* ``prompt4``: transformers' ``no_repeat_ngram_size=4``, which also counts the decoder-only prompt, i.e. the
  MR (what ``lorakit train --task e2e`` did before: the issue's command left the default 4 on);
* ``beam10``: the paper's decoding (10 beams, length penalty 0.8, no repeated output 4-gram).

Run (HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1)::

    python -m benchmarks.e2e_decoding_ablation runs/r20/e2e-lora-1ep/adapter --modes none output4 prompt4 \\
        --out runs/r20/e2e-decoding.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from lorakit.train import evaluate
from lorakit.train.data import get_task, load_task_data

MODES: dict[str, dict[str, Any]] = {
    "none": {"num_beams": 1, "length_penalty": 1.0, "no_repeat_ngram_size": 0},
    "output4": {"num_beams": 1, "length_penalty": 1.0, "no_repeat_ngram_size": 4},
    "prompt4": {"num_beams": 1, "length_penalty": 1.0, "no_repeat_ngram_size": 4},
    "beam10": {"num_beams": 10, "length_penalty": 0.8, "no_repeat_ngram_size": 4},
}


def prompt_counting(n: int, start: int) -> Any:
    """transformers' own rule (the whole ``input_ids``, prompt included), in place of the output-only one."""
    from transformers import NoRepeatNGramLogitsProcessor

    return NoRepeatNGramLogitsProcessor(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("adapter")
    ap.add_argument("--modes", nargs="+", default=["none", "output4", "prompt4"], choices=sorted(MODES))
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--max-mrs", type=int, default=None, help="score only the first N dev MRs (smoke runs)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    from benchmarks.e2e_plain_loop import load

    _, dev = load_task_data(get_task("e2e"), a.data_dir, seed=0, dev_fraction=0.1)
    dev = dev[: a.max_mrs] if a.max_mrs else dev
    tok, model = load(a.adapter)
    results: dict[str, Any] = {"adapter": a.adapter, "n_mrs": len(dev)}
    original = evaluate.OutputNoRepeatNGram
    for mode in a.modes:
        evaluate.OutputNoRepeatNGram = prompt_counting if mode == "prompt4" else original  # type: ignore[assignment,misc]
        t0 = time.perf_counter()
        try:
            scores, hyps = evaluate.score_e2e(model, tok, dev, max_new_tokens=a.max_new_tokens,
                                              batch_size=a.batch_size, device=torch.device("cpu"), **MODES[mode])
        finally:
            evaluate.OutputNoRepeatNGram = original  # type: ignore[misc]
        results[mode] = {**scores, "decode_s": time.perf_counter() - t0, "first": hyps[:3]}
        print(mode, json.dumps({k: v for k, v in scores.items() if k != "skipped"}), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
