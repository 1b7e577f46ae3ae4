"""Search an index: exact or approximate dense search, BM25, and both fused by reciprocal rank.

Dense
-----
A query is embedded by the index's own model and pooling (`check_embedder` refuses any other,
naming both checksums) and L2-normalised like the stored rows, so a score is a cosine similarity.

- Exact (`exact_search`): a matrix-vector product per query over the float16 memmap, in blocks
  of rows, each block's best candidates kept; the candidates are then rescored in float32 and
  sorted. A float16 product (torch) reads half the bytes and is ~10x faster than converting the
  rows to float32 first; the rescoring makes the final order that of float32 arithmetic. Used
  below `ANN_MIN_ROWS` rows.
- Approximate (`Ann`): from `ANN_MIN_ROWS` rows on, an index built by FAISS (`faiss-cpu`)
  proposes candidates, rescored exactly from the memmap like the exact ones.

Why FAISS IVF (figures and commands: docs/search.md; benchmarks/search.py measures FAISS and
usearch side by side at 100k and 1M synthetic vectors): on this project's 2-core CPUs the index
must be cheap to build, since it is rebuilt whenever `index add` replaces a file. An IVF index is
k-means on a fixed sample plus one assignment pass, minutes at 1M rows, where an HNSW graph
(usearch, or FAISS's own) takes many times longer to build for a latency gain that does not show
behind the embedding of the query (milliseconds against tens of milliseconds). IVF's recall is set
by how many cells a query scans (ANN_NPROBE), and the 100 candidates it proposes are rescored
exactly, so its recall@10 is measured on the final ranking. Vectors are stored as float16 in the
cells (SQfp16): the ANN file is as large as vectors.f16, not twice it. ANN_MIN_ROWS is where the
exact scan's latency passes the query's embedding time (docs/search.md).

BM25 and hybrid
---------------
`Bm25` is `bm25s` (Lucene's BM25 variant, sparse matrices, saved without pickle) over words
(`words`, rule "words-v2"): runs of letters of any script and of digits, case and accents folded
(`Café` -> `cafe`), identifiers split at `_` and camelCase (`read_config`, `readConfig` -> `read`,
`config`), scripts written without spaces (Chinese, Japanese, Korean) as overlapping character
pairs, English stop words dropped. An index records its rule (manifest `bm25.terms`) and its
queries are split by the same one: indexes of the ASCII-only "words-v1" rule keep working (the
two agree on ASCII text). Hybrid fuses the dense and BM25
rankings (top `CANDIDATES` of each) by reciprocal rank fusion, score(d) = 1 / (k + dense rank) +
w / (k + BM25 rank), rank starting at 1; it needs no calibration between the two kinds of score.
An index searches with k = RRF_K = 60 (Cormack et al. 2009), w = 1 and DEFAULT_MODE (hybrid: far
better than dense alone with a raw model on the bundled task) until `lmforge index tune` records
its own mode, k and w, measured on held-out pairs (`Settings`, tune.py): after a full contrastive
stage equal weights pull a strong model down, and a light BM25 weight lifts it (docs/search.md).

Trade-offs: the BM25 index and the ANN index are loaded whole on first use (the vectors are not);
a hybrid query pays for both searches.
"""

from __future__ import annotations

import functools
import json
import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ...errors import LmforgeError
from . import DEFAULT_MODE, MODES
from .store import ANN_FILE, BM25_DIR, Hit, Index, normalize

if TYPE_CHECKING:
    from ..embed import Embedder

RRF_K = 60
CANDIDATES = 100  # per ranking fused by hybrid search, and at least this many from the ANN index
ANN_MIN_ROWS = 100_000  # exact search below, an ANN index at and above (docs/search.md)
ANN_NPROBE = 32  # inverted lists scanned per query (docs/search.md: recall@10 >= 0.95 at 1M)
ANN_TRAIN_PER_CELL = 50  # k-means training vectors per inverted list (FAISS warns below 39)
_BLOCK = 262_144  # rows per block of the exact scan (~128 MB of float16 at dim 256)


class Embeds(Protocol):
    """What search needs of an embedder (lmforge.understand.embed.Embedder)."""

    def fingerprint(self) -> dict[str, Any]: ...
    def embed(self, texts: Sequence[str], *, kind: str = "document", progress: bool = False) -> np.ndarray: ...


# ---- exact ---------------------------------------------------------------------------------------


