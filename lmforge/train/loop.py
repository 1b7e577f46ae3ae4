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
object per logged step; validation lines carry `val_loss`), events.jsonl (start, resume, branch,
config change, checkpoint, interrupt, completion), checkpoints/.

A start is checked in full before anything is written: config and `--set` values, the run
directory path, LMFORGE_FAULTS, the data (train split, and the val split when validation is on),
the device, the checkpoint to resume or branch from (for `--from`, the model shape too). Only then
is the run directory committed (config.yaml written), so a failed start leaves nothing behind. A
run has started once it has a checkpoint (a fresh run writes one at step 0); a config.yaml
without one is a start that never trained, and the next start replaces it instead of resuming it.

Self-healing: after every step the guard (guard.py) judges loss and gradient norm; a non-finite
value or a spike rolls the run back to an earlier intact checkpoint, skips the data window that led
into it, optionally lowers the learning rate, and records the event with its evidence. A fresh
run writes a step-0 checkpoint so that even the first steps have somewhere to go back to.

Fault injection for drills and tests (off unless the variable is set): LMFORGE_FAULTS is a comma
list of `kind@step` with kind `kill` (SIGKILL right after that step's update, before its
checkpoint), `nan` (that step's loss becomes NaN) or `spike` (that step's loss and gradients are
scaled by 100). Each fault fires once per run directory (recorded in faults-fired.json), so a
supervised restart or a rollback does not loop on it; `kind@step!` fires every time instead (a
failure that repeats, to drill the supervisor's loop protection). Under many processes `nan` and
`spike` hit every rank, and `kill@step/R` kills rank R alone (`kill@step`: rank 0). A malformed
item is refused when training starts (`check_faults`): a typo must not drill nothing.

Many processes (torchrun; distributed.py): every rank runs this same loop on its share of each
global batch (`Loader(rank=, world=)`), with global_batch / (world * micro_batch) micro batches.
Rank 0 alone prints, writes metrics/events/the store and model.safetensors. Every branch is taken
on agreed values: the loss and gradient norm the guard judges are broadcast from rank 0, a stop
signal or a due time-based checkpoint on any rank stops/saves all of them, and rank 0 plans a
rollback and broadcasts the plan.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import artifacts
from ..artifacts import CONFIG_FILE, EVENTS_FILE, FAULTS_FIRED_FILE, METRICS_FILE
from ..config import Config, load_config
from ..data.loader import Batch
from ..errors import CheckpointError, ConfigError, DataError, LmforgeError
from ..jsonl import append_jsonl
from ..model import autocast
from ..util import atomic_write_text, console, default_device, warn
from . import checkpoint as ckpt_io
from . import distributed, guard
from .distributed import SINGLE, Dist
from .objectives import NextToken, Objective, get_objective, validation_loss
from .optim import build_optimizer, lr_at

# Keys that may change when a run resumes: they change how the run continues, not what it is.
SAFE_TO_CHANGE = {
    "train": {
        "lr", "min_lr_ratio", "warmup_steps", "schedule", "decay_fraction", "weight_decay",
        "beta1", "beta2", "eps", "grad_clip", "max_steps", "log_every", "eval_every",
        "eval_batches", "ckpt_every_steps", "ckpt_every_minutes", "keep_last", "keep_every",
        "threads", "compile", "dtype", "micro_batch", "parallel", "deterministic_reduce",
        "activation_checkpointing",
    },
    "guard": "*", "eval": "*", "serve": "*", "init": "*",
}


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    metrics: dict[str, float] = field(default_factory=dict)  # an objective's extra figures, mean per unit
    units: int = 0  # the step's units over all ranks (tokens, trained tokens, pairs: the objective's)


NEXT_TOKEN = NextToken()


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list[Batch],
    *,
    lr: float,
    grad_clip: float,
    dtype: str,
    objective: Objective = NEXT_TOKEN,
    loss_multiplier: float = 1.0,
    d: Dist = SINGLE,
    deterministic_reduce: bool = False,
) -> StepResult:
    """One optimizer step: accumulate gradients over micro batches, clip, update.

    `micro_batches` are dicts of tensors (data/loader.py), already on the device; under many
    processes they are this rank's share. The loss is normalised by the global number of units
    (`objective.units` summed over every micro batch of every rank, one all-reduce before any
    backward: train/objectives.py), so the returned loss is the global mean per unit and the
    gradient that of the global batch, identical on every rank and on any world size.
    `loss_multiplier` exists for fault injection only (NaN or a large factor)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    n_local, n_total = len(micro_batches), len(micro_batches) * d.world
    local_units = float(sum(objective.units(mb) for mb in micro_batches))
    units = d.sum_floats([local_units])[0] if d.active else local_units  # before any backward: every share's divisor
    # DDP/FSDP average gradients over ranks; deterministic_reduce (and one process) sums them
    averaging = d.world if d.active and not deterministic_reduce else 1
    legacy: list[bool] = []  # per micro batch: the averaged arithmetic (objectives.py)
    metrics: dict[str, float] = {}

    def forward(mb: Batch) -> tuple[torch.Tensor, torch.Tensor]:  # -> (what backward sees, what the loss sums)
        with autocast(dtype, next(iter(mb.values())).device.type):
            out = objective.loss(model, mb)
        loss = out.loss * loss_multiplier if loss_multiplier != 1.0 else out.loss
        for k, v in out.metrics.items():
            metrics[k] = metrics.get(k, 0.0) + float(v)
        legacy.append(out.averaged and out.count * n_total == units)
        if legacy[-1]:  # the mean of equal shares: mean per micro batch / number of micro batches, as always
            return loss / (n_total // averaging), loss.detach()
        summed = loss * out.count if out.averaged else loss
        scaled = summed / max(units, 1.0)
        return (scaled * averaging if averaging != 1 else scaled), summed.detach()

    if deterministic_reduce:  # gradients gathered and summed in canonical order (distributed.py)
        total = distributed.deterministic_step(model, micro_batches, d=d, forward=forward)  # the global sum
    else:
        acc = torch.zeros((), device=next(iter(micro_batches[0].values())).device)  # summed on the device: one sync per step
        for i, mb in enumerate(micro_batches):
            with distributed.no_sync(model, last=i == len(micro_batches) - 1):  # DDP/FSDP reduce once per step
                back, value = forward(mb)
                back.backward()
            acc += value.float()
        total = float(acc)
    if len(set(legacy)) > 1:
        raise RuntimeError(f"objective {objective.name!r} returned averaged and summed losses in one step")
    if deterministic_reduce:
        loss = total / n_total if all(legacy) else total / max(units, 1.0)
    elif all(legacy):  # the mean of this rank's means; the wrapper averaged gradients over ranks, so average it too
        loss = total / n_local
        if d.active:
            loss = d.sum_floats([loss])[0] / d.world
    else:
        loss = (d.sum_floats([total])[0] if d.active else total) / max(units, 1.0)
    if d.active and metrics:
        names = sorted(metrics)
        metrics = dict(zip(names, d.sum_floats([metrics[k] for k in names])))
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    optimizer.step()
    return StepResult(loss=loss, grad_norm=distributed.full_norm(grad_norm),
                      metrics={k: v / max(units, 1.0) for k, v in metrics.items()}, units=int(units))


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
    guard: guard.GuardState = field(default_factory=guard.GuardState)
    dist: Dist = SINGLE  # this process's rank and the world size
    lr_scale: float = 1.0  # product of the guard's lr_scale over all rollbacks so far
    rollbacks: list[int] = field(default_factory=list)  # steps at which the guard rolled back
    fired_faults: list[str] = field(default_factory=list)
    store: Any = None  # the experiment store (track/store.py), None if it cannot be opened
    run_id: int = 0
    fresh_data_order: str = ""  # --from: why the checkpoint's data cursor could not carry over ("": it did)
    tokenizer_facts: dict[str, Any] | None = None  # bos/eos token, chat template of its origin: into every checkpoint
    init_origin: dict[str, Any] | None = None  # init.from's weights, as loaded by a fresh run (its start event)
    objective: Objective = field(default_factory=NextToken)  # train.objective (train/objectives.py)

    @property
    def resumed(self) -> bool:
        """Resumed from a checkpoint of its own (not branched from another run's, not fresh)."""
        return self.resumed_from is not None and self.resumed_from.parent.parent == self.run_dir

    def trainer_state(self) -> dict[str, Any]:
        """What trainer.json records besides weights and optimizer (see checkpoint.py)."""
        return {"tokens": self.tokens, "loader": self.loader.state_dict(), "guard": self.guard.to_dict(),
                "lr_scale": self.lr_scale, "rollbacks": self.rollbacks}


def build(cfg: Config, run_dir: Path, from_checkpoint: Path | None = None, d: Dist = SINGLE) -> Run:
    """Model, optimizer and loader for a run, restored from its newest intact checkpoint, or for a
    new run branched from `from_checkpoint` (weights, optimizer, step; the data cursor when the
    data, seq_len, data seed and global batch are the same, else a fresh data order). Writes
    nothing into a new run directory (so a refused start leaves none); resuming, it records the
    damaged checkpoints it skips. Under many processes every rank builds the same run, wrapped
    for `train.parallel`, reading its own share of each batch."""
    from ..model import Transformer

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    distributed.check_parallel(cfg.train, d)
    distributed.micro_batches_per_rank(cfg.train.global_batch, cfg.train.micro_batch, d.world)
    loader = make_loader(cfg, d)
    seed_everything(cfg.train.seed)  # the RNG states a checkpoint records are then a function of the run
    model = Transformer(cfg.model).to(device())  # init on CPU first: the same weights on any device
    facts_from = None  # the directory whose tokenizer facts (chat template, end of turn) the run carries on
    init_origin = None
    if cfg.init.from_ and from_checkpoint is None and not artifacts.list_checkpoints(run_dir):  # fresh run only
        from .init_from import load_init, origin_record  # pretrained weights (step 0, fresh optimizer)

        loaded = load_init(model, cfg)
        facts_from, init_origin = loaded.origin.path, origin_record(loaded)
    forward_model = distributed.wrap(model, cfg.train, d)  # DDP wrapper, or model itself (FSDP2 shards in place)
    optimizer = build_optimizer(model, cfg.train)  # after FSDP: over the sharded parameters
    run = Run(cfg, run_dir, model, optimizer, loader, Path(loader.source.dataset.tokenizer_path), dist=d,
              init_origin=init_origin, objective=get_objective(cfg.train.objective))
    # rank 0 verifies (hashes) the checkpoints; every rank resumes from the one it chose
    ckpt, damaged = d.broadcast_object(artifacts.scan_checkpoints(run_dir) if d.is_main else None)
    for path, problems in damaged:  # one warning and one event per damaged checkpoint
        warn(f"skipping a damaged checkpoint: {'; '.join(problems)}")
        log_event(run, "checkpoint_corrupt", {"path": str(path), "problem": "; ".join(problems)},
                  step=artifacts.checkpoint_step(path))
    if ckpt is None and damaged:
        raise CheckpointError(f"{run_dir}: every checkpoint is damaged ({', '.join(p.name for p, _ in reversed(damaged))}); "
                              "see the warnings above, or start a new --run-dir")
    if ckpt is not None and from_checkpoint is not None:
        raise ConfigError(f"--from starts a new run, but {run_dir} already has checkpoints; choose a new --run-dir")
    source = ckpt or from_checkpoint
    if source is not None:
        state = _load_state(run, source, branch=ckpt is None)
        run.step, run.tokens, run.resumed_from = state["step"], state["tokens"], source
        run.guard = guard.GuardState.from_dict(state.get("guard"))
        run.lr_scale, run.rollbacks = state.get("lr_scale", 1.0), state.get("rollbacks", [])
        if ckpt is not None and d.is_main:
            _drop_records_after(run_dir / METRICS_FILE, run.step)  # they are about to be redone
        facts_from = source
    if facts_from is not None and (cfg.init.from_ or (facts_from / artifacts.TOKENIZER_CONFIG).is_file()):
        run.tokenizer_facts = _tokenizer_facts(facts_from, run.tokenizer_path)  # {} too: a reader needs no chain
    run.forward_model = torch.compile(forward_model) if cfg.train.compile else forward_model
    run.fired_faults = _read_fired_faults(run_dir)
    return run


def make_loader(cfg: Config, d: Dist = SINGLE) -> Any:
    """This rank's loader of the run's data (data/loader.py chooses the source: token windows, or
    rows of whole conversations for SFT data); says once what the rows leave out."""
    from ..data.loader import DocumentRows, Loader

    loader = Loader(cfg.data.path, seq_len=cfg.data.seq_len, global_batch=cfg.train.global_batch, seed=cfg.data.seed,
                    rank=d.rank, world=d.world, document_mask=cfg.data.document_mask, packing=cfg.data.packing)
    src = loader.source
    if isinstance(src, DocumentRows) and src.dropped and d.is_main:
        warn(f"{src.dropped} of {src.n_documents} examples in {cfg.data.path} are longer than data.seq_len + 1 = "
             f"{cfg.data.seq_len + 1} tokens (the longest: {src.longest}) and are left out, never cut; raise "
             "data.seq_len to train on them")
    return loader


def _tokenizer_facts(source: Path, tokenizer_path: Path) -> dict[str, Any]:
    """The tokenizer facts recorded in `source` (a checkpoint or init.from's directory), when it
    uses this run's tokenizer (they name its tokens): each checkpoint then records them itself."""
    from ..tokenizer import Tokenizer

    if Tokenizer.load(source / artifacts.TOKENIZER_FILE).sha256 != Tokenizer.load(tokenizer_path).sha256:
        return {}
    return artifacts.tokenizer_facts(source)


def _open_store(run: Run) -> None:
    """Register the run in the experiment store; training goes on without it if it fails."""
    from ..track.store import Store

    if not run.dist.is_main:  # one writer: rank 0 records the run
        return
    try:
        run.store = Store.open()
        run.run_id = run.store.start_run(name=run.run_dir.name, run_dir=str(run.run_dir), config=run.cfg.to_dict(), resumed=run.resumed)
    except (LmforgeError, OSError) as e:
        warn(f"experiment store unavailable ({e}); this run is recorded in its directory only")
        run.store = None


def _load_state(run: Run, ckpt: Path, branch: bool = False) -> dict[str, Any]:
    """Restore weights, optimizer, RNG and data cursor from `ckpt`. Resuming (and rolling back) the
    cursor must fit (the loader refuses other data or another shape); a branch (`--from`) whose
    data, seq_len, data seed or global batch differ reads this run's data in a fresh order."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: caught by name

    try:
        state = ckpt_io.load_training_state(ckpt, run.model, run.optimizer)
    except (RuntimeError, ValueError, KeyError, CheckpointException) as e:
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__  # DCP: the rank's error last
        raise CheckpointError(f"{ckpt} does not fit this model/optimizer ({detail})") from None
    changed = _cursor_changes(state["loader"], run.loader) if branch else []
    if changed:
        run.fresh_data_order = "; ".join(changed)
        console.print(f"note: the data cursor of {ckpt} cannot carry over ({run.fresh_data_order}); "
                      "this run reads its data in a fresh order from its first batch")
    else:
        run.loader.load_state_dict(state["loader"])
    return state


def _cursor_changes(saved: dict[str, Any], loader: Any) -> list[str]:
    """What differs between a checkpoint's data cursor and this run's loader, by config key."""
    keys = {"fingerprint": "data (dataset fingerprint)", "seq_len": "data.seq_len", "global_batch": "train.global_batch",
            "seed": "data.seed"}
    return [f"{name}: checkpoint {saved.get(key)!r}, now {getattr(loader, key)!r}"
            for key, name in keys.items() if saved.get(key) != getattr(loader, key)]


def train(run: Run) -> int:
    """Train until max_steps or a stop signal; returns the process exit code."""
    cfg, t, d = run.cfg, run.cfg.train, run.dist
    _open_store(run)
    _record_start(run)
    accum = distributed.micro_batches_per_rank(t.global_batch, t.micro_batch, d.world)
    tokens_per_step = t.global_batch * cfg.data.seq_len
    dev = device()
    flops_per_token, peak = model_flops_per_token(cfg), peak_flops(dev, t.dtype)
    if peak:
        log_event(run, "mfu_peak", {"peak_flops": peak, "device": str(dev), "dtype": t.dtype,
                                    "source": "datasheet" if dev.type == "cuda" else "measured matmul rate"})
    stop = _StopFlag()
    last_ckpt_time = time.monotonic()
    window_start, window_tokens = time.perf_counter(), 0
    if d.world > 1:
        console.print(f"{d.world} processes ({t.parallel}{', deterministic reduce' if t.deterministic_reduce else ''}): "
                      f"{accum} micro batch(es) of {t.micro_batch} per rank per step; logs from rank 0")
    if run.step == 0 and not d.broadcast_object(bool(artifacts.list_checkpoints(run.run_dir))):
        save(run)  # step 0: somewhere for the guard to roll back to, even from the first steps
    progress = _progress(t.max_steps, run.step)
    with stop, progress, _failure_recorded(run):
        while run.step < t.max_steps:
            data_step = run.loader.step
            micro = split_micro(run.loader.next(), t.micro_batch, dev)  # this rank's share, global_batch // world rows
            assert len(micro) == accum
            lr = lr_at(run.step, t) * run.lr_scale
            result = train_step(run.forward_model, run.optimizer, micro, lr=lr, grad_clip=t.grad_clip,
                                dtype=t.dtype, objective=run.objective, loss_multiplier=_fault_multiplier(run, run.step + 1),
                                d=d, deterministic_reduce=t.deterministic_reduce)
            if d.active:  # one set of numbers for the guard and the logs: rank 0's, bit for bit
                result.loss, result.grad_norm = d.broadcast_floats([result.loss, result.grad_norm])
            run.step += 1
            run.tokens += tokens_per_step
            window_tokens += tokens_per_step
            if cfg.guard.enabled:
                verdict, run.guard = guard.check(run.guard, result.loss, result.grad_norm, cfg.guard)
                if verdict.kind != "ok":
                    _on_verdict(run, verdict, result, data_step)
                    if verdict.act:
                        rollback(run, verdict, data_step)
                        progress.update(run.step, result.loss, 0.0)
                        continue
            if run.step % t.log_every == 0 or run.step == t.max_steps:
                rate = window_tokens / max(1e-9, time.perf_counter() - window_start)
                window_start, window_tokens = time.perf_counter(), 0
                perf = {"tflops": rate * flops_per_token / 1e12} | ({"mfu": rate * flops_per_token / peak} if peak else {})
                log_metrics(run, {"loss": result.loss, "lr": lr, "grad_norm": result.grad_norm, "tokens": run.tokens, "tokens_per_s": rate,
                                  **perf, **result.metrics})
                progress.update(run.step, result.loss, rate)
            if t.eval_every and (run.step % t.eval_every == 0 or run.step == t.max_steps):
                vl = validation_loss(run.model, run.objective, val_batches(cfg, t.micro_batch, t.eval_batches), dtype=t.dtype)
                log_metrics(run, {"val_loss": vl})
                progress.note(f"step {run.step}: val_loss {vl:.4f}")
            due = (t.ckpt_every_steps and run.step % t.ckpt_every_steps == 0) or (
                t.ckpt_every_minutes and time.monotonic() - last_ckpt_time >= 60 * t.ckpt_every_minutes
            )
            # agreed across ranks: a clock or a signal seen by one rank saves/stops all of them
            due, stopping = d.any_flags([bool(due), bool(stop.signum)])
            if due or stopping or run.step == t.max_steps:
                save(run)
                last_ckpt_time = time.monotonic()
            _maybe_kill(run)
            if stopping:
                name = signal.Signals(stop.signum or signal.SIGTERM).name
                log_event(run, "interrupted", {"signal": name})
                _finish(run, "interrupted")
                console.print(
                    f"{name}: stopped at step {run.step} with a checkpoint. Run the same command again to resume."
                )
                return 128 + (stop.signum or signal.SIGTERM)
    log_event(run, "completed", {"tokens": run.tokens})
    _finish(run, "completed")
    console.print(f"done: {run.step} steps, {run.tokens:,} tokens; checkpoints in {artifacts.checkpoints_dir(run.run_dir)}")
    return 0


def split_micro(batch: Batch, micro_batch: int, dev: torch.device) -> list[Batch]:
    """A rank's batch -> micro batches of `micro_batch` rows on `dev` (every tensor sliced along dim 0)."""
    parts = {k: v.to(dev, non_blocking=True).split(micro_batch) for k, v in batch.items()}
    return [{k: chunks[i] for k, chunks in parts.items()} for i in range(len(next(iter(parts.values()))))]


def val_batches(cfg: Config, batch_size: int, max_batches: int | None) -> Any:
    """The run's validation batches: the val split read as the train split is (same source kind,
    document masking and packing), in order."""
    from ..data.loader import val_batches as batches

    return batches(cfg.data.path, seq_len=cfg.data.seq_len, batch_size=batch_size, max_batches=max_batches,
                   document_mask=cfg.data.document_mask, packing=cfg.data.packing)


def _record_start(run: Run) -> None:
    """Say how this start began (fresh, resumed or branched) and record it, with the directory it
    runs in (relative paths in the config are read from there)."""
    d, cwd = run.dist, os.getcwd()
    if run.resumed:
        console.print(f"resumed from {run.resumed_from} at step {run.step} ({d.describe()})")
        log_event(run, "resume", {"checkpoint": str(run.resumed_from), "world": d.world, "cwd": cwd})
    elif run.resumed_from is not None:
        console.print(f"branched from {run.resumed_from} at step {run.step} into {run.run_dir}")
        cursor = {"data_order": "fresh", "data_order_reason": run.fresh_data_order} if run.fresh_data_order else {"data_order": "continued"}
        log_event(run, "branch", {"from": str(run.resumed_from), "world": d.world, "cwd": cwd, **cursor})
    else:
        log_event(run, "start", {"world": d.world, "cwd": cwd} | ({"init_from": run.init_origin} if run.init_origin else {}))


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every GPU), Python's `random` and NumPy's global RNG. lmforge's data order
    and model init use none but torch, but user code and libraries may, and checkpoints record all
    three: seeded, a resumed run's states equal an uninterrupted run's."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def device() -> torch.device:
    return default_device()  # under torchrun with nccl, distributed.init() made this rank's GPU the current one


