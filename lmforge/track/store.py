"""The experiment store: every run, metric and event in one SQLite file per workspace.

Design
------
One file (`./lmforge.db`, or `$LMFORGE_DB`, or `--db`) in WAL mode, so any number of readers (the
dashboard, `lmforge runs`) never block the writers, and several writer processes (the trainer and
an eval sidecar) take turns on the write lock (`busy_timeout`). Four tables:

    runs         one row per run directory: name, status, config (JSON), host, pid, versions,
                 timestamps, last step, heartbeat
    metrics      (run, key, step) -> value, time.  A step logged twice (a rollback replays steps)
                 keeps the newest value, so a curve is what the final weights actually saw.
    events       resume, config_change, spike, rollback, checkpoint_saved / _corrupt, eval, crash,
                 interrupted, completed: (run, step, kind, data JSON, time)
    checkpoints  (run, step) -> path, status; filled from checkpoint_* events. The stored status
                 says what was recorded (saved | corrupt); readers add whether the directory is
                 still on disk (see `checkpoint_state`): retention, a rollback or a person may
                 delete it later, and none of those tell the store.

Writes never slow or crash training. `log_metrics`, `log_event` and `heartbeat` only put a tuple
on a queue (about a microsecond); one background thread per process drains it every
`FLUSH_S` seconds and writes the whole batch in one transaction. A locked or failing database
logs a warning (at most one per `WARN_EVERY_S`), keeps the batch for the next try (bounded by
`MAX_PENDING`; the oldest rows are dropped beyond it) and training goes on. Only `start_run`
is synchronous, because the trainer needs the run id; if it fails the store is disabled for
the run (id 0) with a warning rather than stopping the trainer.

A full disk (SQLite's "database or disk is full") is one warning per store, "experiment store:
disk full at PATH, N bytes free", and training goes on. SQLite has then already rolled the
transaction back itself, so a failed write only rolls back a transaction that is still open (an
unconditional ROLLBACK would fail with "cannot rollback - no transaction is active" and hide the
cause). The store marks what it can: when the whole batch cannot be written, it tries the run's
status, heartbeat and events alone (a few rows), so a finished run is not left looking crashed
while there is room for them.

Crashes. A run killed with SIGKILL never calls `finish_run`, so its row still says `running`.
Readers derive the shown status: `crashed` when the run's pid on this host no longer exists, or
when its heartbeat is older than `STALE_S` (another host, or a hung process). The writer thread
refreshes the heartbeat of the runs its process owns every `HEARTBEAT_S`, so a live trainer that
logs rarely never looks stale. The stored row is left alone: readers are read-only.

Schema versions live in `PRAGMA user_version`; `MIGRATIONS[i]` upgrades version i to i + 1 and all
pending ones run in one `BEGIN IMMEDIATE` transaction, so two processes opening a fresh file at
once cannot both migrate it. A file from a newer lmforge is refused with a clear error.

Trade-offs: one row per metric value (not a JSON blob per step) costs space but lets the
dashboard fetch one curve with one indexed query; NaN values are stored as NULL (SQLite has no
NaN) and read back as NaN. Event data is JSON under lmforge/jsonl.py's rule (NaN/inf as the
strings "nan"/"inf"/"-inf"), like every JSON record lmforge writes.
"""

from __future__ import annotations

import json
import math
import os
import platform
import queue
import socket
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterable

from ..errors import LmforgeError
from ..jsonl import dumps_record
from ..util import write_failure

DEFAULT_DB = "lmforge.db"
FLUSH_S = 0.5  # how often the writer thread drains the queue
HEARTBEAT_S = 30.0  # the writer refreshes its runs' heartbeat this often, even when idle
STALE_S = 300.0  # a running run whose heartbeat is older than this is shown as crashed
BUSY_TIMEOUT_MS = 5000  # how long one write waits for another process's write lock
MAX_PENDING = 200_000  # rows kept in memory while the database is unavailable
WARN_EVERY_S = 60.0
DISK_FULL_MARGIN = 64 * 1024  # fewer free bytes than this at a failed write: the disk is full

