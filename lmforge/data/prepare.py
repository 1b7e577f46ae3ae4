"""`lmforge prepare`: a user's corpus -> tokenizer.json + token shards + manifest.json.

Pipeline (two streaming passes over the files; one file is in memory at a time):
1. *Collect* sources: files as given, directories walked recursively in sorted order (hidden files
   and directories skipped; `--include` / `--exclude` globs match the path relative to the
   directory or the file name), `.jsonl` files read one document per line from `--text-field`.
2. *Scan* (pass 1): read and decode every file (not UTF-8: skip and report, or fail with
   `--strict`), cut it into documents, hash each document, decide its split. When no tokenizer is
   given, the train documents of this pass feed the BPE trainer directly.
3. *Tokenize* (pass 2): documents in batches of ~4 MiB through `encode_batch` (Rust threads: both
   cores), an eos token after every document, written into bounded shards per split with a
   running sha256; a document index row per document.
4. Everything is written into a temporary directory that is renamed to `--out` at the end
   (`util.atomic_dir`), so a failure (bad JSONL line, full disk) leaves no partial dataset.

`--out` is checked before any work (`_check_out`): it may not be an input, lie inside one or
contain one (even without `--overwrite`), and `--overwrite` only ever replaces a prepared dataset
(a directory holding manifest.json and nothing but dataset files) or an empty directory; a file, a
symbolic link or any other directory is refused, so prepare never deletes anything but an old
dataset. The check runs again just before the rename.

Documents: a JSONL line is one document; a text file is one document, except that a file larger
than `DOC_MAX_BYTES` is cut at blank lines into pieces of about that size (so one big file such as
tinyshakespeare.txt still has documents for the validation split). The train/val split is decided
per document from the sha256 of its content (`u = hash / 2**64`, val when `u < val_fraction`), so
a document keeps its split when the corpus grows. If that leaves val empty although
val_fraction > 0 and there are at least two documents, the document with the smallest `u` goes to
val (still a pure function of the content).

The manifest's format (its constants, `fingerprint`, reading and verifying it) lives in
manifest.py; the `data info / verify / inspect` commands that read a dataset back in inspect.py.

Trade-offs: the document index lives inside manifest.json as compact rows of ints (about 30 bytes
per document), which is simple to read and fine up to a few million documents; a file is read
whole, so a single file must fit in memory.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from .. import __version__
from ..config import DataConfig
from ..errors import DataError
from ..tokenizer import DEFAULT_SPECIAL_TOKENS, TOKENIZER_FILE, Tokenizer, check_training
from ..jsonl import parse_jsonl
from ..ranges import VAL_FRACTION, positive_int, thread_count
from ..util import atomic_dir, atomic_write_json, console, human_count, progress_bar, warn
from .manifest import FORMAT_VERSION, INDEX_COLUMNS, MANIFEST_FILE, MASK_SUFFIX, SPLITS, fingerprint

DOC_MAX_BYTES = 64 * 1024  # text files larger than this are cut into documents at blank lines
BATCH_BYTES = 4 << 20  # text per encode_batch call: large enough to keep every thread busy
_DATASET_ENTRY = re.compile(r"(manifest\.json|tokenizer\.json|(train|val)-\d{5,}(\.mask)?\.bin)")  # all a dataset holds


# ---- sources and documents -------------------------------------------------------------------


@dataclass
class Source:
    path: Path
    kind: str  # "text" | "jsonl"
    bytes: int = 0
    documents: int = 0


@dataclass
class Document:
    source: int  # index into the sources list
    byte_offset: int  # where the document starts in its source file
    text: str
    u: float  # content hash mapped to [0, 1): decides the split
    record_id: str | None = None  # a JSONL record's "id" field (a string or an integer), when it has one


class NotUtf8(Exception):
    """A source file that does not decode as UTF-8 (skipped, or fatal with --strict)."""


def _resolve(path: Path, what: str = "input") -> Path:
    """path.resolve(), with a symbolic link loop (or a path the system refuses) as a DataError."""
    try:
        return path.resolve()
    except (RuntimeError, OSError) as e:  # RuntimeError "Symlink loop" up to Python 3.12, OSError ELOOP after
        why = "a symbolic link loop" if isinstance(e, RuntimeError) or getattr(e, "errno", None) == errno.ELOOP else str(e)
        raise DataError(f"{what} {path}: cannot resolve it ({why}); give a real file or directory") from None


def _matches(rel: str, name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns)


def collect_sources(inputs: Sequence[str | os.PathLike], include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[Source]:
    """Files and directory walks -> unique sources in a deterministic order."""
    if not inputs:
        raise DataError("no inputs given: pass files, directories or .jsonl files to prepare")
    seen: set[Path] = set()
    sources: list[Source] = []

    def add(path: Path) -> None:
        resolved = _resolve(path)
        if resolved not in seen:
            seen.add(resolved)
            kind = "jsonl" if path.name.lower().endswith(".jsonl") else "text"
            sources.append(Source(resolved, kind, bytes=resolved.stat().st_size))

    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise DataError(f"input not found: {p}")
        if p.is_file():
            add(p)
            continue
        for dirpath, dirnames, filenames in os.walk(p):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                full = Path(dirpath) / name
                rel = full.relative_to(p).as_posix()
                if include and not _matches(rel, name, include):
                    continue
                if exclude and _matches(rel, name, exclude):
                    continue
                if full.is_file():
                    add(full)
    if not sources:
        raise DataError(f"empty corpus: no files found in {', '.join(map(str, inputs))} (check --include/--exclude)")
    return sources


def _u(data: bytes) -> float:
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") / 2.0**64


def _cut_points(data: bytes, max_bytes: int) -> list[int]:
    """Start offsets of the pieces of a text file: cut at a blank line after every max_bytes."""
    starts = [0]
    while len(data) - starts[-1] > max_bytes:
        target = starts[-1] + max_bytes
        cut = data.find(b"\n\n", target)
        if cut >= 0:
            cut += 2
        else:
            cut = data.find(b"\n", target)
            cut = cut + 1 if cut >= 0 else target
            while cut < len(data) and (data[cut] & 0xC0) == 0x80:  # never split a UTF-8 character
                cut += 1
        if cut >= len(data):
            break
        starts.append(cut)
    return starts


def iter_documents(src: Source, index: int, text_field: str) -> Iterator[Document]:
    """The documents of one source. Raises NotUtf8 before yielding anything from a bad file."""
    try:
        data = src.path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {src.path}: {e.strerror or e}") from None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NotUtf8(f"{src.path}: not UTF-8 (byte {e.start})") from None
    if src.kind == "text":
        starts = _cut_points(data, DOC_MAX_BYTES)
        for start, end in zip(starts, starts[1:] + [len(data)]):
            piece = data[start:end]
            if piece.strip():
                yield Document(index, start, piece.decode("utf-8"), _u(piece))
        return
    for where, _, start, record in parse_jsonl(data, src.path, what=f"one JSON object per line with a {text_field!r} field"):
        if not isinstance(record, dict) or text_field not in record:
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{where}: no field {text_field!r} (found: {found}); choose the field with --text-field")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{where}: field {text_field!r} is {type(text).__name__}, expected a string")
        if text.strip():
            encoded = text.encode("utf-8")
            rid = record.get("id")
            rid = str(rid) if isinstance(rid, (str, int)) and not isinstance(rid, bool) else None
            yield Document(index, start, text, _u(encoded), rid)


# ---- shard writing ---------------------------------------------------------------------------


@dataclass
class _SplitWriter:
    """Appends token arrays to bounded shard files `<split>-NNNNN.bin`, hashing as it writes; with
    `masks`, each token's loss-mask byte (1: trained) goes to `<split>-NNNNN.mask.bin` beside it."""

    root: Path
    split: str
    dtype: np.dtype
    shard_tokens: int
    masks: bool = False
    shards: list[dict[str, Any]] = field(default_factory=list)
    rows: list[list[int]] = field(default_factory=list)  # document index rows of this split
    _files: list[Any] = field(default_factory=list)  # the open shard (and mask) file
    _hashes: list[Any] = field(default_factory=list)
    _in_shard: int = 0

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}"
        self.shards.append({"file": f"{name}.bin", "sha256": "", "tokens": 0, "documents": 0})
        names = [f"{name}.bin"] + ([f"{name}{MASK_SUFFIX}"] if self.masks else [])
        if self.masks:
            self.shards[-1]["mask"] = {"file": names[1], "sha256": ""}
        self._files = [open(self.root / n, "wb") for n in names]
        self._hashes = [hashlib.sha256() for _ in names]
        self._in_shard = 0

    def _close(self) -> None:
        if self._files:
            for f in self._files:
                f.close()
            self.shards[-1]["sha256"] = self._hashes[0].hexdigest()
            if self.masks:
                self.shards[-1]["mask"]["sha256"] = self._hashes[1].hexdigest()
            self.shards[-1]["tokens"] = self._in_shard
            self._files = []

    def add(self, tokens: np.ndarray, source: int, byte_offset: int, split_id: int, mask: np.ndarray | None = None) -> None:
        """Write one document's tokens (eos included; `mask` (len(tokens),) uint8 when the writer
        has masks); a document may continue in the next shard."""
        if (mask is not None) != self.masks or (mask is not None and len(mask) != len(tokens)):
            raise ValueError("a loss mask per token goes with every document of a writer with masks, and only there")
        if not self._files or self._in_shard == self.shard_tokens:
            self._close()
            self._open()
        self.rows.append([split_id, len(self.shards) - 1, self._in_shard, source, byte_offset])
        self.shards[-1]["documents"] += 1
        columns = [tokens] + ([mask.astype(np.uint8)] if mask is not None else [])
        while len(columns[0]):
            if self._in_shard == self.shard_tokens:
                self._close()
                self._open()
            n = min(len(columns[0]), self.shard_tokens - self._in_shard)
            for f, h, col in zip(self._files, self._hashes, columns):
                data = col[:n].tobytes()  # native little-endian on every platform torch supports
                f.write(data)
                h.update(data)
            self._in_shard += n
            columns = [col[n:] for col in columns]

    def finish(self) -> dict[str, Any]:
        self._close()
        return {
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": sum(s["documents"] for s in self.shards),
            "shards": self.shards,
        }