def model_flops_per_token(cfg: Config) -> float:
    from ..model import flops_per_token

    return flops_per_token(cfg.model, cfg.data.seq_len)


def peak_flops(dev: torch.device, dtype: str = "bf16") -> float | None:
    """The peak that MFU is measured against: a known GPU's datasheet bf16 peak (hardware.py's
    table), None for an unknown GPU; on the CPU, this machine's matmul rate in the run's dtype,
    measured now with the run's threads (512^3 products for ~0.1 s: an estimate, since a CPU's peak
    depends on its vector units and on what else runs; benchmarks/train_throughput.py measures it longer)."""
    from ..hardware import gpu_peak_flops, matmul_rate

    if dev.type != "cuda":
        return matmul_rate(torch.bfloat16 if dtype == "bf16" else torch.float32, 512, 0.1)
    return gpu_peak_flops(torch.cuda.get_device_name(dev))


def save(run: Run) -> Path:
    """Checkpoint the run at its current step; a failed write (full disk, I/O error) stops training
    with the previous checkpoint intact (the new one was never published)."""
    try:
        path = ckpt_io.save_checkpoint(
            run.run_dir, run.step, model=run.model, optimizer=run.optimizer, config=run.cfg,
            trainer_state=run.trainer_state(), tokenizer_path=run.tokenizer_path,
            tokenizer_facts=run.tokenizer_facts, d=run.dist,
        )
    except OSError as e:
        previous, _ = artifacts.find_resume_checkpoint(run.run_dir)
        log_event(run, "checkpoint_failed", {"error": str(e)})
        raise CheckpointError(
            f"writing the checkpoint of step {run.step} failed: {e}. Nothing was published; the previous "
            f"checkpoint ({previous or 'none'}) is intact. Free space or fix the path, then run the same command to resume."
        ) from None
    if run.dist.is_main:
        ckpt_io.apply_retention(run.run_dir, run.cfg.train.keep_last, run.cfg.train.keep_every)
    run.dist.barrier()  # retention is done before any rank looks at the checkpoints again
    log_event(run, "checkpoint_saved", {"path": str(path)})
    return path


