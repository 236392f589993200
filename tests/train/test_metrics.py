"""Metrics against scikit-learn, scipy and sacrebleu on fixed inputs."""

from __future__ import annotations

import random

import pytest
import sacrebleu
from scipy import stats
from sklearn import metrics as skm

from lorakit.train import metrics

rng = random.Random(3)
LABELS = [rng.randint(0, 1) for _ in range(200)]
PREDS = [t if rng.random() < 0.8 else 1 - t for t in LABELS]
X = [rng.uniform(0, 5) for _ in range(150)]
Y = [x + rng.gauss(0, 1) for x in X]


def test_accuracy_f1_matthews_match_sklearn() -> None:
    assert metrics.accuracy(PREDS, LABELS) == pytest.approx(skm.accuracy_score(LABELS, PREDS))
    assert metrics.f1_binary(PREDS, LABELS) == pytest.approx(skm.f1_score(LABELS, PREDS))
    assert metrics.matthews_corr(PREDS, LABELS) == pytest.approx(skm.matthews_corrcoef(LABELS, PREDS))


def test_degenerate_cases() -> None:
    assert metrics.matthews_corr([1, 1, 1], [0, 1, 0]) == 0.0 == skm.matthews_corrcoef([0, 1, 0], [1, 1, 1])
    assert metrics.f1_binary([0, 0], [0, 0]) == 0.0
    assert metrics.pearson([1, 1, 1], [1, 2, 3]) == 0.0
    with pytest.raises(ValueError):
        metrics.accuracy([], [])
    with pytest.raises(ValueError):
        metrics.accuracy([1], [1, 0])


def test_pearson_spearman_match_scipy() -> None:
    assert metrics.pearson(X, Y) == pytest.approx(stats.pearsonr(X, Y)[0])
    assert metrics.spearman(X, Y) == pytest.approx(stats.spearmanr(X, Y)[0])
    tied_x = [round(x) for x in X]  # many ties
    tied_y = [round(y) for y in Y]
    assert metrics.spearman(tied_x, tied_y) == pytest.approx(stats.spearmanr(tied_x, tied_y)[0])


def test_task_metric_sets() -> None:
    assert set(metrics.classification_metrics("mrpc", PREDS, LABELS)) == {"accuracy", "f1"}
    assert set(metrics.classification_metrics("cola", PREDS, LABELS)) == {"accuracy", "matthews"}
    reg = metrics.regression_metrics(X, Y)
    assert reg["corr"] == pytest.approx((reg["pearson"] + reg["spearman"]) / 2)


HYPS = ["the cat sat on the mat today", "a dog ran quickly across the big park", "nice pub near the river"]
REFS = [
    ["the cat sat on the mat", "today the cat sat on a mat", "a cat is on the mat"],
    ["a dog ran across the big park"],
    ["a nice pub by the river", "the pub near the river is nice"],
]


def test_bleu_single_reference_matches_sacrebleu() -> None:
    refs = [r[0] for r in REFS]
    assert metrics.corpus_bleu(HYPS, [[r] for r in refs]) == pytest.approx(
        sacrebleu.corpus_bleu(HYPS, [refs]).score
    )


def test_bleu_multi_reference_variable_counts() -> None:
    # Equal counts: the plain sacrebleu multi-reference call.
    two = [r[:2] if len(r) >= 2 else r * 2 for r in REFS]
    expect = sacrebleu.corpus_bleu(HYPS, [[r[0] for r in two], [r[1] for r in two]]).score
    assert metrics.corpus_bleu(HYPS, two) == pytest.approx(expect)
    # Variable counts: a duplicated reference changes nothing, so padding to equal width by
    # repetition must give the same score as our None-padded streams.
    width = max(len(r) for r in REFS)
    padded = [r + [r[0]] * (width - len(r)) for r in REFS]
    expect_var = sacrebleu.corpus_bleu(HYPS, [[r[k] for r in padded] for k in range(width)]).score
    got = metrics.corpus_bleu(HYPS, REFS)
    assert got == pytest.approx(expect_var)
    assert got > metrics.corpus_bleu(HYPS, [[r[0]] for r in REFS])  # more references never hurt here


def test_bleu_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        metrics.corpus_bleu(["a"], [])
    with pytest.raises(ValueError):
        metrics.corpus_bleu(["a"], [[]])
