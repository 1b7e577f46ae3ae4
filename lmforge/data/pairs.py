"""Pairs for contrastive training (train.objective: contrastive), as data sources of the Loader.

A source here has what every source has (data/loader.py: `n_samples`, `fingerprint`,
`width(ids)`, `batch(ids, width)`), so the trainer's order, resume and sharding are the ones
pretraining has; its batches hold two or three texts per sample instead of one window:

    {"query": (B, W) int64, "query_lengths": (B,), "positive": (B, W), "positive_lengths": (B,),
     ["negative": (B, W), "negative_lengths": (B,)]}

right-padded with 0 (the contrastive objective masks padding out and trims each part of a micro
batch to its own longest row, so the common width costs no compute). `tokens(ids)` counts the
real tokens of some samples (the trainer's tokens/s).

- `PairRecords` (supervised): a JSONL file, one pair per record, two (or three) configurable fields
  (`data.pair_fields`): {"query", "positive"[, "negative"]} by default, or any two fields of each
  record (title / body, subject / description, docstring / code). Texts get the model's query /
  document prefixes and are cut to `max_len` tokens. A record without a negative when others have
  one is an error (a batch mixes them), as are empty texts. Records are split into train / val by
  a hash of their text (`val_fraction`), so a pair keeps its side when the file grows.
- `DocumentSpans` (unsupervised, for a company without labels): sample i is document i of a
  prepared dataset's split; its two views are two random spans of that document (independent
  cropping, as Contriever does: each span is 10-50 % of the document, at most `max_len` tokens),
  drawn by a hash of (seed, i), so the spans are a pure function and resume exactly. They are the
  same spans in every epoch (the source does not know the epoch); a document shorter than
  MIN_SPAN_DOCUMENT tokens gives no two useful views and is left out (counted). The prefixes are
  tokenized alone and put before each span's tokens.

Trade-off: pairs are tokenized once per source and held in memory (a few hundred bytes per pair),
which is simple and fine up to millions of pairs; the fingerprint hashes the tokens, so a changed
file, field or prefix is noticed on resume.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..jsonl import read_jsonl
from ..tokenizer import Tokenizer
from .order import _splitmix64

PARTS = ("query", "positive", "negative")
MIN_SPAN_DOCUMENT = 8  # tokens (its end-of-document token aside) a document needs to give two spans
SPAN_FRACTION = (0.1, 0.5)  # a span's share of its document: uniform in this range (Contriever's)


def _pad(rows: Sequence[np.ndarray], width: int) -> torch.Tensor:
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


def _u(text: str) -> float:
    """A record's place in [0, 1), from its text: decides its split."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") / 2.0**64


@dataclass
class PairTexts:
    """The texts of a pairs file's split: parallel lists; `negative` empty when the file has none."""

    query: list[str] = field(default_factory=list)
    positive: list[str] = field(default_factory=list)
    negative: list[str] = field(default_factory=list)