class TrainingUnstable(LmforgeError):
    """The guard rolled back too often, or had no checkpoint early enough to roll back to."""


def _on_verdict(run: Run, verdict: guard.Verdict, result: StepResult, data_step: int) -> None:
    evidence = {"loss": result.loss, "grad_norm": result.grad_norm, "data_step": data_step,
                "z": verdict.z, "median": verdict.median, "acting": verdict.act}
    log_event(run, "spike" if verdict.kind == "spike" else "non_finite", evidence)
    # a warning: shown in quiet and json progress modes too
    warn(f"step {run.step}: {verdict.describe()} (loss {result.loss:.4g}, grad norm {result.grad_norm:.4g})", label="guard:")


def rollback(run: Run, verdict: guard.Verdict, data_step: int) -> None:
    """Go back to an earlier intact checkpoint, skip the data window, scale the lr, record it all."""
    g = run.cfg.guard
    recent = [s for s in run.rollbacks if s > run.step - 10 * g.window]
    if len(recent) >= g.max_rollbacks:
        raise TrainingUnstable(
            f"the guard rolled back {len(recent)} times within {10 * g.window} steps (steps {recent}) and "
            f"step {run.step} failed again ({verdict.describe()}); giving up. See {run.run_dir / EVENTS_FILE}. "
            "Lower train.lr, raise guard.skip_steps or guard.rollback_margin, then resume with --set."
        )
    intact, plan = [], None
    if run.dist.is_main:  # one decision: rank 0 verifies the checkpoints and plans; every rank follows
        for path in artifacts.list_checkpoints(run.run_dir):
            if not artifacts.verify_checkpoint(path):
                state = artifacts.read_trainer_state(path)
                intact.append((state["step"], state["loader"]["step"]))
        plan = guard.plan_rollback(spike_step=run.step, spike_data_step=data_step, patience_used=max(1, run.guard.streak),
                                   checkpoints=intact, lr_scale=run.lr_scale, cfg=g)
    intact, plan = run.dist.broadcast_object((intact, plan))
    if plan is None:
        raise TrainingUnstable(
            f"step {run.step}: {verdict.describe()}, and no intact checkpoint is at least guard.rollback_margin="
            f"{g.rollback_margin} steps before it (have {[s for s, _ in intact]}). Keep more checkpoints "
            "(train.keep_last / keep_every) or lower guard.rollback_margin."
        )
    spike_step, rollbacks = run.step, run.rollbacks + [run.step]
    if run.dist.is_main:
        ckpt_io.discard_after(run.run_dir, plan.checkpoint_step)  # the abandoned trajectory's checkpoints
    run.dist.barrier()
    state = _load_state(run, artifacts.checkpoints_dir(run.run_dir) / artifacts.checkpoint_name(plan.checkpoint_step))
    run.step, run.tokens = state["step"], state["tokens"]
    run.guard = guard.GuardState.from_dict(state.get("guard"))
    run.loader.skip(plan.skip_to - run.loader.step)
    run.lr_scale, run.rollbacks = plan.lr_scale, rollbacks
    if run.dist.is_main:
        _drop_records_after(run.run_dir / METRICS_FILE, run.step)
    save(run)  # rewrite that checkpoint with the skip and lr scale: a crash now resumes identically
    log_event(run, "rollback", {"from_step": spike_step, "to_step": run.step, "skipped_data_steps": [plan.skip_from, plan.skip_to],
                                "lr_scale": run.lr_scale, "reason": verdict.describe()})
    warn(f"rolled back from step {spike_step} to {run.step}; skipped data steps {plan.skip_from}..{plan.skip_to - 1}; "
         f"lr x {run.lr_scale:g}", label="guard:")


