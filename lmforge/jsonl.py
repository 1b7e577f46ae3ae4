"""JSON lines: one reader with file:line errors, and one rule for NaN and infinity in records.

The rule. JSON has no NaN or infinity. Python's `json` writes them as bare `NaN` / `Infinity`,
which browsers, jq and most other parsers reject, and `null` would lose the difference between
"no value" and "diverged". So every JSON record lmforge writes -- metrics.jsonl, events.jsonl,
eval-results.jsonl, `eval --json`, `plan --json`, `runs --json`, the dashboard's API, `--progress
json` lines and the event data in the experiment store -- writes a non-finite float as the
*string* "nan", "inf" or "-inf" (`dumps_record`, `append_jsonl`). A reader turns them back into
floats where it expects a number (`as_number` for one field, `restore_numbers` for a record of
numbers); `None` stays `null` and means "no value". `dumps_record` passes `allow_nan=False` to
`json`, so a non-finite float that slipped past the rule is an error here, never invalid JSON.

Two readers, for two kinds of file:
- `read_jsonl(path, what=...)` / `parse_jsonl(data, source, what=...)` read a file a person wrote
  (a `prepare` corpus, an eval task file): every non-blank line must be JSON, and the first one
  that is not stops the read with a `DataError` naming `file:line`, the column and what each line
  should hold. Lines are split on b"\\n" (and "\\r\\n"), never on the other characters
  `str.splitlines` breaks at, which JSON allows raw inside strings; each line carries its byte
  offset, so a document can be traced back to where it starts.
  A string holding a lone UTF-16 surrogate (a `"\\ud800"` escape without its pair: valid JSON, not
  Unicode text, so no tokenizer, file or database can take it) stops the read the same way, naming
  where in the record it is, for every reader of such files at once (issue 21.1's surrogate, in files).
- `read_records(path)` reads a file lmforge appends to while a process may be killed mid-line:
  a line that does not parse (the torn last line of a kill) or is not an object is skipped.

`append_jsonl` writes one record as one line with one write call, flushed (and fsynced on request),
after ending a line a kill left without its newline, so a record is never glued onto a torn one.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple
from collections.abc import Iterable, Iterator

from .errors import DataError

# The rule's three strings, and the floats they stand for.
NON_FINITE: dict[str, float] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


# ---- writing ---------------------------------------------------------------------------------


def to_record(obj: Any) -> Any:
    """`obj` with every non-finite float (in dicts, lists and tuples, at any depth) replaced by
    "nan", "inf" or "-inf"; everything else as it was."""
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: to_record(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_record(v) for v in obj]
    return obj


def dumps_record(obj: Any, **kwargs: Any) -> str:
    """`json.dumps` under the rule (keyword arguments pass through: indent, default, ...)."""
    return json.dumps(to_record(obj), allow_nan=False, **kwargs)


def append_jsonl(path: str | os.PathLike, record: dict[str, Any], *, fsync: bool = False) -> None:
    """Append `record` as one line (one write, flushed; fsynced when `fsync`)."""
    line = dumps_record(record) + "\n"
    with open(path, "a+b") as f:  # a+: appends go to the end, and the last byte can be read
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # a kill mid-append left a torn line: end it first
                line = "\n" + line
        f.write(line.encode("utf-8"))
        f.flush()
        if fsync:
            os.fsync(f.fileno())


# ---- reading numbers back ----------------------------------------------------------------------


def as_number(value: Any) -> float | None:
    """A numeric field as written under the rule -> float ("nan" -> NaN, ...); None when the
    value is missing or not a number (a bool is not a number here)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return NON_FINITE.get(value)
    return None


