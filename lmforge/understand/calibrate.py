"""Calibrated confidence: temperature scaling, per-label thresholds, and what "confidence" is.

Design
------
A classifier's raw scores (logits) are divided by ONE temperature T before the softmax (single-
label) or the sigmoids (multi-label). T is fitted on scores the head did not learn from (a
held-out split of the training data, or out-of-fold logits: classify_train.py step 3) by
minimising the negative log-likelihood there (Guo et al. 2017, "On calibration of modern neural
networks"): one scalar cannot change which class wins (the argmax, hence accuracy, is the same
for every T > 0) and cannot overfit a small held-out split, which is why it is the default over
vector or matrix scaling. The search is over log T in [-7, 7] (scipy's bounded Brent), so T > 0.

Multi-label: also one temperature shared by every label's sigmoid (binary cross-entropy over
every (item, label) cell), not one Platt fit per label: a held-out split of a few hundred items
holds a handful of positives of a rare label, too few to fit two parameters for it. Each label
then gets its own decision threshold on the calibrated probability (`label_thresholds`: the one
that maximises that label's F1 on the held-out split, 0.5 when the split holds no positive of it).

Confidence, which `--min-confidence` compares and ECE bins:
- single-label: the calibrated probability of the predicted class;
- multi-label: the least certain label decision, min over labels of max(p, 1 - p), so an item is
  routed to review when any one of its label decisions is unsure.

A held-out split on which every decision is right cannot say how sure to be (its NLL keeps falling
as T -> 0, towards probabilities of exactly 1); there T is not fitted below 1 (the head's own scale).

Trade-off: NLL is fitted on the held-out split only, so a split with very few items (8 examples
per class, 20 % held out) gives a noisy T; the manifest records how many items it was fitted on.
That is why small training sets calibrate on out-of-fold logits of every example instead
(`--calibration cv`, classify_train.py).
"""

from __future__ import annotations

import math

import numpy as np

T_BOUNDS = (-7.0, 7.0)  # log temperature search range: T in [0.0009, 1097]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + exp(-z)), without overflow warnings


def probabilities(logits: np.ndarray, temperature: float, multi_label: bool) -> np.ndarray:
    return sigmoid(logits, temperature) if multi_label else softmax(logits, temperature)


def nll_at(logits: np.ndarray, targets: np.ndarray, temperature: float, multi_label: bool) -> float:
    """Mean NLL: single-label targets are class indices (N,), multi-label 0/1 (N, L) (mean over cells)."""
    if multi_label:
        p = np.clip(sigmoid(logits, temperature), 1e-12, 1 - 1e-12)
        y = np.asarray(targets, dtype=np.float64)
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(z)), np.asarray(targets, dtype=np.int64)].mean())


def fit_temperature(logits: np.ndarray, targets: np.ndarray, multi_label: bool) -> float:
    """The T > 0 that minimises the held-out NLL (module docstring); 1.0 when there is nothing to fit."""
    from scipy.optimize import minimize_scalar

    if len(logits) == 0:
        return 1.0
    res = minimize_scalar(lambda log_t: nll_at(logits, targets, math.exp(log_t), multi_label),
                          bounds=T_BOUNDS, method="bounded", options={"xatol": 1e-5})
    t = float(math.exp(res.x))
    # Brent may stop beside a flat optimum; never return a T that is worse than no scaling
    t = t if nll_at(logits, targets, t, multi_label) <= nll_at(logits, targets, 1.0, multi_label) else 1.0
    if all_right(logits, targets, multi_label):
        t = max(t, 1.0)  # every held-out item right: the NLL falls as T -> 0; no evidence to sharpen
    return t


def all_right(logits: np.ndarray, targets: np.ndarray, multi_label: bool) -> bool:
    """Every held-out decision (at T = 1; multi-label at 0.5) is right."""
    z = np.asarray(logits)
    if multi_label:
        return bool(((z > 0) == np.asarray(targets, dtype=bool)).all())
    return bool((z.argmax(axis=1) == np.asarray(targets)).all())


def label_thresholds(probs: np.ndarray, targets: np.ndarray) -> list[float]:
    """Per label: the threshold on its calibrated probability with the best F1 on held-out data
    (candidates: the probabilities seen, and 0.5; ties go to the one nearest 0.5), 0.5 without positives."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(targets, dtype=bool)
    out = []
    for j in range(p.shape[1]):
        if not y[:, j].any():
            out.append(0.5)
            continue
        best, best_f1 = 0.5, -1.0
        for t in sorted(set(np.round(p[:, j], 6).tolist()) | {0.5}, key=lambda t: (abs(t - 0.5), t)):
            pred = p[:, j] >= t
            tp = float((pred & y[:, j]).sum())
            denom = float(pred.sum() + y[:, j].sum())
            f1 = 2 * tp / denom if denom else 0.0
            if f1 > best_f1 + 1e-12:
                best, best_f1 = float(t), f1
        out.append(best)
    return out


def confidence(probs: np.ndarray, multi_label: bool) -> np.ndarray:
    """(N,) confidence of each item's decision (module docstring)."""
    p = np.asarray(probs, dtype=np.float64)
    if multi_label:
        return np.maximum(p, 1 - p).min(axis=1) if p.shape[1] else np.ones(len(p))
    return p.max(axis=1)


__all__ = ["softmax", "sigmoid", "probabilities", "nll_at", "fit_temperature", "label_thresholds", "confidence",
           "T_BOUNDS", "all_right"]