# ---- command ---------------------------------------------------------------------------------


def train_command(config_path: str | None, *, run_dir: str | None, overrides: list[str], from_: str | None = None) -> int:
    """`lmforge train`: start a run, resume it (with safe changes) when run_dir has one, or branch a
    new run from a checkpoint of another (`from_`). Under torchrun: one rank of a process group."""
    d = distributed.init()
    try:
        return _train_command(config_path, run_dir=run_dir, overrides=overrides, from_=from_, d=d)
    except LmforgeError as e:
        if d.world > 1:  # rank 0 prints through the CLI; the others are quiet, so say it here
            if not d.is_main:
                print(f"rank {d.rank}/{d.world}: error: {e}", file=sys.stderr, flush=True)
            _record_error(e)
        raise
    except RuntimeError as e:
        if d.world > 1 and distributed.lost_peer(e):  # another rank died: say so, without a traceback
            print(f"rank {d.rank}/{d.world}: stopped: a collective failed ({str(e).splitlines()[0][:200]}); usually "
                  "another rank died first, see torchrun's report for the root cause", file=sys.stderr, flush=True)
            return 1
        raise
    finally:
        distributed.shutdown()


def _record_error(e: LmforgeError) -> None:
    """For `--supervise --nproc-per-node`: torchrun reports any worker failure as exit 1, so a user
    error (exit 2, never worth a restart) is written where the supervisor looks for it."""
    target = os.environ.get("LMFORGE_ERROR_FILE")
    if target:
        try:
            atomic_write_text(target, json.dumps({"exit": 2, "error": str(e), "time": time.time()}))
        except OSError:
            pass


