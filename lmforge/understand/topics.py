"""`lmforge topics`: a pile of text -> topics, keywords, names and an offline HTML report, on the
company's own model (BERTopic's recipe, Grootendorst 2022, with lmforge's embeddings).

Pipeline (each stage chosen by a flag and recorded in the output's MANIFEST.json)
--------------------------------------------------------------------------------
  embed      the model's document vectors (understand/embed.py, kind "document"), L2-normalised
  reduce     umap (umap-learn: n_components 5, n_neighbors 15, min_dist 0, cosine, a fixed
             random_state: BERTopic's defaults) | pca (scikit-learn, exact SVD) | none
  cluster    hdbscan (sklearn.cluster.HDBSCAN on the reduced vectors; min_cluster_size; -1 marks
             an outlier) | kmeans (--n-topics; no outliers)
  outliers   optional reassignment: an outlier joins the topic whose centroid (mean of its members'
             normalised vectors, in the embedding space, not the reduced one) is nearest by cosine,
             when it is within a cap: `auto` (default) is the topic's own radius, the largest
             cosine distance of one of its clustered members from the centroid, so a document joins
             a topic only where that topic's members already reach; or one number for every topic
  keywords   class-based TF-IDF over scikit-learn's CountVectorizer counts (stop words, n-grams,
             min_df): see `ctfidf`
  represent  the members nearest their topic's centroid (cosine), per topic
  names      --namer MODEL: an lmforge chat model writes a short name from the keywords and a few
             representative texts (its chat template, greedy, <= 16 tokens); else the top keywords
  map        a 2-D layout of at most --map-points documents for the report: its own 2-D UMAP of
             their embeddings (PCA when the reducer is not UMAP). Not the clustering's reduction
             reused: a 5-D layout read as 2-D misleads, and a sample keeps this stage cheap; the
             report shows the sample, the files hold every document.

Topic ids: 0, 1, ... by size after outlier reassignment, largest first (ties: the topic whose
first document comes first), so they do not depend on the clusterer's internal numbering; -1 is
"no topic". The labels before reassignment (NMI "before", the manifest) use the same ids.

Memory and passes. The input is read three times as a stream (understand/texts.py): a scan (ids,
timestamps, counts; every bad input is refused here, before a model loads), the embedding (batches
of EMBED_CHUNK texts), and one pass for the keyword counts and the texts the outputs show
(representative documents, the map's hover text). No text is held beyond its batch, except those.
What is held: the vectors (N x dim float32: 100k x 256 = 100 MB, 1M = 1 GB), the ids, and the
reducer's and clusterer's working sets. The reduce and cluster stages are fitted on at most
--fit-max documents (default 100,000; a seeded sample above it): sklearn's HDBSCAN builds its
spanning tree with Prim's algorithm, O(N^2) distance computations, and UMAP's fit is the other
large cost. Each of the rest takes the topic most of its nearest fitted documents have, found
exactly in the embedding space (`nearest_fitted`, `knn_vote`): BERTopic's advice for large corpora
(fit on a sample, assign the rest) without UMAP's transform, which fits each point by SGD.

Determinism: the same input, model, settings, seed and thread count give the same topics and
assignments (UMAP runs single-threaded when seeded; HDBSCAN and the SVD are deterministic).

Trade-offs: HDBSCAN's outliers are reassigned in the embedding space, which is slower than using
the reduced coordinates but measures what the model says, not what UMAP kept (the reduced space
only ranks neighbours well locally). NMI with labels counts the outliers as one group of their
own, so it charges for leaving documents unassigned (before and after reassignment alike).
"""

from __future__ import annotations

import array
import datetime as dt
import json
import math
import os
import resource
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError
from .topics_stages import (TermCounter, agreement, canonical_labels, centroids, ctfidf, diversity, knn_vote,
                            normalise, own_similarity, reassign_outliers, top_terms)

REDUCERS = ("umap", "pca", "none")
CLUSTERERS = ("hdbscan", "kmeans")
EMBED_CHUNK = 4096  # texts tokenized and embedded at a time (the embedder sorts each chunk by length) ...
EMBED_CHARS = 4_000_000  # ... or fewer, when they reach this many characters
COUNT_CHUNK = 8192  # texts counted at a time by the keyword pass ...
COUNT_CHARS = 16_000_000  # ... or fewer, when they reach this many characters
REPRESENTATIVE_CHARS = 1000  # a representative document is cut to this many characters in the outputs
HOVER_CHARS = 200  # a map point's hover text
TOPICS_FILE, ASSIGNMENTS_FILE, REPORT_FILE = "topics.jsonl", "assignments.jsonl", "report.html"
KIND = "topics"  # the MANIFEST.json kind of a topics directory


