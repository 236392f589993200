"""Workload (e): adapter load from disk and adapter switch, SmolLM2-135M all-linear r=16.

    python -m benchmarks.bench_adapters

``lorakit-load``: ``lorakit.load_adapter`` of a saved adapter into an already-injected model.
``lorakit-switch``: ``lorakit.adapters.set_adapter`` between two named adapters, when that module
exists. ``peft-load`` / ``peft-switch``: ``PeftModel.load_adapter`` (a new name each time) and
``set_adapter`` between two loaded adapters.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import tempfile

import torch

from benchmarks.harness import Measured, device_of, dtype_of, main, time_it, variants
from benchmarks.models import load

R = 16


def _lorakit_model(args: argparse.Namespace, tmp: str) -> tuple[torch.nn.Module, str]:
    import lorakit
    model = load("smollm2", args.smoke, device_of(args), dtype_of(args))
    lorakit.inject(model, lorakit.LoraConfig(r=R, alpha=2 * R, targets="all-linear"))
    path = f"{tmp}/a"
    lorakit.save_adapter(model, path)
    return model, path


def _run(args: argparse.Namespace, variant: str) -> Measured:
    tmp = tempfile.mkdtemp()
    if variant == "lorakit-load":
        import lorakit
        model, path = _lorakit_model(args, tmp)
        return time_it(lambda: lorakit.load_adapter(model, path), args.reps, args.warmup)
    if variant == "lorakit-switch":
        if importlib.util.find_spec("lorakit.adapters") is None:
            return Measured(float("nan"), [], extra={"note": "lorakit.adapters not built yet"})
        import lorakit
        from lorakit import adapters
        model, path = _lorakit_model(args, tmp)
        lorakit.load_adapter(model, path, name="second")
        names = itertools.cycle(["second", "default"])
        return time_it(lambda: adapters.set_adapter(model, next(names)), max(args.reps, 20), args.warmup)
    import peft
    base = load("smollm2", args.smoke, device_of(args), dtype_of(args))
    model = peft.get_peft_model(base, peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules="all-linear"))
    model.save_pretrained(f"{tmp}/p")
    path = f"{tmp}/p"
    if variant == "peft-load":
        counter = itertools.count()
        return time_it(lambda: model.load_adapter(path, adapter_name=f"a{next(counter)}"),
                       args.reps, args.warmup)
    model.load_adapter(path, adapter_name="second")
    names = itertools.cycle(["second", "default"])
    return time_it(lambda: model.set_adapter(next(names)), max(args.reps, 20), args.warmup)


VARIANTS = variants(_run, ("lorakit-load", "lorakit-switch", "peft-load", "peft-switch"))

if __name__ == "__main__":
    main("benchmarks.bench_adapters", "Adapter load / switch, SmolLM2-135M all-linear r=16", VARIANTS,
         "lorakit-load")
