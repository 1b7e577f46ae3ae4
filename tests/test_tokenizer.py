"""Tokenizer: byte-level round trip, special tokens, identity (sha256), load errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.errors import DataError
from lmforge.tokenizer import BOS, EOS, PAD, Tokenizer

CORPUS = [
    "To be, or not to be, that is the question:\n",
    "def main() -> int:\n    return 0\n",
    "Grüße aus Köln — naïve café, 東京, emoji 😀\n",
] * 20


_TOK = Tokenizer.train(CORPUS, vocab_size=400)  # trained once: module level so hypothesis can use it


@pytest.fixture
def tok() -> Tokenizer:
    return _TOK


def test_special_tokens_get_the_first_ids(tok: Tokenizer) -> None:
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.hf.id_to_token(1) == EOS
    assert tok.vocab_size == tok.hf.get_vocab_size(with_added_tokens=True) <= 400


def test_training_learns_merges(tok: Tokenizer) -> None:
    # a frequent word is fewer tokens than its bytes once BPE has merged it
    assert len(tok.encode("question")) < len("question")


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_text(text: str) -> None:
    tok = _TOK
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # byte-level: the token byte lengths add up to the UTF-8 length (used to trace byte offsets)
    assert int(tok.token_nbytes()[ids].sum()) == len(text.encode("utf-8"))


def test_text_never_produces_special_tokens(tok: Tokenizer) -> None:
    text = f"a {BOS} b {EOS} c {PAD}"
    ids = tok.encode(text)
    assert not {tok.bos_id, tok.eos_id, tok.pad_id} & set(ids)
    assert tok.decode(ids) == text
    # placed by code, a special token decodes to its marker
    assert tok.decode([*tok.encode("x"), tok.eos_id]) == f"x{EOS}"


def test_encode_batch_equals_encode(tok: Tokenizer) -> None:
    texts = ["hello", "", "naïve café\n\n", "x" * 1000]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_save_load_keeps_identity(tok: Tokenizer, tmp_path) -> None:
    path = tok.save(tmp_path)  # a directory: writes tokenizer.json inside
    assert path == tmp_path / "tokenizer.json"
    again = Tokenizer.load(tmp_path)
    assert again.sha256 == tok.sha256
    assert again.encode("To be, or not") == tok.encode("To be, or not")
    # the hash is of canonical JSON: re-indenting the file does not change it
    (tmp_path / "compact.json").write_text(json.dumps(json.loads(path.read_text())))
    assert Tokenizer.load(tmp_path / "compact.json").sha256 == tok.sha256
    # ... but a different vocabulary does
    assert Tokenizer.train(CORPUS, vocab_size=300).sha256 != tok.sha256
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary behind


def test_load_errors_name_the_path(tmp_path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "nope.json")):
        Tokenizer.load(tmp_path / "nope.json")
    with pytest.raises(DataError, match=r"tokenizer.json"):
        Tokenizer.load(tmp_path)  # a directory without tokenizer.json
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json: .*bad.json"):
        Tokenizer.load(bad)


def test_train_rejects_too_small_vocab_and_missing_specials() -> None:
    with pytest.raises(DataError, match="at least 259"):
        Tokenizer.train(CORPUS, vocab_size=100)
    with pytest.raises(DataError, match=r"<\|pad\|>"):
        Tokenizer.train(CORPUS, vocab_size=300, special_tokens=[BOS, EOS])