EVENT_KINDS = (
    "resume", "config_change", "spike", "rollback", "checkpoint_saved", "checkpoint_corrupt",
    "eval", "crash", "interrupted", "completed",
)
FINAL_STATUSES = ("completed", "interrupted", "failed")


# ---- schema ------------------------------------------------------------------------------------


def _script(conn: sqlite3.Connection, sql: str) -> None:
    """Run several statements inside the caller's transaction (executescript would commit it)."""
    for statement in sql.split(";"):
        if statement.strip():
            conn.execute(statement)


def _v1(conn: sqlite3.Connection) -> None:
    _script(
        conn,
        """
        CREATE TABLE runs (
            id            INTEGER PRIMARY KEY AUTOINCREMENT,
            name          TEXT NOT NULL,
            run_dir       TEXT NOT NULL UNIQUE,
            status        TEXT NOT NULL,          -- running | completed | interrupted | failed
            config        TEXT NOT NULL,          -- JSON
            host          TEXT NOT NULL,
            pid           INTEGER NOT NULL,
            versions      TEXT NOT NULL,          -- JSON {"lmforge", "torch", "python", ...}
            created_at    REAL NOT NULL,          -- first start
            segment_at    REAL NOT NULL,          -- start of the current (resumed) segment
            active_s      REAL NOT NULL DEFAULT 0,-- seconds of earlier segments
            finished_at   REAL,
            heartbeat_at  REAL NOT NULL,
            last_step     INTEGER NOT NULL DEFAULT 0,
            resumes       INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE metrics (
            run_id  INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            key     TEXT NOT NULL,
            step    INTEGER NOT NULL,
            value   REAL,                         -- NULL for NaN
            time    REAL NOT NULL,
            PRIMARY KEY (run_id, key, step)
        ) WITHOUT ROWID;
        CREATE TABLE events (
            id      INTEGER PRIMARY KEY AUTOINCREMENT,
            run_id  INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            step    INTEGER NOT NULL,
            kind    TEXT NOT NULL,
            data    TEXT NOT NULL,                -- JSON
            time    REAL NOT NULL
        );
        CREATE INDEX events_run ON events(run_id, step);
        CREATE TABLE checkpoints (
            run_id  INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
            step    INTEGER NOT NULL,
            path    TEXT NOT NULL,
            status  TEXT NOT NULL,                -- saved | corrupt
            time    REAL NOT NULL,
            PRIMARY KEY (run_id, step)
        );
        """
    )


# MIGRATIONS[i] takes a database at schema version i to version i + 1. Append, never edit.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_v1]


def schema_version() -> int:
    return len(MIGRATIONS)


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the database to the newest schema; return the version it was at before."""
    if conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS):
        return len(MIGRATIONS)  # the common case: no write lock needed, a busy trainer is not waited for
    conn.execute("BEGIN IMMEDIATE")  # take the write lock, then read the version again
    try:
        before = conn.execute("PRAGMA user_version").fetchone()[0]
        if before > len(MIGRATIONS):
            raise LmforgeError(
                f"this experiment store has schema version {before}, newer than this lmforge "
                f"understands ({len(MIGRATIONS)}); upgrade lmforge or use another --db"
            )
        for version in range(before, len(MIGRATIONS)):
            MIGRATIONS[version](conn)
        conn.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise
    return before


# ---- helpers -----------------------------------------------------------------------------------


def default_path() -> Path:
    return Path(os.environ.get("LMFORGE_DB") or DEFAULT_DB)


def _connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None,
                               check_same_thread=False)
    else:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per batch.
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.row_factory = sqlite3.Row
    return conn


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else (None if math.isnan(value) else value)


def _stored(value: float | None) -> float:
    """A metrics row's value as logged: NULL is how a NaN is stored (see `_finite`)."""
    return math.nan if value is None else value


