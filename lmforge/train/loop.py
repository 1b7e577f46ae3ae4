"""The training loop: build(), train(), train_step().

Design:
- `train_step` is one optimizer step over a list of micro batches (gradient accumulation), a pure
  function of (model, optimizer, batches, lr) that tests call on its own.
- `build` turns a resolved config and a run directory into a `Run`: model, optimizer, loader and
  counters, restored from the newest intact checkpoint when the run directory has one. Resume is
  exact because everything that decides the future is restored: weights and optimizer moments
  (DCP), the data cursor (a step number: the order itself is a pure function), RNG states, the
  step counter that drives the learning-rate schedule.
- `train` reads top to bottom: fetch the global batch, split it into micro batches, step, log,
  validate, checkpoint, stop on a signal. SIGINT/SIGTERM are turned into a flag checked between
  steps, so a stop writes a checkpoint at a step boundary and never tears one.

Files written into the run directory: config.yaml (resolved config), metrics.jsonl (one JSON
object per logged step; validation lines carry `val_loss`), events.jsonl (resume, config change,
checkpoint, interrupt, completion), checkpoints/.

Fault injection for drills and tests: LMFORGE_FAULTS="kill@12" SIGKILLs the process right after
step 12's update (before any checkpoint of that step). Each fault fires once per run directory
(recorded in faults-fired.json), so a supervised restart does not loop on it.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import Config, load_config
from ..errors import ConfigError, DataError
from ..evaluate.loss import autocast, validation_loss
from ..util import atomic_write_text, console
from . import checkpoint as ckpt_io
from .optim import build_optimizer, lr_at

# Keys that may change when a run resumes: they change how the run continues, not what it is.
SAFE_TO_CHANGE = {
    "train": {
        "lr", "min_lr_ratio", "warmup_steps", "schedule", "decay_fraction", "weight_decay",
        "beta1", "beta2", "eps", "grad_clip", "max_steps", "log_every", "eval_every",
        "eval_batches", "ckpt_every_steps", "ckpt_every_minutes", "keep_last", "keep_every",
        "threads", "compile", "dtype", "micro_batch", "parallel",
    },
    "guard": "*", "eval": "*", "serve": "*", "init": "*",
}


@dataclass
class StepResult:
    loss: float
    grad_norm: float


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    lr: float,
    grad_clip: float,
    dtype: str,
) -> StepResult:
    """One optimizer step: accumulate gradients over micro batches, clip, update."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros(())
    for x, y in micro_batches:  # each (micro_batch, seq_len)
        with autocast(dtype):
            _, loss = model(x, y)
        (loss / len(micro_batches)).backward()
        total += loss.detach().float()
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    optimizer.step()
    return StepResult(loss=float(total) / len(micro_batches), grad_norm=float(grad_norm))


@dataclass
class Run:
    cfg: Config
    run_dir: Path
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: Any
    tokenizer_path: Path
    step: int = 0  # optimizer steps completed
    tokens: int = 0  # training tokens consumed
    resumed_from: Path | None = None
    forward_model: torch.nn.Module | None = None  # torch.compile'd view of model, if enabled
    fired_faults: list[str] = field(default_factory=list)


def build(cfg: Config, run_dir: Path) -> Run:
    """Model, optimizer and loader for a run, restored from its newest intact checkpoint."""
    from ..data.loader import Loader, TokenDataset
    from ..model import Transformer

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    dataset = TokenDataset(cfg.data.path)
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    loader = Loader(cfg.data.path, seq_len=cfg.data.seq_len, global_batch=cfg.train.global_batch, seed=cfg.data.seed)
    run = Run(cfg, run_dir, model, optimizer, loader, Path(dataset.tokenizer_path))
    ckpt, skipped = ckpt_io.find_resume_checkpoint(run_dir)
    for problem in skipped:
        console.print(f"[yellow]warning:[/] skipping a damaged checkpoint: {problem}")
        log_event(run, "checkpoint_corrupt", {"problem": problem})
    if ckpt is not None:
        state = ckpt_io.load_training_state(ckpt, model, optimizer)
        loader.load_state_dict(state["loader"])
        run.step, run.tokens, run.resumed_from = state["step"], state["tokens"], ckpt
        _drop_records_after(run_dir / "metrics.jsonl", run.step)  # they are about to be redone
    elif ckpt_io.list_checkpoints(run_dir):
        raise DataError(f"{run_dir}: every checkpoint is damaged; see the warnings above, or start a new --run-dir")
    run.forward_model = torch.compile(model) if cfg.train.compile else model
    run.fired_faults = _read_fired_faults(run_dir)
    return run


