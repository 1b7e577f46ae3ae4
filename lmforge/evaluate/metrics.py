"""Metric definitions, as pure functions of scores, following lm-evaluation-harness so numbers compare.

- loss            mean token negative log-likelihood (nats): sum(nll) / tokens
- perplexity      exp(loss)
- bits_per_byte   sum(nll) / sum(UTF-8 bytes of the scored targets) / ln 2. Unlike loss and
                  perplexity this does not depend on the tokenizer, so models with different
                  vocabularies compare on it.
- acc             multiple choice: the choice with the highest summed log-probability is the gold
                  one; cloze: greedy decoding reproduces every target token
- acc_norm        multiple choice: the highest summed log-probability divided by the choice's
                  length in characters (removes the bias towards short answers)
- exact_match     generation: the greedy continuation, cut at the first stop string and stripped
                  of surrounding whitespace, equals the target (also stripped)

Ties go to the first choice (numpy argmax), as in the harness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def loss_metrics(nll_sum: float, n_tokens: int, n_bytes: int) -> dict[str, float]:
    """loss, perplexity and bits per byte from a summed NLL (nats) over n_tokens covering n_bytes."""
    if n_tokens <= 0:
        return {"loss": math.nan, "perplexity": math.nan, "bits_per_byte": math.nan}
    loss = nll_sum / n_tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else math.inf,
        "bits_per_byte": nll_sum / n_bytes / math.log(2) if n_bytes > 0 else math.nan,
    }


def mc_metrics(logprobs: Sequence[Sequence[float]], golds: Sequence[int],
               choices: Sequence[Sequence[str]]) -> dict[str, float]:
    """acc and acc_norm over items; logprobs[i][j] is the summed log-prob of choices[i][j]."""
    acc = norm = 0
    for lp, gold, texts in zip(logprobs, golds, choices, strict=True):
        lp = np.asarray(lp, dtype=np.float64)
        acc += int(np.argmax(lp)) == gold
        norm += int(np.argmax(lp / np.array([len(t) for t in texts], dtype=np.float64))) == gold
    n = len(golds)
    return {"acc": acc / n, "acc_norm": norm / n} if n else {"acc": math.nan, "acc_norm": math.nan}


def cloze_metrics(greedy: Sequence[bool], logprobs: Sequence[float]) -> dict[str, float]:
    """acc (greedy match of every target token) and the mean target log-probability."""
    n = len(greedy)
    if not n:
        return {"acc": math.nan, "logprob": math.nan}
    return {"acc": sum(bool(g) for g in greedy) / n, "logprob": float(np.mean(logprobs))}


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """text up to (not including) the earliest stop string."""
    ends = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(ends)] if ends else text


def exact_match(predictions: Sequence[str], targets: Sequence[str]) -> dict[str, float]:
    n = len(targets)
    hits = sum(p.strip() == t.strip() for p, t in zip(predictions, targets, strict=True))
    return {"exact_match": hits / n if n else math.nan}


__all__ = ["loss_metrics", "mc_metrics", "cloze_metrics", "cut_at_stop", "exact_match"]
