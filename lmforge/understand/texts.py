"""Texts to embed, read from the files a user names: what one text is, and its id.

The rule (docs/embeddings.md):
- a `.jsonl` file: one text per record, from `text_field` (default "text"); its id is the record's
  `id_field` (default "id") when present, else `FILE:LINE`;
- any other file named on the command line: one text per non-blank line; id `FILE:LINE`;
- a directory: walked recursively in sorted order (hidden entries skipped, `prepare`'s walk); each
  file in it is ONE text (a document), id = its path; `.jsonl` files in it are read as JSONL.
Lines are split on "\\n" (a trailing "\\r" is dropped), numbered from 1. Blank lines and empty texts
are skipped and counted. A file that is not UTF-8 is skipped and counted, or refused with
strict=True, as `lmforge prepare` does. No text at all is a DataError.

`iter_texts` streams: a line-based file is read one line at a time (a non-UTF-8 file is first
found by an incremental decode in 1 MiB blocks, so it is skipped whole, as before, without being
held in memory), so a 1 GB file costs one line of memory; a file inside a directory is one
document and is read whole. `read_texts` collects the stream into lists (every text in memory:
fine up to millions of short texts; `lmforge topics` reads the stream twice instead).
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from ..data.prepare import collect_sources
from ..errors import DataError
from ..jsonl import iter_jsonl, record_text

_BLOCK = 1 << 20  # bytes per read of the UTF-8 check


@dataclass
class Texts:
    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    files: int = 0  # files read
    not_utf8: list[str] = field(default_factory=list)  # files skipped
    empty: int = 0  # blank lines, empty texts and empty files skipped


@dataclass(frozen=True)
class Text:
    id: str
    text: str
    record: dict[str, Any] | None  # the JSONL record it came from (its other fields); None for a line or a file
    where: str  # FILE:LINE of a line or record, the path of a whole file


def read_texts(inputs: Sequence[str | os.PathLike], *, text_field: str = "text", id_field: str = "id",
               strict: bool = False) -> Texts:
    """The texts of files and directories (see the module docstring), in input order."""
    out = Texts()
    for t in iter_texts(inputs, text_field=text_field, id_field=id_field, strict=strict, counts=out):
        out.ids.append(t.id)
        out.texts.append(t.text)
    return out


def iter_texts(inputs: Sequence[str | os.PathLike], *, text_field: str = "text", id_field: str = "id",
               strict: bool = False, counts: Texts | None = None) -> Iterator[Text]:
    """The texts of files and directories, streamed in input order; what was read and skipped is
    counted into `counts` (its ids and texts lists are left alone). No text at all: a DataError
    (raised when the stream ends)."""
    out = counts if counts is not None else Texts()
    if not inputs:
        raise DataError("no inputs given: pass text files (one text per line), .jsonl files or directories")
    found = 0
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise DataError(f"input not found: {p}")
        whole = p.is_dir()
        sources = collect_sources([p]) if whole else [None]
        for src in sources:
            path = src.path if src is not None else p
            shown = str(p / path.relative_to(p.resolve())) if whole else str(p)
            bad = _not_utf8(path)
            if bad is not None:
                if strict:
                    raise DataError(f"{shown}: not UTF-8 (byte {bad}) (--strict: every input must be UTF-8 text)")
                out.not_utf8.append(shown)
                continue
            out.files += 1
            if path.name.lower().endswith(".jsonl"):
                items = _jsonl(path, shown, text_field, id_field)
            elif whole:
                items = iter([Text(shown, _read(path).decode("utf-8"), None, shown)])
            else:
                items = _lines(path, shown)
            for t in items:
                if t.text.strip():
                    found += 1
                    yield t
                else:
                    out.empty += 1
    if not found:
        what = f"; skipped {len(out.not_utf8)} file(s) that are not UTF-8" if out.not_utf8 else ""
        raise DataError(f"no text to embed in {', '.join(map(str, inputs))} ({out.empty} empty line(s) or text(s){what})")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _open(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")  # noqa: SIM115 - closed by the caller's with
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def _not_utf8(path: Path) -> int | None:
    """The offset of the first byte that is not UTF-8, or None for a UTF-8 file (read in blocks)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with _open(path) as f:
        while True:
            block = f.read(_BLOCK)
            pending = len(decoder.getstate()[0])  # the bytes of a character cut by the last block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:  # e.start counts from the pending bytes
                return offset - pending + e.start
            if not block:
                return None
            offset += len(block)


def _lines(path: Path, shown: str) -> Iterator[Text]:
    """One text per line (split on "\\n", a trailing "\\r" dropped); an empty file is one empty line."""
    n = 0
    with _open(path) as f:
        for n, raw in enumerate(f, 1):  # noqa: B007 - n counts the lines after the loop
            line = raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
            yield Text(f"{shown}:{n}", line, None, f"{shown}:{n}")
    if n == 0:
        yield Text(f"{shown}:1", "", None, f"{shown}:1")


def _jsonl(path: Path, shown: str, text_field: str, id_field: str) -> Iterator[Text]:
    with _open(path) as f:
        for where, _, _, record in iter_jsonl(f, shown, what=f"one JSON object per line with a {text_field!r} field"):
            text = record_text(record, text_field, where)
            ident = record.get(id_field, where)
            if not isinstance(ident, (str, int)) or isinstance(ident, bool):
                raise DataError(f"{where}: field {id_field!r} must be a string or an integer, got {ident!r}")
            yield Text(str(ident), text, record, where)


__all__ = ["Texts", "Text", "read_texts", "iter_texts"]
