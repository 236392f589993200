"""The five E2E metrics, each against a value computed independently (formula, nltk, a plain LCS)."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from lorakit.train import e2e_metrics as M

pytest.importorskip("sacrebleu", reason="E2E metrics need the train extra (sacrebleu)")

HYPS = ["the cat sat on the mat today", "a dog ran quickly across the big park", "nice pub near the river"]
REFS = [
    ["the cat sat on the mat", "today the cat sat on a mat", "a cat is on the mat"],
    ["a dog ran across the big park"],
    ["a nice pub by the river", "the pub near the river is nice"],
]


def test_nist_equals_nltk_with_one_reference_each() -> None:
    nltk_nist = pytest.importorskip("nltk.translate.nist_score", reason="nltk not installed")
    one = [[r[0]] for r in REFS]
    expected = nltk_nist.corpus_nist([[r.split() for r in rs] for rs in one], [h.split() for h in HYPS], n=5)
    assert M.corpus_nist(HYPS, one) == pytest.approx(expected, rel=1e-12)
    assert expected > 1.0


def test_nist_multi_reference_by_hand() -> None:
    # unigrams of the references: a 2, b 1, c 1 of 4 words -> info a = log2(4/2) = 1, b = c = log2(4) = 2.
    # "a c b" matches a, b and c (each clipped by its largest count in one reference): (1 + 2 + 2) / 3;
    # length 3 >= the average reference length 2, so no penalty. (nltk, best single ref: (1 + 2) / 3.)
    assert M.corpus_nist(["a c b"], [["a b", "a c"]], n=1) == pytest.approx(5 / 3)
    # brevity: 1 word against references of average length 2 -> exp(beta * ln(1/2)^2), beta = ln .5 / ln 1.5^2
    beta = math.log(0.5) / math.log(1.5) ** 2
    assert M.corpus_nist(["b"], [["a b", "a c"]], n=1) == pytest.approx(2 * math.exp(beta * math.log(0.5) ** 2))


def _lcs(a: list[str], b: list[str]) -> int:
    dp = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            dp[i + 1][j + 1] = dp[i][j] + 1 if x == y else max(dp[i][j + 1], dp[i + 1][j])
    return dp[-1][-1]


def test_rouge_l_is_best_lcs_f_measure_per_hypothesis() -> None:
    pytest.importorskip("rouge_score", reason="rouge-score not installed")

    def f(h: str, r: str) -> float:
        lcs = _lcs(h.split(), r.split())
        if lcs == 0:
            return 0.0
        p, rec = lcs / len(h.split()), lcs / len(r.split())
        return 2 * p * rec / (p + rec)

    expected = sum(max(f(h, r) for r in rs) for h, rs in zip(HYPS, REFS, strict=True)) / len(HYPS)
    assert M.rouge_l(HYPS, REFS) == pytest.approx(expected)
    assert M.rouge_l(["the cat on mat"], [["the cat sat on the mat", "a cat"]]) == pytest.approx(0.8)


def _cider_d(hyps: list[str], refs: list[list[str]], sigma: float = 6.0) -> float:
    """CIDEr-D from its definition (raw n-gram counts x IDF, clipped cosine, Gaussian length penalty, x10)."""

    def grams(s: str, n: int) -> Counter:
        w = s.split()
        return Counter(tuple(w[i : i + n]) for i in range(len(w) - n + 1))

    n_docs = len(refs)
    total = 0.0
    for h, rs in zip(hyps, refs, strict=True):
        per_n = []
        for n in range(1, 5):
            df = Counter(g for other in refs for g in set().union(*(grams(r, n) for r in other)))

            def vec(s: str, n: int = n, df: Counter = df) -> dict:
                return {g: c * (math.log(n_docs) - math.log(max(1.0, df[g]))) for g, c in grams(s, n).items()}

            vh = vec(h)
            sims = []
            for r in rs:
                vr = vec(r)
                nh = math.sqrt(sum(v * v for v in vh.values()))
                nr = math.sqrt(sum(v * v for v in vr.values()))
                dot = sum(min(vh[g], vr[g]) * vr[g] for g in vh if g in vr)
                pen = math.exp(-((len(h.split()) - len(r.split())) ** 2) / (2 * sigma**2))
                sims.append(pen * dot / (nh * nr) if nh and nr else 0.0)
            per_n.append(10 * sum(sims) / len(rs))
        total += sum(per_n) / 4
    return total / len(hyps)


def test_cider_d_matches_its_definition() -> None:
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap not installed")
    expected = _cider_d(HYPS, REFS)
    assert M.cider(HYPS, REFS) == pytest.approx(expected, rel=1e-9)
    assert 0.5 < expected < 10


@pytest.mark.slow
def test_meteor_fragmentation_penalty_by_formula() -> None:
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap not installed")
    if M.java_missing():
        pytest.skip(M.java_missing())
    # All six words match exactly (P = R = Fmean = 1) in 2 chunks; METEOR 1.5's English parameters
    # (gamma 0.6, beta 0.2) give 1 - gamma * (chunks / matches) ** beta. One jar start (~10-30 s).
    got = M.meteor(["on a mat the cat sat"], [["the cat sat on a mat"]])
    assert got == pytest.approx(1 - 0.6 * (2 / 6) ** 0.2, abs=1e-4)


def test_e2e_scores_scales_and_reports_skipped_meteor() -> None:
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap not installed")
    out = M.e2e_scores(HYPS, REFS, with_meteor=False)
    assert out["meteor"] is None and "METEOR" in out["skipped"]
    assert out["rouge_l"] == pytest.approx(100 * M.rouge_l(HYPS, REFS))
    assert out["nist"] == pytest.approx(M.corpus_nist(HYPS, REFS))
    with pytest.raises(ValueError):
        M.e2e_scores(HYPS, REFS[:2])