def exact_search(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best rows of `vectors` (N, d) float16 for each of `queries` (Q, d) by dot product:
    rows (Q, k) int64 and scores (Q, k) float32, best first (fewer than k columns when N < k)."""
    import torch

    queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
    n, k = len(vectors), min(k, len(vectors))
    if k == 0:
        return np.zeros((len(queries), 0), np.int64), np.zeros((len(queries), 0), np.float32)
    keep = min(n, max(4 * k, k + 16))  # candidates kept from the float16 scores for float32 rescoring
    q16 = torch.from_numpy(queries).to(torch.float16)  # (Q, d)
    cand_rows, cand_scores = [], []
    for start in range(0, n, _BLOCK):
        block = torch.from_numpy(np.asarray(vectors[start:start + _BLOCK]))  # (B, d) float16, no copy
        # one matrix-vector product per query: on CPUs without float16 GEMM kernels (AVX2) a (B, d) x (d, Q)
        # float16 product is many times slower than Q products with a vector (measured: docs/search.md)
        scores = torch.stack([block @ q for q in q16]).float()  # (Q, B)
        top = torch.topk(scores, min(keep, scores.shape[1]), dim=1)
        cand_rows.append(top.indices + start)
        cand_scores.append(top.values)
    rows = torch.cat(cand_rows, dim=1)
    if rows.shape[1] > keep:  # the best `keep` over all blocks
        rows = torch.gather(rows, 1, torch.topk(torch.cat(cand_scores, dim=1), keep, dim=1).indices)
    return rescore(vectors, queries, rows.numpy(), k)


def rescore(vectors: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Candidates (Q, C) (-1: none) rescored in float32, ties broken by the lower row: the k best
    of each query, (Q, k) rows and scores (fewer columns when C < k)."""
    width = min(k, candidates.shape[1])
    out_rows, out_scores = np.full((len(queries), width), -1, np.int64), np.zeros((len(queries), width), np.float32)
    for i, (q, cand) in enumerate(zip(queries, candidates)):
        cand = np.unique(cand[cand >= 0])  # sorted: the lower row first among equal scores
        scores = np.asarray(vectors[cand], dtype=np.float32) @ q
        order = np.argsort(-scores, kind="stable")[:width]
        out_rows[i, :len(order)], out_scores[i, :len(order)] = cand[order], scores[order]
    return out_rows, out_scores


# ---- approximate ---------------------------------------------------------------------------------


class Ann:
    """The approximate index: FAISS IVF (inverted lists over k-means cells, vectors stored as
    float16) with inner product over the unit rows, stored as ann.faiss. A query scans the
    `ANN_NPROBE` nearest cells; its candidates are rescored exactly by the caller."""

    def __init__(self, index: Any) -> None:
        self.index = index

    @staticmethod
    def wanted(rows: int) -> bool:
        return rows >= ANN_MIN_ROWS

    @staticmethod
    def cells(rows: int) -> int:
        """Inverted lists for `rows` vectors: ~4 sqrt(N) (FAISS's guideline is 4-16 sqrt(N))."""
        return max(1, min(rows // 40, int(4 * rows ** 0.5)))

    @classmethod
    def build(cls, vectors: np.ndarray) -> Ann:
        import faiss

        n, dim = vectors.shape
        nlist = cls.cells(n)
        index = faiss.index_factory(dim, f"IVF{nlist},SQfp16", faiss.METRIC_INNER_PRODUCT)
        sample = np.sort(np.random.default_rng(0).choice(n, min(n, ANN_TRAIN_PER_CELL * nlist), replace=False))
        index.train(np.asarray(vectors[sample], dtype=np.float32))  # k-means on a fixed sample: deterministic
        ann = cls(index)
        ann.add(vectors)
        return ann

    def add(self, vectors: np.ndarray) -> None:
        for start in range(0, len(vectors), _BLOCK):  # float32 a block at a time, never the whole file
            self.index.add(np.asarray(vectors[start:start + _BLOCK], dtype=np.float32))

    def save(self, path: Path) -> None:
        import faiss

        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path) -> Ann:
        import faiss

        return cls(faiss.read_index(str(path)))

    def search(self, queries: np.ndarray, n: int) -> np.ndarray:
        """Candidate rows (Q, n); -1 where the index found fewer."""
        import faiss

        params = faiss.SearchParametersIVF(nprobe=ANN_NPROBE)
        _, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), n, params=params)
        return rows

    def describe(self) -> dict[str, Any]:
        import faiss

        return {"library": "faiss", "version": faiss.__version__, "kind": f"IVF{self.index.nlist},SQfp16",
                "file": ANN_FILE, "nprobe": ANN_NPROBE, "min_rows": ANN_MIN_ROWS}


