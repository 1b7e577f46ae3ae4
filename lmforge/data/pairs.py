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

- Optional groups per pair record (SetFit-style pairs built from labels, understand/
  classify_tune.py): `group`, a non-negative integer or a list of them (a text's labels; `[]`
  none), the groups of the query and, unless `positive_group` gives the positive's own, of the
  positive; `negative_group`, the negative's (without it a negative is never masked). Two texts
  that share a group are never each other's in-batch negatives: the batch carries each part's
  groups as (B, K) int64 (`group`, `positive_group`, `negative_group`; K the most groups any
  record of the file has, padded with -1) and the contrastive objective masks out every column
  whose text shares a group with the row's query (its own positive aside), so two texts of one
  label are not pushed apart (multi-label: two texts sharing any label). Every record has each
  field or none; `positive_group` and `negative_group` need `group`.
- `ExampleRecords` (train.objective: classification): a JSONL file of {"text": str, "label": int}
  (single-label: a class index) or {"text": str, "label": [0/1, ...]} (multi-label: one 0/1 per
  label); its batches are {"text": (B, W), "text_lengths": (B,), "label": (B,) int64 or (B, L)
  float32}. Texts get the document prefix and are cut to `max_len`; the split is by a hash of the
  text as for pairs.

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
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ..jsonl import read_jsonl
from ..tokenizer import Tokenizer
from .order import _splitmix64

PARTS = ("query", "positive", "negative")
GROUP = "group"  # a pair record's optional groups (module docstring): the query's (and the positive's)
GROUP_FIELDS = {"query": GROUP, "positive": "positive_group", "negative": "negative_group"}  # part -> its record field
NO_GROUP = -1  # pads a record's groups to the file's widest
MIN_SPAN_DOCUMENT = 8  # tokens (its end-of-document token aside) a document needs to give two spans
SPAN_FRACTION = (0.1, 0.5)  # a span's share of its document: uniform in this range (Contriever's)


def _pad(rows: Sequence[np.ndarray], width: int) -> torch.Tensor:
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


def _padded(rows: Sequence[list[int]]) -> np.ndarray:
    """Groups per pair -> (N, K) int64, K the most any pair has (at least 1), padded with NO_GROUP."""
    out = np.full((len(rows), max(1, max(map(len, rows), default=1))), NO_GROUP, dtype=np.int64)
    for i, gs in enumerate(rows):
        out[i, : len(gs)] = gs
    return out


def _u(text: str) -> float:
    """A record's place in [0, 1), from its text: decides its split."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") / 2.0**64


@dataclass
class PairTexts:
    """The texts of a pairs file's split: parallel lists; `negative` empty when the file has none."""

    query: list[str] = field(default_factory=list)
    positive: list[str] = field(default_factory=list)
    negative: list[str] = field(default_factory=list)
    groups: dict[str, list[list[int]]] = field(default_factory=dict)  # GROUP_FIELDS name -> one list per pair;
    # only the fields the file's records carry


def _groups(where: str, name: str, value: Any) -> list[int]:
    """A record's group field -> its groups (an integer is a list of one)."""
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in items):
        raise DataError(f"{where}: field {name!r} must be a non-negative integer or a list of them (texts that share a "
                        f"group are not each other's negatives), got {value!r}")
    return sorted(set(items))


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
    seen_groups: set[str] | None = None
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
        groups = {name: _groups(where, name, rec[name]) for name in GROUP_FIELDS.values() if name in rec}
        if seen_groups is not None and set(groups) != seen_groups:
            name = sorted(set(groups) ^ seen_groups)[0]
            raise DataError(f"{where}: {'has' if name in groups else 'lacks'} a {name!r} field, unlike the records "
                            "before it; give every record the same group fields or none")
        seen_groups = set(groups)
        if groups and GROUP not in groups:
            raise DataError(f"{where}: {sorted(groups)[0]!r} without {GROUP!r}: a pair's negatives are masked by "
                            f"the groups of its query, {GROUP!r}")
        if GROUP_FIELDS["negative"] in groups and "negative" not in row:
            raise DataError(f"{where}: {GROUP_FIELDS['negative']!r} but no negative text")
        if (_u(row["query"] + "\x00" + row["positive"]) < val_fraction) != (split == "val"):
            continue
        for part, text in row.items():
            getattr(out, part).append(text)
        for name, gs in groups.items():
            out.groups.setdefault(name, []).append(gs)
    if seen_negative is None:
        raise DataError(f"data.pairs: {path} holds no pair; {what}")
    return out


