"""The index on disk: vectors, chunks with their spans, a manifest that checks them all.

```
idx/<name>/
  MANIFEST.json    artifacts.write_manifest(kind="index"): sha256 + size of every file below, and
                   the embedder's fingerprint (model sha256, pooling, dim), chunking, counts, versions
  vectors.f16      (rows, dim) float16, little-endian, row i = chunk i, L2-normalised: a raw
                   memory-mapped matrix (no header), so search reads it without loading it
  chunks.sqlite    files(id, path, sha256, bytes, kind, chunks) and chunks(id = row, file, lines,
                   bytes, record, tokens, text); read with immutable=1, so reading never writes
  bm25/            the BM25 index over the chunk texts (bm25s' own files, no pickle)
  ann.faiss        the approximate index, only above ANN_MIN_ROWS (search.py says which and why)
```

Vectors are normalised when written, so a dot product is the cosine similarity whatever the
model's pooling did, and exact and approximate search score alike. float16 halves the file and
the memory traffic of a scan; scores are recomputed in float32 for the candidates (search.py).

A `Writer` fills a temporary directory (`util.atomic_dir`, published by one rename, or by one
atomic exchange over an older index: `util.replace_path`), so a reader sees the old index or the
new one, never half of one. `Index.open` verifies every checksum before a search by default (a
flipped byte in the vectors would otherwise be a silently wrong answer), as `load_model` does for
weights; `verify_index` returns the problems one per line, each naming its file.

Trade-off: SQLite holds the text beside the spans, so a search answers without touching the
source files (which may have changed or gone); the index is therefore about as large as the text
it covers plus 2 bytes per dimension per chunk.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from ...artifacts import MANIFEST, read_manifest, verify_manifest
from ...errors import DataError, LmforgeError

VECTORS = "vectors.f16"
CHUNKS = "chunks.sqlite"
BM25_DIR = "bm25"
ANN_FILE = "ann.faiss"
KIND = "index"  # the manifest's kind
INDEX_FORMAT = 1  # the layout above; a reader refuses a newer one
REQUIRED = (VECTORS, CHUNKS)
_BLOCK_ROWS = 65536  # rows copied or scanned at a time: ~32 MB of float16 at dim 256

SCHEMA = """
CREATE TABLE files (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,   -- resolved absolute path
    sha256 TEXT NOT NULL,        -- of the file's bytes when indexed
    bytes INTEGER NOT NULL,
    kind TEXT NOT NULL,          -- text | jsonl
    chunks INTEGER NOT NULL
);
CREATE TABLE chunks (
    id INTEGER PRIMARY KEY,      -- the row of its vector in vectors.f16
    file INTEGER NOT NULL REFERENCES files(id),
    line_start INTEGER NOT NULL,
    line_end INTEGER NOT NULL,
    byte_start INTEGER NOT NULL,
    byte_end INTEGER NOT NULL,
    record TEXT,                 -- a JSONL record's id
    tokens INTEGER NOT NULL,
    text TEXT NOT NULL
);
CREATE INDEX chunks_file ON chunks(file);
"""


@dataclass(frozen=True)
class Hit:
    """A chunk as search returns it: its row, score, text and source span."""

    row: int
    score: float
    path: str
    line_start: int
    line_end: int
    byte_start: int
    byte_end: int
    record: str | None
    text: str

    def where(self) -> str:
        """`path:12-30` (or `path:12`; a JSONL record adds `#id`), the path relative to the
        working directory when it lies below it."""
        try:
            shown = os.path.relpath(self.path)
            path = shown if not shown.startswith("..") else self.path
        except ValueError:  # another drive (Windows)
            path = self.path
        lines = f"{self.line_start}" if self.line_start == self.line_end else f"{self.line_start}-{self.line_end}"
        return f"{path}:{lines}" + (f"#{self.record}" if self.record is not None else "")

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "score": self.score, "path": self.path, "line_start": self.line_start,
                "line_end": self.line_end, "byte_start": self.byte_start, "byte_end": self.byte_end,
                "record": self.record, "text": self.text}


# ---- writing -------------------------------------------------------------------------------------


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero), float32."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norms > 0, norms, 1.0)


class Writer:
    """Fills a new index directory (a temporary one that the caller publishes)."""

    def __init__(self, root: Path, dim: int) -> None:
        self.root, self.dim, self.rows, self.written = root, dim, 0, 0  # rows in the database, vectors in the file
        self.db = sqlite3.connect(root / CHUNKS)
        self.db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;" + SCHEMA)  # the directory is the journal
        self._vectors = open(root / VECTORS, "wb")  # noqa: SIM115 - closed in finish()

    def add_file(self, path: str, sha256: str, nbytes: int, kind: str) -> int:
        cur = self.db.execute("INSERT INTO files(path, sha256, bytes, kind, chunks) VALUES (?, ?, ?, ?, 0)",
                              (path, sha256, nbytes, kind))
        return int(cur.lastrowid)

    def add_chunks(self, file_id: int, rows: list[tuple[int, int, int, int, str | None, int, str]]) -> None:
        """rows: (line_start, line_end, byte_start, byte_end, record, tokens, text); their vectors
        follow through `add_vectors`, in the same order."""
        self.db.executemany(
            "INSERT INTO chunks(id, file, line_start, line_end, byte_start, byte_end, record, tokens, text) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(self.rows + i, file_id, *r) for i, r in enumerate(rows)])
        self.db.execute("UPDATE files SET chunks = chunks + ? WHERE id = ?", (len(rows), file_id))
        self.rows += len(rows)

    def add_vectors(self, vectors: np.ndarray) -> None:
        """The next rows' vectors (N, dim), normalised and stored as float16."""
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or self.written + len(vectors) > self.rows:
            raise AssertionError(f"vectors {vectors.shape} after {self.written} of {self.rows} rows, dim {self.dim}")
        self._vectors.write(normalize(vectors).astype("<f2").tobytes())
        self.written += len(vectors)

    def copy_file(self, old: Index, path: str) -> None:
        """A file of an older index, its chunks and vectors as they were (`index add`)."""
        f = old.file(path)
        assert f is not None
        file_id = self.add_file(path, f["sha256"], f["bytes"], f["kind"])
        rows = old.db.execute("SELECT id, line_start, line_end, byte_start, byte_end, record, tokens, text "
                              "FROM chunks WHERE file = ? ORDER BY id", (f["id"],)).fetchall()
        for i in range(0, len(rows), _BLOCK_ROWS):
            block = rows[i:i + _BLOCK_ROWS]
            ids = np.array([r[0] for r in block], dtype=np.int64)
            # unit rows already: written as read, never through float32 and back
            self._vectors.write(np.ascontiguousarray(old.vectors[ids]).astype("<f2").tobytes())
            self.written += len(block)
            self.db.executemany(
                "INSERT INTO chunks(id, file, line_start, line_end, byte_start, byte_end, record, tokens, text) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(self.rows + j, file_id, *r[1:]) for j, r in enumerate(block)])
            self.rows += len(block)
        self.db.execute("UPDATE files SET chunks = ? WHERE id = ?", (len(rows), file_id))

    def texts(self) -> list[str]:
        return [t for (t,) in self.db.execute("SELECT text FROM chunks ORDER BY id")]

    def counts(self) -> dict[str, int]:
        files, tokens = self.db.execute("SELECT COUNT(*), (SELECT COALESCE(SUM(tokens), 0) FROM chunks) FROM files").fetchone()
        return {"files": int(files), "chunks": self.rows, "tokens": int(tokens)}

    def close(self) -> None:
        """Flush and close the vectors and the database (before the manifest hashes them)."""
        if self.written != self.rows:
            raise AssertionError(f"{self.rows} chunks but {self.written} vectors")
        self._vectors.close()
        self.db.commit()
        self.db.close()

    def vectors(self) -> np.ndarray:
        """The written vectors, memory-mapped (after close)."""
        return memmap_vectors(self.root / VECTORS, self.rows, self.dim)


def memmap_vectors(path: Path, rows: int, dim: int) -> np.ndarray:
    if rows == 0:
        return np.zeros((0, dim), dtype="<f2")
    # copy-on-write ("c"): reads like "r" and nothing is ever written back, but the array is writable,
    # which torch.from_numpy wants (it warns about read-only arrays)
    return np.memmap(path, dtype="<f2", mode="c", shape=(rows, dim))


# ---- reading -------------------------------------------------------------------------------------


def is_index_dir(path: str | os.PathLike) -> bool:
    """A directory whose manifest says it is an index (damaged or not): what --overwrite may replace."""
    p = Path(path)
    if not (p / MANIFEST).is_file():
        return False
    try:
        return read_manifest(p).kind == KIND
    except LmforgeError:
        return (p / VECTORS).exists() and (p / CHUNKS).exists()  # a damaged manifest beside an index's files


def verify_index(path: str | os.PathLike) -> list[str]:
    """Problems of an index directory, one per line naming the file (empty: intact)."""
    p = Path(path)
    problems = verify_manifest(p, KIND, REQUIRED)
    if problems:
        return problems
    fields = read_manifest(p).fields
    try:
        rows, dim = int(fields["vectors"]["rows"]), int(fields["vectors"]["dim"])
    except (KeyError, TypeError, ValueError):
        return [f"{p}: corrupt: {MANIFEST} (no vectors.rows / vectors.dim)"]
    size = (p / VECTORS).stat().st_size
    if size != rows * dim * 2:
        return [f"{p}: {VECTORS} has {size} bytes; {rows} rows x {dim} float16 need {rows * dim * 2}"]
    return []


class Index:
    """An opened index: its manifest fields, the memory-mapped vectors and the chunk database.
    Safe to search from several threads (the database is read under a lock)."""

    def __init__(self, path: Path, fields: dict[str, Any]) -> None:
        self.path, self.fields = path, fields
        self.rows, self.dim = int(fields["vectors"]["rows"]), int(fields["vectors"]["dim"])
        self.vectors = memmap_vectors(path / VECTORS, self.rows, self.dim)
        uri = f"file:{quote(str((path / CHUNKS).resolve()))}?mode=ro&immutable=1"
        self.db = sqlite3.connect(uri, uri=True, check_same_thread=False)
        self._lock = threading.Lock()
        self._bm25: Any = None
        self._ann: Any = None

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: bool = True) -> Index:
        """Open idx/NAME; with verify, every checksum is checked first (DataError naming the bad file)."""
        p = Path(path)
        if not p.is_dir():
            raise DataError(f"no such index: {p} (build one with `lmforge index build MODEL INPUTS --out {p}`)")
        m = read_manifest(p)  # a damaged manifest: "idx/x: corrupt: MANIFEST.json (...)"
        if m.kind != KIND:
            raise DataError(f"{p} is a {m.kind} directory, not an index")
        fmt = m.fields.get("index_format")
        if not isinstance(fmt, int) or fmt > INDEX_FORMAT:
            raise DataError(f"{p}: index format {fmt!r} is not one this lmforge reads (up to {INDEX_FORMAT}); upgrade lmforge")
        problems = verify_index(p) if verify else []
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise DataError(f"{problems[0]}{more}; run `lmforge index verify {p}`, then rebuild the index")
        return cls(p, m.fields)

    # ---- what it records ---------------------------------------------------------------------

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.fields["embedder"]

    @property
    def model(self) -> str:
        return self.fields["model"]

    def file(self, path: str) -> dict[str, Any] | None:
        with self._lock:
            row = self.db.execute("SELECT id, sha256, bytes, kind, chunks FROM files WHERE path = ?", (path,)).fetchone()
        return None if row is None else dict(zip(("id", "sha256", "bytes", "kind", "chunks"), row))

    def paths(self) -> list[str]:
        with self._lock:
            return [p for (p,) in self.db.execute("SELECT path FROM files ORDER BY id")]

    def hits(self, rows: list[int], scores: list[float]) -> list[Hit]:
        """The chunks of these rows with their scores, in the order given."""
        if not rows:
            return []
        marks = ",".join("?" * len(rows))
        with self._lock:
            found = {r[0]: r for r in self.db.execute(
                "SELECT c.id, f.path, c.line_start, c.line_end, c.byte_start, c.byte_end, c.record, c.text "
                f"FROM chunks c JOIN files f ON c.file = f.id WHERE c.id IN ({marks})", [int(r) for r in rows])}
        return [Hit(int(r), float(s), *found[int(r)][1:]) for r, s in zip(rows, scores)]

    def texts(self) -> list[str]:
        with self._lock:
            return [t for (t,) in self.db.execute("SELECT text FROM chunks ORDER BY id")]

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["VECTORS", "CHUNKS", "BM25_DIR", "ANN_FILE", "KIND", "INDEX_FORMAT", "Hit", "normalize", "Writer",
           "memmap_vectors", "is_index_dir", "verify_index", "Index"]