# ---- BM25 ----------------------------------------------------------------------------------------

_WORD_V1 = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")  # ASCII only: what indexes of lmforge <= 0.x hold
_RUN = re.compile(r"[^\W\d_]+|\d+")  # runs of letters (any script) or of digits; `_` and punctuation split
_CAMEL = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+")  # HTTPServer -> HTTP, Server
# scripts written without spaces between words: Han, Hiragana, Katakana, Hangul syllables
_UNSPACED = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af]+")
TERMS = "words-v2"  # the term rule new indexes record (Bm25.describe); `words(text, version)` keeps the older one


@functools.cache
def _stopwords() -> frozenset[str]:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


def _folded(word: str) -> str:
    """Case and accents folded (café, Café, CAFE -> cafe; Straße -> strasse; full-width letters to
    ASCII): a query typed without accents finds the accented text, as search engines' folding does."""
    return "".join(c for c in unicodedata.normalize("NFKD", word.casefold()) if not unicodedata.combining(c))


def split_unspaced(run: str) -> list[str]:
    """A run of word characters -> its parts: each stretch of a script written without spaces
    (Chinese, Japanese, Korean) as overlapping character pairs, as Lucene's CJK analyzer does (a
    word of any length is found without a dictionary; one character alone stays itself), and the
    stretches between them whole. A run with no such script comes back as it is."""
    out: list[str] = []
    pos = 0
    for m in _UNSPACED.finditer(run):
        if m.start() > pos:
            out.append(run[pos : m.start()])
        seg = m.group()
        out.extend([seg] if len(seg) == 1 else [seg[i : i + 2] for i in range(len(seg) - 1)])
        pos = m.end()
    if pos < len(run):
        out.append(run[pos:])
    return out


def _pieces(run: str) -> list[str]:
    """The terms of one run of letters, lower-cased: camelCase split in ASCII; CJK as character
    pairs (`split_unspaced`); any other part whole, case and accents folded."""
    if run.isascii():
        return [w.lower() for w in _CAMEL.findall(run)]
    return [p if _UNSPACED.match(p) else _folded(p) for p in split_unspaced(run)]


def words(text: str, version: str = TERMS) -> list[str]:
    """The BM25 terms of a text (see the module docstring): runs of letters of any script, case and
    accents folded, identifiers split at `_` and camelCase, digit runs, CJK as character pairs; English
    stop words and one-character terms dropped (a lone CJK character kept: it may be a word).
    version "words-v1": the ASCII-only rule of older indexes, so their queries match their terms."""
    stop = _stopwords()
    if version == "words-v1":
        return [w for w in (m.lower() for m in _WORD_V1.findall(text)) if len(w) > 1 and w not in stop]
    terms = (p for run in _RUN.findall(text) for p in ([_folded(run)] if run.isdigit() else _pieces(run)))
    return [w for w in terms if (len(w) > 1 or _UNSPACED.match(w)) and w not in stop]


