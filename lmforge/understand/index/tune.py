"""Choose how an index is searched by default, by measurement on held-out queries (`index build` of a
contrastive run's model, `lmforge index tune`; the verbs are in build.py, the measurement here).

Why
---
Which search mode ranks best depends on the model. With a raw or briefly trained model BM25 carries
the ranking, and hybrid search beats dense search by far; after a full contrastive stage the model
alone beats BM25, and plain reciprocal-rank fusion (equal weights, k = 60) drags it down. A fusion
that trusts the model more (small k, a light BM25 weight) can beat both, but its weight has to be
measured, and on queries other than the ones it is then judged on (docs/search.md has the figures).

What
----
Held-out (query, positive[, negative]) pairs: by default the val split of the contrastive run that
made the index's model (its data.pairs and data.pairs_val_fraction: the `pairs-val` task that
`lmforge eval` scores, pairs the stage never trained on), or every pair of a file given with
--pairs. Each query is searched among all the pairs' positives and negatives exactly as the index
searches: the index's model and pooling, its BM25 (`Bm25` over `words`), the top CANDIDATES of
each ranking fused by `Settings.fuse`. Every setting of `GRID` (dense, bm25, and hybrid over
rrf_k x bm25_weight) is scored by nDCG@10; the best (the first of equals, in the grid's order,
which puts the simpler settings first) goes into the manifest's "search" field with what it was
measured on (`measure`): written with the index by `index build`, or by `index tune` in one atomic
rewrite of the manifest (checksum updated) under the index's writer lock. `search`, `ask` and the
server's /v1/search use it whenever the caller names no mode; `index add` keeps it.

Trade-offs: the pairs' texts are a small corpus (hundreds of texts) where an index may hold
millions of chunks, so the measured balance is an estimate; on the bundled task the setting chosen
on the stage's val pairs scored within 0.001 of the best on the task's own queries (docs/search.md).
Seventeen settings over a few hundred queries can pick noise when two are within ~0.005; the
printed table shows the margins. Tuning embeds the pairs once more (a minute for SmolLM2-135M's
167 pairs on one core), next to embedding the whole corpus.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import DataError, LmforgeError
from .search import CANDIDATES, Bm25, Settings
from .store import normalize

GRID: tuple[Settings, ...] = (
    Settings("dense"), Settings("bm25"),
    *(Settings("hybrid", k, w) for k in (60, 10, 1) for w in (1.0, 0.5, 0.3, 0.2, 0.1)),
)
MIN_QUERIES = 20  # fewer held-out queries than this measure too little to choose by
DEPTH = 10  # nDCG@10 decides


def held_out(model: str | os.PathLike, pairs: str | os.PathLike | None) -> tuple[list[str], list[str], str] | None:
    """(queries, corpus, where they came from) from --pairs, else from the val split of the
    contrastive run `model` (a run, checkpoint or model directory); None when `model` is no such
    run with its pairs file here. Query i's one relevant text is corpus[i]; any negatives follow
    the positives. Fewer than MIN_QUERIES pairs, or a bad pairs file, is a DataError."""
    from ...artifacts import read_config
    from ...data.pairs import read_pairs

    if pairs is not None:
        texts = read_pairs(pairs)  # every pair of the file is held out
        where = str(Path(pairs).resolve())
    else:
        try:
            cfg = read_config(model)
        except (OSError, LmforgeError):
            return None
        d = cfg.data
        if cfg.train.objective != "contrastive" or not d.pairs or not d.pairs_val_fraction or not Path(d.pairs).is_file():
            return None
        texts = read_pairs(d.pairs, fields=d.pair_fields, split="val", val_fraction=d.pairs_val_fraction)
        where = f"{Path(d.pairs).resolve()} (val split, {d.pairs_val_fraction:g})"
    if len(texts.query) < MIN_QUERIES:
        raise DataError(f"{where}: {len(texts.query)} held-out pairs; tuning needs at least {MIN_QUERIES} "
                        "to measure anything")
    return list(texts.query), list(texts.positive) + list(texts.negative), where


def tops(embedder: Any, queries: list[str], corpus: list[str], n: int = CANDIDATES) -> tuple[list[list[int]], list[list[int]]]:
    """Per query the best n rows of the corpus by the model (cosine of normalised vectors, as the
    index scores) and by BM25 (the index's `Bm25`): what `Settings.fuse` fuses."""
    n = min(n, len(corpus))
    docs = normalize(embedder.embed(corpus, kind="document", progress=True))  # (D, dim)
    qs = normalize(embedder.embed(queries, kind="query", progress=True))  # (Q, dim)
    dense_top = np.argsort(-(qs @ docs.T), axis=1, kind="stable")[:, :n].tolist()
    bm25 = Bm25.build(corpus)
    return dense_top, [bm25.search(q, n)[0].tolist() for q in queries]


def score_grid(dense_top: list[list[int]], bm25_top: list[list[int]], relevant: list[int] | None = None
               ) -> list[tuple[Settings, float]]:
    """Mean nDCG@10 of every GRID setting. dense_top / bm25_top: per query the best rows of each
    ranking (`tops`); relevant[i]: query i's one relevant row (default: i)."""
    from ...evaluate.metrics import ndcg_at_k

    scored = []
    for s in GRID:
        total = 0.0
        for i, (d, b) in enumerate(zip(dense_top, bm25_top)):
            wanted = i if relevant is None else relevant[i]
            total += ndcg_at_k(s.ranking(d, b), {wanted: 1.0}, DEPTH)  # type: ignore[arg-type]  # rows stand for doc ids
        scored.append((s, total / len(dense_top)))
    return scored


def best(scored: list[tuple[Settings, float]]) -> tuple[Settings, float]:
    """The highest score; the first in GRID order among equals."""
    return max(scored, key=lambda item: item[1])  # max() keeps the first of equals


def measure(embedder: Any, held: tuple[list[str], list[str], str]) -> dict[str, Any]:
    """Score GRID on held-out pairs (`held_out`) with the index's embedder: the record an index
    keeps in its manifest's "search" field (the chosen setting, and what it was measured on)."""
    queries, corpus, where = held
    scored = score_grid(*tops(embedder, queries, corpus))
    chosen, score = best(scored)
    return {**chosen.to_dict(), "tuned": {
        "pairs": where, "queries": len(queries), "texts": len(corpus), "metric": f"ndcg@{DEPTH}",
        "score": round(score, 4), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "grid": [{**s.to_dict(), "score": round(v, 4)} for s, v in scored]}}


def describe(s: Settings | dict[str, Any]) -> str:
    """A setting (or its record) in words, as the table and the benchmarks print it."""
    s = s if isinstance(s, Settings) else Settings.from_record(s)
    return s.describe()


def show(record: dict[str, Any], path: str | os.PathLike) -> None:
    """The grid's scores as a table, the chosen setting highlighted, and what searches now do."""
    from rich.markup import escape
    from rich.table import Table

    from ...util import out

    t = record["tuned"]
    table = Table(title=f"nDCG@{DEPTH} on {t['queries']} held-out queries among {t['texts']} texts")
    table.add_column("search")
    table.add_column(f"nDCG@{DEPTH}", justify="right")
    for row in t["grid"]:
        table.add_row(describe(row), f"{row['score']:.4f}", style="bold green" if row["score"] == t["score"]
                      and describe(row) == describe(record) else None)
    out.print(table)
    out.print(f"[green]{escape(str(path))}[/] searches with {describe(record)} by default (nDCG@{DEPTH} "
              f"{t['score']:.4f}; pairs: {escape(t['pairs'])}); `--mode` still chooses per search")


__all__ = ["GRID", "MIN_QUERIES", "held_out", "tops", "score_grid", "best", "measure", "describe", "show"]
