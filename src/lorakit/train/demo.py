"""``lorakit demo``: LoRA on MiniLM for binary sentiment with the bundled 300-sentence sample.

Shows, in a couple of minutes on 2 CPU cores: the trainable-parameter share, test accuracy before and
after training, the saved adapter's size next to the full model's, and that the merged model gives
the same outputs as the unmerged one.
"""

from __future__ import annotations

import random
import time
from importlib import resources
from pathlib import Path

import torch

from lorakit.atomic import output_problem
from lorakit.train.config import DemoConfig, TrainConfig
from lorakit.train.data import Example, get_task, read_glue_tsv
from lorakit.train.errors import TrainConfigError

SAMPLE = "demo_sentiment.tsv"


def sample_path() -> Path:
    """Location of the bundled sentiment sample (``sentence<TAB>label``, SST-2 layout)."""
    return Path(str(resources.files("lorakit") / "data" / SAMPLE))


def split_sample(
    examples: list[Example], test_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Stratified, seeded train/test split."""
    rng = random.Random(seed)
    train: list[Example] = []
    test: list[Example] = []
    for label in sorted({int(e.label) for e in examples}):
        group = [e for e in examples if e.label == label]
        rng.shuffle(group)
        n_test = round(test_fraction * len(group))
        test += group[:n_test]
        train += group[n_test:]
    rng.shuffle(train)
    return train, test


def _write_tsv(path: Path, rows: list[Example]) -> None:
    path.write_text("sentence\tlabel\n" + "".join(f"{e.text}\t{e.label}\n" for e in rows), encoding="utf-8")


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_demo(cfg: DemoConfig) -> dict[str, float]:
    """Run the demo end to end and print what it shows; returns the key numbers."""
    import lorakit
    from lorakit.train.batching import encode_classification
    from lorakit.train.commands import load_for_task
    from lorakit.train.evaluate import evaluate
    from lorakit.train.loop import Trainer
    from lorakit.train.models import resolve

    t0 = time.perf_counter()
    spec = get_task("sst2")
    examples = read_glue_tsv(sample_path(), spec)
    train, test = split_sample(examples, 0.25, cfg.seed)
    out = Path(cfg.output_dir)
    problem = output_problem(out, "directory")
    if problem:
        raise TrainConfigError(f"--output-dir: {problem}")
    out.mkdir(parents=True, exist_ok=True)
    _write_tsv(out / "train.tsv", train)
    _write_tsv(out / "test.tsv", test)
    print(f"lorakit demo: LoRA on MiniLM-L6 for sentiment ({len(train)} train / {len(test)} test sentences)")

    tcfg = TrainConfig.build(
        {
            "task": "sst2",
            "model": "minilm",
            "method": "lora",
            "r": cfg.r,
            "alpha": 2.0 * cfg.r,
            "lr": cfg.lr,
            "epochs": cfg.epochs,
            "batch_size": 16,
            "max_len": 48,
            "warmup_ratio": 0.06,
            "weight_decay": 0.01,
            "seed": cfg.seed,
            "train_file": str(out / "train.tsv"),
            "eval_file": str(out / "test.tsv"),
            "output_dir": str(out / "run"),
            "overwrite": True,
            "eval_every": 14,  # once per epoch (224 sentences / batch 16)
            "log_every": 2,
            "progress": cfg.progress,
        }
    )
    trainer = Trainer(tcfg)
    count = lorakit.trainable_parameters(trainer.model)
    print(
        f"trainable parameters: {count.trainable:,} of {count.total:,} ({100 * count.fraction:.2f} %) "
        f"- LoRA r={cfg.r} on {', '.join(trainer.method_info['targets'])} + the classifier head"
    )
    before = evaluate(
        trainer.model,
        spec,
        trainer.eval_feats,
        pad_id=trainer.pad_id,
        batch_size=64,
        device=torch.device("cpu"),
    )["accuracy"]
    print(f"test accuracy before training: {100 * before:.1f} %")
    res = trainer.run()
    after = res["final"]["accuracy"]
    print(f"test accuracy after training:  {100 * after:.1f} %  ({res['train_time_s']:.0f} s of training)")

    adapter = Path(res["saved"])
    src = resolve("minilm")
    full = sum(f.stat().st_size for f in src.path.glob("*.safetensors"))
    a_size = _dir_size(adapter)
    print(
        f"saved adapter: {adapter} = {a_size / 1e6:.2f} MB vs the full model {full / 1e6:.1f} MB "
        f"({full / a_size:.0f}x smaller)"
    )

    model, tok = load_for_task("minilm", "classification", 2, str(adapter))
    feats = encode_classification(test, tok, 48)
    from lorakit.train.batching import collate

    batch = collate(feats, tok.pad_token_id or 0)
    batch.pop("labels")
    with torch.no_grad():
        unmerged = model(**batch).logits
        lorakit.merge(model)
        merged = model(**batch).logits
        plain = lorakit.merge_and_unload(model)
        unloaded = plain(**batch).logits
    diff = float((merged - unmerged).abs().max())
    diff2 = float((unloaded - unmerged).abs().max())
    print(
        f"merged vs unmerged logits: max |diff| = {diff:.2e}; after merge_and_unload: {diff2:.2e} "
        f"({'agree' if max(diff, diff2) < 1e-4 else 'DISAGREE'})"
    )
    print(
        f"run directory: {out / 'run'} (metrics.jsonl, loss.png, adapter/); "
        f"total {time.perf_counter() - t0:.0f} s"
    )
    return {
        "before": before,
        "after": after,
        "adapter_bytes": float(a_size),
        "model_bytes": float(full),
        "merge_diff": max(diff, diff2),
    }