def train(run: Run) -> int:
    """Train until max_steps or a stop signal; returns the process exit code."""
    cfg, t = run.cfg, run.cfg.train
    accum = t.global_batch // t.micro_batch
    tokens_per_step = t.global_batch * cfg.data.seq_len
    stop = _StopFlag()
    last_ckpt_time = time.monotonic()
    window_start, window_tokens = time.perf_counter(), 0
    if run.resumed_from is not None:
        console.print(f"resumed from {run.resumed_from} at step {run.step}")
        log_event(run, "resume", {"checkpoint": str(run.resumed_from)})
    progress = _progress(t.max_steps, run.step)
    with stop, progress:
        while run.step < t.max_steps:
            x, y = run.loader.next()  # (global_batch, seq_len) each
            micro = list(zip(x.split(t.micro_batch), y.split(t.micro_batch)))
            assert len(micro) == accum
            lr = lr_at(run.step, t)
            result = train_step(run.forward_model, run.optimizer, micro, lr=lr, grad_clip=t.grad_clip, dtype=t.dtype)
            run.step += 1
            run.tokens += tokens_per_step
            window_tokens += tokens_per_step
            if run.step % t.log_every == 0 or run.step == t.max_steps:
                rate = window_tokens / max(1e-9, time.perf_counter() - window_start)
                window_start, window_tokens = time.perf_counter(), 0
                log_metrics(run, {"loss": result.loss, "lr": lr, "grad_norm": result.grad_norm, "tokens": run.tokens, "tokens_per_s": rate})
                progress.update(run.step, result.loss, rate)
            if t.eval_every and (run.step % t.eval_every == 0 or run.step == t.max_steps):
                vl = validation_loss(run.model, cfg.data.path, seq_len=cfg.data.seq_len, batch_size=t.micro_batch, max_batches=t.eval_batches, dtype=t.dtype)
                log_metrics(run, {"val_loss": vl})
                progress.note(f"step {run.step}: val_loss {vl:.4f}")
            due = (t.ckpt_every_steps and run.step % t.ckpt_every_steps == 0) or (
                t.ckpt_every_minutes and time.monotonic() - last_ckpt_time >= 60 * t.ckpt_every_minutes
            )
            if due or stop.signum or run.step == t.max_steps:
                save(run)
                last_ckpt_time = time.monotonic()
            _maybe_inject_fault(run)
            if stop.signum:
                name = signal.Signals(stop.signum).name
                log_event(run, "interrupted", {"signal": name})
                console.print(
                    f"{name}: stopped at step {run.step} with a checkpoint. Run the same command again to resume."
                )
                return 128 + stop.signum
    log_event(run, "completed", {"tokens": run.tokens})
    console.print(f"done: {run.step} steps, {run.tokens:,} tokens; checkpoints in {ckpt_io.checkpoints_dir(run.run_dir)}")
    return 0


def save(run: Run) -> Path:
    path = ckpt_io.save_checkpoint(
        run.run_dir,
        run.step,
        model=run.model,
        optimizer=run.optimizer,
        config=run.cfg,
        trainer_state={"tokens": run.tokens, "loader": run.loader.state_dict()},
        tokenizer_path=run.tokenizer_path,
    )
    ckpt_io.apply_retention(run.run_dir, run.cfg.train.keep_last, run.cfg.train.keep_every)
    log_event(run, "checkpoint_saved", {"path": str(path)})
    return path


# ---- command ---------------------------------------------------------------------------------


def train_command(config_path: str | None, *, run_dir: str | None, overrides: list[str]) -> int:
    """`lmforge train`: start a run, or resume it (with safe changes) when run_dir has one."""
    if run_dir is None:
        if config_path is None:
            raise ConfigError("give a config file, a --run-dir to resume, or both")
        run_dir = str(Path("runs") / Path(config_path).stem)
    rd = Path(run_dir)
    saved_path = rd / "config.yaml"
    if config_path is None and not saved_path.is_file():
        raise ConfigError(f"{rd} holds no run (no config.yaml); give a config file to start one")
    cfg = resolve_config(load_config(config_path or saved_path, overrides))
    if saved_path.is_file():
        saved = load_config(saved_path)
        changes = saved.diff(cfg)
        check_resume_changes(changes)
        if changes:
            for key, (old, new) in changes.items():
                console.print(f"config change on resume: {key}: {old!r} -> {new!r}")
    else:
        changes = {}
    rd.mkdir(parents=True, exist_ok=True)
    cfg.save(saved_path)
    run = build(cfg, rd)
    if changes:
        log_event(run, "config_change", {k: list(v) for k, v in changes.items()})
    return train(run)


