"""`lmforge index build | add | info | verify | tune`: documents -> chunks -> vectors -> an index directory.

Build
-----
Sources are collected as `lmforge prepare` collects them (`data.prepare.collect_sources` and
`iter_documents`: files, recursive directories with --include/--exclude globs, JSONL records
from --text-field with an optional `id`; a file that is not UTF-8 is skipped and counted, or
refused with --strict). Each document is cut into token windows (chunk.py) with the model's own
tokenizer, the chunks are embedded with the model's recorded pooling (`Embedder`), and a `Writer`
fills a temporary directory that is published in one step (store.py). The manifest records the
embedder's fingerprint and pooling, the model's path, the chunking, the counts and the versions.
When the model is a contrastive run with its held-out pairs here, the build also chooses the
index's default search on them (tune.py); `index tune` does the same for a built index (one
atomic rewrite of its manifest), and `index add` keeps the setting.

Add (atomic)
------------
`index add` re-reads the inputs with the index's recorded chunking, text field and model: a file
whose sha256 is unchanged is skipped, a changed file's chunks are replaced, a new file's added;
files of the index that are not among the inputs stay. The new version is written as a complete
index into a temporary sibling (unchanged files' chunks and vectors are copied, not re-embedded)
and swapped with the old one in one atomic exchange (`util.replace_path`): killed at any moment,
`idx/NAME` is the complete old index or the complete new one, and verifies. A writer holds an
exclusive lock (`idx/.NAME.lock`) so two adds never race; it removes the leftovers of a killed one
(`idx/.NAME.*.tmp`) first.

Trade-offs: an add rewrites the vectors file and the BM25 index (a copy is seconds per million
rows; re-embedding is what costs, and only new text is embedded); the approximate index is
extended when nothing was replaced, rebuilt otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import platform
import shutil
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape
from rich.table import Table

from ... import __version__
from ...artifacts import MANIFEST, manifest_checksum, read_manifest, write_manifest
from ...data.prepare import NotUtf8, Source, check_out_overlap, collect_sources, iter_documents
from ...errors import DataError, LmforgeError
from ...util import atomic_dir, atomic_write_text, console, human_bytes, sha256_bytes, writes_to
from ...util import out as results_out
from ..embed import Embedder
from . import tune as tuning
from .chunk import Chunking, Lines, Span, check_size, cut, record_span, text_spans
from .search import Ann, Bm25, Settings, load_embedder
from .store import ANN_FILE, BM25_DIR, CHUNKS, INDEX_FORMAT, KIND, VECTORS, Index, Writer, is_index_dir, verify_index

EMBED_BLOCK = 16_384  # chunks embedded (and held as float32) at a time


# ---- reading the inputs --------------------------------------------------------------------------


@dataclass
class Chunked:
    """The chunks of one source file, ready to be written."""

    source: Source
    sha256: str
    rows: list[tuple[int, int, int, int, str | None, int, str]]  # Writer.add_chunks rows
    tokens: int = 0


@dataclass
class Reader:
    """Reads and chunks source files with one tokenizer and chunking; counts what it skipped."""

    embedder: Embedder
    chunking: Chunking
    text_field: str
    strict: bool
    skipped: list[dict[str, str]] = field(default_factory=list)

    def read(self, src: Source) -> tuple[bytes, str]:
        try:
            data = src.path.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {src.path}: {e.strerror or e}") from None
        return data, sha256_bytes(data)

    def chunk(self, src: Source, index: int, data: bytes, sha256: str) -> Chunked | None:
        """The file's chunks; None when it is not UTF-8 (skipped and counted, DataError with --strict)."""
        try:
            docs = list(iter_documents(src, index, self.text_field))
        except NotUtf8 as e:
            if self.strict:
                raise DataError(f"{e} (--strict: every input must be UTF-8 text)") from None
            self.skipped.append({"path": str(src.path), "reason": "not UTF-8", "sha256": sha256})
            return None
        # offsets (character ranges of each token) are what cut() needs: encode_batch, not the _fast one
        encodings = self.embedder.tokenizer.hf.encode_batch([d.text for d in docs], add_special_tokens=False)
        out = Chunked(src, sha256, [])
        lines = Lines(data)  # documents come in file order: one running line count for the file
        for doc, enc in zip(docs, encodings):
            pieces = cut(doc.text, enc.offsets, self.chunking)
            spans: Iterator[Span]
            if src.kind == "jsonl":
                span = record_span(data, doc.byte_offset, doc.record_id, lines)
                spans = iter([span] * len(pieces))
            else:
                spans = text_spans(data, doc.byte_offset, doc.text, pieces, lines)
            for p, s in zip(pieces, spans):
                out.rows.append((s.line_start, s.line_end, s.byte_start, s.byte_end, s.record, p.tokens,
                                 doc.text[p.start:p.end]))
                out.tokens += p.tokens
        return out


