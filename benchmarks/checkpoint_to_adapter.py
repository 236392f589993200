"""A resumable ``checkpoint.pt`` of a ``lorakit train`` run as a PEFT adapter directory (or, for
``--method full``, a model directory that ``lorakit eval`` / transformers load).

Used for the "stopped at step N" rows of docs/reproduction.md: the model is rebuilt from the run's
``config.json`` as the trainer builds it (same base, same ``--quantize``, same LoRA), the checkpoint's
trainable tensors are loaded (``weights_only=True``), and the adapter is saved::

    python -m benchmarks.checkpoint_to_adapter runs/r20/e2e-lora-1ep-nf4 runs/r20/e2e-nf4-ckpt300.pt \\
        runs/r20/e2e-nf4-step300/adapter
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lorakit
from lorakit.train import checkpoint as ckpt
from lorakit.train.data import get_task
from lorakit.train.methods import apply_method
from lorakit.train.models import load_model, load_tokenizer, quantize_for_training, resolve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir", type=Path, help="the run's --output-dir (its config.json is read)")
    ap.add_argument("checkpoint", type=Path, help="a checkpoint.pt of that run")
    ap.add_argument("out", help="adapter directory to write")
    a = ap.parse_args()
    cfg = json.loads((a.run_dir / "config.json").read_text())
    if cfg.get("method") not in ("lora", "full"):
        raise SystemExit(f"{a.run_dir}: method {cfg.get('method')!r}; only LoRA and full runs convert")
    spec = get_task(cfg["task"])
    src = resolve(cfg["model"])
    model = load_model(src, spec.kind, spec.num_labels)
    if cfg["method"] == "full":
        state = ckpt.load(a.checkpoint)
        ckpt.load_trainable_state(model, state["trainable"])
        model.save_pretrained(a.out)
        load_tokenizer(src).save_pretrained(a.out)
        print(f"step {state.get('step')} -> {a.out} (full model)")
        return
    if cfg.get("quantize"):
        quantize_for_training(model, cfg["quantize"])
    apply_method(model, "lora", r=cfg["r"], alpha=cfg["alpha"], dropout=cfg["lora_dropout"], targets=cfg["targets"],
                 use_dora=bool(cfg.get("use_dora")), target_parameters=cfg.get("target_parameters") or None)
    state = ckpt.load(a.checkpoint)
    ckpt.load_trainable_state(model, state["trainable"])
    lorakit.save_adapter(model, a.out)
    print(f"step {state.get('step')} -> {a.out}")


if __name__ == "__main__":
    main()
