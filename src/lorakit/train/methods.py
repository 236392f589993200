"""The three training methods (lora / full / head) and how each one saves its result."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from lorakit.atomic import atomic_dir, atomic_write
from lorakit.checks import check_finite
from lorakit.errors import AlreadyInjectedError, TargetNotFoundError, UnsupportedParameterError
from lorakit.train.checkpoint import copy_into_parameters, trainable_state
from lorakit.train.errors import TrainConfigError
from lorakit.train.models import default_targets, head_modules

META = "lorakit_train.json"  # written next to saved adapters / heads / models: what produced them


def _targets_arg(targets: list[str]) -> str | list[str]:
    """A single regex / ``all-linear`` goes to LoraConfig as a string, plain names as a list."""
    if len(targets) == 1 and not re.fullmatch(r"[\w.]+", targets[0]):
        return targets[0]
    if targets == ["all-linear"]:
        return "all-linear"
    return targets


def apply_method(
    model: torch.nn.Module,
    method: str,
    *,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: list[str] | None = None,
    use_dora: bool = False,
    target_parameters: list[str] | None = None,
) -> dict[str, Any]:
    """Set up ``model`` for ``method`` (freezing as needed); returns what was chosen (targets, heads).

    ``target_parameters``: bare parameters adapted too (:mod:`lorakit.param_targets`); a name matching
    no parameter of the model raises :class:`TrainConfigError` naming ``--target-parameters``.
    """
    heads = head_modules(model)
    info: dict[str, Any] = {"heads": heads}
    if method == "lora":
        import lorakit

        tg = targets or default_targets(model)
        info["targets"] = tg
        if target_parameters:
            info["target_parameters"] = list(target_parameters)
        cfg = lorakit.LoraConfig(
            r=r, alpha=alpha, dropout=dropout, targets=_targets_arg(tg), trainable=heads, bias="none",
            use_dora=use_dora, target_parameters=tuple(target_parameters or ()),
        )
        try:
            lorakit.inject(model, cfg)
        except (TargetNotFoundError, UnsupportedParameterError, AlreadyInjectedError) as exc:
            if target_parameters and str(exc).startswith("target_parameters"):
                raise TrainConfigError(f"--target-parameters: {exc}") from None
            raise
    elif method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method == "head":
        if not heads:
            raise TrainConfigError("--method head: the model has no task head (classifier/score) to train")
        for p in model.parameters():
            p.requires_grad_(False)
        for name in heads:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)
    else:
        raise TrainConfigError(f"--method: unknown method {method!r}")
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in model.parameters())
    info.update(trainable_params=n_train, total_params=n_total, trainable_fraction=n_train / n_total)
    return info


def result_path(method: str, dest: Path) -> Path:
    """Where :func:`save_result` writes ``method``'s weights under ``dest``."""
    return dest / {"lora": "adapter", "full": "model"}.get(method, "head.safetensors")


def save_result(
    model: torch.nn.Module, tokenizer: Any, method: str, dest: Path, meta: dict[str, Any]
) -> Path:
    """Write the trained weights atomically: a PEFT adapter (lora), a model dir (full) or head weights.

    Returns the path to pass to ``lorakit eval`` (``--adapter``, ``--model`` or ``--head``).
    """
    meta_text = json.dumps(meta, indent=2, default=str)
    if method == "lora":
        import lorakit

        def fill(d: Path) -> None:
            lorakit.save_adapter(model, d)
            (d / META).write_text(meta_text)

        atomic_dir(result_path(method, dest), fill)
        return result_path(method, dest)
    if method == "full":

        def fill_full(d: Path) -> None:
            model.save_pretrained(d)  # type: ignore[operator]
            tokenizer.save_pretrained(d)
            (d / META).write_text(meta_text)

        atomic_dir(result_path(method, dest), fill_full)
        return result_path(method, dest)
    from safetensors.torch import save

    blob = save(
        {k: v.contiguous() for k, v in trainable_state(model).items()}, metadata={"lorakit": meta_text}
    )
    atomic_write(result_path(method, dest), lambda fh: fh.write(blob))
    return result_path(method, dest)


def load_head(model: torch.nn.Module, path: str | Path) -> None:
    """Load a head-only run's ``head.safetensors`` into a freshly loaded model."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    check_finite(state, f"--head: {path}", TrainConfigError, hint="the run that wrote it diverged")
    copy_into_parameters(model, state, lambda names: TrainConfigError(
        f"--head: {path} holds tensors the model lacks: {names}"))


def read_meta(path: str | Path) -> dict[str, Any]:
    """The ``lorakit_train.json`` next to an adapter / model dir, or ``{}``."""
    p = Path(path) / META
    return json.loads(p.read_text()) if p.is_file() else {}