def _train_command(config_path: str | None, *, run_dir: str | None, overrides: list[str], from_: str | None, d: Dist) -> int:
    check_faults(d)
    if config_path is not None and Path(config_path).is_dir():
        hint = (f"it is a run directory: resume it with `lmforge train --run-dir {config_path}`"
                if (Path(config_path) / CONFIG_FILE).is_file() else "give a YAML config file")
        raise ConfigError(f"config file {config_path} is a directory; {hint}")
    rd = run_dir_of(config_path, run_dir)
    if rd is None:
        raise ConfigError("give a config file, a --run-dir to resume, or both")
    check_run_dir(rd)
    lock = RunDirLock(rd, active=d.is_main)
    try:
        lock.take()  # an existing run directory: locked before anything in it is read
        return _start_and_train(config_path, rd, overrides, from_, d, lock)
    finally:
        lock.release()


def _start_and_train(config_path: str | None, rd: Path, overrides: list[str], from_: str | None, d: Dist,
                     lock: "RunDirLock") -> int:
    saved_path = rd / CONFIG_FILE
    started = bool(artifacts.list_checkpoints(rd))  # a run has started once it has a checkpoint (step 0 at least)
    branch = artifacts.resolve_checkpoint(from_) if from_ else None
    if branch is not None and started:
        raise ConfigError(f"--from starts a new run, but {rd} already has checkpoints; choose a new --run-dir")
    base = start_config(config_path, rd, branch)
    if base is None:
        raise ConfigError(f"{rd} holds no run (no config.yaml); give a config file to start one")
    cfg = load_config(base, overrides)
    if started:
        _check_data_path_on_resume(cfg, rd)
    cfg = resolve_config(cfg)
    if branch is not None:
        check_branch_model(cfg, branch)
    changes: dict[str, tuple[Any, Any]] = {}
    if started and saved_path.is_file():
        changes = load_config(saved_path).diff(cfg)
        check_resume_changes(changes)
        for key, (old, new) in changes.items():
            console.print(f"config change on resume: {key}: {old!r} -> {new!r}")
    elif saved_path.is_file() and base != saved_path:
        console.print(f"note: {saved_path} is from an earlier start that never trained (no checkpoint); replacing it")
    run = build(cfg, rd, from_checkpoint=branch, d=d)  # the last check: nothing of a new run is written before it
    d.barrier()  # every rank has read the saved config before rank 0 replaces it
    if d.is_main:
        _commit_run_dir(rd, cfg, lock)
    d.barrier()
    if changes:
        log_event(run, "config_change", {k: list(v) for k, v in changes.items()})
    return train(run)


