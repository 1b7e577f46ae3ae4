"""The pure stages of `lmforge topics` (understand/topics.py): arrays in, arrays out.

- `canonical_labels`: topic ids by size (0 the largest), -1 for no topic;
- `centroids`, `own_similarity`: topic centroids in the embedding space (normalised means of the
  members' unit vectors) and each document's cosine to its own;
- `knn_vote`: a document beyond the fitted sample takes its nearest fitted documents' topic;
- `reassign_outliers`: an outlier joins the nearest centroid within a cap (auto: the topic's
  radius, the farthest of its own members);
- `TermCounter`, `ctfidf`, `top_terms`: class-based TF-IDF keywords over CountVectorizer counts,
  accumulated batch by batch;
- `diversity`, `agreement`: topic diversity, and NMI/ARI against gold labels.
Each is small enough to check against numbers worked out by hand (tests/test_topics.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .index.search import split_unspaced


def canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Cluster labels renumbered 0, 1, ... by size (largest first; ties: the earliest first
    document); -1 stays -1."""
    labels = np.asarray(labels)
    out = np.full(labels.shape, -1, dtype=np.int64)
    found = [c for c in np.unique(labels) if c != -1]
    if not found:
        return out
    sizes = {c: int((labels == c).sum()) for c in found}
    first = {c: int(np.argmax(labels == c)) for c in found}
    for new, c in enumerate(sorted(found, key=lambda c: (-sizes[c], first[c]))):
        out[labels == c] = new
    return out


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, in place (float32); a zero row stays zero."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    np.divide(vectors, np.maximum(norms, 1e-12), out=vectors)
    return vectors


def centroids(vectors: np.ndarray, labels: np.ndarray, n_topics: int) -> np.ndarray:
    """(n_topics, dim) unit vectors: the normalised mean of each topic's (normalised) members."""
    out = np.zeros((n_topics, vectors.shape[1]), dtype=np.float64)
    inside = labels >= 0
    np.add.at(out, labels[inside], vectors[inside])
    return normalise(out.astype(np.float32))