@dataclass(frozen=True)
class Settings:
    """Every choice of the pipeline (recorded in the manifest); see the module docstring."""

    reduce: str = "umap"
    n_components: int = 5
    n_neighbors: int = 15
    min_dist: float = 0.0
    cluster: str = "hdbscan"
    min_cluster_size: int = 10
    min_samples: int | None = None  # HDBSCAN's; None: min_cluster_size
    n_topics: int | None = None  # kmeans
    fit_max: int = 100_000  # reduce and cluster are fitted on at most this many documents
    top_words: int = 10
    stop_words: str = "english"  # english | none | a file of words, one per line
    ngram_range: tuple[int, int] = (1, 1)
    min_df: int = 1
    representative_docs: int = 3
    reassign_outliers: bool = True
    outlier_max_distance: float | None = None  # cosine distance; None: auto (each topic's radius)
    seed: int = 0
    map_points: int = 10_000
    time_bins: int = 20

    def __post_init__(self) -> None:
        if self.reduce not in REDUCERS:
            raise ConfigError(f"--reduce must be one of {', '.join(REDUCERS)}; got {self.reduce!r}")
        if self.cluster not in CLUSTERERS:
            raise ConfigError(f"--cluster must be one of {', '.join(CLUSTERERS)}; got {self.cluster!r}")
        if self.cluster == "kmeans" and (self.n_topics is None or self.n_topics < 1):
            raise ConfigError("--cluster kmeans needs --n-topics N (N >= 1): k-means does not find the number itself")
        if self.cluster == "hdbscan" and self.n_topics is not None:
            raise ConfigError("--n-topics applies to --cluster kmeans; HDBSCAN finds the number of topics itself "
                              "(steer it with --min-cluster-size)")
        checks = [("--min-cluster-size", self.min_cluster_size, 2), ("--n-components", self.n_components, 1),
                  ("--n-neighbors", self.n_neighbors, 2), ("--fit-max", self.fit_max, 2), ("--top-words", self.top_words, 1),
                  ("--min-df", self.min_df, 1), ("--representative-docs", self.representative_docs, 0),
                  ("--map-points", self.map_points, 0), ("--time-bins", self.time_bins, 1)]
        if self.min_samples is not None:
            checks.append(("--min-samples", self.min_samples, 1))
        for flag, value, least in checks:
            if value < least:
                raise ConfigError(f"{flag} must be >= {least}, got {value}")
        lo, hi = self.ngram_range
        if not 1 <= lo <= hi:
            raise ConfigError(f"--ngram-range must be MIN,MAX with 1 <= MIN <= MAX, got {lo},{hi}")
        if not 0.0 <= self.min_dist <= 1.0:
            raise ConfigError(f"--min-dist must be within 0..1, got {self.min_dist}")
        d = self.outlier_max_distance
        if d is not None and not (math.isfinite(d) and 0.0 <= d <= 2.0):
            raise ConfigError(f"--outlier-max-distance must be a cosine distance within 0..2 (or auto), got {d}")

    def record(self) -> dict[str, Any]:
        """The settings as the manifest records them, by stage."""
        d = asdict(self)
        return {
            "reduce": {"method": self.reduce, **({"n_components": self.n_components, "n_neighbors": self.n_neighbors,
                                                  "min_dist": self.min_dist, "metric": "cosine"}
                                                 if self.reduce == "umap" else
                                                 {"n_components": self.n_components} if self.reduce == "pca" else {})},
            "cluster": {"method": self.cluster, **({"min_cluster_size": self.min_cluster_size,
                                                    "min_samples": self.min_samples, "metric": "euclidean",
                                                    "cluster_selection_method": "eom"}
                                                   if self.cluster == "hdbscan" else {"n_topics": self.n_topics})},
            "fit_max": self.fit_max,
            "outliers": {"reassign": self.reassign_outliers,
                         "max_distance": "auto" if d["outlier_max_distance"] is None else d["outlier_max_distance"]},
            "keywords": {"method": "c-TF-IDF", "top_words": self.top_words, "stop_words": self.stop_words,
                         "ngram_range": list(self.ngram_range), "min_df": self.min_df},
            "representative_docs": self.representative_docs,
            "seed": self.seed, "map_points": self.map_points, "time_bins": self.time_bins,
        }


# ---- the input: a scan, then streams of the same texts ------------------------------------------


@dataclass
class Corpus:
    """What the scan of the inputs found; `texts()` streams the same texts again, in the same order."""

    inputs: list[str]
    text_field: str
    id_field: str
    strict: bool
    ids: list[str]
    times: np.ndarray | None  # (N,) float64 seconds since 1970 UTC (NaN: the record has none); None: no --time-field
    files: int = 0
    not_utf8: list[str] = field(default_factory=list)
    empty: int = 0
    time_field: str | None = None
    without_time: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def texts(self) -> Iterator[str]:
        """The texts in scan order; a DataError if the inputs changed since the scan."""
        from .texts import iter_texts

        n = 0
        for n, t in enumerate(iter_texts(self.inputs, text_field=self.text_field, id_field=self.id_field,
                                         strict=self.strict), 1):
            if n > len(self.ids) or t.id != self.ids[n - 1]:
                break
            yield t.text
        else:
            if n == len(self.ids):
                return
        raise DataError(f"the inputs changed while they were read ({', '.join(self.inputs)}); run topics again")


def parse_time(value: Any, where: str, name: str, *, found: bool = False) -> float:
    """A record's timestamp -> seconds since 1970 UTC: a number (seconds) or an ISO 8601 string
    (a date, or a date and time; no zone: UTC). found: the field was chosen by --time-field auto
    (the error then says how to turn that off)."""
    if isinstance(value, bool):
        pass  # a bool is not a time: the error below
    elif isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    elif isinstance(value, str):
        try:
            t = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            pass
        else:
            return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp()
    how = ("; found by --time-field auto: pass --time-field none to ignore it, or fix the value" if found else
           " (give an ISO 8601 date or date-time, e.g. 2024-05-01T12:00:00Z, or seconds since 1970)")
    raise DataError(f"{where}: field {name!r} is not a timestamp: {value!r}{how}")


TIME_FIELDS = ("timestamp", "time", "date", "datetime", "created_at", "created", "ts")  # --time-field auto looks for these