def _progress() -> Progress:
    return progress_bar(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )


def _set_threads(workers: int) -> None:
    """Tokenizer threads: RAYON_NUM_THREADS must be set before the Rust thread pool starts."""
    thread_count().check("--workers", workers)
    if workers:
        os.environ["RAYON_NUM_THREADS"] = str(workers)
    # Force parallelism on even after a fork (pytest, multiprocessing), off for one worker.
    os.environ["TOKENIZERS_PARALLELISM"] = "false" if workers == 1 else "true"


def _check_writable(out: Path) -> None:
    """Fail before the slow passes when the output's parent cannot hold a new directory."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError as e:
        raise DataError(f"cannot write dataset {out}: {e.strerror or e} ({e.filename or out.parent}); nothing was written") from None


def check_out_overlap(out: Path, inputs: Sequence[str | os.PathLike], what: str = "dataset") -> None:
    """Refuse an --out that is an input, lies inside one (the next run would read it as corpus)
    or contains one (`what`: the kind of directory written, for the message)."""
    target = _resolve(out, "--out")
    for raw in inputs:
        src = _resolve(Path(raw))
        if target == src:
            raise DataError(f"--out {out} is also an input; write the {what} somewhere else (nothing was written)")
        if src in target.parents:
            raise DataError(
                f"--out {out} is inside the input {raw}: the {what} would be read as corpus next time; "
                f"choose an --out outside the inputs (nothing was written)"
            )
        if target in src.parents:
            raise DataError(f"--out {out} contains the input {raw}; choose an --out that holds no input (nothing was written)")


def _check_out(out: Path, inputs: Sequence[str | os.PathLike], overwrite: bool) -> None:
    """Refuse, before any work, an --out that overlaps an input or that is not ours to replace."""
    check_out_overlap(out, inputs)
    _check_replaceable(out, overwrite)


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """--out may be new, or (with --overwrite) a prepared dataset or an empty directory; nothing else."""
    if out.is_symlink():
        raise DataError(f"output {out} is a symbolic link; pass the directory it points to as --out (nothing was written)")
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(
            f"output already exists and is a file, not a dataset: {out}; choose another --out "
            f"(--overwrite only replaces a dataset made by prepare)"
        )
    try:
        names = sorted(p.name for p in out.iterdir())
    except OSError as e:
        raise DataError(f"cannot read output directory {out}: {e.strerror or e}; choose another --out") from None
    foreign = [n for n in names if not _DATASET_ENTRY.fullmatch(n)]
    if names and (MANIFEST_FILE not in names or foreign):
        what = f"no {MANIFEST_FILE}" if MANIFEST_FILE not in names else "files a dataset does not have"
        shown = ", ".join((foreign or names)[:5]) + (" ..." if len(foreign or names) > 5 else "")
        raise DataError(
            f"output already exists and is not a prepared dataset: {out} ({what}: {shown}); choose another --out "
            f"(--overwrite only replaces a dataset made by prepare; nothing was touched)"
        )
    if not overwrite:
        raise DataError(f"output already exists: {out} (pass --overwrite to replace it)")


def _check_val(val: dict[str, Any], val_fraction: float) -> None:
    """Warn when validation on this dataset would fail: an empty val split, or one shorter than a window
    of the default data.seq_len (the trainer's own check knows the run's seq_len; this is a heads-up)."""
    window = DataConfig.seq_len + 1
    no_eval = "or train with --set train.eval_every=0"
    if val["tokens"] == 0:
        if val_fraction == 0:
            why = "--val-fraction is 0"
            fix = "pass --val-fraction > 0 (e.g. 0.01)"
        else:
            # two or more documents always give val one (module docstring): this corpus is one document
            why = "the corpus is a single document, and a document is never split between train and val"
            fix = f"add more documents (a text file over {DOC_MAX_BYTES // 1024} KiB is cut into several)"
        warn(f"the val split is empty ({why}): training fails at its first validation and `lmforge eval` has nothing "
             f"to score; {fix}, {no_eval}")
    elif val["tokens"] < window:
        warn(f"the val split has {val['tokens']} tokens ({val['documents']} document(s)), fewer than one window of "
             f"seq_len + 1 = {window} at the default data.seq_len: validation at that length fails; raise --val-fraction, "
             f"add more documents, use a data.seq_len below {val['tokens']}, {no_eval}")


def _readable(root: Path) -> None:
    """Give the dataset the usual umask modes (temp dirs and files are created private)."""
    umask = os.umask(0)
    os.umask(umask)
    root.chmod(0o777 & ~umask)
    for f in root.iterdir():
        f.chmod(0o666 & ~umask)


# ---- prepare ---------------------------------------------------------------------------------


def prepare(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    vocab_size: int = 8192,
    tokenizer: str | os.PathLike | None = None,
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    text_field: str = "text",
    val_fraction: float = 0.01,
    shard_tokens: int = 50_000_000,
    strict: bool = False,
    workers: int = 0,
    overwrite: bool = False,
) -> Path:
    """Build a dataset directory at `out` (see the module docstring); returns its path."""
    out = Path(out)
    VAL_FRACTION.check("--val-fraction", val_fraction)
    positive_int().check("--shard-tokens", shard_tokens)
    if tokenizer is None:  # before the pass over the corpus that trains it
        check_training(vocab_size, special_tokens)
    _check_out(out, inputs, overwrite)
    _set_threads(workers)
    sources = collect_sources(inputs, include, exclude)
    _check_writable(out)
    tok = Tokenizer.load(tokenizer) if tokenizer else None
    total_bytes = sum(s.bytes for s in sources)

    # Pass 1: decode, cut, hash; train the tokenizer on the train documents as they stream by.
    skipped: list[dict[str, str]] = []
    bad: set[int] = set()
    stats = {"documents": 0, "min_u": 2.0, "val": 0}

    def scan() -> Iterator[str]:
        with _progress() as progress:
            task = progress.add_task("scan" if tok else "train tokenizer", total=total_bytes)
            for i, src in enumerate(sources):
                try:
                    for doc in iter_documents(src, i, text_field):
                        stats["documents"] += 1
                        stats["min_u"] = min(stats["min_u"], doc.u)
                        if doc.u < val_fraction:
                            stats["val"] += 1
                        else:
                            yield doc.text
                except NotUtf8 as e:
                    if strict:
                        raise DataError(f"{e} (--strict: every input must be UTF-8 text)") from None
                    bad.add(i)
                    skipped.append({"path": str(src.path), "reason": "not UTF-8"})
                progress.advance(task, src.bytes)

    if tok is None:
        tok = Tokenizer.train(scan(), vocab_size, special_tokens=special_tokens)
    else:
        for _ in scan():
            pass
    if skipped:
        names = ", ".join(s["path"] for s in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        warn(f"skipped {len(skipped)} file(s) that are not UTF-8: {names}")
    if stats["documents"] == 0:
        raise DataError(f"empty corpus: no text found in {len(sources)} file(s) under {', '.join(map(str, inputs))}")
    force_val = stats["val"] == 0 and val_fraction > 0 and stats["documents"] >= 2
    if tok.eos_id is None:
        raise DataError(f"tokenizer {tokenizer} has no {'<|eos|>'!r} token; prepare separates documents with it")

    dtype = token_dtype(tok)

    def fill(writers: dict[str, _SplitWriter]) -> None:
        _tokenize(sources, bad, text_field, tok, writers, val_fraction, stats["min_u"] if force_val else None, dtype, total_bytes)

    splits = write_dataset(out, overwrite=overwrite, tok=tok, dtype=dtype, sources=sources, skipped=skipped,
                           val_fraction=val_fraction, shard_tokens=shard_tokens, fill=fill)
    report(out, splits, tok, dtype)
    _check_val(splits["val"], val_fraction)
    return out


def token_dtype(tok: Tokenizer) -> np.dtype:
    """The smallest shard dtype that holds every id of the tokenizer."""
    return np.dtype("<u2") if tok.vocab_size <= 2**16 else np.dtype("<u4")


def write_dataset(
    out: Path,
    *,
    overwrite: bool,
    tok: Tokenizer,
    dtype: np.dtype,
    sources: list[Source],
    skipped: list[dict[str, str]],
    val_fraction: float,
    shard_tokens: int,
    fill: Callable[[dict[str, _SplitWriter]], None],
    masks: bool = False,
    extra: dict[str, Any] | None = None,
    format_version: int = FORMAT_VERSION,
) -> dict[str, Any]:
    """Write a dataset atomically: `fill(writers)` adds the documents to the split writers, then
    the manifest (with `extra` keys) is written and the directory renamed to `out`. Returns the
    splits' summaries; a failure (a DataError from `fill`, a full disk) leaves nothing at `out`."""
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            tok.save(tmp / TOKENIZER_FILE)
            writers = {s: _SplitWriter(tmp, s, dtype, shard_tokens, masks) for s in SPLITS}
            fill(writers)
            splits = {s: w.finish() for s, w in writers.items()}
            if splits["train"]["tokens"] == 0:
                raise DataError("no documents left for training: every document fell into the validation split; lower --val-fraction")
            for src in sources:
                src.documents = 0
            rows = writers["train"].rows + writers["val"].rows
            for row in rows:
                sources[row[3]].documents += 1
            manifest = {
                "format_version": format_version,
                "created_by": f"lmforge {__version__}",
                "tokenizer": TOKENIZER_FILE,
                "tokenizer_sha256": tok.sha256,
                "vocab_size": tok.vocab_size,
                "dtype": dtype.name,
                "eos_id": tok.eos_id,
                "bos_id": tok.bos_id,
                "pad_id": tok.pad_id,
                "val_fraction": val_fraction,
                "shard_tokens": shard_tokens,
                "fingerprint": fingerprint(tok.sha256, dtype.name, splits["train"]["shards"]),
                "splits": splits,
                "sources": [{"path": str(s.path), "kind": s.kind, "bytes": s.bytes, "documents": s.documents} for s in sources],
                "skipped": skipped,
                "document_index": {"columns": INDEX_COLUMNS, "splits": list(SPLITS), "rows": rows},
                **(extra or {}),
            }
            atomic_write_json(tmp / MANIFEST_FILE, manifest)
            _readable(tmp)
            _check_replaceable(out, overwrite)  # again: something may have appeared at --out meanwhile
    except FileExistsError as e:
        if out.exists():  # created by someone else while we were working
            raise DataError(f"output already exists: {out} (pass --overwrite to replace it)") from None
        raise DataError(f"cannot write dataset {out}: {e.strerror or e} ({e.filename or out}); nothing was written") from None
    except OSError as e:
        what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise DataError(f"cannot write dataset {out}: {what} ({e.filename or out}); nothing was written") from None
    return splits


