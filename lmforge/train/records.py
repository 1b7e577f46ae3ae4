"""Run records: what a run writes about itself besides checkpoints, and reading it back.

Files in the run directory (names from lmforge/artifacts.py):
  metrics.jsonl     one JSON object per logged step ({"step", "loss", "lr", ...}; validation lines
                    carry "val_loss"), appended by rank 0
  events.jsonl      start, resume, branch, config_change, checkpoint_saved/_corrupt/_failed, spike,
                    non_finite, rollback, diverged, interrupted, crash, completed, mfu_peak, threads
                    (the thread count changed: other processes took or freed cores, lmforge/threads.py)
  faults-fired.json the LMFORGE_FAULTS items already fired in this run (loop.py fires them)

Every record follows lmforge/jsonl.py's rule: a non-finite float is written as the string "nan",
"inf" or "-inf" (a NaN loss must be recordable, and every reader takes the strings back).
Metrics and events also go to the experiment store (track/store.py), whose calls queue and never
block or fail the step; the store records `resume` and `config_change` itself, so those two (and
the bookkeeping kinds `start` and `mfu_peak`) go to the file only.

Failures. A record that cannot be written (a full disk, a read-only directory) stops training with
one line (`WriteError`: "disk full at PATH, N bytes free ..." naming the newest checkpoint, which
is intact) instead of a traceback; the records written while a run is already failing (its crash
event, a failed checkpoint's event) are best effort, so they never hide the error that stopped it.

A resume first drops the metric lines newer than its checkpoint (`drop_records_after`): those
steps are about to be trained again, and a curve must show what the final weights saw.

Records need only a few things of a run (the `Recorded` protocol), so this module does not import
the loop that owns the run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Protocol

from .. import artifacts
from ..artifacts import CONFIG_FILE, EVENTS_FILE, FAULTS_FIRED_FILE, METRICS_FILE
from ..config import Config, load_config
from ..errors import DataError, LmforgeError, WriteError
from ..jsonl import append_jsonl, read_records
from ..util import atomic_write_text, console, warn, write_failure
from .distributed import Dist

STORE_SKIPS = ("resume", "config_change", "mfu_peak", "start")  # events the store does not get (see above)


class Recorded(Protocol):
    """What the records of a run need of it (loop.Run has all of it)."""

    cfg: Config
    run_dir: Path
    dist: Dist
    step: int
    store: Any
    run_id: int
    resumed_from: Path | None
    fresh_data_order: str
    init_origin: dict[str, Any] | None

    @property
    def resumed(self) -> bool: ...


# ---- writing ---------------------------------------------------------------------------------


def log_metrics(run: Recorded, values: dict[str, float]) -> None:
    if not run.dist.is_main:
        return
    _append(run, METRICS_FILE, {"step": run.step, **values, "time": time.time()})
    if run.store is not None:  # queued; a background thread writes (never slows the step)
        run.store.log_metrics(run.run_id, run.step, values)
        run.store.heartbeat(run.run_id, run.step)


def log_event(run: Recorded, kind: str, data: dict[str, Any], step: int | None = None, *, best_effort: bool = False) -> None:
    """Append an event at the run's step (or `step`: e.g. the step of a damaged checkpoint).
    `best_effort`: a write failure is ignored (for events recorded while the run already fails)."""
    if not run.dist.is_main:
        return
    step = run.step if step is None else step
    try:
        _append(run, EVENTS_FILE, {"step": step, "kind": kind, "time": time.time(), **data})
    except WriteError:
        if not best_effort:
            raise
    if run.store is not None and kind not in STORE_SKIPS:
        run.store.log_event(run.run_id, kind, step, data)


def _append(run: Recorded, name: str, record: dict[str, Any]) -> None:
    path = run.run_dir / name
    try:
        append_jsonl(path, record)  # NaN/inf as "nan"/"inf"/"-inf": lmforge/jsonl.py's rule
    except OSError as e:
        raise stopped_by(run, e, path) from None


def stopped_by(run: Recorded, e: BaseException, path: Path, *, needed: int | None = None,
               what: str = "") -> WriteError:
    """The one-line error for a write of `run` that failed (`util.write_failure`), with where the
    run stands: "disk full at PATH, N bytes free; training stopped at step S ...; the newest
    checkpoint (...) is intact. Free space ..., then run the same command to resume." Raises `e`
    itself when it is no write failure (a bug keeps its traceback)."""
    line = write_failure(e, path, needed)
    if line is None:
        raise e
    ckpts = artifacts.list_checkpoints(run.run_dir)
    newest = f"the newest checkpoint ({ckpts[-1]}) is intact" if ckpts else "no checkpoint was written yet"
    fix = "free space" if line.startswith("disk full") else "fix the path"
    return WriteError(f"{line}; training stopped at step {run.step}{what}; {newest}. "
                      f"{fix[0].upper() + fix[1:]}, then run the same command to resume.")


def drop_records_after(run: Recorded, step: int) -> None:
    """Remove metric lines newer than `step` (written after the checkpoint a resume or rollback
    returns to); a torn last line from a kill goes too."""
    path = run.run_dir / METRICS_FILE
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if 0 <= _record_step(line) <= step]
    if len(kept) != len(lines):
        _rewrite(run, path, "".join(kept))


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1  # a torn last line from a kill: drop it


def read_fired_faults(run_dir: Path) -> list[str]:
    p = run_dir / FAULTS_FIRED_FILE
    return json.loads(p.read_text()) if p.is_file() else []


def write_fired_faults(run: Recorded, fired: list[str]) -> None:
    _rewrite(run, run.run_dir / FAULTS_FIRED_FILE, json.dumps(fired))


def _rewrite(run: Recorded, path: Path, text: str) -> None:
    try:
        atomic_write_text(path, text)
    except OSError as e:
        raise stopped_by(run, e, path) from None


# ---- the experiment store and the start of a run -------------------------------------------------


def open_store(run: Recorded) -> None:
    """Register the run in the experiment store; training goes on without it if it fails."""
    from ..track.store import Store

    if not run.dist.is_main:  # one writer: rank 0 records the run
        return
    try:
        run.store = Store.open()
        run.run_id = run.store.start_run(name=run.run_dir.name, run_dir=str(run.run_dir), config=run.cfg.to_dict(),
                                         resumed=run.resumed)
    except (LmforgeError, OSError) as e:
        warn(f"experiment store unavailable ({e}); this run is recorded in its directory only")
        run.store = None


def record_start(run: Recorded, mix: dict[str, Any] | None = None) -> None:
    """Say how this start began (fresh, resumed or branched) and record it, with the directory it
    runs in (relative paths in the config are read from there) and, for data.mix, what the mixture
    reads (data/loader.py `Mixture.record`: datasets, shares, fingerprints)."""
    d, cwd = run.dist, os.getcwd()
    mix = {"mix": mix} if mix else {}
    if run.resumed:
        console.print(f"resumed from {run.resumed_from} at step {run.step} ({d.describe()})")
        log_event(run, "resume", {"checkpoint": str(run.resumed_from), "world": d.world, "cwd": cwd, **mix})
    elif run.resumed_from is not None:
        console.print(f"branched from {run.resumed_from} at step {run.step} into {run.run_dir}")
        cursor = {"data_order": "fresh", "data_order_reason": run.fresh_data_order} if run.fresh_data_order else {"data_order": "continued"}
        log_event(run, "branch", {"from": str(run.resumed_from), "world": d.world, "cwd": cwd, **cursor, **mix})
    else:
        log_event(run, "start", {"world": d.world, "cwd": cwd, **mix} | ({"init_from": run.init_origin} if run.init_origin else {}))


def finish(run: Recorded, status: str) -> None:
    """Record the end of the run in the store (completed | interrupted | failed) and close it."""
    if run.store is not None:
        run.store.finish_run(run.run_id, status, run.step)
        run.store.close()
        run.store = None


class failure_recorded:
    """Mark the run failed (a `crash` event, the store's status) when training stops on an
    exception (not on SIGKILL: readers show a run whose process is gone as crashed)."""

    def __init__(self, run: Recorded) -> None:
        self.run = run

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, _tb: Any) -> None:
        if exc_type is not None:
            log_event(self.run, "crash", {"error": f"{exc_type.__name__}: {exc}"}, best_effort=True)
            finish(self.run, "failed")


# ---- reading ---------------------------------------------------------------------------------


def last_cwd(run_dir: Path) -> str | None:
    """The working directory of the run's latest recorded start (events.jsonl), if recorded."""
    cwd = None
    for event in read_records(run_dir / EVENTS_FILE):
        cwd = event.get("cwd", cwd)
    return cwd


def data_step_of_run(run_dir: str | Path, step: int) -> dict[str, Any]:
    """Which data step training step `step` (1-based, as logged) of a run read, through its rollbacks.

    A step that raised a guard verdict is shown as it was read (the evidence in its event); any
    other step as it is on the run's final trajectory: after the chronologically last rollback to a
    checkpoint c < step, the data cursor is (step - 1) - c + the cursor it skipped to."""
    rd = Path(run_dir)
    cfg = load_config(rd / CONFIG_FILE)
    if cfg.data.mix:
        raise DataError(f"{rd} trains on data.mix ({', '.join(cfg.data.mix)}): data inspect traces the steps of a run on "
                        "one dataset (data.path), not yet those of a mixed order (docs/data.md)")
    events = read_records(rd / EVENTS_FILE)
    rollbacks = [e for e in events if e.get("kind") == "rollback"]
    notes = [f"run {rd}: {len(rollbacks)} rollback(s)"]
    for e in rollbacks:
        a, b = e["skipped_data_steps"]
        notes.append(f"  step {e['from_step']} -> {e['to_step']} ({e['reason']}): skipped data steps {a}..{b - 1}, lr x {e['lr_scale']:g}")
    verdict = [e for e in events if e.get("kind") in ("spike", "non_finite") and e.get("step") == step]
    if verdict:
        data_step = int(verdict[-1]["data_step"])
        notes.append(f"step {step} raised a guard verdict ({verdict[-1]['kind']}); it read data step {data_step}:")
    else:
        data_step = step - 1
        for e in rollbacks:  # chronological: a later rollback overrides what it abandoned
            if e["to_step"] < step:
                data_step = (step - 1) - e["to_step"] + e["skipped_data_steps"][1]
        notes.append(f"step {step} read data step {data_step}:")
    return {"data_path": cfg.data.path, "seq_len": cfg.data.seq_len, "global_batch": cfg.train.global_batch,
            "seed": cfg.data.seed, "data_step": data_step, "notes": notes}