def _chunked_sims(vectors: np.ndarray, rows: np.ndarray, cents: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """(len(rows), T) cosine of vectors[rows] against every centroid, a chunk of rows at a time."""
    out = np.empty((len(rows), len(cents)), dtype=np.float32)
    for s in range(0, len(rows), chunk):
        out[s : s + chunk] = vectors[rows[s : s + chunk]] @ cents.T
    return out


def own_similarity(vectors: np.ndarray, labels: np.ndarray, cents: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """(N,) cosine of each document to its own topic's centroid (NaN for an outlier)."""
    out = np.full(len(labels), np.nan, dtype=np.float32)
    for s in range(0, len(labels), chunk):
        lab = labels[s : s + chunk]
        ok = lab >= 0
        out[s : s + chunk][ok] = np.einsum("ij,ij->i", vectors[s : s + chunk][ok], cents[lab[ok]])
    return out


@dataclass
class Reassignment:
    labels: np.ndarray  # (N,) after
    reassigned: np.ndarray  # (N,) bool: an outlier that joined a topic
    caps: np.ndarray  # (T,) the cosine distance each topic accepted
    nearest: np.ndarray  # (N,) for each outlier before, its nearest topic (-1 for the others)
    distance: np.ndarray  # (N,) its cosine distance to that topic (NaN for the others)


def reassign_outliers(vectors: np.ndarray, labels: np.ndarray, cents: np.ndarray,
                      max_distance: float | None = None) -> Reassignment:
    """Each outlier (-1) joins the topic with the nearest centroid when its cosine distance
    (1 - cosine) is within the cap: `max_distance`, or None: that topic's radius (the largest
    distance of one of its members from its centroid). vectors: (N, dim) unit rows."""
    n_topics = len(cents)
    new = labels.copy()
    nearest = np.full(len(labels), -1, dtype=np.int64)
    distance = np.full(len(labels), np.nan, dtype=np.float32)
    if max_distance is None:
        own = 1.0 - own_similarity(vectors, labels, cents)
        caps = np.zeros(n_topics, dtype=np.float32)
        np.maximum.at(caps, labels[labels >= 0], own[labels >= 0])
    else:
        caps = np.full(n_topics, max_distance, dtype=np.float32)
    out = np.flatnonzero(labels == -1)
    if n_topics == 0 or len(out) == 0:
        return Reassignment(new, np.zeros(len(labels), dtype=bool), caps, nearest, distance)
    sims = _chunked_sims(vectors, out, cents)  # (n_out, T)
    best = sims.argmax(axis=1)
    d = 1.0 - sims[np.arange(len(out)), best]
    nearest[out], distance[out] = best, d
    joins = d <= caps[best] + 1e-6  # float32 noise: a member's own distance is within its cap
    new[out[joins]] = best[joins]
    reassigned = np.zeros(len(labels), dtype=bool)
    reassigned[out[joins]] = True
    return Reassignment(new, reassigned, caps, nearest, distance)


def knn_vote(neighbours: np.ndarray, labels: np.ndarray, prob: np.ndarray,
             chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Topics of documents from their neighbours among the clustered ones. neighbours: (M, k)
    indices into labels/prob, nearest first. Each takes the label most of its k neighbours have
    (-1 included: a document among outliers stays one; ties: the label of the nearer neighbour),
    with probability = the share of neighbours voting for it x their mean membership probability
    (0 for -1). Returns ((M,) labels, (M,) probabilities)."""
    out = np.empty(len(neighbours), dtype=np.int64)
    p = np.zeros(len(neighbours), dtype=np.float32)
    for s in range(0, len(neighbours), chunk):
        nb = neighbours[s : s + chunk]
        votes = labels[nb]  # (m, k)
        counts = (votes[:, :, None] == votes[:, None, :]).sum(axis=2)  # (m, k): votes for each voter's label
        winner = counts.argmax(axis=1)  # the first voter with the most votes: ties go to the nearer
        rows = np.arange(len(nb))
        chosen = votes[rows, winner]
        mine = votes == chosen[:, None]
        share = counts[rows, winner] / votes.shape[1]
        mean_prob = (prob[nb] * mine).sum(axis=1) / mine.sum(axis=1)
        out[s : s + chunk] = chosen
        p[s : s + chunk] = np.where(chosen >= 0, share * mean_prob, 0.0)
    return out, p


def ctfidf(counts: Any) -> Any:
    """Class-based TF-IDF (Grootendorst 2022, BERTopic's ClassTfidfTransformer without options):

        W[c, t] = tf[c, t] * log(1 + A / f[t])

    counts: (C, V) term counts per class (every document of a class concatenated); tf: each
    class's counts L1-normalised (its term frequencies); f[t]: the term's count over all classes;
    A: the average number of words per class (not truncated to an integer as BERTopic does).
    Returns a (C, V) scipy CSR matrix. A term that occurs nowhere (f = 0) weighs 0."""
    import scipy.sparse as sp
    from sklearn.preprocessing import normalize

    counts = sp.csr_matrix(counts, dtype=np.float64)
    f = np.asarray(counts.sum(axis=0)).ravel()
    avg = counts.sum() / max(counts.shape[0], 1)
    with np.errstate(divide="ignore"):
        idf = np.where(f > 0, np.log1p(avg / np.where(f > 0, f, 1.0)), 0.0)
    return sp.csr_matrix(normalize(counts, norm="l1", axis=1) @ sp.diags(idf))


def top_terms(weights: Any, vocab: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
    """The k highest-weighted terms of each row (ties: alphabetical), weights > 0 only."""
    out = []
    for r in range(weights.shape[0]):
        row = weights.getrow(r)
        idx, val = row.indices, row.data
        keep = val > 0
        idx, val = idx[keep], val[keep]
        order = sorted(range(len(idx)), key=lambda i: (-val[i], vocab[idx[i]]))[:k]
        out.append([(vocab[idx[i]], float(val[i])) for i in order])
    return out


_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn CountVectorizer's default token pattern


def keyword_terms(text: str) -> list[str]:
    """The keyword terms of a (lower-cased) text: CountVectorizer's default tokens (two or more word
    characters), except that Chinese, Japanese and Korean, written without spaces, become
    overlapping character pairs (`index.search.split_unspaced`): else a whole sentence of them
    would be one term, and no keyword would ever repeat."""
    return [p for tok in _TOKEN.findall(text) for p in split_unspaced(tok)]


class TermCounter:
    """Term counts per class over batches of texts (bounded memory: one batch of texts at a time;
    the counts themselves are one sparse (classes x vocabulary) matrix, summed batch by batch; the
    vocabulary grows with the distinct terms of the input). CountVectorizer is fitted
    per batch for its analyzer (lowercase, token pattern, stop words, n-grams) and its batch
    vocabulary is mapped onto one growing vocabulary."""

    def __init__(self, n_classes: int, *, stop_words: list[str] | str | None, ngram_range: tuple[int, int]) -> None:
        self.n_classes = n_classes
        self.stop_words, self.ngram_range = stop_words, ngram_range
        self.vocab: dict[str, int] = {}
        self.total: Any = None  # (classes, len(vocab)) CSR counts so far
        self.df = np.zeros(0, dtype=np.int64)  # documents containing each term

    def add(self, texts: Sequence[str], classes: np.ndarray) -> None:
        import scipy.sparse as sp
        from sklearn.feature_extraction.text import CountVectorizer

        cv = CountVectorizer(stop_words=self.stop_words, ngram_range=self.ngram_range, tokenizer=keyword_terms, token_pattern=None)
        try:
            x = cv.fit_transform(texts)  # (B, V_batch)
        except ValueError:  # "empty vocabulary": every word of the batch is a stop word or too short
            return
        terms = cv.get_feature_names_out()
        to_global = np.fromiter((self.vocab.setdefault(t, len(self.vocab)) for t in terms), dtype=np.int64,
                                count=len(terms))
        x = sp.csr_matrix((x.data, to_global[x.indices], x.indptr), shape=(x.shape[0], len(self.vocab)))
        onehot = sp.csr_matrix((np.ones(len(classes)), (classes, np.arange(len(classes)))),
                               shape=(self.n_classes, len(classes)))
        part = sp.csr_matrix(onehot @ x, dtype=np.float64)
        if self.total is not None:  # summed as it goes: one matrix, not one per batch
            self.total.resize((self.n_classes, len(self.vocab)))
            part = part + self.total
        self.total = part
        df = np.bincount(x.indices, minlength=len(self.vocab))
        df[: len(self.df)] += self.df
        self.df = df

    def counts(self, min_df: int = 1) -> tuple[Any, list[str]]:
        """(classes x terms) counts of the terms in at least min_df documents, and those terms."""
        import scipy.sparse as sp

        total = self.total if self.total is not None else sp.csr_matrix((self.n_classes, 0), dtype=np.float64)
        keep = np.flatnonzero(self.df >= min_df)
        names = np.empty(len(self.vocab), dtype=object)
        for t, i in self.vocab.items():
            names[i] = t
        return sp.csr_matrix(total[:, keep]), [str(t) for t in names[keep]]


def diversity(keywords: Sequence[Sequence[tuple[str, float]]]) -> float:
    """Topic diversity (Dieng et al. 2020): unique terms among all topics' top keywords / terms
    listed; 1 means no topic shares a keyword with another. NaN with no keywords."""
    terms = [t for kw in keywords for t, _ in kw]
    return len(set(terms)) / len(terms) if terms else math.nan


def agreement(gold: dict[int, str], labels: np.ndarray) -> dict[str, float]:
    """NMI and ARI of the labelled documents' topics against their gold labels (outliers, -1,
    count as one group of their own); also NMI over the documents that have a topic."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    idx = np.fromiter(gold, dtype=np.int64, count=len(gold))
    want = [gold[i] for i in idx]
    got = labels[idx]
    inside = got >= 0
    return {"nmi": float(normalized_mutual_info_score(want, got)), "ari": float(adjusted_rand_score(want, got)),
            "nmi_in_topics": float(normalized_mutual_info_score([w for w, k in zip(want, inside) if k], got[inside]))
            if inside.any() else math.nan, "labelled": int(len(idx))}


__all__ = ["canonical_labels", "normalise", "centroids", "own_similarity", "Reassignment", "reassign_outliers",
           "knn_vote", "ctfidf", "top_terms", "TermCounter", "diversity", "agreement"]
