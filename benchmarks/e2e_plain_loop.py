"""The plain PyTorch E2E loop of issue #20 section 0, the reference ``lorakit train --task e2e`` is held to.

Everything the issue describes and nothing of the trainer except the LoRA layers (``lorakit.inject``) and
the data split (``lorakit.train.data.load_task_data``, so both score the same held-out MRs):

* prompt ``MR + "\\nDescription:"`` with the tokenizer's own special tokens (SmolLM2 adds none), target
  ``" " + text + EOS``, loss on the target tokens only (token mean of the batch);
* AdamW (weight decay on every trainable tensor), linear warm-up then linear decay to 0, clipping at 1.0;
* greedy decoding of at most 48 new tokens, one MR at a time, no n-gram blocking;
* corpus BLEU (sacrebleu, 13a) of one text per MR against all its references.

Run (HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1; SmolLM2 steps take seconds each on a loaded 2-core CPU)::

    python -m benchmarks.e2e_plain_loop --steps 150 --warmup 15 --out /tmp/plain150
    python -m benchmarks.e2e_plain_loop --score-adapter runs/x/adapter     # decode + BLEU only

``--steps`` defaults to one epoch of the training split (527 steps at batch 8).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import lorakit
from lorakit.train.data import MRGroup, get_task, load_task_data
from lorakit.train.models import load_model, load_tokenizer, resolve

SEP = "\nDescription:"


def pairs_of(groups: Sequence[MRGroup]) -> list[tuple[str, str]]:
    """(MR, text) training pairs in file order (the trainer's feature order)."""
    return [(g.mr, ref) for g in groups for ref in g.refs]


def encode(tok: Any, mr: str, text: str, max_len: int = 128) -> tuple[list[int], list[int]]:
    """(input ids, labels): prompt tokens labelled -100, the text and EOS labelled with themselves."""
    p = tok(mr.strip() + SEP)["input_ids"]
    t = tok(" " + text.strip() + tok.eos_token, add_special_tokens=False)["input_ids"]
    return (p + t)[:max_len], ([-100] * len(p) + t)[:max_len]


def batch_of(tok: Any, items: Sequence[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels."""
    enc = [encode(tok, mr, text) for mr, text in items]
    width = max(len(ids) for ids, _ in enc)
    pad = tok.pad_token_id
    ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in enc])
    labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in enc])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in enc])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lm_loss(model: Any, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's target tokens."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(), ignore_index=-100)


def train(model: Any, tok: Any, batches: Sequence[Sequence[tuple[str, str]]], *, lr: float, warmup: int,
          weight_decay: float = 0.01, clip: float = 1.0, record: list[dict[str, Any]] | None = None) -> None:
    """One optimizer step per batch; ``record`` gets loss, lr, grad norm and parameters after each step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    model.train()
    for items in batches:
        loss = lm_loss(model, batch_of(tok, items))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        step_lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if record is not None:
            record.append({"loss": float(loss), "lr": step_lr, "grad_norm": float(norm),
                           "params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}})


@torch.no_grad()
def decode(model: Any, tok: Any, mrs: Sequence[str], max_new_tokens: int = 48) -> list[str]:
    """Greedy continuation of each MR's prompt, one at a time, cut at EOS; whitespace normalised."""
    model.eval()
    out = []
    for mr in mrs:
        ids = torch.tensor([tok(mr.strip() + SEP)["input_ids"]])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        out.append(" ".join(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).split()))
    return out


def bleu(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """sacrebleu corpus BLEU with every reference of each MR (missing streams padded by repeating the first
    reference, which changes neither clipped counts nor the closest reference length)."""
    import sacrebleu

    width = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else r[0] for r in refs] for k in range(width)]
    return float(sacrebleu.corpus_bleu(list(hyps), streams).score)


def load(adapter: str | None = None, *, r: int = 4, alpha: float = 32.0, dropout: float = 0.1) -> tuple[Any, Any]:
    """SmolLM2 as the trainer loads it, with fresh LoRA on q_proj / v_proj, a saved adapter or a full model dir."""
    if adapter and (Path(adapter) / "config.json").is_file() and not (Path(adapter) / "adapter_config.json").is_file():
        full = resolve(adapter)  # a full fine-tune's model/ directory
        return load_tokenizer(full), load_model(full, "generation")
    src = resolve("smollm2")
    tok, model = load_tokenizer(src), load_model(src, "generation")
    if adapter:
        from lorakit.train.models import quantize_like_adapter

        quantize_like_adapter(model, adapter)  # a QLoRA adapter is decoded on the base quantized as in training
        lorakit.load_adapter(model, adapter)
    else:
        lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=alpha, dropout=dropout, targets=["q_proj", "v_proj"]))
    return tok, model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default: one epoch)")
    ap.add_argument("--warmup", type=int, default=58)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default="../shared/data")
    ap.add_argument("--score-adapter", default=None, help="only decode + score this saved adapter")
    ap.add_argument("--out", default=None, help="directory for generations.txt, results.json, adapter/")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(a.seed)
    train_g, dev_g = load_task_data(get_task("e2e"), a.data_dir, seed=0, dev_fraction=0.1)
    tok, model = load(a.score_adapter)
    t0, res = time.perf_counter(), {}
    if not a.score_adapter:
        pairs = pairs_of(train_g)
        random.Random(a.seed).shuffle(pairs)
        steps = a.steps or len(pairs) // a.batch_size
        batches = [pairs[(i * a.batch_size) % len(pairs):][: a.batch_size] for i in range(steps)]
        train(model, tok, batches, lr=a.lr, warmup=a.warmup)
        res["train_s"] = time.perf_counter() - t0
        res["steps"] = steps
    hyps = decode(model, tok, [g.mr for g in dev_g])
    res.update(bleu=bleu(hyps, [g.refs for g in dev_g]), n_mrs=len(dev_g))
    print(json.dumps(res))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "generations.txt").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
        (out / "results.json").write_text(json.dumps(res, indent=2))
        if not a.score_adapter:
            lorakit.save_adapter(model, out / "adapter")


if __name__ == "__main__":
    main()