def scan(inputs: Sequence[str | os.PathLike], *, text_field: str = "text", id_field: str = "id",
         time_field: str | None = "auto", strict: bool = False) -> Corpus:
    """Ids (unique: a repeated one is refused naming both places) and timestamps of every text.

    time_field: a JSONL field holding each record's timestamp; None: no timestamps; "auto": the
    first of TIME_FIELDS that the first JSONL record has with a value that parses as a time (then
    every record's value must parse, as with a field named by the user). Memory: one id string per
    text (and a dict from id to index, for the uniqueness check), 8 bytes of time; no text."""
    from .texts import Texts, iter_texts

    counts = Texts()
    ids: list[str] = []
    first: dict[str, int] = {}
    times: array.array[float] = array.array("d")
    without = 0
    auto = time_field == "auto"
    field_name = None if auto else time_field
    for t in iter_texts(inputs, text_field=text_field, id_field=id_field, strict=strict, counts=counts):
        if t.id in first:
            raise DataError(f"{t.where}: id {t.id!r} was already used at {where_of(inputs, first[t.id], text_field, id_field)}"
                            f"; every document needs its own id (fix the {id_field!r} field, or drop it to use FILE:LINE)")
        first[t.id] = len(ids)
        ids.append(t.id)
        if auto and t.record is not None:  # the first record decides (records without one count as without)
            auto = False
            field_name = next((k for k in TIME_FIELDS if _is_time(t.record.get(k))), None)
            if field_name is not None:  # the texts before it (plain lines) have no time
                times.extend([math.nan] * (len(ids) - 1))
                without = len(ids) - 1
        if field_name is not None:
            value = t.record.get(field_name) if t.record is not None else None
            if value is None:
                times.append(math.nan)
                without += 1
            else:
                times.append(parse_time(value, t.where, field_name, found=time_field == "auto"))
    del first
    return Corpus([str(p) for p in inputs], text_field, id_field, strict, ids,
                  np.frombuffer(times, dtype=np.float64).copy() if field_name is not None else None,
                  counts.files, counts.not_utf8, counts.empty, field_name, without)


def _is_time(value: Any) -> bool:
    try:
        parse_time(value, "", "")
    except DataError:
        return False
    return True


def where_of(inputs: Sequence[str | os.PathLike], index: int, text_field: str, id_field: str) -> str:
    """FILE:LINE of the index-th text (read again: only an error message needs it)."""
    from .texts import iter_texts

    for i, t in enumerate(iter_texts(inputs, text_field=text_field, id_field=id_field)):
        if i == index:
            return t.where
    return f"text {index + 1}"


def read_labels(path: str | os.PathLike, ids: Sequence[str]) -> dict[int, str]:
    """A gold file (JSONL: {"id": ..., "label": ...} per line) -> {document index: label}. An id no
    document has, a repeated id, or a record without both fields is a DataError naming file:line."""
    from ..jsonl import read_jsonl

    index = {d: i for i, d in enumerate(ids)}
    gold: dict[int, str] = {}
    seen: dict[str, str] = {}
    for where, _, _, rec in read_jsonl(path, what='one {"id": ..., "label": ...} object per line'):
        if not isinstance(rec, dict) or "id" not in rec or "label" not in rec:
            found = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
            raise DataError(f"{where}: a label record needs the fields 'id' and 'label' (found: {found})")
        ident, label = rec["id"], rec["label"]
        if isinstance(ident, bool) or not isinstance(ident, (str, int)):
            raise DataError(f"{where}: 'id' must be a string or an integer, got {ident!r}")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataError(f"{where}: 'label' must be a string or an integer, got {label!r}")
        ident = str(ident)
        if ident not in index:
            raise DataError(f"{where}: unknown id {ident!r}: no input document has it (ids are the inputs' "
                            "id field, else FILE:LINE as `lmforge embed` writes them)")
        if ident in seen:
            raise DataError(f"{where}: id {ident!r} is labelled twice (first at {seen[ident]})")
        seen[ident] = where
        gold[index[ident]] = str(label)
    if not gold:
        raise DataError(f"{path}: no labels in it (expected one {{\"id\": ..., \"label\": ...}} object per line)")
    return gold


def stop_words_of(spec: str) -> list[str] | str | None:
    """--stop-words: english (scikit-learn's list), none, or a file of words (one per line)."""
    if spec == "english":
        return "english"
    if spec == "none":
        return None
    p = Path(spec)
    if not p.is_file():
        raise ConfigError(f"--stop-words must be english, none or a file of words (one per line); {spec!r} is none of these")
    try:
        return sorted({w.strip().lower() for w in p.read_text(encoding="utf-8").splitlines() if w.strip()})
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--stop-words {spec}: cannot read it as UTF-8 text ({e})") from None


# ---- reduce and cluster ------------------------------------------------------------------------


def _umap(n_components: int, n_neighbors: int, min_dist: float, seed: int, n: int) -> Any:
    import umap

    return umap.UMAP(n_components=n_components, n_neighbors=max(2, min(n_neighbors, n - 1)), min_dist=min_dist,
                     metric="cosine", random_state=seed, transform_seed=seed, n_jobs=1, low_memory=True,
                     init="pca" if n > n_components + 2 else "random")


def _quiet() -> Any:
    """Silence umap-learn's and scikit-learn's advice (n_jobs overridden by a seed, a default about
    to change): they are not the user's business here."""
    w = warnings.catch_warnings()
    w.__enter__()
    warnings.simplefilter("ignore", UserWarning)
    warnings.simplefilter("ignore", FutureWarning)
    return w


def reduce_fit(vectors: np.ndarray, s: Settings, n_components: int | None = None) -> tuple[np.ndarray, Any]:
    """(reduced (N, n_components) float32, the fitted reducer or None for `none`)."""
    nc = n_components or s.n_components
    if s.reduce == "none":
        return vectors, None
    w = _quiet()
    try:
        if s.reduce == "umap" and len(vectors) > nc + 1:
            model = _umap(nc, s.n_neighbors, s.min_dist, s.seed, len(vectors))
        else:  # pca, or too few documents for UMAP's graph
            from sklearn.decomposition import PCA

            model = PCA(n_components=min(nc, len(vectors), vectors.shape[1]), svd_solver="full", random_state=s.seed)
        return np.asarray(model.fit_transform(vectors), dtype=np.float32), model
    finally:
        w.__exit__(None, None, None)


