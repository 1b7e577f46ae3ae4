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

Trade-off: every text is held in memory (the vectors are too); fine up to millions of short texts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..data.prepare import collect_sources
from ..errors import DataError
from ..jsonl import parse_jsonl


@dataclass
class Texts:
    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    files: int = 0  # files read
    not_utf8: list[str] = field(default_factory=list)  # files skipped
    empty: int = 0  # blank lines, empty texts and empty files skipped


def read_texts(inputs: Sequence[str | os.PathLike], *, text_field: str = "text", id_field: str = "id",
               strict: bool = False) -> Texts:
    """The texts of files and directories (see the module docstring), in input order."""
    out = Texts()
    if not inputs:
        raise DataError("no inputs given: pass text files (one text per line), .jsonl files or directories")
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise DataError(f"input not found: {p}")
        whole = p.is_dir()
        sources = collect_sources([p]) if whole else [None]
        for src in sources:
            path = src.path if src is not None else p
            shown = str(p / path.relative_to(p.resolve())) if whole else str(p)
            try:
                data = path.read_bytes()
            except OSError as e:
                raise DataError(f"cannot read {path}: {e.strerror or e}") from None
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                if strict:
                    raise DataError(f"{shown}: not UTF-8 (byte {e.start}) (--strict: every input must be UTF-8 text)") from None
                out.not_utf8.append(shown)
                continue
            out.files += 1
            if path.name.lower().endswith(".jsonl"):
                _jsonl(data, shown, text_field, id_field, out)
            elif whole:
                _add(out, shown, text)
            else:
                for n, line in enumerate(text.removesuffix("\n").split("\n"), 1):
                    _add(out, f"{shown}:{n}", line.removesuffix("\r"))
    if not out.texts:
        what = f"; skipped {len(out.not_utf8)} file(s) that are not UTF-8" if out.not_utf8 else ""
        raise DataError(f"no text to embed in {', '.join(map(str, inputs))} ({out.empty} empty line(s) or text(s){what})")
    return out


def _add(out: Texts, ident: str, text: str) -> None:
    if text.strip():
        out.ids.append(ident)
        out.texts.append(text)
    else:
        out.empty += 1


def _jsonl(data: bytes, shown: str, text_field: str, id_field: str, out: Texts) -> None:
    for where, _, _, record in parse_jsonl(data, shown, what=f"one JSON object per line with a {text_field!r} field"):
        if not isinstance(record, dict) or text_field not in record:
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{where}: no field {text_field!r} (found: {found}); choose the field with --text-field")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{where}: field {text_field!r} is {type(text).__name__}, expected a string")
        ident = record.get(id_field, where)
        if not isinstance(ident, (str, int)) or isinstance(ident, bool):
            raise DataError(f"{where}: field {id_field!r} must be a string or an integer, got {ident!r}")
        _add(out, str(ident), text)


__all__ = ["Texts", "read_texts"]