def _embed_into(writer: Writer, embedder: Embedder, texts: list[str]) -> None:
    """Embed the texts of the rows just added, in blocks, appending their vectors in row order."""
    for start in range(0, len(texts), EMBED_BLOCK):
        writer.add_vectors(embedder.embed(texts[start:start + EMBED_BLOCK], kind="document", progress=True))


def _finish(writer: Writer, tmp: Path, *, embedder: Embedder, model: str, chunking: Chunking, text_field: str,
            include: Sequence[str], exclude: Sequence[str], skipped: list[dict[str, str]],
            extend: tuple[Path, int] | None = None, search: dict[str, Any] | None = None) -> dict[str, Any]:
    """BM25, the ANN index when the size calls for one, and the manifest of a filled index.
    extend: (an older index's ANN file, the first new row): add the new rows to that graph
    instead of building one over every row. search: the index's tuned default search (tune.py), when
measured (build) or kept (add)."""
    counts = {**writer.counts(), "skipped": len(skipped)}
    texts = writer.texts()
    writer.close()
    t = time.perf_counter()
    bm25 = Bm25.build(texts)
    (tmp / BM25_DIR).mkdir()
    bm25.save(tmp / BM25_DIR)
    console.print(f"BM25 over {len(texts):,} chunks in {time.perf_counter() - t:.1f} s")
    ann_info = None
    if Ann.wanted(writer.rows):
        t = time.perf_counter()
        if extend is not None and extend[0].is_file():
            ann = Ann.load(extend[0])
            ann.add(writer.vectors()[extend[1]:])
        else:
            ann = Ann.build(writer.vectors())
        ann.save(tmp / ANN_FILE)
        ann_info = ann.describe()
        console.print(f"approximate index ({ann_info['library']} {ann_info['kind']}) in {time.perf_counter() - t:.1f} s")
    import bm25s
    import torch

    extra = {
        "index_format": INDEX_FORMAT,
        "embedder": embedder.fingerprint(),
        "pooling": embedder.pooling.to_dict(),
        "model": model,
        "chunking": {**asdict(chunking), "text_field": text_field, "include": list(include), "exclude": list(exclude)},
        "counts": counts,
        "vectors": {"file": VECTORS, "rows": writer.rows, "dim": writer.dim, "dtype": "float16", "normalized": True},
        "bm25": Bm25.describe(),
        "ann": ann_info,
        "skipped": skipped,
        **({"search": search} if search else {}),
        "versions": {"lmforge": __version__, "python": platform.python_version(), "numpy": np.__version__,
                     "torch": str(torch.__version__), "sqlite": sqlite3.sqlite_version, "bm25s": bm25s.__version__,
                     **({"faiss": ann_info["version"]} if ann_info else {})},
    }
    return write_manifest(tmp, kind=KIND, extra=extra)


