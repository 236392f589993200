"""The ``lorakit`` command line: ``train``, ``eval``, ``generate``, ``merge``, ``demo`` (+ ``analyze``).

Every subcommand's flags come from a typed config dataclass (:mod:`lorakit.train.config`), so
``--config run.toml`` files use the same names; flags given on the command line win. Heavy imports
(torch models, transformers) happen only inside the chosen subcommand.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from lorakit.errors import LoraError

EPILOG = "Every option can also be set in --config FILE (TOML or YAML) under the same name."
EXAMPLES = {
    "train": "examples:\n  lorakit train --task sst2 --model minilm --method lora --r 8 --max-steps 300\n"
    "  lorakit train --task e2e --model smollm2 --method lora --r 4 --alpha 32 --lr 2e-4\n"
    "  torchrun --nproc_per_node 2 -m lorakit train --task mrpc --batch-size 8\n"
    "  lorakit train --config run.toml --resume",
    "eval": "examples:\n  lorakit eval --task sst2 --adapter runs/sst2-lora-r8/adapter\n"
    "  lorakit eval --task mrpc --model runs/mrpc-full/model --eval-file my_pairs.jsonl",
    "generate": "example:\n  lorakit generate --adapter runs/e2e-lora-r4/adapter "
    "--prompt 'name : Aromi | eatType : pub | area : city centre'",
    "merge": "example:\n  lorakit merge --adapter runs/sst2-lora-r8/adapter --output merged-sst2",
    "demo": "example:\n  lorakit demo --output-dir runs/demo",
}


def _cmd_train(args: argparse.Namespace) -> int:
    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import train

    res = train(TrainConfig.from_sources(args))
    if res:
        print(
            json.dumps(
                {k: res[k] for k in ("final", "best", "trainable_params", "train_time_s", "saved")},
                indent=2,
                default=str,
            )
        )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from lorakit.train.commands import run_eval
    from lorakit.train.config import EvalConfig

    print(json.dumps(run_eval(EvalConfig.from_sources(args)), indent=2))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from lorakit.train.commands import run_generate
    from lorakit.train.config import GenerateConfig

    for text in run_generate(GenerateConfig.from_sources(args)):
        print(text)
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from lorakit.train.commands import run_merge
    from lorakit.train.config import MergeConfig

    print(f"merged model written to {run_merge(MergeConfig.from_sources(args))}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lorakit.train.config import DemoConfig
    from lorakit.train.demo import run_demo

    run_demo(DemoConfig.from_sources(args))
    return 0


SUBCOMMANDS: dict[str, tuple[str, str, Callable[[argparse.Namespace], int]]] = {
    "train": ("TrainConfig", "fine-tune a model (LoRA, full or head-only) on a GLUE task or E2E", _cmd_train),
    "eval": (
        "EvalConfig",
        "score a model (+ adapter) on a dev set or any file of the task's format",
        _cmd_eval,
    ),
    "generate": ("GenerateConfig", "verbalise E2E meaning representations with beam search", _cmd_generate),
    "merge": (
        "MergeConfig",
        "fold a LoRA adapter into its base model and save a plain model dir",
        _cmd_merge,
    ),
    "demo": ("DemoConfig", "a few-minute LoRA sentiment demo on MiniLM with the bundled sample", _cmd_demo),
}


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (subcommands registered from their config dataclasses)."""
    from lorakit.train import config as cfgmod

    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA fine-tuning, evaluation and adapter tools. Start with: lorakit demo",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (cls_name, help_text, func) in SUBCOMMANDS.items():
        cls = getattr(cfgmod, cls_name)
        p = sub.add_parser(
            name,
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            epilog=EXAMPLES[name] + "\n\n" + EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cls.add_arguments(p)
        p.set_defaults(func=func)
    try:
        from lorakit.analysis import add_cli  # type: ignore[attr-defined]
    except ImportError:
        add_cli = None
    if add_cli is not None:
        add_cli(sub)
    from lorakit.serve.cli import add_cli as add_serve  # flags only; the web stack is imported when it runs

    add_serve(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lorakit`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Any = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 1
    try:
        return int(func(args) or 0)
    except LoraError as exc:
        print(f"lorakit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
