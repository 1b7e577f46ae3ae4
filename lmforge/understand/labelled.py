"""Labelled examples and label files for `lmforge classify`: reading JSONL and CSV, streamed.

Formats (docs/classify.md)
--------------------------
- JSONL, one record per line: `{"text": str, "label": str}` (single-label) or `{"text": str,
  "labels": [str, ...]}` (multi-label; an empty list is an item with no label). `id` is kept when
  present (else FILE:LINE). The field names are `text_field`, `label_field`; the multi-label field
  is the label field's plural (`labels`). A file is single- or multi-label by its first record;
  a record of the other kind is an error naming its line.
- CSV with a header row holding `text` and `label` (or `labels`, labels separated by "|"); other
  columns are ignored. A row with another number of fields than the header is "ragged": an
  error naming FILE:LINE (a quoted field may span lines; the line is where the row starts).
- For `predict` (no labels): the same files without label fields, or any other file read as one
  text per non-blank line (id FILE:LINE).

Decisions (bad input is one line naming FILE:LINE, and nothing is written):
- A missing text or label field, a label that is not a non-empty string, a list of labels that is
  not a list of strings: refused at the first such record.
- An empty text (or only whitespace) in a labelled file (train, eval): refused, naming the line.
  Skipping it would silently change what an eval's numbers are over. In `predict` an empty text
  is not an error: it is routed to the fallback with no scores, so the output keeps one line per
  input record.
- A label file (zero-shot): JSONL `{"label": str, "description": str?}`, or one label per
  non-blank line as `name` or `name: description`. Fewer than two labels, or a label twice, is refused.

Streaming: `stream_records` reads a file line by line (JSONL, text) or row by row (CSV) and yields
records, so `predict` holds one chunk at a time whatever the file's size; `read_examples` (train,
eval) keeps every example, which a training set and a test set fit.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..jsonl import iter_jsonl

CSV_MULTI_SEPARATOR = "|"


@dataclass
class Record:
    where: str  # FILE:LINE
    id: str
    text: str
    labels: tuple[str, ...] | None  # None: the file carries no labels (predict)
    multi: bool = False  # the labels came from the plural (multi-label) field


@dataclass
class Examples:
    """A labelled file: texts and labels in file order."""

    path: str
    multi_label: bool
    texts: list[str] = field(default_factory=list)
    labels: list[tuple[str, ...]] = field(default_factory=list)
    wheres: list[str] = field(default_factory=list)

    def label_names(self) -> list[str]:
        """Every label seen, sorted (the classifier's label order)."""
        return sorted({lab for labs in self.labels for lab in labs})

    def subset(self, keep: list[int]) -> Examples:
        return Examples(self.path, self.multi_label, [self.texts[i] for i in keep], [self.labels[i] for i in keep],
                        [self.wheres[i] for i in keep])

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class Label:
    name: str
    description: str = ""


def is_csv(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in (".csv", ".tsv")


def is_jsonl(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in (".jsonl", ".json", ".ndjson")


def _open_text(path: Path) -> io.TextIOWrapper:
    try:
        return open(path, encoding="utf-8", newline="")  # noqa: SIM115 - closed by the callers' with
    except FileNotFoundError:
        raise DataError(f"input not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a directory; give a .jsonl, .csv or text file") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None


def stream_records(path: str | os.PathLike, *, text_field: str = "text", label_field: str = "label",
                   id_field: str = "id", labelled: bool) -> Iterator[Record]:
    """The records of one file, in order (module docstring). `labelled`: every record must carry
    its label(s) (train, eval); else labels are read when present and never required."""
    p = Path(path)
    if is_csv(p):
        yield from _csv(p, text_field, label_field, id_field, labelled)
    elif is_jsonl(p):
        yield from _jsonl(p, text_field, label_field, id_field, labelled)
    elif labelled:
        raise DataError(f"{p}: labelled examples must be a .jsonl file ({{\"{text_field}\": ..., \"{label_field}\": ...}}"
                        f" per line) or a .csv file with a header holding {text_field},{label_field}")
    else:
        with _open_text(p) as f:
            try:
                for n, line in enumerate(f, 1):
                    line = line.rstrip("\r\n")
                    if line.strip():
                        yield Record(f"{p}:{n}", f"{p}:{n}", line, None)
            except UnicodeDecodeError as e:
                raise DataError(f"{p}: not UTF-8 text (byte {e.start} of a read block)") from None


def _labels_of(value: Any, where: str, field_name: str, multi: bool) -> tuple[str, ...]:
    if multi:
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            raise DataError(f"{where}: field {field_name!r} must be a list of non-empty strings, got {value!r}")
        return tuple(dict.fromkeys(v.strip() for v in value))  # once each, in order
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise DataError(f"{where}: field {field_name!r} must be a non-empty string, got {value!r}")
    return (str(value).strip(),)


def _jsonl(p: Path, text_field: str, label_field: str, id_field: str, labelled: bool) -> Iterator[Record]:
    plural = label_field + "s"
    multi: bool | None = None
    try:
        f = open(p, "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise DataError(f"input not found: {p}") from None
    except OSError as e:
        raise DataError(f"cannot read {p}: {e.strerror or e}") from None
    what = f"one object per line with {text_field!r} and {label_field!r} (or {plural!r})"
    with f:  # the one JSONL reader: not UTF-8, invalid, nested too deeply or a lone surrogate is a DataError at file:line
        for where, _, _, rec in iter_jsonl(f, p, what=what):
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            if text_field not in rec:
                raise DataError(f"{where}: no field {text_field!r} (found: {sorted(rec)}); choose it with --text-field")
            text = rec[text_field]
            if not isinstance(text, str):
                raise DataError(f"{where}: field {text_field!r} is {type(text).__name__}, expected a string")
            has_one, has_many = label_field in rec, plural in rec
            labels: tuple[str, ...] | None = None
            if has_one and has_many:
                raise DataError(f"{where}: both {label_field!r} and {plural!r}; give one ({label_field!r}: one label, "
                                f"{plural!r}: a list for multi-label)")
            if has_one or has_many:
                if multi is None:
                    multi = has_many
                elif multi != has_many:
                    first = plural if multi else label_field
                    raise DataError(f"{where}: field {plural if has_many else label_field!r} but earlier records use "
                                    f"{first!r}; a file is single-label ({label_field!r}) or multi-label ({plural!r})")
                labels = _labels_of(rec[plural if has_many else label_field], where,
                                    plural if has_many else label_field, has_many)
            elif labelled:
                raise DataError(f"{where}: no field {label_field!r} (or {plural!r}) (found: {sorted(rec)}); choose it "
                                "with --label-field")
            ident = rec.get(id_field, where)
            if not isinstance(ident, (str, int)) or isinstance(ident, bool):
                raise DataError(f"{where}: field {id_field!r} must be a string or an integer, got {ident!r}")
            yield Record(where, str(ident), text, labels, bool(has_many))


def _csv(p: Path, text_field: str, label_field: str, id_field: str, labelled: bool) -> Iterator[Record]:
    plural = label_field + "s"
    with _open_text(p) as f:
        try:
            reader = csv.reader(f, delimiter="\t" if p.suffix.lower() == ".tsv" else ",")
            header = next(reader, None)
            if header is None:
                raise DataError(f"{p}: empty file; expected a header row with {text_field},{label_field}")
            header = [h.strip() for h in header]
            if text_field not in header:
                raise DataError(f"{p}:1: the header has no {text_field!r} column (found: {header}); choose it with "
                                "--text-field")
            col_text = header.index(text_field)
            col_label = header.index(label_field) if label_field in header else None
            col_many = header.index(plural) if plural in header else None
            if col_label is not None and col_many is not None:
                raise DataError(f"{p}:1: both {label_field!r} and {plural!r} columns; keep one")
            if labelled and col_label is None and col_many is None:
                raise DataError(f"{p}:1: the header has no {label_field!r} (or {plural!r}) column (found: {header}); "
                                "choose it with --label-field")
            col_id = header.index(id_field) if id_field in header else None
            start = reader.line_num + 1
            for row in reader:
                where = f"{p}:{start}"
                start = reader.line_num + 1
                if not row or (len(row) == 1 and not row[0].strip() and len(header) > 1):
                    continue  # a blank line
                if len(row) != len(header):
                    raise DataError(f"{where}: ragged row: {len(row)} fields, the header has {len(header)} "
                                    f"({','.join(header)}); quote fields that hold the delimiter")
                labels: tuple[str, ...] | None = None
                if col_label is not None:
                    labels = _labels_of(row[col_label], where, label_field, False)
                elif col_many is not None:
                    labels = _labels_of([v for v in row[col_many].split(CSV_MULTI_SEPARATOR) if v.strip()], where,
                                        plural, True)
                yield Record(where, row[col_id] if col_id is not None and row[col_id] else where, row[col_text], labels,
                             col_many is not None)
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text (byte {e.start} of a read block)") from None
        except csv.Error as e:
            raise DataError(f"{p}:{reader.line_num}: not valid CSV ({e})") from None


def read_examples(path: str | os.PathLike, *, text_field: str = "text", label_field: str = "label") -> Examples:
    """Every labelled example of a train or test file (module docstring: an empty text is refused)."""
    from ..bundled import resolve_bundled

    path = resolve_bundled(path, "data")  # a bundled data set by name: stdlib-modules-train
    out: Examples | None = None
    for rec in stream_records(path, text_field=text_field, label_field=label_field, labelled=True):
        assert rec.labels is not None
        if not rec.text.strip():
            raise DataError(f"{rec.where}: empty text; a labelled example needs text (remove the line or fill it in)")
        if out is None:
            out = Examples(str(path), multi_label=rec.multi)
        out.texts.append(rec.text)
        out.labels.append(rec.labels)
        out.wheres.append(rec.where)
    if out is None:
        raise DataError(f"{path}: no examples (the file is empty or holds only blank lines)")
    return out


def read_label_file(path: str | os.PathLike) -> list[Label]:
    """The labels (and descriptions) of a label file (module docstring)."""
    from ..bundled import resolve_bundled

    p = resolve_bundled(path, "data")
    labels: list[Label] = []
    if is_jsonl(p):
        from ..jsonl import read_jsonl

        for where, _, _, rec in read_jsonl(p, what='one {"label": ..., "description": ...} object per line'):
            if not isinstance(rec, dict) or not isinstance(rec.get("label"), str):
                raise DataError(f"{where}: expected an object with a string field 'label', got {rec!r:.80}")
            desc = rec.get("description", "")
            if not isinstance(desc, str):
                raise DataError(f"{where}: field 'description' must be a string, got {desc!r:.80}")
            labels.append(Label(rec["label"].strip(), desc.strip()))
    else:
        with _open_text(p) as f:
            for line in f:
                if line.strip():
                    name, _, desc = line.strip().partition(":")
                    labels.append(Label(name.strip(), desc.strip()))
    names = [lab.name for lab in labels]
    for i, lab in enumerate(labels):
        if not lab.name:
            raise DataError(f"{p}: label {i + 1} has an empty name")
        if names.index(lab.name) != i:
            raise DataError(f"{p}: label {lab.name!r} is listed twice")
    check_label_count(names, str(p))
    return labels


def check_label_count(names: list[str], source: str) -> None:
    if len(names) < 2:
        found = f"only {names[0]!r}" if names else "none"
        raise DataError(f"{source}: a classifier needs at least two labels, found {found}")


__all__ = ["Record", "Examples", "Label", "stream_records", "read_examples", "read_label_file", "check_label_count",
           "is_csv", "is_jsonl", "CSV_MULTI_SEPARATOR"]