class _TokenRows:
    """Samples made of token rows per part (self.rows[part][i]); the Source methods over them."""

    rows: dict[str, list[np.ndarray]]
    n_samples: int
    _fingerprint: str
    groups: dict[str, np.ndarray] = {}  # GROUP_FIELDS name -> (n_samples, K) int64 padded with NO_GROUP; {} without

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
        for name, groups in self.groups.items():
            out[name] = torch.from_numpy(groups[ids])
        return out

    def _hash(self, header: str) -> str:
        h = hashlib.sha256(header.encode())
        for part in PARTS:
            for ids in self.rows.get(part, []):
                h.update(len(ids).to_bytes(4, "little"))
                h.update(ids.tobytes())
        for name in GROUP_FIELDS.values():  # a file of one integer group per record hashes as it always did
            if name in self.groups:
                h.update((b"" if name == GROUP else name.encode()) + self.groups[name].tobytes())
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
        self.groups = {name: _padded(rows) for name, rows in texts.groups.items()}
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


class ExampleRecords(_TokenRows):
    """Labelled texts for the classification objective (module docstring): rows of the texts' tokens
    and their targets. `n_labels`: the head's label count (class indices and 0/1 rows are checked against it)."""

    def __init__(self, path: str | os.PathLike, tokenizer: Tokenizer, *, n_labels: int, max_len: int,
                 split: str = "train", val_fraction: float = 0.0, document_prefix: str = "") -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"data.examples: no such file: {self.path} (a JSONL of {{text, label}}, docs/classify.md)")
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"the examples' val fraction must be in [0, 1), got {val_fraction}")
        what = "one JSON object per line: {\"text\": str, \"label\": class index | [0/1 per label]}"
        texts: list[str] = []
        targets: list[Any] = []
        multi: bool | None = None
        for where, _, _, rec in read_jsonl(self.path, what=what):
            text, label = (rec.get("text"), rec.get("label")) if isinstance(rec, dict) else (None, None)
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where}: expected a non-empty \"text\"; {what}")
            is_multi = isinstance(label, list)
            ok = (all(v in (0, 1) and not isinstance(v, float) for v in label) and len(label) == n_labels) if is_multi \
                else isinstance(label, int) and not isinstance(label, bool) and 0 <= label < n_labels
            if not ok:
                raise DataError(f"{where}: \"label\" must be a class index in [0, {n_labels}) or {n_labels} 0/1 values, "
                                f"got {label!r}")
            if multi is not None and is_multi != multi:
                raise DataError(f"{where}: mixes single-label (an index) and multi-label (a 0/1 list) records")
            multi = is_multi
            if (_u(text) < val_fraction) != (split == "val"):
                continue
            texts.append(text)
            targets.append(label)
        if multi is None:
            raise DataError(f"data.examples: {self.path} holds no example; {what}")
        self.multi_label = multi
        self.rows = {"text": [np.asarray(ids[:max_len], dtype=np.int64)
                              for ids in tokenizer.encode_batch([document_prefix + t for t in texts])]}
        self.targets = np.asarray(targets, dtype=np.float32 if multi else np.int64).reshape(len(texts), -1 if multi else 1)
        self.n_samples = len(texts)
        self.cut = sum(len(ids) >= max_len for ids in self.rows["text"])
        h = self._hash(f"examples:{tokenizer.sha256}:{max_len}:{split}:{val_fraction}:{n_labels}:{multi}")
        self._fingerprint = hashlib.sha256((h + ":").encode() + self.targets.tobytes()).hexdigest()

    def _hash(self, header: str) -> str:
        h = hashlib.sha256(header.encode())
        for ids in self.rows["text"]:
            h.update(len(ids).to_bytes(4, "little"))
            h.update(ids.tobytes())
        return h.hexdigest()

    def batch(self, sample_ids: np.ndarray, width: int | None = None) -> dict[str, torch.Tensor]:
        out = super().batch(sample_ids, width)
        y = torch.from_numpy(self.targets[np.asarray(sample_ids, dtype=np.int64)])
        out["label"] = y if self.multi_label else y[:, 0]  # (B, L) float32 | (B,) int64
        return out


__all__ = ["PairRecords", "ExampleRecords", "DocumentSpans", "PairTexts", "read_pairs", "two_spans", "PARTS", "MIN_SPAN_DOCUMENT"]
