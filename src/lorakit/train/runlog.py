"""Run-directory logging: ``metrics.jsonl`` records and the ``loss.png`` curve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorakit.atomic import atomic_write

METRICS = "metrics.jsonl"


class MetricsLog:
    """Appends one JSON object per line; ``enabled=False`` (non-zero ranks) makes it a no-op."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.path = run_dir / METRICS
        self.enabled = enabled

    def reset(self, keep_until_step: int | None = None) -> None:
        """Start fresh, or keep only records up to ``keep_until_step`` (resuming from a checkpoint)."""
        if not self.enabled:
            return
        kept: list[str] = []
        if keep_until_step is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by the kill
                if rec.get("step", 0) <= keep_until_step:
                    kept.append(line)
        atomic_write(self.path, lambda fh: fh.write("".join(ln + "\n" for ln in kept)), mode="w")

    def append(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=float) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out


def plot_loss(records: list[dict[str, Any]], path: Path, metric: str | None = None) -> None:
    """Training loss (and the eval metric / loss, if any) against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train"]
    evals = [(r["step"], r) for r in records if r.get("split") == "eval" and "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="tab:blue")
    if evals:
        ax.plot(
            [s for s, _ in evals], [r["loss"] for _, r in evals], "o-", label="eval loss", color="tab:orange"
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    if evals and metric and metric != "loss" and all(metric in r for _, r in evals):
        ax2 = ax.twinx()
        ax2.plot([s for s, _ in evals], [r[metric] for _, r in evals], "s--", color="tab:green", label=metric)
        ax2.set_ylabel(metric)
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
