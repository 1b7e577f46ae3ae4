"""Retrieval evaluation: embed a task's corpus and queries, rank, and score the rankings.

Design: the model embeds every doc (kind "document") and every query (kind "query") with the
pooling its config records (lmforge/understand/embed.py), a query's scores are one matrix product
with the doc vectors (the cosine similarity when the pooling normalises), and the top
`RANK_DEPTH` doc ids per query go to the pure metric functions (evaluate/metrics.py: nDCG@10,
recall@1/10/100, MRR@10). `rank` is shared by anything else that produces (queries x docs)
scores, e.g. BM25 in benchmarks/embed.py, so every method is ranked and scored the same way.

Trade-offs: exact search (every query against every doc), which is what a task of a few thousand
docs needs; a doc longer than the model's context is cut to it (the Embedder's rule), as a task
file holds what it holds. Ties rank in corpus order (a stable sort), so results are reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..understand.embed import Embedder
from . import metrics as M
from .tasks import Task

RANK_DEPTH = 100  # the deepest cut-off a metric looks at (recall@100)


def rank(scores: np.ndarray, doc_ids: Sequence[str], depth: int = RANK_DEPTH) -> list[list[str]]:
    """(Q, D) scores, higher is better -> per query the top `depth` doc ids, best first (ties in
    doc order)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :depth]
    return [[doc_ids[j] for j in row] for row in order]


def score_retrieval(embedder: Embedder, task: Task, *, progress: bool = False) -> dict[str, float]:
    """nDCG@10, recall@1/10/100 and MRR@10 of `embedder` on a retrieval task."""
    doc_ids = [d for d, _ in task.docs]
    docs = embedder.embed([t for _, t in task.docs], kind="document", progress=progress)  # (D, dim)
    queries = embedder.embed([q.text for q in task.queries], kind="query", progress=progress)  # (Q, dim)
    return M.retrieval_metrics(rank(queries @ docs.T, doc_ids), [q.relevant for q in task.queries])


__all__ = ["rank", "score_retrieval", "RANK_DEPTH"]
