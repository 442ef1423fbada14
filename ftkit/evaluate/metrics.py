"""Metric functions for stage 04, each on one prediction/reference pair, and the bootstrap.

Text metrics are per example so that every aggregate is a mean over examples and a paired
bootstrap over examples gives confidence intervals on differences between models:

- ``exact_match`` and ``token_f1``: SQuAD-style, on normalised text (lower case, no punctuation,
  no articles, single spaces);
- ``chrf`` and ``bleu``: sacrebleu's sentence-level chrF and BLEU (exponential smoothing), scaled
  to 0-1; the aggregates are means of sentence scores, not corpus scores;
- ``rouge_l``: rouge-score's ROUGE-L F-measure with stemming;
- ``json_valid``: the reply parses as JSON (a ```json fence around it is allowed);
- ``label_metrics``: accuracy, macro F1 and the confusion matrix (scikit-learn) when replies are labels.

Loss is a ratio of sums (summed token losses / trained tokens), so its bootstrap resamples
examples and recomputes that ratio.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def normalize_label(text: str) -> str:
    """Labels keep their words (an article can be a label) but not case, outer punctuation or extra spaces."""
    return " ".join(text.lower().split()).strip(string.punctuation + " ")


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def chrf(prediction: str, reference: str) -> float:
    import sacrebleu

    return sacrebleu.sentence_chrf(prediction, [reference]).score / 100


def bleu(prediction: str, reference: str) -> float:
    import sacrebleu

    return sacrebleu.sentence_bleu(prediction, [reference]).score / 100


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def json_valid(text: str) -> bool:
    text = text.strip()
    fenced = _FENCE.match(text)
    try:
        json.loads(fenced.group(1) if fenced else text)
    except (json.JSONDecodeError, ValueError):
        return False
    return True


def infer_task(references: Sequence[str]) -> str:
    """``json`` when every reference is JSON, ``label`` when they are a few short repeated strings."""
    refs = [r.strip() for r in references if r.strip()]
    if not refs:
        return "free_text"
    if all(r[:1] in "{[" and json_valid(r) for r in refs):
        return "json"
    labels = {normalize_label(r) for r in refs}
    short = all(len(r.split()) <= 4 for r in refs)
    if short and len(labels) <= max(2, min(50, len(refs) // 2)):
        return "label"
    return "free_text"


def label_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Accuracy, macro F1 and confusion matrix over the reference labels; other replies count as '(other)'."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    labels = sorted({normalize_label(r) for r in references})
    known = set(labels)
    y_true = [normalize_label(r) for r in references]
    y_pred = [p if p in known else "(other)" for p in (normalize_label(x) for x in predictions)]
    all_labels = labels + (["(other)"] if "(other)" in y_pred else [])
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "labels": all_labels,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=all_labels).tolist(),
    }


def length_stats(values: Sequence[float]) -> dict:
    if not values:
        return {"mean": 0.0, "median": 0.0, "p90": 0.0, "max": 0.0}
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "max": float(a.max())}


@dataclass
class Sample:
    """Per-example values of one metric for one model: a mean of ``values``, or, with ``weights``,
    the ratio sum(values) / sum(weights) (loss: summed token losses over trained tokens)."""

    values: np.ndarray
    weights: np.ndarray | None = None

    @classmethod
    def of(cls, values, weights=None) -> Sample:
        return cls(np.asarray(values, dtype=float), None if weights is None else np.asarray(weights, dtype=float))

    def statistic(self, idx: np.ndarray) -> np.ndarray:
        """The statistic on each row of resampled indices ``idx`` (shape resamples x n)."""
        if self.weights is None:
            return self.values[idx].mean(axis=-1)
        return self.values[idx].sum(axis=-1) / np.maximum(self.weights[idx].sum(axis=-1), 1e-12)

    def point(self) -> float:
        return float(self.statistic(np.arange(len(self.values))))


def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def bootstrap_ci(sample: Sample, *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
                 transform=None) -> dict:
    """Point estimate and percentile bootstrap interval of one model's metric."""
    transform = transform or (lambda x: x)
    n = len(sample.values)
    point = float(transform(np.asarray(sample.point())))
    if n == 0:
        return {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    stats = transform(sample.statistic(_indices(n, resamples, seed)))
    tail = (1 - confidence) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    return {"value": point, "ci_low": float(low), "ci_high": float(high)}


def paired_bootstrap(a: Sample, b: Sample, *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
                     transform=None) -> dict:
    """Difference b - a of a metric measured on the same examples, with a paired percentile interval.

    Examples are resampled together for both models, so the interval reflects the difference on
    these prompts rather than the spread of either model alone.
    """
    if len(a.values) != len(b.values):
        raise ValueError(f"paired bootstrap needs the same examples for both models ({len(a.values)} vs "
                         f"{len(b.values)})")
    transform = transform or (lambda x: x)
    n = len(a.values)
    delta = float(transform(np.asarray(b.point())) - transform(np.asarray(a.point())))
    if n == 0:
        return {"delta": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
    idx = _indices(n, resamples, seed)
    diffs = transform(b.statistic(idx)) - transform(a.statistic(idx))
    tail = (1 - confidence) / 2
    low, high = np.quantile(diffs, [tail, 1 - tail])
    return {"delta": delta, "ci_low": float(low), "ci_high": float(high)}
