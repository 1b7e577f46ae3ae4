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

Retrieval (BEIR / pytrec_eval definitions; a query's ranking is a list of doc ids, best first, and
its relevant docs map doc id -> gain, 1 for plain relevance):
- ndcg@k          DCG@k / IDCG@k with DCG = sum over ranks r = 1..k of gain(doc at r) / log2(r + 1);
                  IDCG is the DCG of the best possible order of the relevant docs
- recall@k        |relevant docs in the top k| / |relevant docs|
- mrr@k           1 / the rank of the first relevant doc within the top k, else 0
Each is averaged over queries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

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


def ndcg_at_k(ranking: Sequence[str], relevant: Mapping[str, float], k: int) -> float:
    dcg = sum(relevant.get(d, 0.0) / math.log2(r + 2) for r, d in enumerate(ranking[:k]))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranking: Sequence[str], relevant: Mapping[str, float], k: int) -> float:
    wanted = {d for d, g in relevant.items() if g > 0}
    return len(wanted.intersection(ranking[:k])) / len(wanted) if wanted else 0.0


def mrr_at_k(ranking: Sequence[str], relevant: Mapping[str, float], k: int) -> float:
    return next((1.0 / (r + 1) for r, d in enumerate(ranking[:k]) if relevant.get(d, 0.0) > 0), 0.0)


RETRIEVAL_METRICS = ("ndcg@10", "recall@1", "recall@10", "recall@100", "mrr@10")


def retrieval_metrics(rankings: Sequence[Sequence[str]], relevant: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """ndcg@10, recall@1/10/100 and mrr@10 averaged over queries (rankings[i] answers relevant[i])."""
    n = len(relevant)
    if n != len(rankings):
        raise ValueError(f"{len(rankings)} rankings for {n} queries")
    if not n:
        return {m: math.nan for m in RETRIEVAL_METRICS}
    pairs = list(zip(rankings, relevant))
    return {"ndcg@10": sum(ndcg_at_k(r, g, 10) for r, g in pairs) / n,
            **{f"recall@{k}": sum(recall_at_k(r, g, k) for r, g in pairs) / n for k in (1, 10, 100)},
            "mrr@10": sum(mrr_at_k(r, g, 10) for r, g in pairs) / n}


__all__ = ["ndcg_at_k", "recall_at_k", "mrr_at_k", "retrieval_metrics", "RETRIEVAL_METRICS", "loss_metrics", "mc_metrics", "cloze_metrics", "cut_at_stop", "exact_match"]