def restore_numbers(obj: Any) -> Any:
    """`obj` with the rule's strings turned back into floats at any depth: for records whose
    string values can only be numbers (an evaluation's metrics)."""
    if isinstance(obj, str):
        return NON_FINITE.get(obj, obj)
    if isinstance(obj, dict):
        return {k: restore_numbers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [restore_numbers(v) for v in obj]
    return obj


# ---- reading files -----------------------------------------------------------------------------


class JsonLine(NamedTuple):
    where: str  # "path:line", how every message about this line starts
    line: int  # 1-based line number
    offset: int  # byte offset of the line's start in the file
    value: Any  # the parsed JSON value


def parse_jsonl(data: bytes, source: str | os.PathLike, *, what: str) -> Iterator[JsonLine]:
    """The JSON values of `data` (the bytes of `source`), one per non-blank line.

    Raises DataError "SOURCE:LINE: invalid JSON (MESSAGE at column C); expected WHAT" at the
    first line that does not parse (the lines before it have been yielded).
    """
    return iter_jsonl(data.split(b"\n"), source, what=what)


def iter_jsonl(lines: Iterable[bytes], source: str | os.PathLike, *, what: str) -> Iterator[JsonLine]:
    """`parse_jsonl` over lines that arrive one at a time (a file object opened "rb" iterates on
    b"\\n": a file of any size is read with one line in memory); each line with or without its
    b"\\n". Same values, same errors."""
    offset = 0
    for number, raw in enumerate(lines, start=1):
        start, offset = offset, offset + len(raw) + (0 if raw.endswith(b"\n") else 1)
        if not raw.strip():
            continue
        where = f"{source}:{number}"
        try:
            value = json.loads(raw)
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 (byte {e.start} of the line); expected {what}") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); expected {what}") from None
        except RecursionError:  # json's parser recurses per level: 100,000 nested [ exhaust the stack
            raise DataError(f"{where}: JSON nested too deeply (more than Python's recursion limit of "
                            f"{sys.getrecursionlimit()} levels); expected {what}") from None
        if _MAY_HOLD_SURROGATE.search(raw) and (path := _lone_surrogate_at(value)) is not None:
            raise DataError(f"{where}: the string at {path} holds a lone UTF-16 surrogate (a \\ud800-style escape "
                            f"without its pair): not Unicode text; fix or remove that line")
        yield JsonLine(where, number, start, value)


# A lone surrogate reaches a parsed string from a "\\udXXX" escape or from the UTF-8-like bytes ED A0..BF
# (json decodes bytes with "surrogatepass"); only lines holding either are walked.
_MAY_HOLD_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def _lone_surrogate_at(value: Any) -> str | None:
    """Where in a parsed JSON value (e.g. `$.messages[1].content`) the first string holding a lone
    UTF-16 surrogate is, keys included; None when there is none. Iterative: any depth json parsed.
    The path shows such a key with backslash escapes, so the message itself stays printable."""
    stack: list[tuple[str, Any]] = [("$", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    return path
        elif isinstance(v, dict):
            for k, item in v.items():
                shown = f"{path}.{k.encode('utf-8', 'backslashreplace').decode('utf-8')}"
                stack += [(shown, item), (f"{shown} (its key)", k)]
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(v))
    return None


def read_jsonl(path: str | os.PathLike, *, what: str) -> Iterator[JsonLine]:
    """`parse_jsonl` of a file; a file that cannot be read is a DataError naming it."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    return parse_jsonl(data, path, what=what)


def record_text(record: Any, field: str, where: str) -> str:
    """The text in `field` of a JSONL record; a record without it, or with a non-string there, is
    a DataError naming the line and the fields it has (the user's fix: --text-field)."""
    if not isinstance(record, dict) or field not in record:
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: no field {field!r} (found: {found}); choose the field with --text-field")
    text = record[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} is {type(text).__name__}, expected a string")
    return text


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The JSON objects of a file lmforge appends to (run files); [] when it does not exist.
    Lines that do not parse (a torn last line) and values that are not objects are skipped."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError both; nested too deeply
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


__all__ = ["NON_FINITE", "to_record", "dumps_record", "append_jsonl", "as_number", "restore_numbers",
           "JsonLine", "parse_jsonl", "iter_jsonl", "read_jsonl", "record_text", "read_records"]