def _versions() -> dict[str, str]:
    from importlib import metadata

    from .. import __version__

    out = {"lmforge": __version__, "python": platform.python_version()}
    torch = sys.modules.get("torch")  # never import torch just to record its version
    if torch is not None:
        out["torch"] = str(torch.__version__)
    else:
        try:
            out["torch"] = metadata.version("torch")
        except metadata.PackageNotFoundError:
            pass
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    # A zombie (killed, not yet reaped by its parent) still answers kill(0); it is dead to us.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}: configs are compared key by key."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    fa, fb = flatten(a), flatten(b)
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)}


def checkpoint_state(run_dir: str, row: dict[str, Any]) -> dict[str, Any]:
    """A checkpoints row as readers show it: `stored_status` as recorded, `on_disk`, and `status`
    derived like a run's `crashed`: `deleted` when the directory is gone from a run directory that
    is still here (retention's keep_last / keep_every, a rollback discarding newer checkpoints, a
    person), `missing` when the run directory itself is not here (moved, removed, another host).

    The trainer does not report those deletions to the store, so the file system is the truth.
    A relative recorded path is relative to the trainer's working directory; the checkpoint is
    found by name in the run directory (stored absolute) instead."""
    from ..artifacts import CHECKPOINTS

    d = dict(row)
    path = Path(d["path"])
    if not path.is_absolute():
        path = Path(run_dir) / CHECKPOINTS / path.name
    d["stored_status"] = d["status"]
    d["on_disk"] = path.is_dir()
    if not d["on_disk"]:
        d["status"] = "deleted" if Path(run_dir).is_dir() else "missing"
    return d


@dataclass
class _Op:
    """One queued write. kind: metrics | event | heartbeat | finish."""

    kind: str
    run_id: int
    step: int
    payload: Any
    time: float


# ---- the store ---------------------------------------------------------------------------------


def _disk_full(e: BaseException, path: Path) -> str | None:
    """"disk full at PATH, N bytes free" when `e` comes from a full disk, else None. SQLite says
    "database or disk is full" for its own files, but "disk I/O error" when it cannot grow its
    shared-memory file: fewer free bytes than a few pages tell that case apart."""
    line = write_failure(e, path, needed=DISK_FULL_MARGIN)
    return line if line is not None and line.startswith("disk full") else None


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back a failed transaction, if SQLite has not already (it does on a full disk)."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


