"""Retrieval evaluation: embed a task's corpus and queries, rank, and score the rankings.

Design: the model embeds every doc (kind "document") and every query (kind "query") with the
pooling its config records (lmforge/understand/embed.py), a query's scores are one matrix product
with the doc vectors (the cosine similarity when the pooling normalises), and the top
`RANK_DEPTH` doc ids per query go to the pure metric functions (evaluate/metrics.py: nDCG@10,
recall@1/10/100, MRR@10). `rank` is shared by anything else that produces (queries x docs)
scores, e.g. BM25 in benchmarks/embed.py, so every method is ranked and scored the same way.

`pairs_task` turns a contrastive run's held-out pairs (data.pairs, its val split) into a retrieval
task, `pairs-val`: each val query against all val positives (and negatives), its own positive the
one relevant doc. `lmforge eval RUN` and the `--watch` sidecar score it by default, so the stage's
retrieval quality is measured on the user's own data without a task file.

Trade-offs: exact search (every query against every doc), which is what a task of a few thousand
docs needs; a doc longer than the model's context is cut to it (the Embedder's rule), as a task
file holds what it holds. Ties rank in corpus order (a stable sort), so results are reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..config import Config
from ..understand.embed import Embedder
from . import metrics as M
from .tasks import Query, Task

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


PAIRS_TASK = "pairs-val"


def pairs_task(cfg: Config) -> Task | None:
    """The val pairs of a contrastive run as a retrieval task (module docstring); None when the run
    is not one, has no val pairs, or its data.pairs file is not here."""
    from ..data.pairs import read_pairs

    d = cfg.data
    if cfg.train.objective != "contrastive" or not d.pairs or not d.pairs_val_fraction or not Path(d.pairs).is_file():
        return None
    texts = read_pairs(d.pairs, fields=d.pair_fields, split="val", val_fraction=d.pairs_val_fraction)
    if not texts.query:
        return None
    docs = [(f"positive-{i}", t) for i, t in enumerate(texts.positive)]
    docs += [(f"negative-{i}", t) for i, t in enumerate(texts.negative)]
    queries = [Query(f"query-{i}", t, {f"positive-{i}": 1.0}) for i, t in enumerate(texts.query)]
    return Task(name=PAIRS_TASK, kind="retrieval", items=(), path=d.pairs, docs=tuple(docs), queries=tuple(queries))


__all__ = ["rank", "score_retrieval", "pairs_task", "RANK_DEPTH", "PAIRS_TASK"]
