"""Classification metrics, as pure functions of gold labels, predictions and confidences.

Single-label (every item has one gold label index; a prediction is one index):
- accuracy        correct / items
- precision, recall, F1 per class (scikit-learn's definitions; a class never predicted has
  precision 0, one with no gold items recall 0, and F1 0 when both are 0)
- macro_f1        the unweighted mean of the per-class F1 over the classifier's classes
- confusion       counts[gold][predicted], rows gold, columns predicted
- ece             expected calibration error over 15 equal-width bins of confidence (Guo et al. 2017):
                  bin b holds the items whose confidence is in (b/15, (b+1)/15] (0 goes to the first
                  bin); ECE = sum over bins of |bin| / N * |accuracy(bin) - mean confidence(bin)|
- nll             mean negative log-probability of the gold class (natural log)
- coverage curve  for a threshold t: coverage = share of items with confidence >= t, accuracy =
                  accuracy on those kept (NaN when none is kept); what `--min-confidence t` gives

Multi-label (gold and predicted are 0/1 matrices, items x labels):
- subset_accuracy every label of an item right; hamming_loss the share of wrong (item, label) cells
- per-label precision/recall/F1 as above on each column; micro_f1 over all cells; macro_f1 the mean
- ece             over every (item, label) probability as a binary forecast: bins of p, |mean(y) - mean(p)|

Ties of a prediction go to the first class (numpy argmax), as the harness's multiple choice does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

ECE_BINS = 15
# Thresholds of the coverage table (`classify eval`): 0 (keep everything) to 0.99.
COVERAGE_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(20)) + (0.99,)


def confusion(gold: Sequence[int], pred: Sequence[int], n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) int64 counts; rows gold, columns predicted."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(gold, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return m


def prf_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall, F1 from true/false positives and false negatives (0 where undefined)."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return {"precision": precision, "recall": recall, "f1": f1}


def single_label_metrics(gold: Sequence[int], pred: Sequence[int], labels: Sequence[str]) -> dict:
    """accuracy, macro_f1, per-class precision/recall/F1/support and the confusion matrix.
    A gold index >= len(labels) is a label the classifier does not know: wrong, its own row."""
    n = len(labels)
    g = np.asarray(gold, dtype=np.int64)
    p = np.asarray(pred, dtype=np.int64)
    m = confusion(g, p, max(n, int(g.max()) + 1 if len(g) else n))
    tp = np.diag(m)[:n]
    prf = prf_from_counts(tp, m[:, :n].sum(axis=0) - tp, m[:n].sum(axis=1) - tp)
    return {
        "accuracy": float((g == p).mean()) if len(g) else math.nan,
        "macro_f1": float(prf["f1"].mean()) if n else math.nan,
        "per_class": {lab: {"precision": float(prf["precision"][i]), "recall": float(prf["recall"][i]),
                            "f1": float(prf["f1"][i]), "support": int(m[i].sum())} for i, lab in enumerate(labels)},
        "confusion": m[:, :n].tolist(),
    }


def multi_label_metrics(gold: np.ndarray, pred: np.ndarray, labels: Sequence[str]) -> dict:
    """subset_accuracy, hamming_loss, micro_f1, macro_f1 and per-label precision/recall/F1/support
    of 0/1 matrices (items x labels)."""
    g, p = np.asarray(gold, dtype=bool), np.asarray(pred, dtype=bool)
    tp, fp, fn = (g & p).sum(0), (~g & p).sum(0), (g & ~p).sum(0)
    prf = prf_from_counts(tp, fp, fn)
    micro = prf_from_counts(np.array([tp.sum()]), np.array([fp.sum()]), np.array([fn.sum()]))
    return {
        "subset_accuracy": float((g == p).all(axis=1).mean()) if len(g) else math.nan,
        "hamming_loss": float((g != p).mean()) if g.size else math.nan,
        "micro_f1": float(micro["f1"][0]),
        "macro_f1": float(prf["f1"].mean()) if len(labels) else math.nan,
        "per_class": {lab: {"precision": float(prf["precision"][i]), "recall": float(prf["recall"][i]),
                            "f1": float(prf["f1"][i]), "support": int(g[:, i].sum())} for i, lab in enumerate(labels)},
    }


def ece(confidence: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS) -> float:
    """Expected calibration error (module docstring): confidence in [0, 1], correct 0/1."""
    c = np.asarray(confidence, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    if not len(c):
        return math.nan
    b = np.clip(np.ceil(c * bins).astype(np.int64) - 1, 0, bins - 1)  # (b/bins, (b+1)/bins] -> b; 0 -> 0
    total = 0.0
    for k in range(bins):
        inside = b == k
        if inside.any():
            total += inside.sum() / len(c) * abs(y[inside].mean() - c[inside].mean())
    return float(total)


def reliability(confidence: Sequence[float], correct: Sequence[bool], bins: int = ECE_BINS) -> list[dict]:
    """Per non-empty bin: its range, items, mean confidence and accuracy (the reliability diagram)."""
    c = np.asarray(confidence, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    b = np.clip(np.ceil(c * bins).astype(np.int64) - 1, 0, bins - 1)
    out = []
    for k in range(bins):
        inside = b == k
        if inside.any():
            out.append({"low": k / bins, "high": (k + 1) / bins, "items": int(inside.sum()),
                        "confidence": float(c[inside].mean()), "accuracy": float(y[inside].mean())})
    return out


def nll(probs: np.ndarray, gold: Sequence[int]) -> float:
    """Mean -log p(gold) of (N, C) probabilities (a gold index outside C counts as p = 0: clipped)."""
    p = np.asarray(probs, dtype=np.float64)
    g = np.asarray(gold, dtype=np.int64)
    if not len(g):
        return math.nan
    inside = g < p.shape[1]
    picked = np.where(inside, p[np.arange(len(g)), np.minimum(g, p.shape[1] - 1)], 0.0)
    return float(-np.log(np.clip(picked, 1e-12, 1.0)).mean())


def coverage_curve(confidence: Sequence[float], correct: Sequence[bool],
                   thresholds: Sequence[float] = COVERAGE_THRESHOLDS) -> list[dict]:
    """For each threshold t: {threshold, coverage, kept, accuracy} on the items with confidence >= t."""
    c = np.asarray(confidence, dtype=np.float64)
    y = np.asarray(correct, dtype=bool)
    rows = []
    for t in thresholds:
        keep = c >= t
        kept = int(keep.sum())
        rows.append({"threshold": float(t), "coverage": kept / len(c) if len(c) else math.nan, "kept": kept,
                     "accuracy": float(y[keep].mean()) if kept else math.nan})
    return rows


def coverage_points(confidence: Sequence[float], correct: Sequence[bool]) -> list[tuple[float, float, float]]:
    """The whole curve: (threshold, coverage, accuracy) at every distinct confidence, most confident
    first (what the HTML report draws); the last point keeps everything."""
    c = np.asarray(confidence, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    order = np.argsort(-c, kind="stable")
    c, y = c[order], y[order]
    hits = np.cumsum(y)
    out = []
    for i in range(len(c)):
        if i + 1 < len(c) and c[i + 1] == c[i]:
            continue  # one point per distinct threshold
        out.append((float(c[i]), (i + 1) / len(c), float(hits[i] / (i + 1))))
    return out


__all__ = ["ECE_BINS", "COVERAGE_THRESHOLDS", "confusion", "prf_from_counts", "single_label_metrics",
           "multi_label_metrics", "ece", "reliability", "nll", "coverage_curve", "coverage_points"]
