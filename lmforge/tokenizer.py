"""The tokenizer: a thin wrapper around a Hugging Face `tokenizers.Tokenizer` (byte-level BPE).

Design:
- The on-disk format is the HF `tokenizer.json`, so a tokenizer trained here loads unchanged in
  `transformers` / `tokenizers` elsewhere, and one trained elsewhere can be reused here
  (`lmforge prepare --tokenizer path/to/tokenizer.json`).
- Byte-level BPE (ByteLevel pre-tokenizer and decoder, no normalizer, no prefix space): every
  UTF-8 string maps to bytes and back, so `decode(encode(text)) == text` for any text.
- `encode` never adds special tokens, and text that happens to contain `<|eos|>` is encoded as
  plain text (`encode_special_tokens = True`): a document can never smuggle a control token into
  the token stream. Control tokens are placed by code (prepare appends `eos_id` after each
  document), never by text. The one exception is a chat template: `encode_template` reads the
  control tokens the template itself writes (`<|im_start|>`), while the messages stay plain text.
- A model directory's recorded facts (tokenizer_config.json: eos_token, chat_template) are applied
  with `use_model_facts`: an instruct model's recorded EOS (`<|im_end|>`, its end of turn) then
  also ends generation (`end_ids`), while `eos_id` stays the document separator prepare uses.
- `sha256` hashes the canonical JSON (keys sorted, no whitespace), so re-saving a tokenizer with a
  different indentation does not change its identity; the dataset manifest records this hash.

- `StreamDecoder` turns a growing list of generated ids into text as it settles (for `lmforge
  sample` and the server's streams): a byte-level token can end inside a UTF-8 character, whose
  text is held back until its remaining bytes arrive. It decodes a short window, the tokens since
  the last-but-one settled point, so a token costs O(1) instead of re-decoding the whole
  continuation; its output joined equals `decode` of all the ids.

Trade-off: training uses the HF trainer in memory (it holds word counts, not the corpus), which is
fast and fine for corpora up to many GB; sentencepiece-style unigram models are not offered.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Protocol
from collections.abc import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .config import VOCAB_SIZE
from .errors import DataError
from .util import atomic_write_text, sha256_bytes

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
DEFAULT_SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, PAD)

TOKENIZER_FILE = "tokenizer.json"
# Imported tokenizers (lmforge import) name their control tokens their own way; ours come first.
# EOS is the document separator prepare places between documents, as in the model's pretraining.
BOS_NAMES: tuple[str, ...] = (BOS, "<|begin_of_text|>", "<s>", "<bos>")
EOS_NAMES: tuple[str, ...] = (EOS, "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


def _first_id(hf: HFTokenizer, names: Sequence[str]) -> int | None:
    return next((i for i in (hf.token_to_id(n) for n in names) if i is not None), None)


class Tokenizer:
    """A byte-level BPE tokenizer; `.hf` is the underlying `tokenizers.Tokenizer`."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        # Text is always text: "<|eos|>" written inside a document is encoded as its bytes.
        self.hf.encode_special_tokens = True
        self.bos_id: int | None = _first_id(hf, BOS_NAMES)
        self.eos_id: int | None = _first_id(hf, EOS_NAMES)
        self.pad_id: int | None = hf.token_to_id(PAD)
        self.end_ids: tuple[int, ...] = () if self.eos_id is None else (self.eos_id,)  # ids that end generation
        self.chat_template: str | None = None  # a model directory's recorded template (use_model_facts)
        self._token_nbytes: np.ndarray | None = None

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Load a tokenizer.json file, or a directory holding one."""
        p = Path(path)
        if p.is_dir():
            p = p / TOKENIZER_FILE
        if not p.is_file():
            raise DataError(f"tokenizer not found: {p} (expected a tokenizer.json file or a directory holding one)")
        try:
            hf = HFTokenizer.from_file(str(p))
        except Exception as e:  # the Rust side raises plain Exception with a parse message
            raise DataError(f"not a valid tokenizer.json: {p} ({e})") from None
        return cls(hf)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
        min_frequency: int = 2,
    ) -> "Tokenizer":
        """Train a byte-level BPE on `texts`; special tokens get the first ids (0, 1, 2, ...)."""
        special_tokens = check_training(vocab_size, special_tokens)
        alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 byte symbols
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=special_tokens,
            initial_alphabet=alphabet,
            show_progress=False,  # prepare shows its own rich progress over the bytes read
        )
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    # ---- use ---------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts in parallel (the Rust side uses RAYON_NUM_THREADS threads)."""
        # encode_batch_fast skips computing character offsets, which we never use.
        encodings = self.hf.encode_batch_fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def encode_template(self, parts: Sequence[tuple[str, bool]]) -> list[int]:
        """Encode a rendered chat template: parts are (text, written_by_the_template).

        In template text, the special tokens' strings (`<|im_start|>`) become their ids; all other
        text, and every message (written_by_the_template False), is plain text, so a message cannot
        smuggle a control token. Plain pieces that meet are joined before encoding, and the HF
        tokenizer splits its input at special tokens before anything else, so for messages free of
        special-token strings this equals encoding the whole rendered string with special tokens
        parsed (what `transformers`' apply_chat_template(tokenize=True) does).
        """
        return self.encode_template_spans(parts)[0]

    def encode_template_spans(self, parts: Sequence[tuple[str, bool]]) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode_template`'s ids, and for each id the [start, end) characters of the joined parts'
        text it stands for (how SFT data finds the tokens of an assistant turn: data/sft.py)."""
        special = {t.content: i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
        pattern = re.compile("|".join(re.escape(t) for t in sorted(special, key=len, reverse=True))) if special else None
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        plain: list[str] = []
        at = 0  # characters of the joined text before `plain`

        def flush() -> None:
            nonlocal at
            text = "".join(plain)
            if text:
                enc = self.hf.encode(text, add_special_tokens=False)
                ids.extend(enc.ids)
                spans.extend((at + a, at + b) for a, b in enc.offsets)
                at += len(text)
            plain.clear()

        for text, is_template in parts:
            if not is_template or pattern is None:
                plain.append(text)
                continue
            pos = 0
            for m in pattern.finditer(text):
                plain.append(text[pos:m.start()])
                flush()
                ids.append(special[m.group()])
                spans.append((at, at + len(m.group())))
                at += len(m.group())
                pos = m.end()
            plain.append(text[pos:])
        flush()
        return ids, spans

    def use_model_facts(self, facts: dict) -> None:
        """Apply a model's recorded tokenizer facts (tokenizer_config.json's keys): its chat
        template, and its eos_token as a further end of generation (an instruct model's end of
        turn; `eos_id`, the document separator, is unchanged)."""
        if isinstance(facts.get("chat_template"), str):
            self.chat_template = facts["chat_template"]
        eos = facts.get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos  # transformers' serialized AddedToken
        i = self.hf.token_to_id(eos) if isinstance(eos, str) else None
        if i is not None and i not in self.end_ids:
            self.end_ids = (*self.end_ids, i)

    def decode(self, ids: Iterable[int]) -> str:
        # Special tokens are shown (an <|eos|> between documents is information when inspecting).
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_nbytes(self) -> np.ndarray:
        """(vocab_size,) int64: bytes of source text each token stands for (0 for special tokens).

        Byte-level BPE maps each byte to one symbol, so a token's byte length is its string
        length. Used to trace a token position back to a byte offset in its source file.
        """
        if self._token_nbytes is None:
            n = np.zeros(self.vocab_size, dtype=np.int64)
            special = {t.content for t in self.hf.get_added_tokens_decoder().values()}
            for token, i in self.hf.get_vocab(with_added_tokens=True).items():
                n[i] = 0 if token in special else len(token)
            self._token_nbytes = n
        return self._token_nbytes

    # ---- identity and storage ----------------------------------------------------------------

    def canonical_json(self) -> str:
        return json.dumps(json.loads(self.hf.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False)

    @property
    def sha256(self) -> str:
        return sha256_bytes(self.canonical_json().encode("utf-8"))

    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json atomically (`path` is the file, or a directory to hold it)."""
        p = Path(path)
        if p.is_dir():
            p = p / TOKENIZER_FILE
        atomic_write_text(p, self.hf.to_str(pretty=True))
        return p

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"


def check_training(vocab_size: int, special_tokens: Sequence[str]) -> list[str]:
    """The special tokens of a tokenizer to train (in order, without duplicates), or DataError when
    they lack BOS/EOS/PAD or vocab_size is outside 256 bytes + the special tokens .. MAX_VOCAB_SIZE
    (checked before any text is read: `prepare` trains after a pass over the corpus)."""
    special = list(dict.fromkeys(special_tokens))  # keep order, drop duplicates
    for required in (BOS, EOS, PAD):
        if required not in special:
            raise DataError(f"special tokens must include {required!r}; got {special}")
    minimum = 256 + len(special)
    if vocab_size < minimum:
        raise DataError(
            f"vocab size {vocab_size} is too small: a byte-level BPE needs at least "
            f"{minimum} (256 bytes + {len(special)} special tokens)"
        )
    VOCAB_SIZE.check("--vocab-size", vocab_size)
    return special


def lone_surrogate(text: str) -> int | None:
    """The index of the first lone UTF-16 surrogate in text (U+D800..U+DFFF: what a JSON "\\ud800"
    escape or a non-UTF-8 byte in argv becomes in Python), or None. Such a string is not Unicode
    text: it has no UTF-8 form, so no tokenizer can encode it."""
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


# ---- incremental decoding ------------------------------------------------------------------


class Decodes(Protocol):
    def decode(self, ids: list[int]) -> str: ...


class StreamDecoder:
    """Text of a growing token list, handed out as it settles: `push(id)` returns the new text that
    is final, `flush()` the rest (ending the stream). Joined, the returned pieces equal
    `tokenizer.decode(every id pushed)`.

    Settled means: no trailing U+FFFD (a byte-level token that ends inside a UTF-8 character
    decodes to U+FFFD until its remaining bytes arrive; text before it is returned at once).

    Only a window is decoded: the ids since the settled point before the last one. The window
    starts where decoding splits cleanly (after a whole character), so its text is a suffix of
    the full decode, and one settled token of context in front of the new ones keeps decoders
    that treat the start of a text specially (SentencePiece's Strip of a leading space) from
    changing the new text: `shown` counts the window's characters already returned.
    """

    def __init__(self, tokenizer: Decodes) -> None:
        self.tokenizer = tokenizer
        self.window: list[int] = []  # the ids being decoded: context, then ids not yet settled
        self.context = 0  # window[:context] settled before the last settled point
        self.shown = 0  # characters of decode(window) already returned

    def push(self, token_id: int) -> str:
        """Add one id; return the text it settles (may be "")."""
        self.window.append(token_id)
        return self._settle(final=False)

    def flush(self) -> str:
        """The held-back rest (an unfinished character decodes to U+FFFD); starts a new stream."""
        text = self._settle(final=True)
        self.window, self.context, self.shown = [], 0, 0
        return text

    def _settle(self, *, final: bool) -> str:
        text = self.tokenizer.decode(self.window)
        end = len(text) if final or not text.endswith("\ufffd") else len(text.rstrip("\ufffd"))
        new = text[self.shown : end]
        self.shown = max(self.shown, end)
        if end == len(text):  # settled after the last id: the window may move up to the previous point
            if self.context:
                self.window = self.window[self.context :]
                self.shown = len(self.tokenizer.decode(self.window))
            self.context = len(self.window)
        return new