def nearest_fitted(vectors: np.ndarray, fit: np.ndarray, rest: np.ndarray, k: int,
                   budget: int = 1 << 24) -> np.ndarray:
    """(len(rest), k) indices into `fit` of each rest document's k nearest fitted documents by
    cosine in the embedding space (the rows of `vectors` are unit length): exact, a matrix product
    of a block of the rest against every fitted document and its top k, in blocks of at most
    `budget` similarities (64 MB of float32) so memory does not grow with the corpus.

    Exact, not an approximate index: the cost is len(rest) x len(fit) x dim multiply-adds (900,000
    x 100,000 x 256 at 1M documents: minutes on one thread, small beside embedding them), it has
    no start-up cost (pynndescent, tried first, spent 35-65 s compiling its numba kernels in every
    process before the first query), no recall to tune, and it is deterministic by construction.
    Not UMAP's transform either, which fits every new point by SGD (~4 ms a document: an hour for 1M)."""
    import torch

    table = torch.from_numpy(np.ascontiguousarray(vectors[fit]))
    out = np.empty((len(rest), k), dtype=np.int64)
    rows = max(1, budget // max(1, len(fit)))
    for s in range(0, len(rest), rows):
        sims = torch.from_numpy(np.ascontiguousarray(vectors[rest[s : s + rows]])) @ table.T  # (rows, len(fit))
        out[s : s + rows] = torch.topk(sims, k, dim=1).indices.numpy()  # nearest first
    return out


def cluster_fit(coords: np.ndarray, s: Settings) -> tuple[np.ndarray, np.ndarray, Any]:
    """(labels (N,) with -1 for outliers, membership probabilities (N,), the fitted clusterer)."""
    w = _quiet()
    try:
        if s.cluster == "kmeans":
            from sklearn.cluster import KMeans

            k = min(int(s.n_topics or 1), len(coords))
            km = KMeans(n_clusters=k, n_init=3, random_state=s.seed).fit(coords)
            return km.labels_.astype(np.int64), np.ones(len(coords), dtype=np.float32), km
        from sklearn.cluster import HDBSCAN

        hd = HDBSCAN(min_cluster_size=s.min_cluster_size, min_samples=s.min_samples, metric="euclidean",
                     cluster_selection_method="eom", copy=True).fit(coords)
        return hd.labels_.astype(np.int64), hd.probabilities_.astype(np.float32), hd
    finally:
        w.__exit__(None, None, None)


# ---- the whole pipeline ------------------------------------------------------------------------


@dataclass
class Topic:
    id: int  # -1: the outliers
    size: int
    keywords: list[tuple[str, float]]
    name: str
    representative: list[int]  # document indices


@dataclass
class Result:
    """What `fit_topics` found (document arrays in input order)."""

    labels: np.ndarray  # (N,) final topic, -1: none
    cluster_labels: np.ndarray  # (N,) before outlier reassignment
    probability: np.ndarray  # (N,) the clusterer's membership strength (0 for an outlier)
    similarity: np.ndarray  # (N,) cosine to the own topic's centroid; NaN for an outlier
    reassigned: np.ndarray  # (N,) bool
    topics: list[Topic]  # id 0.. then, if any outliers remain, id -1
    centroid_similarity: np.ndarray  # (T, T) cosine of the topic centroids
    texts: dict[int, str]  # the texts the outputs show: representative documents and map points (cut)
    map_index: np.ndarray  # (M,) documents on the map
    map_xy: np.ndarray  # (M, 2)
    quality: dict[str, Any]
    stages: dict[str, dict[str, float]]  # stage -> {"seconds", "peak_rss_mb"}
    notes: dict[str, Any]  # what was resolved on the way (fit sample, clamped neighbours, caps, namer)

    @property
    def n_topics(self) -> int:
        return len(self.centroid_similarity)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Stages:
    """Seconds and peak memory (so far) of each stage, and a log line as each ends."""

    def __init__(self, log: Callable[[str], None] | None) -> None:
        self.log = log
        self.record: dict[str, dict[str, float]] = {}
        self.start = time.perf_counter()

    def done(self, name: str, note: str = "") -> None:
        now = time.perf_counter()
        self.record[name] = {"seconds": round(now - self.start, 3), "peak_rss_mb": round(peak_rss_mb(), 1)}
        if self.log:
            self.log(f"{name}: {now - self.start:.1f}s{'  ' + note if note else ''}")
        self.start = now


def fit_topics(vectors: np.ndarray, texts: Callable[[], Iterable[str]], s: Settings, *,
               gold: dict[int, str] | None = None, namer: Callable[[Topic, list[str]], str] | None = None,
               log: Callable[[str], None] | None = None, stages: Stages | None = None) -> Result:
    """Topics of N documents: `vectors` (N, dim) their embeddings (normalised here, in place),
    `texts()` a fresh iterator over the same N texts in the same order (read once, for keywords
    and the texts the outputs show). `gold`: {document index: label} for NMI/ARI."""
    n = len(vectors)
    if n < s.min_cluster_size:
        raise DataError(f"{n} document(s) is fewer than --min-cluster-size {s.min_cluster_size}: no topic can form; "
                        "give more documents or lower --min-cluster-size")
    st = stages or Stages(log)
    rng = np.random.default_rng(s.seed)
    vectors = normalise(np.asarray(vectors, dtype=np.float32))
    notes: dict[str, Any] = {}

    # reduce + cluster: on all documents, or a seeded sample of fit_max and the rest by their neighbours
    fit = np.sort(rng.choice(n, s.fit_max, replace=False)) if n > s.fit_max else np.arange(n)
    notes["fitted_on"] = int(len(fit))
    coords, reducer = reduce_fit(vectors[fit], s)
    if s.reduce == "umap":
        notes["n_neighbors"] = int(getattr(reducer, "n_neighbors", 0)) or None
    st.done("reduce", f"{s.reduce} of {len(fit):,} documents")
    fit_labels, fit_prob, _ = cluster_fit(coords, s)
    labels = np.full(n, -1, dtype=np.int64)
    prob = np.zeros(n, dtype=np.float32)
    labels[fit], prob[fit] = fit_labels, fit_prob
    if len(fit) < n:
        rest = np.setdiff1d(np.arange(n), fit)
        k = min(s.n_neighbors, len(fit))
        labels[rest], prob[rest] = knn_vote(nearest_fitted(vectors, fit, rest, k), fit_labels, fit_prob)
        notes["rest"] = {"documents": int(len(rest)), "method": f"vote of the {k} nearest fitted documents "
                         "(embedding space, cosine, exact)"}
    labels = canonical_labels(labels)
    n_topics = int(labels.max()) + 1
    cents = centroids(vectors, labels, n_topics)
    before = (labels == -1).mean()
    st.done("cluster", f"{s.cluster}: {n_topics} topics, {before:.1%} outliers")

    # outliers
    re = reassign_outliers(vectors, labels, cents, s.outlier_max_distance) if s.reassign_outliers and n_topics else None
    final = re.labels if re is not None else labels
    if re is not None:
        # ids by size again, after the joins (the same renumbering of the labels before them)
        inside, renumber = final >= 0, np.zeros(n_topics, dtype=np.int64)  # old id -> new id
        renumber[final[inside]] = canonical_labels(final)[inside]
        labels = np.where(labels >= 0, renumber[np.maximum(labels, 0)], -1)
        final = np.where(final >= 0, renumber[np.maximum(final, 0)], -1)
        cents = centroids(vectors, final, n_topics)  # the joined documents move the centroids
        notes["outlier_caps"] = {"min": float(re.caps.min()), "median": float(np.median(re.caps)),
                                 "max": float(re.caps.max())}
    sim = own_similarity(vectors, final, cents)
    after = (final == -1).mean()
    st.done("outliers", f"{before:.1%} -> {after:.1%} outliers" if re is not None else "kept as they are")

    # keywords, representative documents, and the texts the outputs show (one pass over the texts)
    reps = representatives(sim, final, n_topics, s.representative_docs)
    map_index = (np.sort(rng.choice(n, s.map_points, replace=False)) if n > s.map_points else np.arange(n)) \
        if s.map_points else np.zeros(0, dtype=np.int64)
    wanted_full = {i for r in reps for i in r}
    wanted_hover = set(map_index.tolist())
    shown: dict[int, str] = {}
    classes = np.where(final >= 0, final, n_topics)  # outliers are one more class (their keywords too)
    counter = TermCounter(n_topics + 1, stop_words=stop_words_of(s.stop_words), ngram_range=s.ngram_range)
    batch: list[str] = []
    seen = chars = 0
    for i, text in enumerate(texts()):
        if i in wanted_full:
            shown[i] = cut(text, REPRESENTATIVE_CHARS)
        elif i in wanted_hover:
            shown[i] = cut(text, HOVER_CHARS)
        batch.append(text)
        chars += len(text)
        if len(batch) == COUNT_CHUNK or chars >= COUNT_CHARS:
            counter.add(batch, classes[seen : seen + len(batch)])
            seen += len(batch)
            batch, chars = [], 0
    if batch:
        counter.add(batch, classes[seen : seen + len(batch)])
        seen += len(batch)
    if seen != n:
        raise DataError(f"{seen} texts for {n} vectors: the texts and the vectors must be the same documents")
    counts, vocab = counter.counts(s.min_df)
    words = top_terms(ctfidf(counts), vocab, s.top_words) if vocab else [[] for _ in range(n_topics + 1)]
    sizes = np.bincount(final + 1, minlength=n_topics + 1)  # [outliers, topic 0, ...]
    topics = [Topic(t, int(sizes[t + 1]), words[t], keyword_name(words[t], t), reps[t]) for t in range(n_topics)]
    if sizes[0]:
        topics.append(Topic(-1, int(sizes[0]), words[n_topics], "outliers", []))
    st.done("keywords", f"c-TF-IDF over {len(vocab):,} terms")

    if namer is not None:
        for t in topics:
            if t.id >= 0:
                t.name = namer(t, [shown[i] for i in t.representative]) or t.name
        st.done("names", f"{n_topics} names")

    # the map: its own 2-D layout of the sampled documents
    map_xy = np.zeros((len(map_index), 2), dtype=np.float32)
    if len(map_index) >= 3:
        map_xy, _ = reduce_fit(vectors[map_index], Settings(reduce="pca" if s.reduce != "umap" else "umap",
                                                              n_neighbors=s.n_neighbors, min_dist=0.1, seed=s.seed),
                               n_components=2)
        if map_xy.shape[1] < 2:
            map_xy = np.pad(map_xy, ((0, 0), (0, 2 - map_xy.shape[1])))
    st.done("map", f"{len(map_index):,} documents")

    quality: dict[str, Any] = {
        "documents": n, "topics": n_topics,
        "outlier_share_before": float(before), "outlier_share": float(after),
        "reassigned": int(re.reassigned.sum()) if re is not None else 0,
        "diversity": diversity([t.keywords for t in topics if t.id >= 0]),
    }
    if gold:
        quality["labels"] = {"before_reassignment": agreement(gold, labels), "final": agreement(gold, final)}
    return Result(final, labels, np.where(final >= 0, prob, 0.0).astype(np.float32), sim,
                  re.reassigned if re is not None else np.zeros(n, dtype=bool), topics,
                  np.asarray(cents @ cents.T, dtype=np.float32), shown, map_index, np.asarray(map_xy, dtype=np.float32),
                  quality, st.record, notes)


def representatives(sim: np.ndarray, labels: np.ndarray, n_topics: int, k: int) -> list[list[int]]:
    """Per topic, its k members most similar to its centroid (ties: the earlier document)."""
    out: list[list[int]] = [[] for _ in range(n_topics)]
    if k == 0:
        return out
    order = np.lexsort((np.arange(len(labels)), -np.nan_to_num(sim, nan=-np.inf)))
    for i in order:
        t = labels[i]
        if t >= 0 and len(out[t]) < k:
            out[t].append(int(i))
    return out


def keyword_name(words: Sequence[tuple[str, float]], topic: int, k: int = 4) -> str:
    """A topic's name without a namer: BERTopic's `3_word_word_word` form, spaced."""
    return f"{topic}: " + ", ".join(w for w, _ in words[:k]) if words else f"topic {topic}"


def cut(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: chars - 1] + "\u2026"


# ---- names from a chat model --------------------------------------------------------------------

NAME_TOKENS = 16


def naming_prompt(keywords: Sequence[str], examples: Sequence[str], example_chars: int = 200) -> str:
    lines = ["These texts share one topic.", f"Keywords: {', '.join(keywords)}", "Examples:"]
    lines += [f"- {' '.join(cut(e, example_chars).split())}" for e in examples]
    lines.append("Write a short name for the topic (2 to 5 words). Answer with the name only.")
    return "\n".join(lines)


def clean_name(text: str, chars: int = 60) -> str:
    """A model's answer -> one line without quotes or a trailing full stop, at most `chars`."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    prev = None
    while line != prev:  # peel "Name:", quotes, markdown and a full stop in any order
        prev = line
        line = line.removeprefix("Name:").strip().strip("\"'`*#").rstrip(".").strip()
    return cut(line, chars)


class Namer:
    """An lmforge chat model that names topics: a prompt through its chat template, greedy."""

    def __init__(self, path: str | os.PathLike, device: Any = None) -> None:
        from ..artifacts import load_model
        from ..serve.chat import ChatTemplate

        self.path = str(path)
        self.loaded = load_model(path, device=device)
        self.template = ChatTemplate(self.loaded.tokenizer, self.loaded.tokenizer.chat_template)
        self.window = self.loaded.model.cfg.max_seq_len

    def __call__(self, topic: Topic, examples: list[str]) -> str:
        from ..generate import generate
        from ..serve.protocol import ChatMessage

        tok = self.loaded.tokenizer
        words = [w for w, _ in topic.keywords]
        for keep in range(len(examples), -1, -1):  # fewer examples until the prompt fits the window
            ids = self.template.encode([ChatMessage(role="user", content=naming_prompt(words, examples[:keep]))])
            if len(ids) + NAME_TOKENS <= self.window:
                break
        else:
            return ""
        out = tok.decode(generate(self.loaded.model, ids[-(self.window - NAME_TOKENS):], max_tokens=NAME_TOKENS,
                                  temperature=0.0, stop_ids=tok.end_ids))
        for stop in self.template.stop:
            out = out.split(stop, 1)[0]
        return clean_name(out)

    def record(self) -> dict[str, Any]:
        o = self.loaded.origin
        return {"path": self.path, "model_sha256": o.model_sha256, "tokenizer_sha256": self.loaded.tokenizer.sha256,
                "max_tokens": NAME_TOKENS, "decoding": "greedy"}


# ---- topics over time ---------------------------------------------------------------------------


def over_time(times: np.ndarray, labels: np.ndarray, topics: Sequence[int], bins: int) -> dict[str, Any] | None:
    """Documents per time bin for each topic in `topics` (bins of equal width between the first and
    the last timestamp); None when fewer than two documents carry one."""
    ok = np.isfinite(times)
    if ok.sum() < 2:
        return None
    lo, hi = float(times[ok].min()), float(times[ok].max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    series = {}
    for t in topics:
        series[str(t)] = np.histogram(times[ok & (labels == t)], bins=edges)[0].tolist()
    iso = [dt.datetime.fromtimestamp(e, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") for e in edges]
    return {"edges": iso, "counts": series, "with_time": int(ok.sum())}


# ---- the topics directory ---------------------------------------------------------------------

MAP_TRACES = 30  # topics with their own colour on the map; the rest share one trace
HEATMAP_TOPICS = 40
TIME_TOPICS = 10


def report_data(result: Result, corpus: Corpus, settings: Settings, *, model: str, title: str,
                stages: dict[str, dict[str, float]]) -> dict[str, Any]:
    """What the report's script draws (document arrays for the sampled map points only)."""
    ids = corpus.ids
    named = [t for t in result.topics if t.id >= 0]
    topics = [{"id": t.id, "name": t.name, "size": t.size, "keywords": [[w, round(s, 5)] for w, s in t.keywords],
               "docs": [{"id": ids[i], "text": result.texts.get(i, "")} for i in t.representative]}
              for t in result.topics]
    idx = result.map_index
    doc_map = {"x": np.round(result.map_xy[:, 0], 4).tolist() if len(idx) else [],
               "y": np.round(result.map_xy[:, 1], 4).tolist() if len(idx) else [],
               "topic": result.labels[idx].tolist(), "id": [ids[i] for i in idx],
               "text": [result.texts.get(int(i), "") for i in idx]}
    k = min(HEATMAP_TOPICS, len(named))
    time_data = None
    if corpus.times is not None:
        time_data = over_time(corpus.times, result.labels, [t.id for t in named[:TIME_TOPICS]], settings.time_bins)
    return {
        "title": title, "model": model, "created": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
        "quality": result.quality, "settings": settings.record(), "stages": stages,
        "input": {"inputs": corpus.inputs, "files": corpus.files, "not_utf8": len(corpus.not_utf8),
                  "empty": corpus.empty, "time_field": corpus.time_field, "without_time": corpus.without_time},
        "topics": topics, "map": doc_map, "map_total": len(ids), "map_traces": MAP_TRACES,
        "similarity": {"ids": [t.id for t in named[:k]], "names": [t.name for t in named[:k]],
                       "z": np.round(result.centroid_similarity[:k, :k], 4).tolist()},
        "time": time_data,
    }


def write_topics(out: Path, result: Result, corpus: Corpus, settings: Settings, *, fingerprint: dict[str, Any],
                 model: str, namer: dict[str, Any] | None, truncated: int, overwrite: bool, stages: Stages) -> None:
    """The topics directory, atomically (see the module docstring)."""
    from ..artifacts import write_manifest
    from ..jsonl import to_record
    from ..util import atomic_dir, writes_to
    from .topics_report import render_report

    ids = corpus.ids
    with writes_to(out), atomic_dir(out, overwrite=overwrite) as tmp:
        with open(tmp / TOPICS_FILE, "w", encoding="utf-8") as f:
            for t in result.topics:
                f.write(json.dumps({"id": t.id, "size": t.size, "name": t.name,
                                    "keywords": [{"term": w, "score": round(s, 6)} for w, s in t.keywords],
                                    "representative_docs": [{"id": ids[i], "text": result.texts.get(i, "")}
                                                            for i in t.representative]}, ensure_ascii=False) + "\n")
        with open(tmp / ASSIGNMENTS_FILE, "w", encoding="utf-8") as f:
            lab, prob, sim, re_ = result.labels, result.probability, result.similarity, result.reassigned
            for i, ident in enumerate(ids):
                t = int(lab[i])
                f.write(json.dumps({"id": ident, "topic": t, "probability": round(float(prob[i]), 4) if t >= 0 else None,
                                    "similarity": round(float(sim[i]), 4) if t >= 0 else None,
                                    "reassigned": bool(re_[i])}, ensure_ascii=False) + "\n")
        title = f"Topics: {out.name}"
        (tmp / REPORT_FILE).write_text(render_report(report_data(result, corpus, settings, model=model, title=title,
                                                                 stages=stages.record), title), encoding="utf-8")
        stages.done("write", f"{out}")
        write_manifest(tmp, kind=KIND, extra=to_record({  # NaN as "nan" (lmforge/jsonl.py's rule)
            "model": {"path": model, **fingerprint},
            "input": {"inputs": corpus.inputs, "documents": len(ids), "files": corpus.files,
                      "not_utf8_skipped": len(corpus.not_utf8), "empty_skipped": corpus.empty,
                      "text_field": corpus.text_field, "id_field": corpus.id_field, "time_field": corpus.time_field,
                      "without_time": corpus.without_time, "truncated": truncated},
            "pipeline": {"embed": {"method": "lmforge", "kind": "document", "pooling": fingerprint.get("pooling")},
                         **settings.record(), "names": {"method": "chat model", **namer} if namer else
                         {"method": "top keywords"}},
            "resolved": result.notes, "quality": result.quality, "stages": stages.record,
        }))


# ---- the command --------------------------------------------------------------------------------


def check_out(out: Path, overwrite: bool) -> None:
    """--out must not exist, or with --overwrite be a topics directory (never anything else)."""
    if not os.path.lexists(out):
        return
    if not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out or pass --overwrite (it replaces a topics directory)")
    from ..artifacts import MANIFEST, read_manifest
    from ..errors import CheckpointError

    if out.is_dir() and not out.is_symlink():
        if not any(out.iterdir()):
            return
        if (out / MANIFEST).is_file():
            try:
                if read_manifest(out).kind == KIND:
                    return
            except CheckpointError:
                pass
    raise ConfigError(f"{out} is not a topics directory (no MANIFEST.json of kind {KIND!r}); --overwrite replaces "
                      "only a topics directory: choose another --out")


def topics_command(model: str, inputs: Sequence[str], out: str, *, settings: Settings, text_field: str = "text",
                   id_field: str = "id", time_field: str | None = "auto", labels: str | None = None,
                   namer: str | None = None, batch_size: int = 32, threads: int = 0, max_len: int | None = None,
                   strict: bool = False, overwrite: bool = False, as_json: bool = False, compile: bool = False) -> int:
    """`lmforge topics MODEL INPUTS... --out DIR`: see the module docstring and docs/topics.md."""
    import torch

    from ..util import console, out as results_out, warn
    from .embed import Embedder

    target = Path(out)
    check_out(target, overwrite)
    if threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0: all cores), got {threads}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    stop_words_of(settings.stop_words)  # a bad --stop-words file fails now, not after the embedding
    st = Stages(lambda line: console.print(line, markup=False))
    corpus = scan(inputs, text_field=text_field, id_field=id_field, time_field=time_field, strict=strict)
    n = len(corpus)
    if corpus.not_utf8:
        names = ", ".join(corpus.not_utf8[:5]) + (" ..." if len(corpus.not_utf8) > 5 else "")
        warn(f"skipped {len(corpus.not_utf8)} file(s) that are not UTF-8: {names} (--strict refuses them)")
    if n < settings.min_cluster_size:
        raise DataError(f"{n} document(s) in {', '.join(inputs)} is fewer than --min-cluster-size "
                        f"{settings.min_cluster_size}: no topic can form; give more documents or lower --min-cluster-size")
    gold = read_labels(labels, corpus.ids) if labels else None
    if time_field not in (None, "auto") and corpus.without_time == n:
        raise DataError(f"no document has the field {time_field!r} given by --time-field (timestamps come from JSONL "
                        "records); check the field's name")
    st.done("scan", f"{n:,} documents in {corpus.files} file(s)")

    if threads:
        torch.set_num_threads(threads)
    emb = Embedder.load(model, batch_size=batch_size, max_len=max_len, compile=compile)
    name_model = Namer(namer) if namer else None  # a bad --namer fails before the long work
    console.print(f"embedding {n:,} documents with {model} ({emb.pooling.method} pooling, {emb.dtype}, "
                  f"{torch.get_num_threads()} threads)", markup=False)
    vectors, cut_count = embed_stream(emb, corpus.texts(), n)
    st.done("embed", f"{n:,} x {emb.dim}" + (f", {cut_count} cut to {emb.max_len} tokens" if cut_count else ""))

    result = fit_topics(vectors, corpus.texts, settings, gold=gold, namer=name_model, stages=st)
    write_topics(target, result, corpus, settings, fingerprint=emb.fingerprint(), model=model,
                 namer=name_model.record() if name_model else None, truncated=cut_count, overwrite=overwrite,
                 stages=st)
    q = result.quality
    summary = {"out": str(target), **q, "stages": st.record}
    if as_json:
        from ..jsonl import dumps_record

        results_out.print(dumps_record(summary), markup=False, soft_wrap=True)
        return 0
    results_out.print(f"{n:,} documents -> {result.n_topics} topics in {target}: outliers "
                      f"{q['outlier_share_before']:.1%} -> {q['outlier_share']:.1%}"
                      f"{'' if settings.reassign_outliers else ' (reassignment off)'}, diversity {q['diversity']:.2f}",
                      markup=False)
    if gold:
        b, f = q["labels"]["before_reassignment"], q["labels"]["final"]
        results_out.print(f"against {b['labelled']:,} labels: NMI {b['nmi']:.3f} -> {f['nmi']:.3f}, "
                          f"ARI {b['ari']:.3f} -> {f['ari']:.3f} (before -> after outlier reassignment)", markup=False)
    for t in result.topics[:10]:
        if t.id >= 0:
            results_out.print(f"  {t.id:>4}  {t.size:>7,}  {t.name}", markup=False)
    if result.n_topics > 10:
        results_out.print(f"  ... {result.n_topics - 10} more in {target / TOPICS_FILE} and {target / REPORT_FILE}",
                          markup=False)
    return 0


