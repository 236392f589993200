"""Task metrics as the LoRA paper reports them (accuracy, F1, Matthews, Pearson/Spearman, BLEU).

Implemented directly on Python lists so that scoring needs no scikit-learn / scipy; the tests check
every function against those libraries (and BLEU against sacrebleu) on fixed inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of exact matches."""
    _check(preds, labels)
    return sum(int(p == t) for p, t in zip(preds, labels, strict=True)) / len(labels)


def f1_binary(preds: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """F1 of the positive class (0.0 when there are no true or predicted positives)."""
    _check(preds, labels)
    tp = sum(1 for p, t in zip(preds, labels, strict=True) if p == positive and t == positive)
    fp = sum(1 for p, t in zip(preds, labels, strict=True) if p == positive and t != positive)
    fn = sum(1 for p, t in zip(preds, labels, strict=True) if p != positive and t == positive)
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews_corr(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation coefficient for binary labels (0.0 when undefined)."""
    _check(preds, labels)
    tp = sum(1 for p, t in zip(preds, labels, strict=True) if p == 1 and t == 1)
    tn = sum(1 for p, t in zip(preds, labels, strict=True) if p == 0 and t == 0)
    fp = sum(1 for p, t in zip(preds, labels, strict=True) if p == 1 and t == 0)
    fn = sum(1 for p, t in zip(preds, labels, strict=True) if p == 0 and t == 1)
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if den == 0 else (tp * tn - fp * fn) / den


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation (0.0 when a side is constant)."""
    _check(x, y)
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return 0.0 if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks starting at 1, ties get their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson of tie-averaged ranks)."""
    _check(x, y)
    return pearson(_ranks(x), _ranks(y))


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu, default 13a tokenisation) with a variable number of references each.

    ``references[i]`` holds all references of hypothesis ``i`` (for E2E: every text of its MR).
    """
    import sacrebleu

    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(
            f"need as many reference lists as hypotheses (got {len(hypotheses)} / {len(references)})"
        )
    if any(len(r) == 0 for r in references):
        raise ValueError("every hypothesis needs at least one reference")
    width = max(len(r) for r in references)
    # sacrebleu wants reference *streams*; shorter reference lists are padded with None (ignored).
    streams = [[r[k] if k < len(r) else None for r in references] for k in range(width)]
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


def classification_metrics(task: str, preds: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """The metrics reported for a GLUE classification task."""
    out = {"accuracy": accuracy(preds, labels)}
    if task == "mrpc":
        out["f1"] = f1_binary(preds, labels)
    if task == "cola":
        out["matthews"] = matthews_corr(preds, labels)
    return out


def regression_metrics(preds: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman correlations (STS-B); ``corr`` is their mean."""
    p, s = pearson(preds, labels), spearman(preds, labels)
    return {"pearson": p, "spearman": s, "corr": (p + s) / 2}


def _check(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"need two non-empty sequences of equal length (got {len(a)} and {len(b)})")
