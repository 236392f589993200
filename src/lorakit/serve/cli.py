"""The ``serve`` subcommand, registered into ``lorakit``'s parser by :func:`add_cli`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

HELP = "serve one base model and many LoRA adapters over an OpenAI-compatible HTTP API"
EXAMPLE = ("examples:\n  lorakit serve --model smollm2 --adapter-dir adapters --max-loaded 8\n"
           "  lorakit serve --model smollm2 --adapter sql=runs/sql/adapter --api-key $KEY --port 8000\n"
           "  lorakit serve --config serve.toml\n\n"
           "Every option can also be set in --config FILE (TOML or YAML) under the same name.")


def _cmd_serve(args: argparse.Namespace) -> int:
    from .app import ServeConfig, run

    return run(ServeConfig.from_sources(args))


def add_cli(sub: Any) -> None:
    """Add ``serve`` to the ``lorakit`` subparsers (flags from :class:`~lorakit.serve.app.ServeConfig`)."""
    from .app import ServeConfig

    p = sub.add_parser("serve", help=HELP, description=HELP[0].upper() + HELP[1:] + ".", epilog=EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ServeConfig.add_arguments(p)
    p.set_defaults(func=_cmd_serve)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lorakit.serve``: the same as ``lorakit serve``."""
    from lorakit.errors import LoraError

    parser = argparse.ArgumentParser(prog="lorakit")
    add_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args))
    except LoraError as exc:
        print(f"lorakit serve: error: {exc}", file=sys.stderr)
        return 2