def report(out: Path, splits: dict[str, Any], tok: Tokenizer, dtype: np.dtype, note: str = "") -> None:
    """The one-line summary of a prepared dataset."""
    t, v = splits["train"], splits["val"]
    console.print(
        f"[green]prepared[/] {out}: train {human_count(t['tokens'])} tokens / {t['documents']} docs / "
        f"{len(t['shards'])} shard(s), val {human_count(v['tokens'])} tokens / {v['documents']} docs, "
        f"vocab {tok.vocab_size} ({dtype.name}){note}"
    )


def _tokenize(
    sources: list[Source],
    bad: set[int],
    text_field: str,
    tok: Tokenizer,
    writers: dict[str, _SplitWriter],
    val_fraction: float,
    forced_u: float | None,
    dtype: np.dtype,
    total_bytes: int,
) -> None:
    """Pass 2: documents -> encode_batch -> eos appended -> shards of their split."""
    eos = np.array([tok.eos_id], dtype=dtype)
    batch: list[Document] = []

    def flush() -> None:
        for doc, ids in zip(batch, tok.encode_batch([d.text for d in batch])):
            split_id = 1 if (doc.u < val_fraction or doc.u == forced_u) else 0
            tokens = np.concatenate([np.asarray(ids, dtype=dtype), eos])
            writers[SPLITS[split_id]].add(tokens, doc.source, doc.byte_offset, split_id)
        batch.clear()

    with _progress() as progress:
        task = progress.add_task("tokenize", total=total_bytes)
        size = 0
        for i, src in enumerate(sources):
            if i not in bad:
                for doc in iter_documents(src, i, text_field):
                    batch.append(doc)
                    size += len(doc.text)
                    if size >= BATCH_BYTES:
                        flush()
                        size = 0
            progress.advance(task, src.bytes)
        flush()