HEAD_CHARS_PER_TOKEN = 24  # a long text is tokenized from a head of max_len x this many characters


def text_head(text: str, chars: int) -> str:
    """The text up to its last word end at or before `chars` characters (the whole text when it is
    shorter, or when no word ends in that head). The cut is where a non-space character meets a
    space, where every pre-tokenizer lmforge loads (byte-level BPE's regex, Llama 3's, SentencePiece's
    Metaspace) ends a piece in the whole text too, so the head's tokens are the whole text's first
    tokens."""
    if len(text) <= chars:
        return text
    k = chars
    while k > 0 and not (text[k].isspace() and not text[k - 1].isspace()):
        k -= 1
    return text[:k] if k > 0 else text


def embed_stream(emb: Any, texts: Iterable[str], n: int) -> tuple[np.ndarray, int]:
    """(N, dim) float32 document vectors of a stream of N texts, and how many were cut to the
    model's max_len. Bounded memory whatever the texts' lengths: texts go in chunks of at most
    EMBED_CHUNK texts and EMBED_CHARS characters, and a long text is tokenized from its head
    (`text_head`, max_len x HEAD_CHARS_PER_TOKEN characters), not whole: the first max_len tokens
    are the same, and a 1 GB file is not tokenized in full for 256 tokens of each text. A head with
    fewer than max_len tokens (very long tokens) falls back to the whole text."""
    from ..util import progress_bar
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    vectors = np.empty((n, emb.dim), dtype=np.float32)
    head_chars = emb.max_len * HEAD_CHARS_PER_TOKEN
    done = cut_count = 0
    bar = progress_bar(TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True)
    with bar:
        task = bar.add_task("embedding", total=n)
        chunk: list[str] = []
        heads: list[bool] = []  # the text in chunk is a head of a longer one
        chars = 0

        def flush() -> None:
            nonlocal done, cut_count
            rows = emb.tokenize(chunk, kind="document")
            for i, row in enumerate(rows):
                if heads[i] and len(row) < emb.max_len:  # the head was too short in tokens: the whole text
                    rows[i] = row = emb.tokenize([whole[i]], kind="document")[0]
                if heads[i] or len(row) > emb.max_len:
                    cut_count += 1
                    rows[i] = row[: emb.max_len]
            vectors[done : done + len(rows)] = emb.embed_ids(rows)
            done += len(rows)
            bar.advance(task, len(rows))

        whole: dict[int, str] = {}  # the long texts of this chunk, in case their head is not enough
        for text in texts:
            head = text_head(text, head_chars)
            if len(head) < len(text):
                whole[len(chunk)] = text
            chunk.append(head)
            heads.append(len(head) < len(text))
            chars += len(head)
            if len(chunk) == EMBED_CHUNK or chars >= EMBED_CHARS:
                flush()
                chunk, heads, whole, chars = [], [], {}, 0
        if chunk:
            flush()
    if done != n:
        raise DataError(f"the inputs changed while they were read ({done} texts, {n} at the scan); run topics again")
    return vectors, cut_count


__all__ = ["Settings", "Corpus", "scan", "read_labels", "parse_time", "stop_words_of", "reduce_fit", "nearest_fitted", "cluster_fit", "Topic", "Result", "Stages",
           "fit_topics", "representatives", "keyword_name", "naming_prompt", "clean_name", "Namer", "over_time",
           "check_out", "report_data", "write_topics", "topics_command", "embed_stream", "text_head", "where_of",
           "TIME_FIELDS"]