def run_dir_of(config_path: str | None, run_dir: str | None) -> Path | None:
    """The run directory a start uses: --run-dir, else runs/<config name>; None if neither is given."""
    if run_dir is not None:
        return Path(run_dir)
    return Path("runs") / Path(config_path).stem if config_path is not None else None


def start_config(config_path: str | None, rd: Path, branch: Path | None) -> str | Path | None:
    """The config a start loads: the given file, else the run's saved config.yaml (not for a
    branch, which starts from its checkpoint's), else the --from checkpoint's; None if none."""
    saved = rd / CONFIG_FILE
    if config_path:
        return config_path
    if branch is None and saved.is_file():
        return saved
    return branch / CONFIG_FILE if branch is not None else None


def check_run_dir(rd: Path) -> None:
    """Refuse a run directory path that cannot be a directory (a file, or under one)."""
    if rd.exists() and not rd.is_dir():
        raise ConfigError(f"--run-dir {rd}: exists and is not a directory; give a new path or a run's directory")
    parent = next((p for p in rd.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"--run-dir {rd}: {parent} is a file, not a directory; choose another path")


class RunDirLock:
    """One training job per run directory. Rank 0 holds an exclusive flock on the directory from
    before it reads the run (or, for a new run, from its creation) until training ends; a second
    `lmforge train` or torchrun job on the same directory is refused instead of both writing
    checkpoints and metrics into it. The kernel drops the lock when the process dies (kill -9
    included), so a crash never leaves a stale lock behind and a resume simply takes it again.
    (No-op where fcntl is missing.)"""

    def __init__(self, rd: Path, active: bool) -> None:
        self.rd, self.active, self.fd = rd, active, None

    def take(self) -> None:
        if not self.active or self.fd is not None or not self.rd.is_dir():
            return
        try:
            import fcntl
        except ImportError:  # not POSIX
            return
        fd = os.open(self.rd, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"--run-dir {self.rd} is in use by another `lmforge train` (it holds the run directory's "
                              "lock); wait for it to finish or stop it, or choose another --run-dir") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _commit_run_dir(rd: Path, cfg: Config, lock: RunDirLock) -> None:
    """The start was accepted: create the run directory, lock it, and write its config (atomically)."""
    try:
        rd.mkdir(parents=True, exist_ok=True)
        lock.take()  # a new run: before its config is written (a second start racing it fails here)
        cfg.save(rd / CONFIG_FILE)
    except OSError as e:
        raise ConfigError(f"--run-dir {rd}: cannot write the run directory ({e.strerror or e}); choose another path") from None


FAULT_FORMS = ("kill@N, nan@N, spike@N (N: a step >= 1), kill@N/R (under torchrun: rank R only), each optionally "
               "ending in ! to fire every time; e.g. LMFORGE_FAULTS=nan@15,kill@20")


def check_faults(d: Dist = SINGLE) -> None:
    """Refuse a malformed LMFORGE_FAULTS when training starts (a typo would silently drill nothing)."""
    spec = os.environ.get("LMFORGE_FAULTS", "")
    for item in (f.strip() for f in spec.split(",")):
        if not item:
            continue
        m = re.fullmatch(r"(kill|nan|spike)@(\d+)(?:/(\d+))?!?", item)
        if m is None or int(m[2]) < 1 or (m[3] is not None and m[1] != "kill"):
            raise ConfigError(f"LMFORGE_FAULTS={spec!r}: {item!r} is not a fault; valid forms: {FAULT_FORMS}")
        if m[3] is not None and int(m[3]) >= d.world:
            raise ConfigError(f"LMFORGE_FAULTS={spec!r}: {item!r} names rank {m[3]}, but this job has "
                              f"{d.world} process(es) (ranks 0..{d.world - 1})")


def model_shape(m: Any) -> dict[str, Any]:
    """The model keys that decide its parameters (their shapes and meaning), with automatic values
    (0) resolved; the others (RoPE settings, max_seq_len, norm_eps, init_std) may change under --from."""
    return {"vocab_size": m.vocab_size, "n_layer": m.n_layer, "n_head": m.n_head, "n_kv_head": m.kv_heads,
            "d_model": m.d_model, "d_ff": m.ff_dim, "tie_embeddings": m.tie_embeddings}


def check_branch_model(cfg: Config, ckpt: Path) -> None:
    """`--from` continues the checkpoint's weights and optimizer state: the model must have its shape."""
    theirs, mine = model_shape(artifacts.read_config(ckpt).model), model_shape(cfg.model)
    differ = [f"model.{k}: checkpoint {theirs[k]!r}, now {mine[k]!r}" for k in theirs if theirs[k] != mine[k]]
    if differ:
        raise ConfigError(
            f"--from {ckpt}: the model must keep the checkpoint's shape (its weights and optimizer state fit no "
            f"other), but {'; '.join(differ)}. Undo the change, or train the new shape from scratch in a new run "
            "(without --from)."
        )


def _check_data_path_on_resume(cfg: Config, rd: Path) -> None:
    """A relative data.path is read from the current directory: say so when resuming from another one."""
    path = Path(cfg.data.path)
    if not cfg.data.path or path.is_absolute() or path.exists():
        return
    where = _last_cwd(rd)
    then = f"this run last ran in {where}: run the command from there" if where else "run the command from where the run was started"
    raise DataError(f"data.path {path} of {rd} is not found from the current directory ({Path.cwd()}): a relative "
                    f"data.path is read from the directory lmforge runs in; {then}")


def _last_cwd(rd: Path) -> str | None:
    """The working directory of the run's latest recorded start (events.jsonl), if recorded."""
    path = rd / EVENTS_FILE
    cwd = None
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                cwd = json.loads(line).get("cwd", cwd)
            except (ValueError, AttributeError):
                continue
    return cwd


def resolve_config(cfg: Config) -> Config:
    """Fill in what depends on the data (vocab size) and check the config against the dataset."""
    from ..data.loader import TokenDataset

    if not cfg.data.path:
        raise ConfigError("data.path is empty: set it to a prepared dataset, e.g. --set data.path=data/mycorp")
    if cfg.init.from_:  # the imported model decides the model section; its tokenizer must be the data's
        from .init_from import resolve_init

        cfg = resolve_init(cfg)
    ds = TokenDataset(cfg.data.path)
    vocab = int(ds.manifest["vocab_size"])
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = vocab
    elif cfg.model.vocab_size < vocab:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the dataset's tokenizer ({vocab} tokens); "
            f"set model.vocab_size to 0 (automatic) or >= {vocab}"
        )
    from ..data.loader import open_source

    if open_source(ds, seq_len=cfg.data.seq_len, document_mask=cfg.data.document_mask, packing=cfg.data.packing).n_samples < 1:
        if ds.kind == "sft":
            raise DataError(f"{cfg.data.path}: no example of the train split fits data.seq_len + 1 = {cfg.data.seq_len + 1} "
                            "tokens; raise data.seq_len")
        raise DataError(f"{cfg.data.path}: the train split has {ds.n_tokens} tokens, fewer than one sample of data.seq_len+1")
    if cfg.train.eval_every:
        check_val_split(cfg)
    return cfg


