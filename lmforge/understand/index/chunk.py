"""Token-aware chunking with overlap, each chunk traced back to its source span.

A document (a text file, a piece of a large one, or a JSONL record: `data.prepare.iter_documents`)
is tokenized once with the embedding model's tokenizer; its offsets (character ranges of each
token) turn token windows back into text. A window holds at most `size` tokens and the next one
starts `overlap` tokens before the previous one ended, so a sentence cut by one boundary is whole
in the neighbouring chunk. Two refinements keep chunks readable and their citations exact:

- a window that does not reach the end of its document ends after the last token holding a line
  break within its second half (a chunk is whole lines whenever a line break is near);
- the next window starts at a line start: the first one inside the overlap, else the nearest one
  before it (up to half a window back: a longer overlap rather than a chunk that starts mid-line),
  else right after the window when it ended a line (no overlap), else mid-line `overlap` back.

Spans: for a text file, the 1-based line range of the chunk's first and last visible (non-space)
characters, and the byte range [start, end) of the whole chunk within the file. For a JSONL record, the chunk lies inside a JSON string, so its span is the
record's line and that line's bytes, plus the record's `id` when it has one.

Trade-offs: a chunk's tokens are counted in the document's tokenization; encoded alone its text
can differ by a token or two at the edges, which is why the context check (`check_size`) leaves
room for the document prefix and `Embedder.embed` truncates at the model's context anyway. A file
larger than prepare's DOC_MAX_BYTES is cut at blank lines first, so no chunk spans such a cut.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ...errors import LmforgeError


@dataclass(frozen=True)
class Chunking:
    """How documents are cut: window size and overlap, in tokens of the embedding model."""

    size: int = 256
    overlap: int = 32

    def check(self) -> None:
        if self.size < 8:
            raise LmforgeError(f"--chunk-size must be at least 8 tokens, got {self.size}")
        if not 0 <= self.overlap <= self.size // 2:
            raise LmforgeError(f"--chunk-overlap must be between 0 and half the chunk size ({self.size // 2}), "
                               f"got {self.overlap}")


def check_size(chunking: Chunking, context: int, reserved: int = 0) -> None:
    """A chunk must fit the model's context with `reserved` tokens (the document prefix) beside it."""
    chunking.check()
    if chunking.size + reserved > context:
        room = f" ({reserved} of them taken by the document prefix)" if reserved else ""
        raise LmforgeError(f"--chunk-size {chunking.size} is larger than the model's context of {context} tokens{room}; "
                           f"use --chunk-size {context - reserved} or less")


@dataclass(frozen=True)
class Piece:
    """One chunk of one document: its characters [start, end) and its token count."""

    start: int
    end: int
    tokens: int


def cut(text: str, offsets: Sequence[tuple[int, int]], chunking: Chunking) -> list[Piece]:
    """The chunks of one document, in order (chunks of nothing but whitespace are dropped), from
    its tokens' character offsets (`tokenizers`' Encoding.offsets with the model's tokenizer)."""
    n = len(offsets)
    # a token that holds a line break ends a line (byte-level BPE glues "\n" to the next line's indentation)
    closes_line = ["\n" in text[a:b] for a, b in offsets]
    pieces: list[Piece] = []
    start = 0
    while start < n:
        end = min(start + chunking.size, n)
        if end < n:  # end after the last line break in the window's second half, if any
            for i in range(end - 1, start + chunking.size // 2 - 1, -1):
                if closes_line[i]:
                    end = i + 1
                    break
        a, b = offsets[start][0], offsets[end - 1][1]
        if text[a:b].strip():
            pieces.append(Piece(a, b, end - start))
        if end == n:
            break
        start = _next_start(closes_line, start, end, chunking)
    return pieces


def _next_start(closes_line: list[bool], start: int, end: int, chunking: Chunking) -> int:
    """Where the window after [start, end) starts: the first line start within the last `overlap`
    tokens, else the nearest line start before them (at most half a window back), else `end`
    itself when the window ended a line (no overlap rather than a chunk that starts mid-line),
    else `overlap` tokens back; always after `start`."""
    nxt = max(end - chunking.overlap, start + 1)
    for i in range(nxt, end):
        if closes_line[i - 1]:
            return i
    for i in range(nxt - 1, max(start + 1, end - chunking.size // 2) - 1, -1):
        if closes_line[i - 1]:
            return i
    return end if closes_line[end - 1] else nxt


@dataclass(frozen=True)
class Span:
    """Where a chunk came from: lines [line_start, line_end] (1-based, inclusive) and bytes
    [byte_start, byte_end) of its file; `record` is a JSONL record's id."""

    line_start: int
    line_end: int
    byte_start: int
    byte_end: int
    record: str | None = None


class Lines:
    """Line numbers of byte offsets into one file, asked in increasing order: a running count,
    so a file of N records costs one pass, not N (a count from the start for each is quadratic)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.offset, self.line = data, 0, 1

    def at(self, offset: int) -> int:
        """The 1-based line holding byte `offset` (offsets must not decrease)."""
        if offset < self.offset:
            raise ValueError(f"offset {offset} before {self.offset}: ask in increasing order")
        self.line += self.data.count(b"\n", self.offset, offset)
        self.offset = offset
        return self.line


def text_spans(data: bytes, doc_offset: int, text: str, pieces: list[Piece], lines: Lines | None = None) -> Iterator[Span]:
    """Spans of the pieces of a text document that starts at byte `doc_offset` of the file `data`
    (`lines`: the file's running line count, when several documents of it are asked in order)."""
    base_line = (lines or Lines(data)).at(doc_offset)
    done_chars, done_bytes, done_lines = 0, doc_offset, base_line  # a running position: linear in the text
    for p in pieces:
        head = text[done_chars:p.start]
        done_bytes += len(head.encode("utf-8"))
        done_lines += head.count("\n")
        done_chars = p.start
        body = text[p.start:p.end]
        lead = len(body) - len(body.lstrip())  # lines are those of the first and last visible characters
        first = done_lines + body.count("\n", 0, lead)
        yield Span(first, done_lines + body.rstrip().count("\n"), done_bytes, done_bytes + len(body.encode("utf-8")))


def record_span(data: bytes, line_offset: int, record: str | None, lines: Lines | None = None) -> Span:
    """The span of every chunk of the JSONL record whose line starts at byte `line_offset`."""
    end = data.find(b"\n", line_offset)
    end = len(data) if end < 0 else end
    line = (lines or Lines(data)).at(line_offset)
    return Span(line, line, line_offset, end, record)


__all__ = ["Chunking", "check_size", "Piece", "cut", "Span", "Lines", "text_spans", "record_span"]