class Store:
    """Writer and reader of one experiment store file. Thread-safe; one per process is enough."""

    def __init__(self, path: Path, conn: sqlite3.Connection, readonly: bool) -> None:
        self.path = path
        self.readonly = readonly
        self._conn = conn  # readers and start_run; the writer thread has its own connection
        self._lock = threading.Lock()  # guards self._conn
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._owned: dict[int, int] = {}  # run_id -> last step, for the runs this process started
        self._wake = threading.Event()  # flush() / close(): write now instead of at the next tick
        self._last_warn = 0.0
        self._disk_full_warned = False
        self.dropped = 0  # queued writes given up on while the database was unavailable
        self.failures = 0  # failed write attempts (each one retried later)
        self.warnings: list[str] = []  # what was printed, for callers and tests

    # ---- opening -----------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike | None = None, readonly: bool = False) -> "Store":
        """Open (and create or migrate) the store. readonly: for viewers; the file must exist."""
        p = Path(path) if path is not None else default_path()
        if readonly:
            if not p.exists():
                raise LmforgeError(
                    f"no experiment store at {p}: train a run first, or point --db / $LMFORGE_DB "
                    "at an existing lmforge.db"
                )
            try:
                conn = _connect(p, readonly=True)
                version = conn.execute("PRAGMA user_version").fetchone()[0]
            except sqlite3.DatabaseError as e:
                raise LmforgeError(f"{p} is not a readable lmforge experiment store: {e}") from e
            if version != len(MIGRATIONS):
                conn.close()
                if version > len(MIGRATIONS):
                    raise LmforgeError(
                        f"{p} has schema version {version}, newer than this lmforge understands "
                        f"({len(MIGRATIONS)}); upgrade lmforge"
                    )
                # An older file: upgrading it is a write, so do it through a writable handle.
                cls.open(p).close()
                conn = _connect(p, readonly=True)
            return cls(p, conn, readonly=True)
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = _connect(p)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable across app crashes
            migrate(conn)
        except sqlite3.DatabaseError as e:
            full = _disk_full(e, p)
            if full:
                raise LmforgeError(f"cannot open experiment store: {full}") from None
            raise LmforgeError(f"cannot open experiment store {p}: {e}") from e
        return cls(p, conn, readonly=False)

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- writing (the trainer's API) ---------------------------------------------------------
    def start_run(self, name: str | None, run_dir: str, config: dict[str, Any],
                  resumed: bool = False) -> int:
        """Register a run (or reopen the row of its run directory); return its id.

        One row per run directory. resumed=True continues the row: records a `resume` event and,
        when the config differs from the stored one, a `config_change` event with the diff.
        resumed=False on a known directory means it was started over: its old metrics, events
        and checkpoints no longer describe anything on disk and are cleared.
        Returns 0 (writes become no-ops) with a warning if the database cannot be written.
        """
        if self.readonly:
            raise LmforgeError("this store was opened read-only")
        run_dir = str(Path(run_dir).resolve())
        name = name or Path(run_dir).name
        now = time.time()
        cfg_json = json.dumps(config, sort_keys=True, default=str)
        try:
            with self._lock:
                c = self._conn
                c.execute("BEGIN IMMEDIATE")
                try:
                    row = c.execute("SELECT * FROM runs WHERE run_dir = ?", (run_dir,)).fetchone()
                    fields = dict(name=name, config=cfg_json, host=socket.gethostname(),
                                  pid=os.getpid(), versions=json.dumps(_versions()),
                                  heartbeat_at=now, segment_at=now)
                    if row is None:
                        cur = c.execute(
                            "INSERT INTO runs (name, run_dir, status, config, host, pid, versions, "
                            "created_at, segment_at, heartbeat_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                            (name, run_dir, "running", cfg_json, fields["host"], fields["pid"],
                             fields["versions"], now, now, now),
                        )
                        run_id = int(cur.lastrowid)
                    elif resumed:
                        run_id = int(row["id"])
                        before = self._derive(dict(row), now)
                        c.execute(
                            "UPDATE runs SET name=?, status='running', config=?, host=?, pid=?, "
                            "versions=?, heartbeat_at=?, segment_at=?, active_s=?, "
                            "finished_at=NULL, resumes=resumes+1 WHERE id=?",
                            (name, cfg_json, fields["host"], fields["pid"], fields["versions"],
                             now, now, before["elapsed_s"], run_id),
                        )
                        self._insert_event(c, run_id, row["last_step"], "resume",
                                           {"previous_status": before["status"]}, now)
                        diff = config_diff(json.loads(row["config"]), config)
                        if diff:
                            self._insert_event(c, run_id, row["last_step"], "config_change",
                                               {"changed": {k: list(v) for k, v in diff.items()},
                                                "source": "resume"}, now)
                    else:
                        run_id = int(row["id"])
                        for table in ("metrics", "events", "checkpoints"):
                            c.execute(f"DELETE FROM {table} WHERE run_id=?", (run_id,))
                        c.execute(
                            "UPDATE runs SET name=?, status='running', config=?, host=?, pid=?, "
                            "versions=?, created_at=?, segment_at=?, heartbeat_at=?, active_s=0, "
                            "finished_at=NULL, last_step=0, resumes=0 WHERE id=?",
                            (name, cfg_json, fields["host"], fields["pid"], fields["versions"],
                             now, now, now, run_id),
                        )
                    c.execute("COMMIT")
                except BaseException:
                    _rollback(c)
                    raise
        except sqlite3.Error as e:
            full = _disk_full(e, self.path)
            self._warn(f"experiment store: {full}; this run is not recorded there" if full else
                       f"experiment store {self.path} unavailable ({e}); this run is not recorded")
            return 0
        self._owned[run_id] = 0
        self._ensure_thread()
        return run_id

    def log_metrics(self, run_id: int, step: int, metrics: dict[str, float]) -> None:
        """Queue one step's scalars; returns at once (the writer thread stores them)."""
        if run_id:
            self._put(_Op("metrics", run_id, int(step), metrics, time.time()))

    def log_event(self, run_id: int, kind: str, step: int, data: dict[str, Any] | None = None) -> None:
        """Queue an event. A checkpoint_saved / _corrupt event with data["path"] also indexes it."""
        if run_id:
            self._put(_Op("event", run_id, int(step), (kind, dict(data or {})), time.time()))

    def heartbeat(self, run_id: int, step: int) -> None:
        if run_id:
            self._put(_Op("heartbeat", run_id, int(step), None, time.time()))

    def finish_run(self, run_id: int, status: str, step: int) -> None:
        """Record the end of a run (completed | interrupted | failed) and wait for it to land."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"finish_run status must be one of {FINAL_STATUSES}, got {status!r}")
        if run_id:
            self._put(_Op("finish", run_id, int(step), status, time.time()))
            self.flush()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written (or given up on); False on timeout."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._put(_Op("barrier", 0, 0, done, 0.0))
        self._wake.set()
        return done.wait(timeout)

    def close(self) -> None:
        """Flush the queue, stop the writer thread and close the file."""
        if self._thread is not None:
            self._queue.put(None)
            self._wake.set()
            self._thread.join(timeout=30)
            self._thread = None
        with self._lock:
            self._conn.close()

    def _put(self, op: _Op) -> None:
        self._queue.put(op)
        if self._thread is None:
            self._ensure_thread()

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._writer, name="lmforge-store", daemon=True)
                self._thread.start()

    def _warn(self, message: str) -> None:
        if "disk full at" in message:  # one warning per store: it stays full until someone frees space
            if self._disk_full_warned:
                return
            self._disk_full_warned = True
            self._last_warn = 0.0
        now = time.monotonic()
        if now - self._last_warn >= WARN_EVERY_S or self._last_warn == 0.0:
            self._last_warn = now
            self.warnings.append(message)
            try:
                from rich.markup import escape

                from ..util import warn

                warn(escape(message))
            except Exception:
                pass

    # ---- the writer thread -------------------------------------------------------------------
    def _writer(self) -> None:
        conn: sqlite3.Connection | None = None
        pending: list[_Op] = []
        barriers: list[threading.Event] = []
        last_beat = time.monotonic()
        stop = False
        while not stop:
            # Sleep a whole tick (not "until the first item"): a trainer logging every step would
            # otherwise get one transaction per step, and each commit costs more CPU than the rows.
            self._wake.wait(FLUSH_S)
            self._wake.clear()
            while True:  # drain everything queued now: one transaction per batch
                try:
                    op = self._queue.get_nowait()
                except queue.Empty:
                    break
                if op is None:
                    stop = True
                elif op.kind == "barrier":
                    barriers.append(op.payload)
                else:
                    pending.append(op)
            if time.monotonic() - last_beat >= HEARTBEAT_S:
                last_beat = time.monotonic()
                now = time.time()
                pending += [_Op("heartbeat", r, s, None, now) for r, s in list(self._owned.items())]
            if pending:
                try:
                    if conn is None:
                        conn = _connect(self.path)
                    self._write_batch(conn, pending)
                    pending = []
                except sqlite3.Error as e:
                    self.failures += 1
                    full = _disk_full(e, self.path)
                    self._warn(f"experiment store: {full}; training goes on (its run directory has every record), "
                               "the store keeps what it can" if full else
                               f"experiment store {self.path}: write failed ({e}); will retry")
                    pending = self._write_essentials(conn, pending)
                    if len(pending) > MAX_PENDING:
                        self.dropped += len(pending) - MAX_PENDING
                        pending = pending[-MAX_PENDING:]
                    if stop:  # closing: one last try after the lock holder had time to finish
                        time.sleep(FLUSH_S)
                        try:
                            assert conn is not None
                            self._write_batch(conn, pending)
                        except sqlite3.Error:
                            self.dropped += len(pending)
                except Exception as e:  # never let a bad value kill the thread (and the logging)
                    self._warn(f"experiment store {self.path}: dropped a batch ({e!r})")
                    self.dropped += len(pending)
                    pending = []
            for b in barriers:
                b.set()
            barriers = []
        if conn is not None:
            conn.close()

    def _write_essentials(self, conn: sqlite3.Connection | None, ops: list[_Op]) -> list[_Op]:
        """After a failed batch: write the ops that mark a run (status, heartbeat, events) alone, a
        few rows that may fit where the batch did not; return what is still pending."""
        essential = [op for op in ops if op.kind != "metrics"]
        if conn is None or not essential or len(essential) == len(ops):
            return ops
        try:
            self._write_batch(conn, essential)
        except sqlite3.Error:
            return ops
        return [op for op in ops if op.kind == "metrics"]

    def _write_batch(self, conn: sqlite3.Connection, ops: list[_Op]) -> None:
        metric_rows: list[tuple[int, str, int, float | None, float]] = []
        beats: dict[int, tuple[int, float]] = {}  # run_id -> (max step, newest time)
        finishes: list[_Op] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op in ops:
                if op.kind == "metrics":
                    metric_rows += [(op.run_id, str(k), op.step, _finite(v), op.time)
                                    for k, v in op.payload.items()]
                    if op.run_id in self._owned:
                        self._owned[op.run_id] = max(self._owned[op.run_id], op.step)
                elif op.kind == "event":
                    kind, data = op.payload
                    self._insert_event(conn, op.run_id, op.step, kind, data, op.time)
                elif op.kind == "finish":
                    finishes.append(op)
                # Liveness and progress come from the process that started the run: an eval
                # sidecar writing eval metrics into it must not keep a dead trainer "running".
                if op.kind in ("heartbeat", "finish") or (op.kind == "metrics" and op.run_id in self._owned):
                    step, t = beats.get(op.run_id, (0, 0.0))
                    beats[op.run_id] = (max(step, op.step), max(t, op.time))
            conn.executemany("INSERT OR REPLACE INTO metrics VALUES (?,?,?,?,?)", metric_rows)
            for run_id, (step, t) in beats.items():
                conn.execute(
                    "UPDATE runs SET heartbeat_at=MAX(heartbeat_at, ?), last_step=MAX(last_step, ?) "
                    "WHERE id=?", (t, step, run_id))
            for op in finishes:
                conn.execute(
                    "UPDATE runs SET status=?, finished_at=?, last_step=? WHERE id=?",
                    (op.payload, op.time, op.step, op.run_id))
                self._owned.pop(op.run_id, None)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    @staticmethod
    def _insert_event(conn: sqlite3.Connection, run_id: int, step: int, kind: str,
                      data: dict[str, Any], t: float) -> None:
        conn.execute("INSERT INTO events (run_id, step, kind, data, time) VALUES (?,?,?,?,?)",
                     (run_id, step, kind, dumps_record(data, default=str), t))
        if kind in ("checkpoint_saved", "checkpoint_corrupt") and "path" in data:
            conn.execute("INSERT OR REPLACE INTO checkpoints VALUES (?,?,?,?,?)",
                         (run_id, step, str(data["path"]),
                          "saved" if kind == "checkpoint_saved" else "corrupt", t))

    # ---- reading -----------------------------------------------------------------------------
    def _query(self, sql: str, args: Iterable[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, tuple(args)).fetchall()

    @staticmethod
    def _derive(row: dict[str, Any], now: float) -> dict[str, Any]:
        """Shown status and elapsed time of a runs row (a dead `running` run is `crashed`)."""
        status = row["status"]
        if status == "running":
            dead = row["host"] == socket.gethostname() and not pid_alive(int(row["pid"]))
            if dead or now - row["heartbeat_at"] > STALE_S:
                status = "crashed"
        end = row["finished_at"] or (now if status == "running" else row["heartbeat_at"])
        elapsed = row["active_s"] + max(0.0, end - row["segment_at"])
        return {"status": status, "elapsed_s": elapsed}

    def _run_dict(self, row: sqlite3.Row, now: float) -> dict[str, Any]:
        d = dict(row)
        d.update(self._derive(d, now))
        d["stored_status"] = row["status"]
        d["config"] = json.loads(d["config"])
        d["versions"] = json.loads(d["versions"])
        return d

    def list_runs(self) -> list[dict[str, Any]]:
        """Every run, newest first, with its last loss and tokens (config left out)."""
        now = time.time()
        rows = self._query("SELECT * FROM runs ORDER BY created_at DESC, id DESC")
        last = self._last_values([r["id"] for r in rows], ("loss", "tokens"))
        out = []
        for row in rows:
            d = self._run_dict(row, now)
            del d["config"]
            d["loss"] = last.get((row["id"], "loss"))
            d["tokens"] = last.get((row["id"], "tokens"))
            out.append(d)
        return out

    def _last_values(self, run_ids: list[int], keys: Iterable[str]) -> dict[tuple[int, str], float | None]:
        # One primary-key lookup per (run, key): cheap however long the curves are.
        out: dict[tuple[int, str], float | None] = {}
        for run_id in run_ids:
            for key in keys:
                rows = self._query("SELECT value FROM metrics WHERE run_id=? AND key=? "
                                   "ORDER BY step DESC LIMIT 1", (run_id, key))
                if rows:
                    out[(run_id, key)] = _stored(rows[0]["value"])
        return out

    def resolve(self, ref: str | int) -> int:
        """A run id from an id, a name or a run directory; a clear error when none or several."""
        s = str(ref)
        if s.isdigit():
            rows = self._query("SELECT id FROM runs WHERE id=?", (int(s),))
            if rows:
                return int(rows[0]["id"])
        rows = self._query("SELECT id, run_dir FROM runs WHERE name=? ORDER BY id", (s,))
        if not rows:
            rows = self._query("SELECT id, run_dir FROM runs WHERE run_dir=?", (str(Path(s).resolve()),))
        if len(rows) == 1:
            return int(rows[0]["id"])
        if not rows:
            names = [r["name"] for r in self._query("SELECT name FROM runs ORDER BY id DESC LIMIT 10")]
            hint = f"; known runs: {', '.join(names)}" if names else "; the store has no runs yet"
            raise LmforgeError(f"no run named {s!r} in {self.path}{hint}")
        ids = ", ".join(f"{r['id']} ({r['run_dir']})" for r in rows)
        raise LmforgeError(f"several runs are named {s!r}: {ids}; give the id or the run directory")

    def run_id(self, run_dir: str) -> int | None:
        """The id of the run in this run directory (for an eval sidecar), or None."""
        rows = self._query("SELECT id FROM runs WHERE run_dir=?", (str(Path(run_dir).resolve()),))
        return int(rows[0]["id"]) if rows else None

    def get_run(self, run_id: int) -> dict[str, Any]:
        rows = self._query("SELECT * FROM runs WHERE id=?", (run_id,))
        if not rows:
            raise LmforgeError(f"no run with id {run_id} in {self.path}")
        d = self._run_dict(rows[0], time.time())
        d["summary"] = self.summary(run_id)
        d["events"] = self.events(run_id)
        d["checkpoints"] = [checkpoint_state(d["run_dir"], dict(r)) for r in self._query(
            "SELECT step, path, status, time FROM checkpoints WHERE run_id=? ORDER BY step", (run_id,))]
        return d

    def summary(self, run_id: int) -> dict[str, dict[str, Any]]:
        """Per metric key: last value (at the highest step), min, max, count."""
        out: dict[str, dict[str, Any]] = {}
        for r in self._query(
            "SELECT key, COUNT(*) AS n, MIN(value) AS lo, MAX(value) AS hi, MAX(step) AS step "
            "FROM metrics WHERE run_id=? GROUP BY key ORDER BY key", (run_id,)):
            last = self._query("SELECT value FROM metrics WHERE run_id=? AND key=? AND step=?",
                               (run_id, r["key"], r["step"]))[0]["value"]
            last = _stored(last)
            out[r["key"]] = {"last": last, "step": r["step"], "min": r["lo"], "max": r["hi"], "count": r["n"]}
        return out

    def events(self, run_id: int) -> list[dict[str, Any]]:
        return [
            {"step": r["step"], "kind": r["kind"], "data": json.loads(r["data"]), "time": r["time"]}
            for r in self._query("SELECT * FROM events WHERE run_id=? ORDER BY step, id", (run_id,))
        ]

    def metric_keys(self, run_id: int) -> list[str]:
        return [r["key"] for r in self._query(
            "SELECT DISTINCT key FROM metrics WHERE run_id=? ORDER BY key", (run_id,))]

    def metrics(self, run_id: int, keys: Iterable[str] | None = None,
                max_points: int = 0) -> dict[str, dict[str, list[Any]]]:
        """{key: {"step": [...], "value": [...]}} in step order; max_points > 0 thins each curve
        to at most max_points points spread evenly over its steps (first and last kept; with
        max_points 1, the last point alone)."""
        if max_points < 0:
            raise ValueError(f"max_points must be >= 0 (0: every point), got {max_points}")
        out: dict[str, dict[str, list[Any]]] = {}
        for key in (list(keys) if keys is not None else self.metric_keys(run_id)):
            n, lo, hi = self._query("SELECT COUNT(*), MIN(step), MAX(step) FROM metrics "
                                    "WHERE run_id=? AND key=?", (run_id, key))[0]
            if 0 < max_points < n:
                # A live dashboard polls this and a long run has millions of rows, so never read
                # them all: seek (primary key) to the first step at or after each of max_points - 1
                # evenly spaced targets from the first step, plus the last step. Even in step, as
                # the x axis is. Targets that land on the same step collapse (IN), so the answer
                # never exceeds max_points.
                targets = max_points - 1
                width = (hi - lo) / targets if targets else 0.0
                rows = self._query(
                    "WITH RECURSIVE t(i) AS (SELECT 0 WHERE ? > 0 UNION ALL SELECT i + 1 FROM t WHERE i + 1 < ?) "
                    "SELECT step, value FROM metrics WHERE run_id=? AND key=? AND step IN ("
                    " SELECT (SELECT step FROM metrics WHERE run_id=? AND key=? AND step >= ? + i * ? "
                    "  ORDER BY step LIMIT 1) FROM t UNION SELECT ?) ORDER BY step",
                    (targets, targets, run_id, key, run_id, key, lo, width, hi))
            else:
                rows = self._query("SELECT step, value FROM metrics WHERE run_id=? AND key=? ORDER BY step",
                                   (run_id, key))
            if rows:
                out[key] = {"step": [r["step"] for r in rows],
                            "value": [_stored(r["value"]) for r in rows]}
        return out

    def compare(self, run_ids: list[int]) -> dict[str, Any]:
        """Config keys that differ between the runs, and their final metrics side by side."""
        runs = [self.get_run(i) for i in run_ids]
        flat = [flatten(r["config"]) for r in runs]
        keys = sorted(set().union(*flat))
        differing = {k: [f.get(k) for f in flat] for k in keys if len({json.dumps(f.get(k)) for f in flat}) > 1}
        metric_keys = sorted(set().union(*(r["summary"] for r in runs)))
        final = {k: [r["summary"].get(k, {}).get("last") for r in runs] for k in metric_keys}
        heads = [{k: r[k] for k in ("id", "name", "status", "last_step", "elapsed_s", "run_dir")} for r in runs]
        return {"runs": heads, "config_diff": differing, "final_metrics": final}

    def delete_run(self, run_id: int) -> None:
        """Remove a run and everything recorded about it from the store (not its directory)."""
        if self.readonly:
            raise LmforgeError("this store was opened read-only")
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for table in ("metrics", "events", "checkpoints"):
                    self._conn.execute(f"DELETE FROM {table} WHERE run_id=?", (run_id,))
                self._conn.execute("DELETE FROM runs WHERE id=?", (run_id,))
                self._conn.execute("COMMIT")
            except BaseException:
                _rollback(self._conn)
                raise