def check_val_split(cfg: Config) -> None:
    """Validation (train.eval_every > 0) needs a val window of data.seq_len + 1 tokens: found now,
    before any step, rather than at the first validation after steps of work."""
    try:
        next(val_batches(cfg, 1, 1))
    except DataError as e:
        raise DataError(f"{e}; or train without validation: --set train.eval_every=0") from None


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


def data_step_of_run(run_dir: str | Path, step: int) -> dict[str, Any]:
    """Which data step training step `step` (1-based, as logged) of a run read, through its rollbacks.

    A step that raised a guard verdict is shown as it was read (the evidence in its event); any
    other step as it is on the run's final trajectory: after the chronologically last rollback to a
    checkpoint c < step, the data cursor is (step - 1) - c + the cursor it skipped to."""
    rd = Path(run_dir)
    cfg = load_config(rd / CONFIG_FILE)
    events_path = rd / EVENTS_FILE
    events = [json.loads(line) for line in events_path.read_text(encoding="utf-8").splitlines() if line.strip()] if events_path.is_file() else []
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


# ---- records ---------------------------------------------------------------------------------


def log_metrics(run: Run, values: dict[str, float]) -> None:
    if not run.dist.is_main:
        return
    _append_jsonl(run.run_dir / METRICS_FILE, {"step": run.step, **values, "time": time.time()})
    if run.store is not None:  # queued; a background thread writes (never slows the step)
        run.store.log_metrics(run.run_id, run.step, values)
        run.store.heartbeat(run.run_id, run.step)


