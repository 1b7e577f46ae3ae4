"""The contrastive stage (train.objective: contrastive): pair sources, the InfoNCE objective, and
training through the one loop (deterministic order, exact resume, the store, the sidecar)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.pairs import PairRecords
from lmforge.errors import DataError
from lmforge.tokenizer import Tokenizer

QUERIES = [f"how do I {verb} a {noun}" for verb in ("open", "close", "sort", "parse", "copy") for noun in ("file", "list", "date", "string")]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(QUERIES * 3 + ["def f(x): return x"] * 3, vocab_size=300, min_frequency=1)


def write_pairs(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_pair_records_read_fields_prefixes_and_split(tok, tmp_path) -> None:
    recs = [{"title": q, "body": f"def f(x): return x  # {i}", "other": 1} for i, q in enumerate(QUERIES)]
    path = write_pairs(tmp_path / "p.jsonl", recs)
    fields = ("title", "body", "negative")
    train = PairRecords(path, tok, max_len=8, fields=fields, val_fraction=0.25, query_prefix="q: ")
    val = PairRecords(path, tok, max_len=8, fields=fields, val_fraction=0.25, split="val", query_prefix="q: ")
    assert train.n_samples + val.n_samples == len(QUERIES) and 0 < val.n_samples < len(QUERIES) // 2
    b = train.batch(np.array([0, 1]))
    assert set(b) == {"query", "query_lengths", "positive", "positive_lengths"}
    assert b["query"].shape == b["positive"].shape == (2, train.width(np.array([0, 1])))
    assert int(b["positive_lengths"].max()) == 8  # cut to max_len
    again = PairRecords(path, tok, max_len=8, fields=fields, val_fraction=0.25, query_prefix="q: ")
    assert again.fingerprint == train.fingerprint  # the same tokens: the same data
    assert PairRecords(path, tok, max_len=8, fields=fields, val_fraction=0.25).fingerprint != train.fingerprint
    q0 = b["query"][0, : int(b["query_lengths"][0])].tolist()
    assert q0 == tok.encode("q: " + tok.decode(q0)[3:])[:8] and tok.decode(q0).startswith("q: ")


@pytest.mark.parametrize("records, message", [
    ([{"query": "a b", "positive": "c"}, {"query": "d", "positive": "e", "negative": "f"}], "has a 'negative' field, unlike"),
    ([{"query": "a b"}], "no field 'positive'"),
    ([{"query": "a b", "positive": ""}], "field 'positive' must be a non-empty string"),
    ([["a", "b"]], "expected a JSON object"),
])
def test_bad_pair_files_name_file_and_line(tok, tmp_path, records, message) -> None:
    with pytest.raises(DataError, match=message):
        PairRecords(write_pairs(tmp_path / "p.jsonl", records), tok, max_len=16)
