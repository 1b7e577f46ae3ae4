"""Small shared helpers: atomic writes, hashing, fsync, logging to the console.

Atomicity rule used everywhere in lmforge: write to a temporary sibling, fsync it, rename it into
place, fsync the directory. A reader therefore sees the old file or the new one, never half of one.
Directories (datasets, checkpoints) follow the same rule via `atomic_dir`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import Progress

console = Console(stderr=True, highlight=False, soft_wrap=True)  # log lines never wrap mid-word in files
# A command's RESULT (a table, a verdict, a summary, sampled text): stdout, never quiet (see below).
out = Console(highlight=False, soft_wrap=True)

# ---- device ----------------------------------------------------------------------------------


def default_device():
    """Where models train and run: LMFORGE_DEVICE (cpu, cuda or cuda:N) when set, else the current
    CUDA device when there is one, else the CPU. One place, so train, eval, sample and serve agree;
    the variable lets an eval sidecar stay on the CPU beside a GPU run."""
    import torch

    from .errors import ConfigError

    want = os.environ.get("LMFORGE_DEVICE", "").strip()
    if not want:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(want)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"LMFORGE_DEVICE={want!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"LMFORGE_DEVICE={want!r}, but this machine has no CUDA device (torch {torch.__version__}); "
                              "unset it or use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"LMFORGE_DEVICE={want!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


# ---- progress --------------------------------------------------------------------------------
# LMFORGE_PROGRESS (or the CLI's --progress, which sets it so child processes inherit it):
#   auto   rich bars when stderr is a terminal; when it is a file or a pipe, no bars (not even the
#          final frame or a blank line) and plain log lines where the long work has them (the default)
#   json   no bars; one JSON object per line on stderr per progress update, at most one per second
#          per task, plus the final one: {"progress": task, "completed", "total", "rate", "eta_s", ...}
#   quiet  no bars and no informational lines; warnings and errors still print
# The modes govern stderr only. A command's result (data info's table, eval's metrics, a verify
# verdict, sampled text, runs tables, import/export summaries ...) is its answer, not progress: it
# goes to stdout through `out`, which no mode silences, so `--progress json|quiet` in a script or
# CI still gets the answer. Convention: results -> `out` (stdout); logs, bars, warnings and errors
# -> `console` (stderr). `--json` flags print their JSON on stdout and nothing else there.
PROGRESS_MODES = ("auto", "json", "quiet")


def progress_mode() -> str:
    mode = os.environ.get("LMFORGE_PROGRESS", "auto")
    return mode if mode in PROGRESS_MODES else "auto"


def set_progress_mode(mode: str) -> None:
    os.environ["LMFORGE_PROGRESS"] = mode
    console.quiet = mode in ("json", "quiet")  # informational console lines off; bars emit JSON


def cache_root() -> Path:
    """Where lmforge keeps what it builds on this machine (compiled decode steps, its kernels):
    $LMFORGE_CACHE_DIR, else $XDG_CACHE_HOME/lmforge, else ~/.cache/lmforge."""
    return Path(os.environ.get("LMFORGE_CACHE_DIR") or (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge"))


def warn(text: str, label: str = "warning:") -> None:
    """A warning that prints in every progress mode (rich markup allowed), after its label."""
    quiet, console.quiet = console.quiet, False
    console.print(f"[yellow]{label}[/] {text}")
    console.quiet = quiet


def compile_failed(doing: str) -> Callable[[Exception], None]:
    """The warning for `model.run_compiled`'s fallback: torch.compile could not build kernels
    (e.g. no C++ compiler on this machine), and `doing` (e.g. "embedding") goes on without it."""

    def report(error: Exception) -> None:
        first = (str(error).strip().splitlines() or [""])[0][:200]
        warn(f"torch.compile could not build the model's kernels ({type(error).__name__}: {first}); "
             f"{doing} without --compile")

    return report


class _Progress(Progress):
    """rich Progress that, in json mode, writes rate-limited JSON lines instead of drawing."""

    _last: dict[int, float]

    def update(self, task_id, **kwargs) -> None:  # type: ignore[override]
        super().update(task_id, **kwargs)
        self._emit(task_id)

    def advance(self, task_id, advance: float = 1) -> None:  # type: ignore[override]
        super().advance(task_id, advance)
        self._emit(task_id)

    def _emit(self, task_id) -> None:
        if progress_mode() != "json":
            return
        import sys
        import time

        from .jsonl import dumps_record

        task = self._tasks[task_id]
        now = time.monotonic()
        last = getattr(self, "_last", {})
        finished = task.total is not None and task.completed >= task.total
        if now - last.get(task_id, 0.0) < 1.0 and not finished:
            return
        last[task_id] = now
        self._last = last
        record = {**{k: v for k, v in task.fields.items() if isinstance(v, (int, float, str))},
                  "progress": str(task.description), "completed": task.completed, "total": task.total,
                  "rate": task.speed, "eta_s": task.time_remaining}
        sys.stderr.write(dumps_record(record) + "\n")  # a NaN loss as "nan": lmforge/jsonl.py's rule
        sys.stderr.flush()


def progress_bar(*columns, transient: bool = False) -> Progress:
    """The progress bar every long piece of work uses (see the modes above). Drawn only in auto
    mode on a terminal: rich would otherwise write its last frame (or, for a transient bar, a blank
    line) into a log file or pipe. json mode still emits its lines from a disabled bar."""
    draw = progress_mode() == "auto" and console.is_terminal
    return _Progress(*columns, console=console, transient=transient, disable=not draw)


_CHUNK = 1 << 20


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create 0600 files and 0700 directories; published datasets, checkpoints and
# model directories get the ordinary permissions instead (0644 / 0755 under the usual umask 022).
_UMASK = _umask()
FILE_MODE, DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory below root (before the rename that publishes it)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def publish_modes(root: str | os.PathLike) -> None:
    """Give every file below root FILE_MODE and every directory DIR_MODE (root included).

    Temporary directories are created private (mkdtemp: 0700) and some writers create private
    files (safetensors' save_file: 0600); what lmforge publishes gets the modes open() and
    mkdir() would give under the current umask, as the other files beside them have."""
    os.chmod(root, DIR_MODE)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, DIR_MODE)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, FILE_MODE)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


_RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths in one step


def exchange_paths(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE, glibc >= 2.28 and a
    filesystem that supports it: ext4, xfs, btrfs, tmpfs ...). False when this system cannot, and
    nothing was changed; any other failure raises OSError."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # the filesystem (or kernel) has no exchange
        return False
    raise OSError(err, os.strerror(err), os.fspath(a))


def replace_path(new: str | os.PathLike, final: str | os.PathLike) -> None:
    """Rename the finished file or directory `new` to `final`, replacing whatever `final` is.

    A file over a file (or over a link) is one atomic rename. A directory over a directory is one
    atomic exchange where the system has one (`exchange_paths`), then the old one, now at `new`'s
    name, is removed: `final` always holds the complete old directory or the complete new one,
    even across a kill -9 (which may leave the old one behind under the temporary name). Anything
    else (or no exchange) cannot be renamed over in one step: the old entry is first renamed to a
    hidden sibling, `new` renamed into place, then the old entry removed. So `final` always holds
    the complete old entry or the complete new one (or, between the two renames, nothing); if the
    second rename fails the old entry is put back. Nothing is left behind on success: a backup
    that cannot be removed is reported with a warning naming it.
    """
    new, final = Path(new), Path(final)
    replaces_dir = final.is_dir() and not final.is_symlink()
    if not os.path.lexists(final) or (not replaces_dir and not new.is_dir()):
        os.replace(new, final)
        return
    if replaces_dir and new.is_dir() and not new.is_symlink() and exchange_paths(new, final):
        old = new  # the old directory now lives under the temporary name
    else:
        while True:
            old = final.with_name(f".{final.name}.{os.urandom(4).hex()}.old")
            if not os.path.lexists(old):
                break
        os.replace(final, old)
        try:
            os.replace(new, final)
        except BaseException:
            os.replace(old, final)
            raise
    try:
        _remove(old)
    except OSError as e:
        warn(f"replaced {final}, but could not remove the old version moved to {old} ({e.strerror or e}); delete it by hand")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success fsync it and rename it to `final`.

    On any exception the temporary directory is removed and `final` is untouched, so a reader
    never sees a half-written dataset or checkpoint. With overwrite, whatever `final` is (a
    directory or a file) is replaced as `replace_path` does. Files and directories written
    inside get the usual umask modes (`publish_modes`), not the private ones of temp files.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    os.chmod(tmp, DIR_MODE)
    try:
        yield tmp
        publish_modes(tmp)
        fsync_tree(tmp)
        if os.path.lexists(final):
            if not overwrite:
                raise FileExistsError(f"{final} already exists")
            replace_path(tmp, final)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---- write failures --------------------------------------------------------------------------
# A full disk reaches lmforge in many shapes: an OSError with errno ENOSPC from Python, a
# SafetensorError whose text says "No space left on device (os error 28)", SQLite's "database or
# disk is full", and torch's zip writer inside DCP, which only says "unexpected pos 704 vs 598"
# (a short write it did not check). `write_failure` turns any of them into one line a user can act on.

_DISK_FULL_TEXT = ("no space left on device", "os error 28", "errno 28", "database or disk is full")


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the filesystem of `path` (or of its nearest existing parent); None if unknown."""
    p = Path(path).absolute()
    for q in (p, *p.parents):
        if q.exists():
            try:
                return shutil.disk_usage(q).free
            except OSError:
                return None
    return None


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` says the disk is full: ENOSPC, or its text, anywhere in `e`, its causes and (a
    DCP CheckpointException) the failures of its ranks."""
    todo: list[Any] = [e]
    seen: set[int] = set()
    while todo:
        x = todo.pop()
        if not isinstance(x, BaseException) or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno == errno.ENOSPC:
            return True
        text = str(x.args[0]) if x.args else ""  # not str(x): a CheckpointException formats whole tracebacks
        if any(marker in text.lower() for marker in _DISK_FULL_TEXT):
            return True
        todo += [x.__cause__, x.__context__]
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return False


def write_failure(e: BaseException, path: str | os.PathLike, needed: int | None = None) -> str | None:
    """One line for a failed write to `path`: "disk full at PATH, N bytes free" when the disk is
    full (`is_disk_full`, or fewer bytes free than the write `needed`: a writer that hides ENOSPC),
    "cannot write PATH: REASON" for any other OSError, None for anything else (not a write
    failure: a bug, which should keep its traceback)."""
    free = free_bytes(path)
    if is_disk_full(e) or (needed is not None and free is not None and free < needed):
        return f"disk full at {path}, {'an unknown number of' if free is None else f'{free:,}'} bytes free"
    if isinstance(e, OSError):
        where = f" ({os.fsdecode(e.filename)})" if e.filename and Path(os.fsdecode(e.filename)) != Path(path) else ""
        return f"cannot write {path}: {e.strerror or e}{where}"
    return None


@contextlib.contextmanager
def writes_to(out: str | os.PathLike, needed: int | None = None, *, updating: bool = False) -> Iterator[None]:
    """Around a verb's write of its --out (an `atomic_dir` or atomic file): a failed write becomes
    one line naming it, a WriteError: "disk full at OUT, N bytes free; nothing was written to OUT"
    (also from safetensors and SQLite, which report ENOSPC as their own errors, and from a short
    write that names no errno, when fewer bytes are free than the output `needed`), else "cannot
    write OUT: REASON" for any other OSError. `updating`: OUT existed and is being replaced by a
    new version (`index add`), so the line says "OUT is unchanged" instead. Anything else (a bug)
    keeps its traceback. The writers inside leave nothing half-written; this only says so."""
    import sqlite3

    from safetensors import SafetensorError

    from .errors import WriteError

    kept = f"{out} is unchanged" if updating else f"nothing was written to {out}"
    try:
        yield
    except (OSError, SafetensorError, sqlite3.OperationalError) as e:  # SQLite: "database or disk is full"
        line = write_failure(e, out, needed)
        if line is not None and line.startswith("disk full"):
            raise WriteError(f"{line}; {kept}. Free space" + (" and run it again" if updating else ", or choose another --out")) from None
        if not isinstance(e, OSError):
            raise
        # name the path that failed unless it is --out itself or its temporary sibling
        named = e.filename and Path(os.fsdecode(e.filename)).parent != Path(out).parent
        where = f" ({os.fsdecode(e.filename)})" if named else ""
        raise WriteError(f"cannot write {out}: {e.strerror or e}{where}; {kept}") from None


def check_port(port: int, flag: str = "--port") -> int:
    """A TCP port to listen on, 0-65535 (0: any free port), or a ConfigError naming the flag."""
    from .errors import ConfigError

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"{flag} must be a port number from 0 to 65535 (0: any free port), got {port!r}")
    return port


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def read_text_file(path: str | os.PathLike, what: str, *, max_bytes: int = 16 << 20) -> str:
    """The UTF-8 text of a small file a user named (`what` says which, e.g. "--chat-template"), or an
    LmforgeError naming it in one line: missing, unreadable, a directory, over max_bytes (another file
    given by mistake, a model or a dataset), not UTF-8 (a binary file)."""
    from .errors import LmforgeError

    p = Path(path)
    try:
        size = p.stat().st_size
        if p.is_dir():
            raise LmforgeError(f"{what} {p} is a directory; give a file")
        if size > max_bytes:
            raise LmforgeError(f"{what} {p}: {size:,} bytes is not what {what} takes (at most {max_bytes:,}); "
                               "is it the right file?")
        return p.read_text(encoding="utf-8")
    except OSError as e:
        raise LmforgeError(f"cannot read {what} {p}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{what} {p}: not a text file (byte {e.start} is not UTF-8)") from None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"