def log_event(run: Run, kind: str, data: dict[str, Any], step: int | None = None) -> None:
    """Append an event at the run's step (or `step`: e.g. the step of a damaged checkpoint)."""
    if not run.dist.is_main:
        return
    step = run.step if step is None else step
    _append_jsonl(run.run_dir / EVENTS_FILE, {"step": step, "kind": kind, "time": time.time(), **data})
    if run.store is not None and kind not in ("resume", "config_change", "mfu_peak", "start"):  # the store records the first two itself; the others are bookkeeping
        run.store.log_event(run.run_id, kind, step, data)


def _finish(run: Run, status: str) -> None:
    if run.store is not None:
        run.store.finish_run(run.run_id, status, run.step)
        run.store.close()
        run.store = None


class _failure_recorded:
    """Mark the run failed in the store when training stops on an exception (not on SIGKILL:
    readers show a run whose process is gone as crashed)."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, _tb: Any) -> None:
        if exc_type is not None:
            log_event(self.run, "crash", {"error": f"{exc_type.__name__}: {exc}"})
            _finish(self.run, "failed")


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
    append_jsonl(path, record)  # NaN/inf as "nan"/"inf"/"-inf": lmforge/jsonl.py's rule


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
    p = run_dir / FAULTS_FIRED_FILE
    return json.loads(p.read_text()) if p.is_file() else []


def _faults(run: Run, kind: str, step: int, suffix: str = "") -> bool:
    """True once if LMFORGE_FAULTS holds kind@step<suffix> for this run (then recorded as fired;
    every rank decides the same from the same file, rank 0 writes it)."""
    spec = f"{kind}@{step}{suffix}"
    wanted = [f.strip() for f in os.environ.get("LMFORGE_FAULTS", "").split(",")]
    if spec + "!" in wanted:  # "kind@step!" fires every time: a failure that repeats
        console.print(f"fault injection: {spec}!")
        return True
    if spec not in wanted or spec in run.fired_faults:
        return False
    run.fired_faults.append(spec)
    if run.dist.is_main:
        atomic_write_text(run.run_dir / FAULTS_FIRED_FILE, json.dumps(run.fired_faults))
    console.print(f"fault injection: {spec}")
    return True


def _fault_multiplier(run: Run, step: int) -> float:
    if _faults(run, "nan", step):
        return math.nan
    if _faults(run, "spike", step):
        return 100.0
    return 1.0


def _maybe_kill(run: Run) -> None:
    """`kill@step` SIGKILLs rank 0 (the only rank of one process); `kill@step/R` rank R."""
    targets = [r for r in range(run.dist.world) if _faults(run, "kill", run.step, f"/{r}") or (r == 0 and _faults(run, "kill", run.step))]
    if targets:
        run.dist.barrier()  # faults-fired.json is on disk before a rank dies
        if run.dist.rank in targets:
            os.kill(os.getpid(), signal.SIGKILL)


class _progress:
    """A rich progress bar (step, loss, tokens/s, ETA) that also prints a plain log line."""

    def __init__(self, total: int, start: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

        from ..util import progress_bar

        self._bar = progress_bar(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} tok/s"),
            TimeRemainingColumn(),
        )
        self._task = self._bar.add_task("train", total=total, completed=start, loss="-", rate="-", loss_value=None, tokens_per_s=None)

    def __enter__(self) -> "_progress":
        self._bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.__exit__(*exc)

    def update(self, step: int, loss: float, rate: float) -> None:
        self._bar.update(self._task, completed=step, loss=f"{loss:.4f}", rate=f"{rate:,.0f}", loss_value=loss, tokens_per_s=rate)
        if not console.is_terminal:
            console.print(f"step {step}: loss {loss:.4f}, {rate:,.0f} tok/s")

    def note(self, text: str) -> None:
        console.print(text)
