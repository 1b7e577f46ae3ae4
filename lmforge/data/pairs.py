"""Pairs for contrastive training (train.objective: contrastive), as data sources of the Loader.

A source here has what every source has (data/loader.py: `n_samples`, `fingerprint`,
`width(ids)`, `batch(ids, width)`), so the trainer's order, resume and sharding are the ones
pretraining has; its batches hold two or three texts per sample instead of one window:

    {"query": (B, W) int64, "query_lengths": (B,), "positive": (B, W), "positive_lengths": (B,),
     ["negative": (B, W), "negative_lengths": (B,)]}

right-padded with 0 (the contrastive objective masks padding out and trims each part of a micro
batch to its own longest row, so the common width costs no compute).

- `PairRecords` (supervised): a JSONL file, one pair per record, two (or three) configurable fields:
  {"query", "positive"[, "negative"]} by default, or any two fields of each record (title / body,
  subject / description, docstring / code). Texts get the model's query / document prefixes and
  are cut to `max_len` tokens. A record without a negative when others have one is an error (a
  batch mixes them), as are empty texts. Records are split into train / val by a hash of their
  text (`val_fraction`), so a pair keeps its side when the file grows.
- `DocumentSpans` (unsupervised, for a company without labels): sample i is document i of a
  prepared dataset's split; its two views are two random spans of that document (independent
  cropping, as Contriever does), a pure function of (seed, i, epoch-free), so the order and the
  spans are reproducible and resume exactly.

Trade-off: pairs are tokenized once and held in memory (a few hundred bytes per pair), which is
simple and fine up to millions of pairs; the fingerprint hashes the tokens, so a changed file or
field or prefix is noticed on resume.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..jsonl import read_jsonl
from ..tokenizer import Tokenizer

PARTS = ("query", "positive", "negative")


def _pad(rows: Sequence[np.ndarray], width: int) -> torch.Tensor:
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


def _u(text: str) -> float:
    """A record's place in [0, 1), from its text: decides its split."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") / 2.0**64


class PairRecords:
    """(query, positive[, negative]) token rows from a JSONL file (module docstring)."""

    def __init__(self, path: str | os.PathLike, tokenizer: Tokenizer, *, max_len: int, split: str = "train",
                 val_fraction: float = 0.0, fields: Sequence[str] = PARTS, query_prefix: str = "",
                 document_prefix: str = "") -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be train or val, got {split!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"the pairs' val fraction must be in [0, 1), got {val_fraction}")
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"data.pairs: no such file: {self.path} (a JSONL of pairs, docs/embeddings.md)")
        q_field, p_field, n_field = fields
        texts: dict[str, list[str]] = {"query": [], "positive": [], "negative": []}
        what = f"one JSON object per line with {q_field!r} and {p_field!r} fields"
        for where, _, _, rec in read_jsonl(self.path, what=what):
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}; {what}")
            row = {}
            for part, name in zip(PARTS, fields):
                if name not in rec:
                    if part == "negative":
                        continue
                    raise DataError(f"{where}: no field {name!r} (found: {sorted(rec)}); set data.{part}_field")
                if not isinstance(rec[name], str) or not rec[name].strip():
                    raise DataError(f"{where}: field {name!r} must be a non-empty string, got {rec[name]!r}")
                row[part] = rec[name]
            if texts["query"] and ("negative" in row) != bool(texts["negative"]):
                raise DataError(f"{where}: {'has' if 'negative' in row else 'lacks'} a {n_field!r} field, unlike the "
                                "records before it; give every record a negative or none")
            if (_u(row["query"] + "\x00" + row["positive"]) < val_fraction) != (split == "val"):
                continue
            for part, text in row.items():
                texts[part].append(text)
        self.has_negatives = bool(texts["negative"])
        prefix = {"query": query_prefix, "positive": document_prefix, "negative": document_prefix}
        self.rows = {part: [np.asarray(ids[:max_len], dtype=np.int64) for ids in
                            tokenizer.encode_batch([prefix[part] + t for t in texts[part]])]
                     for part in PARTS if texts[part]}
        self.n_samples = len(texts["query"])
        self.cut = sum(len(ids) >= max_len for rows in self.rows.values() for ids in rows)  # at the limit: maybe cut
        h = hashlib.sha256(f"pairs:{tokenizer.sha256}:{max_len}:{split}:{val_fraction}".encode())
        for part in PARTS:
            for ids in self.rows.get(part, []):
                h.update(len(ids).to_bytes(4, "little"))
                h.update(ids.tobytes())
        self._fingerprint = h.hexdigest()

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def width(self, sample_ids: np.ndarray) -> int:
        ids = np.asarray(sample_ids, dtype=np.int64).tolist()
        return max((len(rows[i]) for rows in self.rows.values() for i in ids), default=0)

    def batch(self, sample_ids: np.ndarray, width: int | None = None) -> dict[str, torch.Tensor]:
        ids = np.asarray(sample_ids, dtype=np.int64).tolist()
        width = self.width(sample_ids) if width is None else width
        out = {}
        for part, rows in self.rows.items():
            out[part] = _pad([rows[i] for i in ids], width)
            out[f"{part}_lengths"] = torch.tensor([len(rows[i]) for i in ids], dtype=torch.int64)
        return out


__all__ = ["PairRecords", "PARTS"]
