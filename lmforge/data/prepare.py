"""`lmforge prepare`: a user's corpus -> tokenizer.json + token shards + manifest.json.

Pipeline (two streaming passes; one file is in memory at a time):
1. *Collect* sources: files as given, directories walked recursively in sorted order (hidden files
   and directories skipped; `--include` / `--exclude` globs match the path relative to the
   directory or the file name), `.jsonl` files read one document per line from `--text-field`.
   Each source remembers the *input* (command-line argument) it came from; inputs are named by
   mix.input_names (base name without extension) in reports and in `--mix`.
2. *Scan and clean* (pass 1): read and decode every file (not UTF-8: skip and report, or fail with
   `--strict`), cut it into documents, hash each document (its split), and put it through the
   hygiene stages (hygiene.py: PII, quality, exact and near dedup; the per-document work in
   `--workers` processes, the decisions here, in corpus order). Kept documents are appended to a
   spill file beside `--out` (scrubbed text + where it came from); when no tokenizer is given, the
   kept train documents feed the BPE trainer as they stream by.
3. *Tokenize* (pass 2): the spill, read back in order (once per mixing round with `--mix`:
   mix.py), in batches of ~4 MiB through `encode_batch` (Rust threads: all cores), an eos token
   after every document, written into bounded shards per split with a running sha256; a document
   index row per document.
4. Everything is written into a temporary directory that is renamed to `--out` at the end
   (`util.atomic_dir`), so a failure (bad JSONL line, full disk, an input emptied by hygiene)
   leaves no partial dataset; the spill is removed in every case.

The manifest records what hygiene did (settings, library versions, removals per rule and input,
redactions per kind and input, bounded redacted examples) and the mixture; the dataset stays a pure
function of (inputs, settings): preparing twice gives the same checksums.

Shared with `prepare --sft` (sft.py): the checks of `--out`, `collect_sources`, `token_dtype`,
`write_dataset` (step 4: `fill(writers)` writes the documents, with loss masks for SFT, and returns
the manifest keys only writing tells, such as the tokens per input and the hygiene record), `report`
and `hygiene_summary` (the lines printed at the end), `check_empty_inputs`. SFT examples get two of
the hygiene stages (exact dedup and PII, decided by the same `Hygiene`); sft.py says why not all.

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
whole, so a single file must fit in memory; the spill costs disk space the size of the kept text
for the duration of the run, and saves running the scrubber twice.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import math
import os
import re
import shutil
import struct
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
from ..jsonl import parse_jsonl, record_text
from ..ranges import VAL_FRACTION, positive_int, thread_count
from ..util import atomic_dir, atomic_write_json, console, human_count, progress_bar, warn
from . import mix as mixing
from .hygiene import Analyser, Hygiene, Settings, genre_of
from .manifest import FORMAT_VERSION, INDEX_COLUMNS, MANIFEST_FILE, MASK_SUFFIX, SPLITS, fingerprint

DOC_MAX_BYTES = 64 * 1024  # text files larger than this are cut into documents at blank lines
BATCH_BYTES = 4 << 20  # text per encode_batch call: large enough to keep every thread busy
HYGIENE_BATCH_CHARS = 1 << 20  # text per hygiene batch sent to a worker process
POOL_MIN_BYTES = 8 << 20  # smaller corpora are analysed in this process (starting workers costs more)
_DATASET_ENTRY = re.compile(r"(manifest\.json|tokenizer\.json|(train|val)-\d{5,}(\.mask)?\.bin)")  # all a dataset holds


# ---- sources and documents -------------------------------------------------------------------


@dataclass
class Source:
    path: Path
    kind: str  # "text" | "jsonl"
    bytes: int = 0
    documents: int = 0
    input: int = 0  # which input (command-line argument) it was found under
    genre: str = "prose"  # "code" | "prose": which quality rules apply (hygiene.genre_of)


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

    def add(path: Path, which: int) -> None:
        resolved = _resolve(path)
        if resolved not in seen:
            seen.add(resolved)
            kind = "jsonl" if path.name.lower().endswith(".jsonl") else "text"
            sources.append(Source(resolved, kind, bytes=resolved.stat().st_size, input=which, genre=genre_of(path, kind)))

    for which, raw in enumerate(inputs):
        p = Path(raw)
        if not p.exists():
            raise DataError(f"input not found: {p}")
        if p.is_file():
            add(p, which)
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
                    add(full, which)
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
        text = record_text(record, text_field, where)
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
    hygiene: Settings | None = None,
    allow_empty: bool = False,
    mix: str | dict[str, float] | None = None,
    mix_max_repeat: float | None = None,
) -> Path:
    """Build a dataset directory at `out` (see the module docstring); returns its path.

    hygiene: what the hygiene stages do (hygiene.Settings; None: the defaults, everything on;
    `Settings.off()`: the corpus as it is). allow_empty: an input left without documents by hygiene
    is a warning instead of an error. mix / mix_max_repeat: weighted mixing of the inputs (mix.py)."""
    out = Path(out)
    settings = (hygiene if hygiene is not None else Settings()).validate()
    VAL_FRACTION.check("--val-fraction", val_fraction)
    positive_int().check("--shard-tokens", shard_tokens)
    if tokenizer is None:  # before the pass over the corpus that trains it
        check_training(vocab_size, special_tokens)
    names = mixing.input_names(inputs)
    weights: dict[str, float] | None = None
    if mix is not None:
        weights = mixing.parse_mix(mix) if isinstance(mix, str) else mixing.parse_mix(",".join(f"{k}={v}" for k, v in mix.items()))
        mixing.check_names(weights, names, inputs)
    elif mix_max_repeat is not None:
        raise DataError("--mix-max-repeat without --mix: there is no mixture to cap; drop it or add --mix")
    max_repeat = mixing.DEFAULT_MAX_REPEAT if mix_max_repeat is None else mix_max_repeat
    if weights is not None:
        mixing.plan(weights, {n: 1 for n in names}, max_repeat)  # refuse a bad cap before the slow passes
    _check_out(out, inputs, overwrite)
    _set_threads(workers)
    sources = collect_sources(inputs, include, exclude)
    _check_writable(out)
    tok = Tokenizer.load(tokenizer) if tokenizer else None
    total_bytes = sum(s.bytes for s in sources)
    processes = (workers or os.cpu_count() or 1) if total_bytes >= POOL_MIN_BYTES and settings != Settings.off() else 1

    skipped: list[dict[str, str]] = []
    bad: set[int] = set()
    stats = {"documents": 0, "min_u": 2.0, "val": 0}
    train_bytes = dict.fromkeys(names, 0)  # kept train text per input, for the mixture
    hyg = Hygiene(settings, names)
    spill_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.spill-", dir=out.parent))
    spill_path = spill_dir / "kept.bin"
    analyser = Analyser(settings, processes)  # before any tokenizer work: workers are forked
    try:
        # Pass 1: decode, cut, hash, hygiene; kept documents go to the spill file, and the train
        # ones into the BPE trainer as they stream by.
        try:
            with open(spill_path, "wb", buffering=1 << 20) as spill:

                def documents() -> Iterator[Document]:
                    for i, src in enumerate(sources):
                        try:
                            yield from iter_documents(src, i, text_field)
                        except NotUtf8 as e:
                            if strict:
                                raise DataError(f"{e} (--strict: every input must be UTF-8 text)") from None
                            bad.add(i)
                            skipped.append({"path": str(src.path), "reason": "not UTF-8"})

                def batches() -> Iterator[tuple[list[Document], list[tuple[str, str]]]]:
                    batch: list[Document] = []
                    size = 0
                    for doc in documents():
                        batch.append(doc)
                        size += len(doc.text)
                        if size >= HYGIENE_BATCH_CHARS:
                            yield batch, [(d.text, sources[d.source].genre) for d in batch]
                            batch, size = [], 0
                    if batch:
                        yield batch, [(d.text, sources[d.source].genre) for d in batch]

                def scan() -> Iterator[str]:
                    with _progress() as progress:
                        task = progress.add_task("scan" if tok else "train tokenizer", total=total_bytes)
                        for docs, analyses in analyser.map(batches()):
                            for doc, a in zip(docs, analyses):
                                src = sources[doc.source]
                                name = names[src.input]
                                nbytes = len(doc.text.encode("utf-8"))
                                keep = hyg.decide(a, input_name=name, source=str(src.path), byte_offset=doc.byte_offset,
                                                  nbytes=nbytes, u=doc.u, original=doc.text)
                                progress.advance(task, nbytes)
                                if not keep:
                                    continue
                                data = a.text.encode("utf-8")
                                spill.write(_SPILL.pack(doc.source, doc.byte_offset, doc.u, len(data)))
                                spill.write(data)
                                stats["documents"] += 1
                                stats["min_u"] = min(stats["min_u"], doc.u)
                                if doc.u < val_fraction:
                                    stats["val"] += 1
                                else:
                                    train_bytes[name] += len(data)
                                    yield a.text
                        progress.update(task, completed=total_bytes)

                if tok is None:
                    tok = Tokenizer.train(scan(), vocab_size, special_tokens=special_tokens)
                else:
                    for _ in scan():
                        pass
        except OSError as e:  # the spill: a full disk beside --out
            raise _write_error(out, e) from None
        analyser.close()
        if skipped:
            shown = ", ".join(s["path"] for s in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
            warn(f"skipped {len(skipped)} file(s) that are not UTF-8: {shown}")
        if stats["documents"] == 0:
            read = sum(c.documents for c in hyg.read.values())
            if read:
                raise DataError(f"no documents left after hygiene: all {read} were removed ({_reasons(hyg, None)}); "
                                f"see which stage with --no-dedup / --quality off / --pii keep")
            raise DataError(f"empty corpus: no text found in {len(sources)} file(s) under {', '.join(map(str, inputs))}")
        check_empty_inputs(hyg, inputs, allow_empty)
        force_val = stats["val"] == 0 and val_fraction > 0 and stats["documents"] >= 2
        forced_u = stats["min_u"] if force_val else None
        if forced_u is not None:
            for src_i, _, u, text in _spill_records(spill_path):  # that document moves from train to val
                if u == forced_u:
                    train_bytes[names[sources[src_i].input]] -= len(text.encode("utf-8"))
        if tok.eos_id is None:
            raise DataError(f"tokenizer {tokenizer} has no {'<|eos|>'!r} token; prepare separates documents with it")
        mix_plan = mixing.plan(weights, train_bytes, max_repeat) if weights is not None else None
        dtype = token_dtype(tok)

        def fill(writers: dict[str, _SplitWriter]) -> dict[str, Any]:
            tokens = _tokenize(spill_path, sources, names, tok, writers, val_fraction, forced_u, dtype, mix_plan)
            return {
                "inputs": [
                    {"name": name, "path": str(Path(raw).resolve()), "files": sum(1 for s in sources if s.input == i),
                     "bytes": sum(s.bytes for s in sources if s.input == i),
                     **{f"{split}_tokens": tokens[split][name] for split in SPLITS}}
                    for i, (name, raw) in enumerate(zip(names, inputs))
                ],
                "hygiene": hyg.record(val_fraction, forced_u),
                "mix": _mix_record(weights, max_repeat, mix_plan, train_bytes, tokens) if mix_plan is not None else None,
            }

        splits = write_dataset(out, overwrite=overwrite, tok=tok, dtype=dtype, sources=sources, skipped=skipped,
                               val_fraction=val_fraction, shard_tokens=shard_tokens, fill=fill)
    finally:
        analyser.close()
        shutil.rmtree(spill_dir, ignore_errors=True)
    report(out, splits, tok, dtype)
    if settings != Settings.off():
        hygiene_summary(hyg, out)
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
    fill: Callable[[dict[str, _SplitWriter]], dict[str, Any] | None],
    masks: bool = False,
    extra: dict[str, Any] | None = None,
    format_version: int = FORMAT_VERSION,
) -> dict[str, Any]:
    """Write a dataset atomically: `fill(writers)` adds the documents to the split writers and
    returns the manifest keys that only writing them tells (the tokens per input, the hygiene
    record; or None), then the manifest (with those and the `extra` keys) is written and the
    directory renamed to `out`. Returns the splits' summaries; a failure (a DataError from `fill`,
    a full disk) leaves nothing at `out`."""
    try:
        with atomic_dir(out, overwrite=overwrite) as tmp:
            tok.save(tmp / TOKENIZER_FILE)
            writers = {s: _SplitWriter(tmp, s, dtype, shard_tokens, masks) for s in SPLITS}
            filled = fill(writers)
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
                "sources": [{"path": str(s.path), "kind": s.kind, "bytes": s.bytes, "documents": s.documents,
                             "input": s.input, "genre": s.genre} for s in sources],
                "skipped": skipped,
                "document_index": {"columns": INDEX_COLUMNS, "splits": list(SPLITS), "rows": rows},
                **(extra or {}),
                **(filled or {}),
            }
            atomic_write_json(tmp / MANIFEST_FILE, manifest)
            _readable(tmp)
            _check_replaceable(out, overwrite)  # again: something may have appeared at --out meanwhile
    except FileExistsError as e:
        if out.exists():  # created by someone else while we were working
            raise DataError(f"output already exists: {out} (pass --overwrite to replace it)") from None
        raise DataError(f"cannot write dataset {out}: {e.strerror or e} ({e.filename or out}); nothing was written") from None
    except OSError as e:
        raise _write_error(out, e) from None
    return splits


def _write_error(out: Path, e: OSError) -> DataError:
    what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return DataError(f"cannot write dataset {out}: {what} ({e.filename or out}); nothing was written")


def report(out: Path, splits: dict[str, Any], tok: Tokenizer, dtype: np.dtype, note: str = "") -> None:
    """The one-line summary of a prepared dataset."""
    t, v = splits["train"], splits["val"]
    console.print(
        f"[green]prepared[/] {out}: train {human_count(t['tokens'])} tokens / {t['documents']} docs / "
        f"{len(t['shards'])} shard(s), val {human_count(v['tokens'])} tokens / {v['documents']} docs, "
        f"vocab {tok.vocab_size} ({dtype.name}){note}"
    )


def hygiene_summary(hyg: Hygiene, out: Path, what: str = "documents") -> None:
    """The one line after it that says what hygiene did, and where the details are."""
    removed = sum(c.documents for per in hyg.removed.values() for c in per.values())
    redacted = sum(c["items"] for per in hyg.redacted.values() for c in per.values())
    read = sum(c.documents for c in hyg.read.values())
    console.print(f"hygiene: removed {removed} of {read} {what}" + (f" ({_reasons(hyg, None)})" if removed else "")
                  + f", redacted {redacted} PII item(s); details: lmforge data report {out}", markup=False)


def check_empty_inputs(hyg: Hygiene, inputs: Sequence[str | os.PathLike], allow_empty: bool,
                       switches: str = "--no-dedup, --skip-rule NAME, --quality off, --pii keep") -> None:
    """Refuse (or with allow_empty, warn about) an input that had documents and has none left."""
    for name in hyg.empty_inputs():
        what = f"input {name} ({inputs[hyg.inputs.index(name)]}) has no documents left after hygiene ({_reasons(hyg, name)})"
        if not allow_empty:
            raise DataError(f"{what}; switch the stage or rule off ({switches}) or pass --allow-empty")
        warn(what)


def _reasons(hyg: Hygiene, name: str | None) -> str:
    """'near_dup 12, min_words 3' for one input (or all when name is None), most frequent first."""
    counts = {reason: sum(c.documents for n, c in per.items() if name is None or n == name)
              for reason, per in hyg.removed.items()}
    return ", ".join(f"{r} {c}" for r, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c)


def _mix_record(weights: dict[str, float] | None, max_repeat: float, plan: dict[str, Any], train_bytes: dict[str, int],
                tokens: dict[str, dict[str, int]]) -> dict[str, Any]:
    assert weights is not None
    total_tokens = sum(tokens["train"].values()) or 1
    return {
        "weights": weights,
        "max_repeat": max_repeat,
        "rule": mixing.RULE,
        "target_bytes": plan["target_bytes"],
        "capped_by": plan["capped_by"],
        "inputs": {n: {"weight": w, "kept_train_bytes": train_bytes[n], "repeat": plan["repeat"][n],
                       "written_bytes": plan["written"][n], "written_documents": plan["documents"][n],
                       "tokens": tokens["train"][n], "token_share": tokens["train"][n] / total_tokens}
                   for n, w in weights.items()},
    }


_SPILL = struct.Struct("<IQdQ")  # source index, byte offset, u, text bytes; then the UTF-8 text


def _spill_records(path: Path) -> Iterator[tuple[int, int, float, str]]:
    with open(path, "rb", buffering=1 << 20) as f:
        while head := f.read(_SPILL.size):
            src, offset, u, n = _SPILL.unpack(head)
            yield src, offset, u, f.read(n).decode("utf-8")


def _tokenize(
    spill_path: Path,
    sources: list[Source],
    names: list[str],
    tok: Tokenizer,
    writers: dict[str, _SplitWriter],
    val_fraction: float,
    forced_u: float | None,
    dtype: np.dtype,
    plan: dict[str, Any] | None,
) -> dict[str, dict[str, int]]:
    """Pass 2: kept documents -> encode_batch -> eos appended -> shards of their split.

    With a mixture, the spill is read once per round: round k writes the train documents whose
    input's repeat factor gives them more than k copies (mix.copies); val documents go in round 0
    only. Returns the tokens written per split and input."""
    eos = np.array([tok.eos_id], dtype=dtype)
    tokens = {s: dict.fromkeys(names, 0) for s in SPLITS}
    batch: list[tuple[int, int, int, str]] = []  # split id, source, byte offset, text
    rounds = 1 if plan is None else max(1, max(math.ceil(r) for r in plan["repeat"].values()))
    if plan is not None:
        plan["written"] = dict.fromkeys(names, 0)
        plan["documents"] = dict.fromkeys(names, 0)

    def flush() -> None:
        for (split_id, src, offset, _), ids in zip(batch, tok.encode_batch([b[3] for b in batch])):
            doc_tokens = np.concatenate([np.asarray(ids, dtype=dtype), eos])
            writers[SPLITS[split_id]].add(doc_tokens, src, offset, split_id)
            tokens[SPLITS[split_id]][names[sources[src].input]] += len(doc_tokens)
        batch.clear()

    spill_bytes = spill_path.stat().st_size
    with _progress() as progress:
        task = progress.add_task("tokenize", total=spill_bytes * rounds)
        size = 0
        for k in range(rounds):
            for src, offset, u, text in _spill_records(spill_path):
                progress.advance(task, _SPILL.size + len(text))
                split_id = 1 if (u < val_fraction or u == forced_u) else 0
                if split_id == 1 and k > 0:
                    continue
                if split_id == 0 and plan is not None:
                    name = names[sources[src].input]
                    if mixing.copies(plan["repeat"][name], mixing.mix_key(u)) <= k:
                        continue
                    plan["written"][name] += len(text.encode("utf-8"))
                    plan["documents"][name] += 1
                batch.append((split_id, src, offset, text))
                size += len(text)
                if size >= BATCH_BYTES:
                    flush()
                    size = 0
        flush()
        progress.update(task, completed=spill_bytes * rounds)
    return tokens
