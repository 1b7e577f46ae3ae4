"""The eval sidecar: `lmforge eval RUN --watch` follows a run directory and evaluates each new
checkpoint once, beside training, without stopping it.

Loop: every `interval` seconds list the run's published checkpoints (oldest first, so curves fill
in order); for each one not yet evaluated, load it through `artifacts.load_model` (which verifies
every sha256 of its MANIFEST.json), evaluate it (evaluate/harness.py) and record the result.

What "already evaluated" means survives a restart of the sidecar: every result is appended to
`runs/<run>/eval-results.jsonl` (one JSON object per line, fsynced), keyed by checkpoint name AND
the sha256 of its model.safetensors. After a rollback the trainer deletes the abandoned
checkpoints and later writes new ones with the same step names but other weights; those have a
new key and are evaluated again. A torn last line (a crash mid-append) is ignored on reading.

Recording: the JSONL always; the experiment store too when one exists (`Store.open()`, the run
found by `store.run_id(run_dir)`): metrics `eval/<name>` at the checkpoint's step (the store
upserts, so a repeat is harmless) and an `eval` event. The JSONL line is written last: it is the
commit point.

Damaged or vanished checkpoints are skipped with one message each: the trainer's retention may
delete a checkpoint between listing and loading, and a corrupt one will not heal by retrying.

Start: the sidecar may start before training. A run directory that does not exist yet, or an
empty one, is a run about to start: it says once that it waits and looks again every `interval`
seconds (`once=True` refuses a missing directory instead: there is nothing present to pass over).
What exists but cannot be a run directory is refused at once: a file, a checkpoint directory, a
model directory (`lmforge import`), a directory with other (non-hidden) contents.

Exit: when the run's events.jsonl says `completed` (and no `resume` came after it) and every
checkpoint present has been evaluated or skipped; `follow=True` keeps watching (a resumed run
writes more checkpoints); `once=True` makes one pass. The two exclude each other.

Resources: the process lowers its own priority (`os.nice`) and uses `threads` torch threads.
On a machine with few cores, give training and sidecar disjoint thread counts (e.g. 1 + 1 on 2
cores): OpenMP threads that spin waiting for each other make an oversubscribed run many times
slower (figures in docs/eval.md).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch

from ..artifacts import (
    CHECKPOINTS, CONFIG_FILE, EVAL_RESULTS_FILE, EVENTS_FILE, is_checkpoint_dir, is_model_dir,
    list_checkpoints, load_model, read_manifest,
)
from ..errors import CheckpointError, LmforgeError
from ..jsonl import append_jsonl, read_records, restore_numbers
from ..threads import Governor, cores
from ..util import console, warn
from .harness import check_eval_options, evaluate_model, load_tasks, own_tasks, text_source


def checkpoint_key(ckpt: Path) -> str | None:
    """"step-000030:<sha256 of model.safetensors>" (a LoRA run's: of its adapter) from the MANIFEST, or None if unreadable."""
    try:
        return f"{ckpt.name}:{read_manifest(ckpt).weights_sha256}"
    except (CheckpointError, KeyError):
        return None


def read_results(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The sidecar's results so far, metrics as floats ("nan" back to NaN: lmforge/jsonl.py's rule);
    unparsable lines, e.g. a torn last line, are skipped."""
    rows = [row for row in read_records(Path(run_dir) / EVAL_RESULTS_FILE) if "key" in row]
    return [{**row, "metrics": restore_numbers(row["metrics"])} if "metrics" in row else row for row in rows]


def run_completed(run_dir: str | os.PathLike) -> bool:
    """True when the last `completed` / `resume` event in events.jsonl is `completed`."""
    state = False
    for event in read_records(Path(run_dir) / EVENTS_FILE):
        kind = event.get("kind")
        if kind == "completed":
            state = True
        elif kind == "resume":
            state = False
    return state


def _open_store():
    """The experiment store if one exists (never create one for a run that had none)."""
    from ..track.store import Store, default_path

    if not default_path().exists():
        return None
    try:
        return Store.open()
    except LmforgeError as e:
        warn(f"experiment store unavailable ({e}); results go to {EVAL_RESULTS_FILE} only")
        return None


def _record(run_dir: Path, store: Any, ckpt: Path, key: str, step: int, results: dict[str, float], seconds: float) -> None:
    # NaN/inf go as they are: every writer below applies lmforge/jsonl.py's rule ("nan", "inf")
    if store is not None:
        run_id = store.run_id(str(run_dir))  # asked each time: training may register after we start
        if run_id is not None:
            store.log_metrics(run_id, step, {f"eval/{k}": v for k, v in results.items()})
            store.log_event(run_id, "eval", step, {"checkpoint": ckpt.name, **results})
            store.flush()
    append_jsonl(run_dir / EVAL_RESULTS_FILE, {"key": key, "checkpoint": ckpt.name, "step": step, "metrics": results,
                                          "seconds": round(seconds, 3), "time": time.time()}, fsync=True)


def _check_run_dir(run_dir: Path) -> None:
    """Refuse a path that exists but is not (and cannot become) a run directory."""
    if not run_dir.is_dir():
        raise CheckpointError(f"--watch needs a run directory, but {run_dir} is a file; "
                              "give the --run-dir that `lmforge train` writes")
    if is_checkpoint_dir(run_dir):
        raise CheckpointError(f"--watch follows a run directory, not a checkpoint: give {run_dir.parent.parent}")
    if is_model_dir(run_dir):
        raise CheckpointError(f"{run_dir} is a model directory, not a run directory: --watch follows a training "
                              f"run's checkpoints; evaluate a model once with `lmforge eval {run_dir}` (no --watch)")
    # Hidden entries are ignored: the trainer's first write into a new run directory is a
    # temporary `.config.yaml.*.tmp` (atomic write), the supervisor's `.last-error.json`.
    visible = [p for p in run_dir.iterdir() if not p.name.startswith(".")]
    if visible and not ((run_dir / CONFIG_FILE).exists() or (run_dir / CHECKPOINTS).exists()):
        # an empty directory is a run about to start; one with other contents is a wrong path
        raise CheckpointError(f"{run_dir} is not a run directory (no config.yaml, no checkpoints/); "
                              "give the --run-dir that `lmforge train` writes")


def _wait_for(run_dir: Path, interval: float) -> None:
    """Block until `run_dir` exists (training creates it), saying so once."""
    if run_dir.exists():
        return
    console.print(f"eval sidecar: waiting for {run_dir} to appear (a run about to start; "
                  f"looking every {interval:g}s, Ctrl-C stops)", markup=False)
    while not run_dir.exists():
        time.sleep(interval)


def watch(
    run_dir: str | os.PathLike,
    *,
    tasks: list[str] | None = None,
    data: str | None = None,
    text: str | None = None,
    batch_size: int | None = None,
    threads: int | None = None,
    max_batches: int = 0,
    interval: float = 10.0,
    once: bool = False,
    follow: bool = False,
    scorer: str = "packed",
    nice: int = 10,
    retrieval: list[str] | None = None,
) -> int:
    """Evaluate every checkpoint of `run_dir` once, as it appears; returns 0 when done."""
    run_dir = Path(run_dir)
    # Mistakes in the arguments fail now, before any waiting.
    if once and follow:
        raise LmforgeError("--once makes one pass and exits, --follow keeps watching after the run completed: give one")
    if interval <= 0:
        raise LmforgeError(f"--interval must be > 0 seconds, got {interval}")
    check_eval_options(data, text, batch_size, max_batches)
    if run_dir.exists():
        _check_run_dir(run_dir)
    elif blocker := next((p for p in run_dir.parents if p.exists() and not p.is_dir()), None):
        raise CheckpointError(f"{run_dir} can never be a run directory: {blocker} is a file")
    elif once:
        raise CheckpointError(f"--watch --once makes one pass over the checkpoints present, and there is no "
                              f"directory {run_dir}; drop --once to wait for the run to start")
    cli_tasks = load_tasks(list(tasks or []), retrieval)  # a bad task file fails now, not at the first checkpoint
    if not run_dir.exists():
        _wait_for(run_dir, interval)
        _check_run_dir(run_dir)
    if nice:
        try:
            os.nice(nice)  # training keeps priority: the sidecar gets what is left over
        except OSError:
            pass
    if not threads:  # the run's eval.threads (default 1): leave the other cores to training
        from ..config import load_config

        cfg_path = run_dir / CONFIG_FILE
        threads = load_config(cfg_path).eval.threads if cfg_path.is_file() else 1
    # sets them (powers of two, as training: the metrics do not depend on the count); fewer while the machine is oversubscribed
    governor = Governor(max(1, min(threads, cores())), exact=True)
    store = _open_store()
    done = {row["key"] for row in read_results(run_dir)}
    reported: set[str] = set()  # damaged checkpoints already reported (once each)
    console.print(f"eval sidecar: watching {run_dir} ({len(done)} checkpoint(s) already evaluated, "
                  f"{torch.get_num_threads()} thread(s))")
    try:
        while True:
            completed = run_completed(run_dir)  # read BEFORE listing: no checkpoint can follow `completed`
            for ckpt in list_checkpoints(run_dir):
                key = checkpoint_key(ckpt) or f"{ckpt.name}:?"
                if key in done or key in reported:
                    continue
                t0 = time.perf_counter()
                try:
                    loaded = load_model(ckpt)
                except (CheckpointError, OSError) as e:
                    if ckpt.exists():
                        reported.add(key)
                        console.print(f"[yellow]skipping[/] {ckpt.name}: damaged ({e})")
                    else:
                        console.print(f"[yellow]skipping[/] {ckpt.name}: vanished before it could be evaluated "
                                      "(retention deleted it? raise train.keep_last)")
                    continue
                model, tokenizer, cfg, step = loaded.model, loaded.tokenizer, loaded.config, loaded.origin.step
                task_list = cli_tasks if (tasks or retrieval) else load_tasks(list(cfg.eval.tasks)) + own_tasks(cfg)
                source = text_source(cfg, tokenizer, data=data, text=text)
                if source is None and not task_list:
                    raise LmforgeError(
                        f"nothing to evaluate for {ckpt}: its data ({', '.join(cfg.data.datasets) or 'data.path unset'}) is not a prepared "
                        "dataset here and no tasks are configured; pass --data, --text or --tasks"
                    )
                results = evaluate_model(model, tokenizer, cfg, tasks=task_list, source=source,
                                         batch_size=batch_size or cfg.eval.batch_size, max_batches=max_batches,
                                         scorer=scorer, show_progress=False, governor=governor)
                seconds = time.perf_counter() - t0
                _record(run_dir, store, ckpt, key, step, results, seconds)
                done.add(key)
                shown = ", ".join(f"{k} {v:.4f}" for k, v in results.items())
                console.print(f"evaluated {ckpt.name} (step {step}) in {seconds:.1f}s: {shown}")
            if once or (completed and not follow):
                if completed:
                    console.print(f"{run_dir}: training completed and every checkpoint is evaluated")
                return 0
            time.sleep(interval)
    finally:
        if store is not None:
            store.close()


__all__ = ["watch", "read_results", "run_completed", "checkpoint_key"]
