"""The E2E NLG Challenge metrics the LoRA paper reports (Table 3): BLEU, NIST, METEOR, ROUGE-L, CIDEr.

Each comes from a maintained library, imported lazily (all in the ``train`` extra):

* BLEU: sacrebleu corpus BLEU (13a tokenisation), every reference of an MR at once.
* NIST: mteval-v13a's definition (n = 5) on 13a tokens, checked against nltk's ``corpus_nist``
  (which uses only the best single reference, so it is exact only with one reference each).
* METEOR: METEOR 1.5 (``-l en -norm``) through pycocoevalcap's wrapper around its jar, the program the
  E2E challenge scripts call; it needs a ``java`` on ``PATH`` and is reported as ``None`` (with the
  reason under ``skipped``) where there is none.
* ROUGE-L: rouge-score's LCS F-measure (its own tokeniser, stemming off), the best reference per
  hypothesis, averaged over hypotheses.
* CIDEr: pycocoevalcap's ``Cider`` (which is CIDEr-D: clipped counts, Gaussian length penalty, x10),
  on lower-cased 13a tokens; document frequencies come from the scored references, as in COCO.

Scaled as the paper prints them: BLEU, METEOR and ROUGE-L in percent, NIST and CIDEr raw.
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from collections.abc import Sequence
from typing import Any

from lorakit.train.metrics import corpus_bleu

E2E_METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider")


def _check(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> None:
    if len(hyps) != len(refs) or not hyps:
        raise ValueError(f"need as many reference lists as hypotheses (got {len(hyps)} / {len(refs)})")
    if any(len(r) == 0 for r in refs):
        raise ValueError("every hypothesis needs at least one reference")


def _tok13a() -> Any:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def _ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def corpus_nist(hyps: Sequence[str], refs: Sequence[Sequence[str]], n: int = 5) -> float:
    """NIST as mteval-v13a scores it, on 13a tokens: information weights from all references, each
    hypothesis n-gram clipped by its largest count in any one reference, the average reference length
    in the brevity penalty. (nltk's ``corpus_nist``, which scores against the single best reference,
    equals this with one reference per hypothesis: the tests check that.)"""
    _check(hyps, refs)
    tok = _tok13a()
    hyp_w = [tok(h).split() for h in hyps]
    ref_w = [[tok(r).split() for r in rs] for rs in refs]
    counts: Counter[tuple[str, ...]] = Counter()
    n_words = 0
    for rs in ref_w:
        for r in rs:
            n_words += len(r)
            for k in range(1, n + 1):
                counts.update(_ngrams(r, k))

    def info(g: tuple[str, ...]) -> float:
        prefix = counts[g[:-1]] if len(g) > 1 else n_words
        return math.log2(prefix / counts[g])

    score = 0.0
    for k in range(1, n + 1):
        gained, total = 0.0, 0
        for h, rs in zip(hyp_w, ref_w, strict=True):
            hg = _ngrams(h, k)
            best: Counter[tuple[str, ...]] = Counter()
            for r in rs:
                best |= _ngrams(r, k)
            gained += sum(info(g) * min(c, best[g]) for g, c in hg.items() if best[g])
            total += sum(hg.values())
        score += gained / total if total else 0.0
    sys_len = sum(len(h) for h in hyp_w)
    ref_len = sum(sum(len(r) for r in rs) / len(rs) for rs in ref_w)
    ratio = min(1.0, sys_len / ref_len) if ref_len else 0.0
    beta = math.log(0.5) / math.log(1.5) ** 2
    return score * (math.exp(beta * math.log(ratio) ** 2) if ratio > 0 else 0.0)


def rouge_l(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Mean over hypotheses of the best ROUGE-L F-measure against any of its references (0..1)."""
    from rouge_score import rouge_scorer

    _check(hyps, refs)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return sum(scorer.score_multi(list(rs), h)["rougeL"].fmeasure for h, rs in zip(hyps, refs, strict=True)) / len(hyps)


def cider(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """CIDEr-D (pycocoevalcap) on lower-cased 13a tokens; IDF from these references."""
    from pycocoevalcap.cider.cider import Cider

    _check(hyps, refs)
    tok = _tok13a()
    gts = {i: [tok(r).lower() for r in rs] for i, rs in enumerate(refs)}
    res = {i: [tok(h).lower()] for i, h in enumerate(hyps)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


def java_missing() -> str | None:
    """Why METEOR 1.5 cannot run here (no java / no pycocoevalcap), or None when it can."""
    if shutil.which("java") is None:
        return "METEOR needs a Java runtime (java on PATH) for the METEOR 1.5 jar"
    try:
        import pycocoevalcap.meteor.meteor  # noqa: F401
    except ImportError:
        return "METEOR needs pycocoevalcap (pip install 'lorakit[train]')"
    return None


def meteor(hyps: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
    """Corpus METEOR 1.5 (stats aggregated over all segments, as the jar's EVAL line), 0..1."""
    from pycocoevalcap.meteor.meteor import Meteor

    _check(hyps, refs)
    why = java_missing()
    if why:
        raise RuntimeError(why)
    clean = [" ".join(h.split()) or "." for h in hyps]  # the jar needs a non-empty hypothesis line
    scorer = Meteor()
    try:
        score, _ = scorer.compute_score(
            {i: [" ".join(r.split()) for r in rs] for i, rs in enumerate(refs)},
            {i: [h] for i, h in enumerate(clean)},
        )
    finally:
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
    return float(score)


def e2e_scores(
    hyps: Sequence[str], refs: Sequence[Sequence[str]], *, with_meteor: bool = True
) -> dict[str, Any]:
    """All five Table-3 metrics; METEOR is ``None`` (reason in ``skipped``) where Java is missing."""
    _check(hyps, refs)
    out: dict[str, Any] = {
        "bleu": corpus_bleu(hyps, refs),
        "nist": corpus_nist(hyps, refs),
        "meteor": None,
        "rouge_l": 100 * rouge_l(hyps, refs),
        "cider": cider(hyps, refs),
    }
    why = java_missing() if with_meteor else "METEOR not requested"
    if why is None:
        out["meteor"] = 100 * meteor(hyps, refs)
    else:
        out["skipped"] = why
    return out