def read_pairs(path: str | os.PathLike, *, fields: Sequence[str] = PARTS, split: str = "train",
               val_fraction: float = 0.0) -> PairTexts:
    """The (query, positive[, negative]) texts of one split of a JSONL pairs file (module docstring).
    `fields` names the record fields of the parts: 2 or 3 names; a third one's field may be absent
    from every record (no hard negatives) but not from some. A bad file is a DataError naming file:line."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be train or val, got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"the pairs' val fraction must be in [0, 1), got {val_fraction}")
    if not 2 <= len(fields) <= 3:
        raise ValueError(f"fields must name 2 or 3 fields, got {list(fields)}")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.pairs: no such file: {path} (a JSONL of pairs, docs/embeddings.md)")
    q_field, p_field = fields[0], fields[1]
    out = PairTexts()
    seen_negative: bool | None = None
    what = f"one JSON object per line with {q_field!r} and {p_field!r} fields"
    for where, _, _, rec in read_jsonl(path, what=what):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}; {what}")
        row = {}
        for part, name in zip(PARTS, fields):
            if name not in rec:
                if part == "negative":
                    continue
                raise DataError(f"{where}: no field {name!r} (found: {sorted(rec)}); name the fields with data.pair_fields")
            if not isinstance(rec[name], str) or not rec[name].strip():
                raise DataError(f"{where}: field {name!r} must be a non-empty string, got {rec[name]!r}")
            row[part] = rec[name]
        if seen_negative is not None and ("negative" in row) != seen_negative:
            raise DataError(f"{where}: {'has' if 'negative' in row else 'lacks'} a {fields[2]!r} field, unlike the "
                            "records before it; give every record a negative or none")
        seen_negative = "negative" in row
        if (_u(row["query"] + "\x00" + row["positive"]) < val_fraction) != (split == "val"):
            continue
        for part, text in row.items():
            getattr(out, part).append(text)
    if seen_negative is None:
        raise DataError(f"data.pairs: {path} holds no pair; {what}")
    return out


class _TokenRows:
    """Samples made of token rows per part (self.rows[part][i]); the Source methods over them."""

    rows: dict[str, list[np.ndarray]]
    n_samples: int
    _fingerprint: str

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def has_negatives(self) -> bool:
        return "negative" in self.rows

    def width(self, sample_ids: np.ndarray) -> int:
        ids = np.asarray(sample_ids, dtype=np.int64).tolist()
        return max((len(rows[i]) for rows in self.rows.values() for i in ids), default=0)

    def tokens(self, sample_ids: np.ndarray) -> int:
        ids = np.asarray(sample_ids, dtype=np.int64).tolist()
        return sum(len(rows[i]) for rows in self.rows.values() for i in ids)

    def batch(self, sample_ids: np.ndarray, width: int | None = None) -> dict[str, torch.Tensor]:
        ids = np.asarray(sample_ids, dtype=np.int64).tolist()
        width = self.width(sample_ids) if width is None else width
        out = {}
        for part, rows in self.rows.items():
            out[part] = _pad([rows[i] for i in ids], width)
            out[f"{part}_lengths"] = torch.tensor([len(rows[i]) for i in ids], dtype=torch.int64)
        return out

    def _hash(self, header: str) -> str:
        h = hashlib.sha256(header.encode())
        for part in PARTS:
            for ids in self.rows.get(part, []):
                h.update(len(ids).to_bytes(4, "little"))
                h.update(ids.tobytes())
        return h.hexdigest()


class PairRecords(_TokenRows):
    """(query, positive[, negative]) token rows from a JSONL file (module docstring)."""

    def __init__(self, path: str | os.PathLike, tokenizer: Tokenizer, *, max_len: int, split: str = "train",
                 val_fraction: float = 0.0, fields: Sequence[str] = PARTS, query_prefix: str = "",
                 document_prefix: str = "") -> None:
        self.path = Path(path)
        texts = read_pairs(path, fields=fields, split=split, val_fraction=val_fraction)
        prefix = {"query": query_prefix, "positive": document_prefix, "negative": document_prefix}
        self.rows = {part: [np.asarray(ids[:max_len], dtype=np.int64) for ids in
                            tokenizer.encode_batch([prefix[part] + t for t in getattr(texts, part)])]
                     for part in PARTS if getattr(texts, part)}
        self.n_samples = len(texts.query)
        self.cut = sum(len(ids) >= max_len for rows in self.rows.values() for ids in rows)  # at the limit: maybe cut
        self._fingerprint = self._hash(f"pairs:{tokenizer.sha256}:{max_len}:{split}:{val_fraction}")


def _uniform(seed: int, sample: int, draw: int) -> float:
    """A number in [0, 1), a pure function of (seed, sample, draw) (splitmix64, as the order uses)."""
    return _splitmix64(_splitmix64(_splitmix64(seed & (2**64 - 1)) ^ sample) ^ draw) / 2.0**64


def two_spans(length: int, *, max_len: int, seed: int, sample: int) -> list[tuple[int, int]]:
    """Two (start, length) spans of a document of `length` tokens, each 10-50 % of it (at least 1 token,
    at most max_len), placed independently; a pure function of the arguments."""
    lo, hi = SPAN_FRACTION
    spans = []
    for view in range(2):
        a = min(max(1, int(lo * length)), max_len)
        b = min(max(a, int(hi * length)), max_len)
        n = a + int(_uniform(seed, sample, 2 * view) * (b - a + 1))
        start = int(_uniform(seed, sample, 2 * view + 1) * (length - n + 1))
        spans.append((start, n))
    return spans


class DocumentSpans(_TokenRows):
    """Two random spans of each document of a prepared dataset's split (module docstring)."""

    def __init__(self, dataset: str | os.PathLike, split: str = "train", *, max_len: int, seed: int,
                 tokenizer: Tokenizer | None = None, query_prefix: str = "", document_prefix: str = "") -> None:
        from .loader import TokenDataset

        ds = TokenDataset(dataset, split)
        self.dataset = ds
        tok = tokenizer or Tokenizer.load(ds.tokenizer_path)
        eos = ds.manifest.get("eos_id")
        starts = ds.document_starts.tolist()
        ends = starts[1:] + [ds.n_tokens]
        prefix = {part: np.asarray(tok.encode(p), dtype=np.int64) if p else np.zeros(0, dtype=np.int64)
                  for part, p in (("query", query_prefix), ("positive", document_prefix))}
        room = max_len - max(len(prefix["query"]), len(prefix["positive"]))
        if room < 1:
            raise DataError(f"data.seq_len ({max_len}) leaves no room for a span after the embed prefixes")
        self.rows = {"query": [], "positive": []}
        self.dropped = 0
        for s, e in zip(starts, ends):
            doc = np.asarray(ds.window(s, e - s), dtype=np.int64)
            if len(doc) and eos is not None and doc[-1] == eos:
                doc = doc[:-1]  # the separator prepare puts after every document is no part of its text
            if len(doc) < MIN_SPAN_DOCUMENT:
                self.dropped += 1
                continue
            i = len(self.rows["query"])
            for part, (a, n) in zip(("query", "positive"), two_spans(len(doc), max_len=room, seed=seed, sample=i)):
                self.rows[part].append(np.concatenate([prefix[part], doc[a:a + n]]))
        self.n_documents = len(starts)
        self.n_samples = len(self.rows["query"])
        self.cut = 0
        self._fingerprint = self._hash(f"spans:{ds.fingerprint}:{split}:{max_len}:{seed}")


__all__ = ["PairRecords", "DocumentSpans", "PairTexts", "read_pairs", "two_spans", "PARTS", "MIN_SPAN_DOCUMENT"]