class Bm25:
    """A bm25s index over the chunk texts, row i = chunk i."""

    def __init__(self, retriever: Any, rows: int, terms: str = TERMS) -> None:
        self.retriever, self.rows, self.terms = retriever, rows, terms

    @classmethod
    def build(cls, texts: Sequence[str]) -> Bm25:
        import bm25s

        corpus = [words(t) for t in texts]
        if not any(corpus):  # no text has a term (symbols only): bm25s needs one; no query ever has this one
            corpus = [["\x00"] for _ in corpus]
        retriever = bm25s.BM25()
        retriever.index(corpus, show_progress=False)
        return cls(retriever, len(texts))

    def save(self, directory: Path) -> None:
        self.retriever.save(str(directory), show_progress=False)

    @classmethod
    def load(cls, directory: Path, rows: int, terms: str = TERMS) -> Bm25:
        """terms: the rule the index was built with (its manifest's bm25.terms), applied to queries too."""
        import bm25s

        return cls(bm25s.BM25.load(str(directory), mmap=False, show_progress=False), rows, terms)

    def search(self, query: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows and scores of the best n chunks with a positive score (no shared term: none)."""
        terms = words(query, self.terms)
        n = min(n, self.rows)
        if not terms or n == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        rows, scores = self.retriever.retrieve([terms], k=n, show_progress=False, n_threads=1)
        keep = scores[0] > 0
        return rows[0][keep].astype(np.int64), scores[0][keep].astype(np.float32)

    @staticmethod
    def describe() -> dict[str, Any]:
        import bm25s

        return {"library": "bm25s", "version": bm25s.__version__, "method": "lucene", "k1": 1.5, "b": 0.75,
                "terms": TERMS, "directory": BM25_DIR}


# ---- fusion --------------------------------------------------------------------------------------


def rrf(rankings: Sequence[Sequence[int]], k: int = RRF_K, weights: Sequence[float] | None = None) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: (row, sum over rankings of weight / (k + rank)), best first; rank
    starts at 1, weights 1 unless given (one per ranking); equal scores keep the order of first
    appearance (the first ranking's first)."""
    scores: dict[int, float] = {}
    for i, ranking in enumerate(rankings):
        w = 1.0 if weights is None else float(weights[i])
        for rank, row in enumerate(ranking, start=1):
            scores[int(row)] = scores.get(int(row), 0.0) + w / (k + rank)
    return sorted(scores.items(), key=lambda item: -item[1])  # sorted() is stable


@dataclass(frozen=True)
class Settings:
    """How an index is searched when the caller names no mode: `DEFAULT_MODE` with plain RRF
    (k = RRF_K, both rankings weigh 1) until `lmforge index tune` measures something better on
    held-out queries and records it in the manifest's "search" field (tune.py)."""

    mode: str = DEFAULT_MODE
    rrf_k: int = RRF_K
    bm25_weight: float = 1.0  # the BM25 ranking's weight in the fusion; the dense ranking's is 1

    @classmethod
    def from_record(cls, rec: dict[str, Any] | None) -> Settings:
        """A setting as `to_dict` (and the manifest's "search" field) holds it; None or {}: the default."""
        rec = rec or {}
        return cls(str(rec.get("mode", DEFAULT_MODE)), int(rec.get("rrf_k", RRF_K)), float(rec.get("bm25_weight", 1.0)))

    @classmethod
    def of(cls, index: Index) -> Settings:
        return cls.from_record(index.fields.get("search"))

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "rrf_k": self.rrf_k, "bm25_weight": self.bm25_weight}

    def fuse(self, dense_rows: Sequence[int], bm25_rows: Sequence[int]) -> list[tuple[int, float]]:
        """Hybrid search's ranking: (row, fused score), best first."""
        return rrf([dense_rows, bm25_rows], self.rrf_k, (1.0, self.bm25_weight))

    def describe(self) -> str:
        return self.mode if self.mode != "hybrid" else f"hybrid (rrf_k {self.rrf_k}, bm25 weight {self.bm25_weight:g})"

    def ranking(self, dense_rows: Sequence[int], bm25_rows: Sequence[int]) -> list[int]:
        """The rows this setting's mode ranks first to last, given both rankings."""
        if self.mode == "dense":
            return list(dense_rows)
        if self.mode == "bm25":
            return list(bm25_rows)
        return [r for r, _ in self.fuse(dense_rows, bm25_rows)]


# ---- the searcher --------------------------------------------------------------------------------


def check_embedder(index: Index, embedder: Embeds) -> None:
    """Refuse a query embedder whose fingerprint (model and tokenizer sha256, pooling, dim) is not
    the one the index was built with, in one line naming both checksums."""
    from ..embed import fingerprint_mismatch

    why = fingerprint_mismatch(index.fingerprint, embedder.fingerprint())
    if why is not None:
        raise LmforgeError(f"{index.path} was built by another model or pooling ({why}); use the model it was built "
                           f"by ({index.model}) or rebuild the index")


def load_embedder(index: Index, model: str | os.PathLike | None = None, *, batch_size: int = 32,
                  compile: bool = False) -> Embedder:
    """The index's embedder: its recorded model (or `model`), with its recorded pooling; refused
    when the fingerprint differs from the one the index was built with."""
    from ..embed import Embedder, Pooling

    path = Path(model) if model is not None else Path(index.model)
    if model is None and not path.exists():
        raise LmforgeError(f"{index.path} was built by the model {path}, which is not there any more; "
                           f"pass that model with --model PATH")
    embedder = Embedder.load(path, pooling=Pooling.from_dict(index.fields["pooling"]), batch_size=batch_size,
                             compile=compile)
    check_embedder(index, embedder)
    return embedder


