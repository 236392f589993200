"""``lorakit analyze`` subcommand (registered by the main CLI via :func:`add_cli`)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_cli", "run_cli"]


def run_cli(args: argparse.Namespace) -> int:
    """Handler: run :func:`analyze` and print :func:`format_summary`; returns the exit code."""
    from .report import analyze, format_summary

    result = analyze(args.adapter, compare=args.compare, base=args.base, out_dir=args.out,
                     random_draws=args.random_draws, seed=args.seed)
    print(format_summary(result))
    return 0


def add_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``analyze ADAPTER [--compare ADAPTER2] [--base MODEL_DIR_OR_PRESET] [--out DIR]``.

    The parser's default ``func`` is :func:`run_cli` (call ``args.func(args)``).
    """
    p = subparsers.add_parser(
        "analyze",
        help="LoRA paper Section 7 analysis: subspace similarity, ΔW vs W, ΔW spectra",
        description="Subspace similarity between two adapters (Eq. 4), ΔW vs W projections and "
        "amplification (Table 7), ΔW singular spectra. Writes analysis.json + PNGs with --out.",
    )
    p.add_argument("adapter", help="PEFT adapter directory or .safetensors file")
    p.add_argument("--compare", metavar="ADAPTER2", default=None, help="second adapter (same modules)")
    p.add_argument("--base", metavar="MODEL_DIR_OR_PRESET", default=None,
                   help="base model: transformers directory, .safetensors file, or preset 'minilm'")
    p.add_argument("--out", metavar="DIR", default=None, help="write analysis.json and figures here")
    p.add_argument("--random-draws", type=int, default=8, help="random-direction draws (Table 7 baseline)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random baselines")
    p.set_defaults(func=run_cli)
    return p