# ---- build ---------------------------------------------------------------------------------------


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """--out may be new, or (with --overwrite) an index directory or an empty directory."""
    if out.is_symlink():
        raise DataError(f"--out {out} is a symbolic link; pass the directory it points to (nothing was written)")
    if not out.exists():
        return
    if not out.is_dir():
        raise DataError(f"--out {out} exists and is a file; choose another --out (nothing was written)")
    empty = not any(out.iterdir())
    if not empty and not is_index_dir(out):
        raise DataError(f"--out {out} exists and is not an index directory; choose another --out "
                        f"(--overwrite only replaces an index; nothing was touched)")
    if not overwrite and not empty:
        raise DataError(f"--out {out} already exists (pass --overwrite to replace the index there)")


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Hold the index's writer lock (idx/.NAME.lock) and clear what a killed writer left behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LmforgeError(f"another lmforge is writing {path} (it holds {lock}); wait for it to finish") from None
        # a killed writer's half-written or swapped-out version: atomic_dir's `.NAME.<8 random>.tmp`, replace_path's
        # `.NAME.<8 hex>.old`; exactly 8 characters, so `.NAME.b.<8>.tmp` (the index NAME.b's) never matches
        for stale in [*path.parent.glob(f".{glob.escape(path.name)}.{'?' * 8}.tmp"),
                      *path.parent.glob(f".{glob.escape(path.name)}.{'?' * 8}.old")]:
            shutil.rmtree(stale, ignore_errors=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_index(model: str | os.PathLike, inputs: Sequence[str | os.PathLike], out: str | os.PathLike, *,
          chunk_size: int | None = None, chunk_overlap: int | None = None, include: Sequence[str] = (),
          exclude: Sequence[str] = (), text_field: str = "text", strict: bool = False, overwrite: bool = False,
          batch_size: int = 32, embedder: Embedder | None = None, tune: bool = True, compile: bool = False) -> dict[str, Any]:
    """Build an index at `out` (see the module docstring); returns its manifest. `embedder`: an
    Embedder of `model` already loaded (the quickstart's, sharing the weights it trained). tune:
    when `model` is a contrastive run with its held-out pairs here, choose the default search on
    them (tune.py) and record it with the index. compile: the model's blocks through torch.compile
    (`Embedder(compile=True)`)."""
    out = Path(out)
    if not inputs:
        raise DataError("no inputs given: pass files, directories or .jsonl files to index")
    check_out_overlap(out, inputs, what="index")
    _check_replaceable(out, overwrite)
    if embedder is None:
        embedder = Embedder.load(model, batch_size=batch_size, compile=compile)
    reserved = len(embedder.tokenizer.encode(embedder.pooling.document_prefix)) if embedder.pooling.document_prefix else 0
    size = chunk_size if chunk_size is not None else min(256, embedder.max_len - reserved)
    chunking = Chunking(size, chunk_overlap if chunk_overlap is not None else size // 8)
    check_size(chunking, embedder.max_len, reserved)
    sources = collect_sources(inputs, include, exclude)
    reader = Reader(embedder, chunking, text_field, strict)
    t0 = time.perf_counter()
    with writing(out), writes_to(out), atomic_dir(out, overwrite=True) as tmp:
        writer = Writer(tmp, embedder.dim)
        texts = _chunk_into(writer, reader, ((src, *reader.read(src)) for src in sources))
        if not texts:
            raise DataError(f"empty corpus: no text to index in {len(sources)} file(s) under "
                            f"{', '.join(map(str, inputs))}" + (f" ({len(reader.skipped)} not UTF-8)" if reader.skipped else ""))
        _report_skipped(reader.skipped)
        console.print(f"{len(texts):,} chunks of up to {chunking.size} tokens from {len(sources) - len(reader.skipped)} "
                      f"file(s); embedding them with {model}")
        _embed_into(writer, embedder, texts)
        search = _tuned(embedder, model, out) if tune else None
        manifest = _finish(writer, tmp, embedder=embedder, model=str(Path(model).resolve()), chunking=chunking,
                           text_field=text_field, include=include, exclude=exclude, skipped=reader.skipped,
                           search=search)
        _check_replaceable(out, overwrite)  # again: something may have appeared at --out meanwhile
    c = manifest["counts"]
    console.print(f"[green]indexed[/] {escape(str(out))}: {c['chunks']:,} chunks from {c['files']} file(s), "
                  f"{c['tokens']:,} tokens, in {time.perf_counter() - t0:.1f} s")
    return manifest


def _tuned(embedder: Embedder, model: str | os.PathLike, out: Path) -> dict[str, Any] | None:
    """The search setting `index tune` would record, measured on the held-out pairs of a contrastive
    run `model`; None (untuned) for any other model, or when its pairs cannot be used (said)."""
    try:
        held = tuning.held_out(model, None)
    except LmforgeError as e:
        console.print(f"[yellow]not tuning the default search:[/] {escape(str(e))}")
        return None
    if held is None:
        return None
    console.print(f"choosing the default search on {len(held[0])} held-out pairs of {escape(str(model))} "
                  "(--no-tune skips this)")
    record = tuning.measure(embedder, held)
    tuning.show(record, out)
    return record


def _chunk_into(writer: Writer, reader: Reader, files: Iterable[tuple[Source, bytes, str]]) -> list[str]:
    """Chunk each (source, its bytes, their sha256) into the writer's file and chunk tables (a file
    the reader skips, not UTF-8, adds nothing); the chunk texts, in order, to embed."""
    texts: list[str] = []
    for i, (src, data, sha) in enumerate(files):
        chunked = reader.chunk(src, i, data, sha)
        if chunked is None:
            continue
        file_id = writer.add_file(str(src.path), sha, len(data), src.kind)
        writer.add_chunks(file_id, chunked.rows)
        texts += [r[-1] for r in chunked.rows]
    return texts


def _report_skipped(skipped: list[dict[str, str]]) -> None:
    if skipped:
        from ...util import warn

        names = ", ".join(s["path"] for s in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        warn(f"skipped {len(skipped)} file(s) that are not UTF-8: {escape(names)}")


# ---- add -----------------------------------------------------------------------------------------


def add_to_index(path: str | os.PathLike, inputs: Sequence[str | os.PathLike], *, include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None, strict: bool = False, model: str | os.PathLike | None = None,
        batch_size: int = 32, compile: bool = False) -> dict[str, Any]:
    """Add new and changed files to an index, atomically (module docstring); returns a summary
    {"added", "replaced", "unchanged", "chunks", "skipped"}."""
    path = Path(path)
    if not inputs:
        raise DataError("no inputs given: pass the files or directories to add")
    check_out_overlap(path, inputs, what="index")
    with writing(path):
        with Index.open(path) as old:
            embedder = load_embedder(old, model, batch_size=batch_size, compile=compile)
            rec = old.fields["chunking"]
            chunking = Chunking(int(rec["size"]), int(rec["overlap"]))
            include = rec.get("include", []) if include is None else include
            exclude = rec.get("exclude", []) if exclude is None else exclude
            reader = Reader(embedder, chunking, rec.get("text_field", "text"), strict)
            sources = collect_sources(inputs, include, exclude)
            fresh: list[tuple[Source, bytes, str]] = []
            replaced: set[str] = set()
            unchanged = 0
            skipped_before = {s["path"]: s.get("sha256") for s in old.fields.get("skipped", [])}
            for src in sources:
                data, sha = reader.read(src)
                known = old.file(str(src.path))
                if (known is not None and known["sha256"] == sha) or skipped_before.get(str(src.path)) == sha:
                    unchanged += 1  # as indexed, or as skipped (not UTF-8) last time
                    continue
                if known is not None:
                    replaced.add(str(src.path))
                fresh.append((src, data, sha))
            summary = {"added": len(fresh) - len(replaced), "replaced": len(replaced), "unchanged": unchanged,
                       "chunks": 0, "skipped": 0}
            if not fresh:
                console.print(f"nothing to add to {escape(str(path))}: {unchanged} file(s) unchanged")
                return summary
            with writes_to(path, updating=True), atomic_dir(path, overwrite=True) as tmp:
                writer = Writer(tmp, embedder.dim)
                for p in old.paths():
                    if p not in replaced:
                        writer.copy_file(old, p)
                kept = writer.rows
                texts = _chunk_into(writer, reader, fresh)
                _report_skipped(reader.skipped)
                summary.update(chunks=len(texts), skipped=len(reader.skipped))
                console.print(f"{len(texts):,} new chunks from {len(fresh) - len(reader.skipped)} file(s); "
                              f"{kept:,} chunks kept")
                _embed_into(writer, embedder, texts)
                prior_skipped = [s for s in old.fields.get("skipped", []) if s["path"] not in
                                 {str(src.path) for src, _, _ in fresh}]
                _finish(writer, tmp, embedder=embedder, model=old.model if model is None else str(Path(model).resolve()),
                        chunking=chunking, text_field=reader.text_field, include=include, exclude=exclude,
                        skipped=prior_skipped + reader.skipped,
                        extend=None if replaced else (old.path / ANN_FILE, kept),  # only appended: extend the graph
                        search=old.fields.get("search"))
    console.print(f"[green]updated[/] {escape(str(path))}: {summary['added']} file(s) added, {summary['replaced']} replaced, "
                  f"{summary['unchanged']} unchanged; {summary['chunks']:,} chunks embedded")
    return summary


# ---- tune ----------------------------------------------------------------------------------------


def tune_index(path: str | os.PathLike, *, pairs: str | os.PathLike | None = None, model: str | os.PathLike | None = None,
               batch_size: int = 32) -> dict[str, Any]:
    """`lmforge index tune`: measure tuning.GRID on held-out pairs (--pairs, else the val pairs of
    the contrastive run that built the index) and record the best setting in the manifest's
    "search" field: one atomic rewrite of MANIFEST.json (checksum updated) under the writer lock;
    no file it covers changes. Returns the record."""
    path = Path(path)
    with writing(path), Index.open(path) as index:
        held = tuning.held_out(index.model if model is None else model, pairs)
        if held is None:
            raise LmforgeError(f"the model {index.model} is not a contrastive run whose pairs file is here, so there "
                               "are no held-out pairs to measure on; pass --pairs FILE (JSONL of query/positive "
                               "pairs the model was not trained on)")
        record = tuning.measure(load_embedder(index, model, batch_size=batch_size), held)
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        manifest["search"] = record
        manifest["manifest_sha256"] = manifest_checksum(manifest)
        atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return record


def tune_command(path: str | os.PathLike, *, pairs: str | None = None, model: str | None = None,
                 as_json: bool = False) -> int:
    """Print the grid's scores (or the record as JSON) and the setting now recorded."""
    record = tune_index(path, pairs=pairs, model=model)
    if as_json:
        print(json.dumps(record, indent=2))
    else:
        tuning.show(record, path)
    return 0


# ---- info / verify -------------------------------------------------------------------------------


def info(path: str | os.PathLike) -> dict[str, Any]:
    """The summary `index info` prints (the manifest's self-checksum is checked, the files not)."""
    p = Path(path)
    if not p.is_dir():
        raise DataError(f"no such index: {p}")
    m = read_manifest(p)
    if m.kind != KIND:
        raise DataError(f"{p} is a {m.kind} directory, not an index")
    f = m.fields
    return {
        "path": str(p), "model": f.get("model"), "model_sha256": f.get("embedder", {}).get("model_sha256"),
        "pooling": f.get("pooling"), "dim": f.get("vectors", {}).get("dim"), **f.get("counts", {}),
        "chunk_size": f.get("chunking", {}).get("size"), "chunk_overlap": f.get("chunking", {}).get("overlap"),
        "text_field": f.get("chunking", {}).get("text_field"),
        "ann": (f"{f['ann']['library']} {f['ann']['kind']}" if f.get("ann") else None),
        "search": search_default(f.get("search")),
        "bytes": sum(meta["bytes"] for meta in m.files.values()), "created": f.get("created"),
        "lmforge_version": f.get("lmforge_version"),
    }


def search_default(record: dict[str, Any] | None) -> str:
    """What a search without --mode does: the setting `index tune` recorded (and what it measured), else the default."""
    if not record:
        return f"{Settings().describe()}, the default (not tuned: lmforge index tune)"
    t = record.get("tuned", {})
    s = Settings.from_record(record)
    return f"{s.describe()}, tuned: nDCG@10 {t.get('score')} on {t.get('queries')} held-out pairs ({t.get('time')})"


def info_command(path: str | os.PathLike, as_json: bool = False) -> int:
    summary = info(path)
    if as_json:
        print(json.dumps(summary, indent=2))
        return 0
    table = Table(title=f"index {path}", show_header=False)
    for key, value in summary.items():
        if key == "pooling" and isinstance(value, dict):  # mean, normalized, prefixes when set
            value = ", ".join([value.get("method", "?")] + [k for k in ("normalize", "bidirectional") if value.get(k)]
                              + [f"{k} {value[k]!r}" for k in ("query_prefix", "document_prefix") if value.get(k)])
        table.add_row(key, human_bytes(value) if key == "bytes" else escape(str(value)))
    results_out.print(table)
    return 0


def verify_command(path: str | os.PathLike) -> int:
    """Print the verdict; 0 when every checksum matches, 1 otherwise (each bad file named)."""
    p = Path(path)
    if not p.is_dir():
        raise DataError(f"no such index: {p}")
    if not (p / MANIFEST).exists() and not ((p / VECTORS).exists() or (p / CHUNKS).exists()):
        raise DataError(f"{p} is not an index directory (no {MANIFEST})")
    problems = verify_index(p)
    if not problems:
        m = read_manifest(p)
        results_out.print(f"[green]ok[/] {escape(str(p))}: {len(m.files)} file(s) match the manifest "
                          f"({m.fields['vectors']['rows']:,} chunks)")
        return 0
    for problem in problems:
        results_out.print(f"[bold red]bad:[/] {escape(problem)}", soft_wrap=True)
    return 1


__all__ = ["build_index", "add_to_index", "info", "info_command", "verify_command", "writing",
           "EMBED_BLOCK"]