class Searcher:
    """Searches one opened index; `embedder` (its own model and pooling) is needed for dense and
    hybrid modes only. Safe for concurrent searches once `warm()` has loaded the side indexes."""

    def __init__(self, index: Index, embedder: Embeds | None = None) -> None:
        if embedder is not None:
            check_embedder(index, embedder)
        self.index, self.embedder = index, embedder
        self.settings = Settings.of(index)
        self._bm25: Bm25 | None = None
        self._ann: Ann | None = None

    def warm(self) -> Searcher:
        """Load the BM25 and ANN indexes now (a server does, before its first request)."""
        self.bm25()
        self.ann()
        return self

    def bm25(self) -> Bm25:
        if self._bm25 is None:
            terms = (self.index.fields.get("bm25") or {}).get("terms", "words-v1")
            self._bm25 = Bm25.load(self.index.path / BM25_DIR, self.index.rows, terms)
        return self._bm25

    def ann(self) -> Ann | None:
        if self._ann is None and (self.index.path / ANN_FILE).is_file():
            self._ann = Ann.load(self.index.path / ANN_FILE)
        return self._ann

    def embed_query(self, query: str) -> np.ndarray:
        if self.embedder is None:
            raise LmforgeError("dense and hybrid search need the index's model; use --mode bm25 to search without it")
        return normalize(self.embedder.embed([query], kind="query"))  # (1, d)

    def dense(self, query: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Best n rows and scores for one normalised query vector (1, d): ANN candidates when the
        index has an ANN index, exact otherwise; scores exact either way."""
        ann = self.ann()
        if ann is None:
            rows, scores = exact_search(self.index.vectors, query, n)
        else:
            rows, scores = rescore(self.index.vectors, query, ann.search(query, max(n, CANDIDATES)), n)
        keep = rows[0] >= 0
        return rows[0][keep], scores[0][keep]

    def search(self, query: str, k: int = 5, mode: str | None = None) -> list[Hit]:
        """The k best chunks for a query, best first (BM25 returns only chunks sharing a term);
        mode None: the index's own (`Settings`)."""
        mode = mode or self.settings.mode
        if mode not in MODES:
            raise LmforgeError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
        if k < 1:
            raise LmforgeError(f"-k must be >= 1, got {k}")
        if not query.strip():
            raise LmforgeError("the query is empty; pass the text to search for")
        if mode == "dense":
            rows, scores = self.dense(self.embed_query(query), k)
        elif mode == "bm25":
            rows, scores = self.bm25().search(query, k)
        else:
            n = max(k, CANDIDATES)
            dense_rows, _ = self.dense(self.embed_query(query), n)
            bm25_rows, _ = self.bm25().search(query, n)
            fused = self.settings.fuse(dense_rows.tolist(), bm25_rows.tolist())[:k]
            return self.index.hits([r for r, _ in fused], [s for _, s in fused])
        return self.index.hits(rows.tolist(), scores.tolist())


# ---- `lmforge search` ----------------------------------------------------------------------------


def search_command(path: str | os.PathLike, query: str, *, k: int = 5, mode: str | None = None,
                   model: str | None = None, as_json: bool = False) -> int:
    """Print the k best chunks: rank, score, file:lines and the start of the text (or JSON);
    mode None: the index's own (`Settings`)."""
    from rich.markup import escape

    from ...tokenizer import lone_surrogate
    from ...util import out

    if mode is not None and mode not in MODES:
        raise LmforgeError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
    if lone_surrogate(query) is not None:
        raise LmforgeError("the query is not valid UTF-8 text; pass it as UTF-8")
    with Index.open(path) as index:
        mode = mode or Settings.of(index).mode
        embedder = load_embedder(index, model) if mode != "bm25" else None
        hits = Searcher(index, embedder).search(query, k=k, mode=mode)
    if as_json:
        print(json.dumps({"index": str(path), "query": query, "mode": mode, "k": k,
                          "results": [{"rank": i, "where": h.where(), **h.to_dict()} for i, h in enumerate(hits, 1)]},
                         indent=2, ensure_ascii=False))
        return 0
    if not hits:
        out.print(f"no results for {query!r} ({mode})", markup=False)
    for i, h in enumerate(hits, 1):
        out.print(f"[bold]{i}.[/] {h.score:.4f}  [cyan]{escape(h.where())}[/]")
        lines = h.text.strip("\n").splitlines()
        for line in lines[:4]:
            out.print(f"    {line[:120]}", markup=False, highlight=False)
        if len(lines) > 4:
            out.print(f"    ... ({len(lines) - 4} more lines)", style="dim", markup=False)
    return 0


__all__ = ["load_embedder", "search_command", "MODES", "DEFAULT_MODE", "RRF_K", "CANDIDATES", "ANN_MIN_ROWS", "ANN_NPROBE", "Embeds", "exact_search",
           "rescore", "Ann", "words", "split_unspaced", "TERMS", "Bm25", "rrf", "Settings", "check_embedder", "Searcher"]