def resolve_config(cfg: Config) -> Config:
    """Fill in what depends on the data (vocab size) and check the config against the dataset."""
    from ..data.loader import TokenDataset

    if not cfg.data.path:
        raise ConfigError("data.path is empty: set it to a prepared dataset, e.g. --set data.path=data/mycorp")
    if cfg.init.from_:
        raise ConfigError("init.from is not supported yet (see the interop issue); leave it empty")
    ds = TokenDataset(cfg.data.path)
    vocab = int(ds.manifest["vocab_size"])
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = vocab
    elif cfg.model.vocab_size < vocab:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the dataset's tokenizer ({vocab} tokens); "
            f"set model.vocab_size to 0 (automatic) or >= {vocab}"
        )
    n = ds.num_samples(cfg.data.seq_len)
    if n < 1:
        raise DataError(f"{cfg.data.path}: the train split has {ds.n_tokens} tokens, fewer than one sample of data.seq_len+1")
    return cfg


def check_resume_changes(changes: dict[str, tuple[Any, Any]]) -> None:
    unsafe = []
    for key in changes:
        section, name = key.split(".")
        allowed = SAFE_TO_CHANGE.get(section, set())
        if allowed != "*" and name not in allowed:
            unsafe.append(key)
    if unsafe:
        detail = ", ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in unsafe)
        raise ConfigError(
            f"cannot resume with a changed {detail}: it would make a different run. "
            "Start a new run directory instead (--run-dir), or undo the change."
        )


# ---- records ---------------------------------------------------------------------------------


def log_metrics(run: Run, values: dict[str, float]) -> None:
    _append_jsonl(run.run_dir / "metrics.jsonl", {"step": run.step, **values, "time": time.time()})


def log_event(run: Run, kind: str, data: dict[str, Any]) -> None:
    _append_jsonl(run.run_dir / "events.jsonl", {"step": run.step, "kind": kind, "time": time.time(), **data})


def _drop_records_after(path: Path, step: int) -> None:
    """Remove metric lines newer than `step` (written after the checkpoint we resume from)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if 0 <= _record_step(line) <= step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(kept))


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1  # a torn last line from a kill: drop it


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# ---- signals, faults, progress ---------------------------------------------------------------


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag checked between steps (restored on exit)."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum:  # a second Ctrl-C means: stop now
            raise KeyboardInterrupt
        self.signum = signum
        console.print(f"{signal.Signals(signum).name} received: finishing this step and writing a checkpoint")

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def _read_fired_faults(run_dir: Path) -> list[str]:
    p = run_dir / "faults-fired.json"
    return json.loads(p.read_text()) if p.is_file() else []


def _maybe_inject_fault(run: Run) -> None:
    for spec in filter(None, os.environ.get("LMFORGE_FAULTS", "").split(",")):
        kind, _, at = spec.strip().partition("@")
        if kind == "kill" and at.isdigit() and int(at) == run.step and spec not in run.fired_faults:
            run.fired_faults.append(spec)
            atomic_write_text(run.run_dir / "faults-fired.json", json.dumps(run.fired_faults))
            console.print(f"fault injection: SIGKILL at step {run.step}")
            os.kill(os.getpid(), signal.SIGKILL)


class _progress:
    """A rich progress bar (step, loss, tokens/s, ETA) that also prints a plain log line."""

    def __init__(self, total: int, start: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} tok/s"),
            TimeRemainingColumn(), console=console, transient=False,
        )
        self._task = self._bar.add_task("train", total=total, completed=start, loss="-", rate="-")

    def __enter__(self) -> "_progress":
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.__exit__(*exc)

    def update(self, step: int, loss: float, rate: float) -> None:
        self._bar.update(self._task, completed=step, loss=f"{loss:.4f}", rate=f"{rate:,.0f}")
        if not console.is_terminal:
            console.print(f"step {step}: loss {loss:.4f}, {rate:,.0f} tok/s")

    def note(self, text: str) -> None:
        console.print(text)
