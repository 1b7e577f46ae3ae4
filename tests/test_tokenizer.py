"""Tokenizer: byte-level round trip, special tokens, identity (sha256), load errors, incremental decoding."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.errors import DataError
from lmforge.tokenizer import BOS, EOS, PAD, StreamDecoder, Tokenizer

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


# ---- incremental decoding ------------------------------------------------------------------


def streamed(tokenizer, ids: list[int]) -> list[str]:
    """The pieces a StreamDecoder hands out for ids, one per push, then the flush."""
    decoder = StreamDecoder(tokenizer)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_stream_decoder_holds_split_characters_back_and_equals_the_full_decode(tok: Tokenizer) -> None:
    text = "Grüße aus Köln — naïve café, 東京, emoji 😀😀 and 🦜 ǅ 𝄞 done"
    ids = tok.encode(text)
    # byte-level tokens split some characters (the parrot and the clef are not in the training text)
    split = [k for k in range(1, len(ids)) if tok.decode(ids[:k]).endswith("\ufffd")]
    assert len(split) >= 3
    pieces = streamed(tok, ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)  # never half a character
    # what is settled comes out at once: after each push, exactly the text before the unfinished character
    for k in range(1, len(ids)):
        assert "".join(pieces[:k]) == tok.decode(ids[:k]).rstrip("\ufffd")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 399), max_size=40), st.booleans())
def test_stream_decoder_equals_the_full_decode_for_any_ids(ids: list[int], flush_twice: bool) -> None:
    """Any ids: byte garbage (a lone continuation byte, a character cut short by another), special
    tokens; the pieces always add up to the full decode, and a flush starts a new stream."""
    tok = _TOK
    decoder = StreamDecoder(tok)
    half = len(ids) // 2 if flush_twice else len(ids)
    first = "".join(decoder.push(i) for i in ids[:half]) + decoder.flush()
    second = "".join(decoder.push(i) for i in ids[half:]) + decoder.flush()
    assert first == tok.decode(ids[:half]) and second == tok.decode(ids[half:])


def test_stream_decoder_decodes_a_short_window(tok: Tokenizer) -> None:
    """Each push decodes the ids since the last-but-one settled point, not the whole continuation."""
    seen: list[int] = []

    class Counting:
        def decode(self, ids: list[int]) -> str:
            seen.append(len(ids))
            return tok.decode(ids)

    ids = tok.encode("To be, or not to be, that is the question: 東京 😀 " * 20)
    assert "".join(streamed(Counting(), ids)) == tok.decode(ids)
    assert len(ids) > 300 and max(seen) <= 6


def test_stream_decoder_keeps_the_spaces_a_sentencepiece_decoder_strips_at_the_start() -> None:
    """A Metaspace decoder drops the leading space of the first token it decodes: a window
    decoded on its own would lose the space before each new word; the settled token kept in
    front of the new ones keeps it."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    hf.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"], show_progress=False))
    sp = Tokenizer(hf)
    text = "To be, or not to be, that is the question: naïve café"
    ids = sp.encode(text)
    assert sp.decode(ids) == text and sp.decode(ids[3:5]) != sp.decode(ids)[len(sp.decode(ids[:3])):len(sp.decode(ids[:5]))]
    assert "".join(streamed(sp, ids)) == text
