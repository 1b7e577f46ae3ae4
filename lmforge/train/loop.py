"""The training loop: build(), train(), train_step(), save() and the guard's rollback. Deciding a
start (config, run directory, lock, resume checks) is start.py's job; the run's records
(metrics.jsonl, events.jsonl, the experiment store) are records.py's.

- `train_step` is one optimizer step over a list of micro batches (gradient accumulation), a pure
  function of (model, optimizer, batches, lr) that tests call on its own.
- `build` turns a resolved config and a run directory into a `Run`: model, optimizer, loader and
  counters, restored from the newest intact checkpoint when the run directory has one. Resume is
  exact because everything that decides the future is restored: weights and optimizer moments
  (DCP), the data cursor (a step number: the order itself is a pure function), RNG states, the
  step counter that drives the learning-rate schedule.
- `train` reads top to bottom: fetch the global batch, split it into micro batches, step, judge,
  log, validate, checkpoint, stop on a signal. SIGINT/SIGTERM are turned into a flag checked
  between steps, so a stop writes a checkpoint at a step boundary and never tears one.

Self-healing: after every step the guard (guard.py) judges loss and gradient norm; a non-finite
value or a spike rolls the run back to an earlier intact checkpoint (a fresh run writes one at
step 0), skips the data window that led into it, optionally lowers the learning rate, and records
the event. With the guard off a non-finite loss is still loud: a warning and a `non_finite` event
at its first step, and a run whose loss or final weights went non-finite ends with a `diverged`
event and exit status 3 (EXIT_NON_FINITE). A write that fails (a full disk: a checkpoint, a
record) stops training with one line naming the newest checkpoint, which is intact.

Fault injection for drills (off unless set): LMFORGE_FAULTS is a comma list of `kind@step`, kind
`kill` (SIGKILL after that step's update, before its checkpoint), `nan` (that step's loss becomes
NaN) or `spike` (loss and gradients x 100). Each fires once per run directory (faults-fired.json),
so a restart or a rollback does not loop on it; `kind@step!` fires every time (to drill the
supervisor's loop protection). Under many processes `nan`/`spike` hit every rank and `kill@step/R`
kills rank R alone. A malformed item, or a step after train.max_steps, is refused at the start.

Many processes (torchrun; distributed.py): every rank runs this same loop on its share of each
global batch (`Loader(rank=, world=)`), with global_batch / (world * micro_batch) micro batches.
Rank 0 alone prints, writes metrics/events/the store and model.safetensors. Every branch is taken
on agreed values: the loss and gradient norm the guard judges are broadcast from rank 0, a stop
signal or a due time-based checkpoint on any rank stops/saves all of them, and rank 0 plans a
rollback and broadcasts the plan.
"""

from __future__ import annotations

import copy
import math
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import artifacts
from ..config import Config
from ..errors import CheckpointError, ConfigError, DataError, LmforgeError
from ..data.loader import Batch
from ..hardware import peak_flops
from ..model import autocast
from ..model import flops_per_token as model_flops
from ..threads import Governor, choose, cores, power_of_two
from ..util import console, default_device, warn
from . import checkpoint as ckpt_io
from . import distributed, guard, records
from .distributed import SINGLE, Dist
from .objectives import AdaptersOff, FrozenCopy, NextToken, Objective, make_objective, validation
from .optim import build_optimizer, lr_at
from .records import failure_recorded, finish, log_event, log_metrics

EXIT_NON_FINITE = 3  # the run reached its end, but its loss or weights went non-finite (guard off)


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
    non_finite_step: int | None = None  # guard off: the first step of this start whose loss or grad norm was not finite
    objective: Objective = field(default_factory=NextToken)  # train.objective (train/objectives.py)
    lora_base: dict[str, str] | None = None  # a LoRA run: its frozen base (artifacts.base_record), in every checkpoint
    reference: dict[str, Any] | None = None  # DPO: where the reference weights came from (init_from.reference_record)

    @property
    def resumed(self) -> bool:
        """Resumed from a checkpoint of its own (not branched from another run's, not fresh)."""
        return self.resumed_from is not None and self.resumed_from.parent.parent == self.run_dir

    def trainer_state(self) -> dict[str, Any]:
        """What trainer.json records besides weights and optimizer (see checkpoint.py)."""
        return {"tokens": self.tokens, "loader": self.loader.state_dict(), "guard": self.guard.to_dict(),
                "lr_scale": self.lr_scale, "rollbacks": self.rollbacks} | ({"reference": self.reference} if self.reference else {})


def build(cfg: Config, run_dir: Path, from_checkpoint: Path | None = None, d: Dist = SINGLE) -> Run:
    """Model, optimizer and loader for a run, restored from its newest intact checkpoint, or for a
    new run branched from `from_checkpoint` (weights, optimizer, step; the data cursor when the
    data, seq_len, data seed and global batch are the same, else a fresh data order). Writes
    nothing into a new run directory (so a refused start leaves none); resuming, it records the
    damaged checkpoints it skips. Under many processes every rank builds the same run, wrapped
    for `train.parallel`, reading its own share of each batch."""
    from ..model import Transformer, check_memory

    if cfg.train.dtype not in ("fp32", "bf16"):
        raise ValueError(f"build() needs a resolved train.dtype, got {cfg.train.dtype!r}: start.plan_start resolves auto")
    dpo = cfg.train.objective == "dpo"  # a reference, and two sequences (chosen, rejected) per sample
    # before anything is allocated: weights, gradients, AdamW state and logits on the training device (LoRA: the
    # weights alone; its adapter and optimizer state are small; DPO without LoRA: a frozen reference copy too)
    check_memory(cfg.model, device(), micro_batch=0 if cfg.lora.rank else cfg.train.micro_batch * (2 if dpo else 1),
                 seq_len=cfg.data.seq_len, shards=d.world if cfg.train.parallel == "fsdp" else 1,
                 reference=dpo and not cfg.lora.rank,
                 fix="model.n_layer, model.d_model, model.d_ff, model.vocab_size or train.micro_batch")
    # Powers of two only: other thread counts change the numbers (lmforge/threads.py)
    if d.world == 1:  # train.threads (at most this machine's cores), or 0: the cores others leave free
        choose(min(cfg.train.threads, cores()) or None, exact=True)
    elif cfg.train.threads:  # several processes: torchrun's one thread each unless the config says
        torch.set_num_threads(power_of_two(cfg.train.threads))
    loader = make_loader(cfg, d)
    seed_everything(cfg.train.seed)  # the RNG states a checkpoint records are then a function of the run
    model = Transformer(cfg.model).to(device())  # init on CPU first: the same weights on any device
    facts_from = None  # the directory whose tokenizer facts (chat template, end of turn) the run carries on
    init_origin = None
    fresh = from_checkpoint is None and not artifacts.list_checkpoints(run_dir)
    lora_base = None
    reference, reference_model = None, None  # DPO on full weights: where the reference came from, and the weights
    if cfg.lora.rank:  # the frozen base on every start (checkpoints hold the adapter alone), then the adapter
        from .init_from import load_lora_init

        base, facts_dir, record = load_lora_init(model, cfg)
        lora_base = artifacts.base_record(base)
        if fresh:
            facts_from, init_origin = facts_dir, record
    elif cfg.init.from_ and fresh:  # pretrained weights (step 0, fresh optimizer)
        from .init_from import load_init, origin_record, reference_record

        loaded = load_init(model, cfg)
        facts_from, init_origin = loaded.origin.path, origin_record(loaded)
        if dpo:  # the starting weights, copied before any step (and before FSDP shards them)
            reference, reference_model = reference_record(loaded.origin), copy.deepcopy(model)
            console.print("DPO reference: the same weights, frozen")
    forward_model = distributed.wrap(model, cfg.train, d)  # DDP wrapper, or model itself (FSDP2 shards in place)
    optimizer = build_optimizer(model, cfg.train)  # after FSDP: over the sharded parameters
    run = Run(cfg, run_dir, model, optimizer, loader, tokenizer_path(cfg), dist=d,
              init_origin=init_origin, objective=make_objective(cfg) if not dpo else NEXT_TOKEN,  # DPO's: below
              lora_base=lora_base)
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
    if dpo and cfg.lora.rank:  # the reference is the frozen base: the policy with its adapters off, no second copy
        run.objective = make_objective(cfg, reference=AdaptersOff())
    elif dpo:
        if source is not None:  # before _load_state, which restores the RNG states (building a model draws from them)
            reference, reference_model = _recorded_reference(cfg, source, branch=ckpt is None)
        if reference_model is None:
            raise ConfigError("train.objective=dpo needs the model to tune: set init.from (its weights are also the frozen reference)")
        run.reference = reference
        run.objective = make_objective(cfg, reference=FrozenCopy(reference_model.to(device())))
    if source is not None:
        _check_lora_base(run, source)
        state = _load_state(run, source, branch=ckpt is None)
        run.step, run.tokens, run.resumed_from = state["step"], state["tokens"], source
        run.guard = guard.GuardState.from_dict(state.get("guard"))
        run.lr_scale, run.rollbacks = state.get("lr_scale", 1.0), state.get("rollbacks", [])
        if ckpt is not None and d.is_main:
            records.drop_records_after(run, run.step)  # they are about to be redone
        facts_from = source
    if facts_from is not None and (cfg.init.from_ or (facts_from / artifacts.TOKENIZER_CONFIG).is_file()):
        run.tokenizer_facts = _tokenizer_facts(facts_from, run.tokenizer_path)  # {} too: a reader needs no chain
    run.forward_model = torch.compile(forward_model) if cfg.train.compile else forward_model
    run.fired_faults = records.read_fired_faults(run_dir)
    return run


def _recorded_reference(cfg: Config, source: Path, branch: bool) -> tuple[dict[str, Any], torch.nn.Module]:
    """The DPO reference of a run that resumes from (or branches off) checkpoint `source`: the one
    its trainer.json records (init_from.load_reference re-derives the weights), or for a branch off
    a run that had none (e.g. an SFT run), the branched checkpoint's own weights."""
    from .init_from import load_reference, reference_record

    record = artifacts.read_trainer_state(source).get("reference")
    if record is None:
        if not branch:
            raise CheckpointError(f"{source} records no DPO reference (was the run trained with train.objective=dpo?)")
        record = reference_record(artifacts.resolve_origin(source))
    return record, load_reference(record, cfg)


def make_loader(cfg: Config, d: Dist = SINGLE) -> Any:
    """This rank's loader of the run's data (`data_source`: token windows, rows of whole
    conversations for SFT data, preference pairs for DPO, pairs for the contrastive objective);
    says once what it leaves out."""
    from ..data.loader import DocumentRows, Loader, PreferencePairs
    from ..data.pairs import DocumentSpans, PairRecords

    src = data_source(cfg)
    loader = Loader(src, seq_len=cfg.data.seq_len, global_batch=cfg.train.global_batch, seed=cfg.data.seed,
                    rank=d.rank, world=d.world)
    if d.is_main and isinstance(src, DocumentRows) and src.dropped:
        warn(f"{src.dropped} of {src.n_documents} examples in {cfg.data.path} are longer than data.seq_len + 1 = "
             f"{cfg.data.seq_len + 1} tokens (the longest: {src.longest}) and are left out, never cut; raise "
             "data.seq_len to train on them")
    if isinstance(src, PreferencePairs) and src.dropped and d.is_main:
        warn(f"{src.dropped} of {src.n_pairs} pairs in {cfg.data.path} have a sequence longer than data.seq_len + 1 = "
             f"{cfg.data.seq_len + 1} tokens (the longest: {src.longest}) and are left out, never cut; raise "
             "data.seq_len to train on them")
    if d.is_main and isinstance(src, PairRecords) and src.cut:
        console.print(f"note: {src.cut} text(s) of {cfg.data.pairs} reach data.seq_len = {cfg.data.seq_len} tokens "
                      "and may be cut to it")
    if d.is_main and isinstance(src, DocumentSpans) and src.dropped:
        console.print(f"note: {src.dropped} of {src.n_documents} documents of {cfg.data.path} are too short for two "
                      "spans and are left out")
    return loader


def _check_lora_base(run: Run, ckpt: Path) -> None:
    """A LoRA run resumes (or branches) on the base its checkpoint was trained on, and only a LoRA
    checkpoint continues a LoRA run: refused otherwise, naming both checksums."""
    recorded = artifacts.read_manifest(ckpt).base
    mine = run.lora_base
    if recorded is None and mine is None:
        return
    if recorded is None or mine is None:
        what = "a LoRA adapter's" if recorded else "whole weights'"
        raise ConfigError(f"{ckpt} holds {what} training state, but this run has lora.rank={run.cfg.lora.rank}; "
                          "keep the checkpoint's lora settings, or start a new --run-dir")
    if recorded["sha256"] != mine["sha256"]:
        raise CheckpointError(f"{ckpt} trained its LoRA adapter on the base model with sha256 {recorded['sha256']} "
                              f"({recorded['path']}), but init.from {run.cfg.init.from_} has sha256 {mine['sha256']}: "
                              f"resume on the same base (--set init.from={recorded['path']})")


def data_source(cfg: Config, split: str = "train") -> Any:
    """The samples of the run's `split` (a data/loader.py Source): for the contrastive objective,
    pairs (data/pairs.py: the JSONL data.pairs, else two spans of each document of data.path, with
    the embed prefixes); otherwise the prepared dataset's windows or rows (`open_source`)."""
    from ..data.loader import open_source

    if cfg.data.mix and split == "train":
        return mixture(cfg)
    if cfg.train.objective != "contrastive":
        return open_source(cfg.data.path, split, seq_len=cfg.data.seq_len, document_mask=cfg.data.document_mask,
                           packing=cfg.data.packing)
    from ..data.pairs import DocumentSpans, PairRecords
    from ..tokenizer import Tokenizer

    tok, e = Tokenizer.load(tokenizer_path(cfg)), cfg.embed
    if cfg.data.pairs:
        return PairRecords(cfg.data.pairs, tok, max_len=cfg.data.seq_len, split=split,
                           val_fraction=cfg.data.pairs_val_fraction, fields=cfg.data.pair_fields,
                           query_prefix=e.query_prefix, document_prefix=e.document_prefix)
    return DocumentSpans(cfg.data.path, split, max_len=cfg.data.seq_len, seed=cfg.data.seed, tokenizer=tok,
                         query_prefix=e.query_prefix, document_prefix=e.document_prefix)


def mixture(cfg: Config) -> Any:
    """data.mix: the train splits of its datasets as one data/loader.py Mixture (the mixed order),
    each read as the run reads data (document masking, packing), named as `prepare --mix` names inputs."""
    from ..data.loader import Mixture, open_source
    from ..data.mix import input_names

    d = cfg.data
    paths = list(d.mix)
    sources = [open_source(p, "train", seq_len=d.seq_len, document_mask=d.document_mask, packing=d.packing) for p in paths]
    return Mixture(sources, [d.mix[p] for p in paths], input_names(paths), max_repeat=d.mix_max_repeat)


def tokenizer_path(cfg: Config) -> Path:
    """The run's tokenizer.json: its prepared dataset's (data.path; with data.mix, the first
    dataset's: a start checks that they all share it), else (pairs from data.pairs) init.from's,
    which tokenizes them."""
    if cfg.data.datasets:
        from ..data.manifest import read_manifest

        first = cfg.data.datasets[0]
        return Path(first) / read_manifest(first)["tokenizer"]
    if not cfg.init.from_:
        raise ConfigError("data.pairs are tokenized with the model's tokenizer: set init.from to the model to train "
                          "(a run, checkpoint or model directory)")
    return artifacts.resolve_origin(cfg.init.from_).path / artifacts.TOKENIZER_FILE


def _tokenizer_facts(source: Path, tokenizer_path: Path) -> dict[str, Any]:
    """The tokenizer facts recorded in `source` (a checkpoint or init.from's directory), when it
    uses this run's tokenizer (they name its tokens): each checkpoint then records them itself."""
    from ..tokenizer import Tokenizer

    if Tokenizer.load(source / artifacts.TOKENIZER_FILE).sha256 != Tokenizer.load(tokenizer_path).sha256:
        return {}
    return artifacts.tokenizer_facts(source)


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
    """Train until max_steps or a stop signal; returns the process exit code: 0 done,
    EXIT_NON_FINITE (3) done with a non-finite loss or weights, 128 + signal number when stopped."""
    cfg, t, d = run.cfg, run.cfg.train, run.dist
    records.open_store(run)
    mixed = getattr(run.loader.source, "record", None)  # data.mix: a Mixture says what it reads
    records.record_start(run, mix=mixed() if mixed is not None else None)
    accum = distributed.micro_batches_per_rank(t.global_batch, t.micro_batch, d.world)
    # DPO: a sample is two sequences, and each also goes through the reference's forward (a third of a step's FLOPs)
    dpo = t.objective == "dpo"
    dev = device()
    flops_per_token, peak = model_flops(cfg.model, cfg.data.seq_len) * (4 / 3 if dpo else 1), peak_flops(dev, t.dtype)
    if peak:
        log_event(run, "mfu_peak", {"peak_flops": peak, "device": str(dev), "dtype": t.dtype,
                                    "source": "datasheet" if dev.type == "cuda" else "measured matmul rate"})
    stop = _StopFlag()
    # Fewer threads while other processes hold cores, back up to train.threads (0: all cores) when
    # they leave; powers of two, which do not change the numbers (lmforge/threads.py). One process
    # on the CPU only: ranks keep torchrun's count.
    governor = Governor(min(t.threads, cores()) or cores(), start=torch.get_num_threads(), exact=True,
                        adapt=d.world == 1 and dev.type == "cpu",
                        on_change=lambda old, new, why: log_event(run, "threads", {"from": old, "to": new, "reason": why}))
    last_ckpt_time = time.monotonic()
    window_start, window_tokens = time.perf_counter(), 0
    if d.world > 1:
        console.print(f"{d.world} processes ({t.parallel}{', deterministic reduce' if t.deterministic_reduce else ''}): "
                      f"{accum} micro batch(es) of {t.micro_batch} per rank per step; logs from rank 0")
    if run.step == 0 and not d.broadcast_object(bool(artifacts.list_checkpoints(run.run_dir))):
        save(run)  # step 0: somewhere for the guard to roll back to, even from the first steps
    progress = _progress(t.max_steps, run.step)
    with stop, progress, failure_recorded(run):
        while run.step < t.max_steps:
            data_step = run.loader.step
            # of the global batch: global_batch x seq_len for windows (DPO: two sequences a sample), real tokens for pairs
            tokens_per_step = run.loader.tokens(data_step) * (2 if dpo else 1)
            micro = split_micro(run.loader.next(), t.micro_batch, dev)  # this rank's share, global_batch // world rows
            assert len(micro) == accum
            lr = lr_at(run.step, t) * run.lr_scale
            step_start = time.perf_counter()
            result = train_step(run.forward_model, run.optimizer, micro, lr=lr, grad_clip=t.grad_clip,
                                dtype=t.dtype, objective=run.objective, loss_multiplier=_fault_multiplier(run, run.step + 1),
                                d=d, deterministic_reduce=t.deterministic_reduce)
            governor.step(time.perf_counter() - step_start)
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
            elif not (math.isfinite(result.loss) and math.isfinite(result.grad_norm)):
                _on_unguarded_non_finite(run, result, data_step)
            if run.step % t.log_every == 0 or run.step == t.max_steps:
                rate = window_tokens / max(1e-9, time.perf_counter() - window_start)
                window_start, window_tokens = time.perf_counter(), 0
                perf = {"tflops": rate * flops_per_token / 1e12} | ({"mfu": rate * flops_per_token / peak} if peak else {})
                log_metrics(run, {"loss": result.loss, "lr": lr, "grad_norm": result.grad_norm, "tokens": run.tokens, "tokens_per_s": rate,
                                  **perf, **result.metrics})
                progress.update(run.step, result.loss, rate)
            if t.eval_every and (run.step % t.eval_every == 0 or run.step == t.max_steps):
                val = validate(run)
                log_metrics(run, {f"val_{k}": v for k, v in val.items()})  # val_loss (val_loss/NAME: data.mix), the objective's metrics
                progress.note(f"step {run.step}: " + ", ".join(f"val_{k} {v:.4f}" for k, v in val.items()))
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
                finish(run, "interrupted")
                console.print(
                    f"{name}: stopped at step {run.step} with a checkpoint. Run the same command again to resume."
                )
                return 128 + (stop.signum or signal.SIGTERM)
    return _completed(run)


def _completed(run: Run) -> int:
    """Record the end of a run that reached train.max_steps: `completed` and 0, or, when its loss
    (guard off) or its final weights went non-finite, `diverged`, a loud line and EXIT_NON_FINITE."""
    weights_finite = _weights_finite(run)
    if run.non_finite_step is None and weights_finite:
        log_event(run, "completed", {"tokens": run.tokens})
        finish(run, "completed")
        console.print(f"done: {run.step} steps, {run.tokens:,} tokens; checkpoints in {artifacts.checkpoints_dir(run.run_dir)}")
        return 0
    log_event(run, "diverged", {"first_non_finite_step": run.non_finite_step, "weights_finite": weights_finite})
    finish(run, "failed")
    since = f"since step {run.non_finite_step}" if run.non_finite_step is not None else "at the end"
    warn(f"the run reached step {run.step}, but its loss or weights are not finite ({since}; the guard is "
         f"{'on' if run.cfg.guard.enabled else 'off'}): the newest checkpoints hold no usable model. Exit status "
         f"{EXIT_NON_FINITE}. Branch a new run from a checkpoint before it (--from) with guard.enabled=true, or a lower train.lr",
         label="error:")
    return EXIT_NON_FINITE


def _weights_finite(run: Run) -> bool:
    """Every parameter finite on every rank (a sharded parameter: this rank's shard)."""
    local = all(bool(torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()) for p in run.model.parameters())
    return not run.dist.any_flags([not local])[0]


def split_micro(batch: Batch, micro_batch: int, dev: torch.device) -> list[Batch]:
    """A rank's batch -> micro batches of `micro_batch` rows on `dev` (every tensor sliced along dim 0)."""
    parts = {k: v.to(dev, non_blocking=True).split(micro_batch) for k, v in batch.items()}
    return [{k: chunks[i] for k, chunks in parts.items()} for i in range(len(next(iter(parts.values()))))]


def val_batches(cfg: Config, batch_size: int, max_batches: int | None, path: str | None = None) -> Any:
    """The run's validation batches: the val split read as the train split is (same source kind,
    document masking and packing; pairs for the contrastive objective), in order; max_batches None
    or 0 reads them all (as train.eval_batches 0 and `lmforge eval --max-batches 0` mean).
    `path`: another dataset's val split (one of data.mix), read the same way."""
    from ..data.loader import in_order
    from ..data.loader import val_batches as batches

    if cfg.train.objective != "contrastive":
        return batches(path or cfg.data.path, seq_len=cfg.data.seq_len, batch_size=batch_size, max_batches=max_batches or None,
                       document_mask=cfg.data.document_mask, packing=cfg.data.packing)
    source = data_source(cfg, "val")
    if source.n_samples < 1:
        where = (f"no pair of {cfg.data.pairs} falls in the val split (data.pairs_val_fraction = "
                 f"{cfg.data.pairs_val_fraction}); raise it" if cfg.data.pairs else
                 f"the val split of {cfg.data.path} has no document long enough for two spans; prepare with a larger --val-fraction")
        raise DataError(f"{where}, or train without validation: --set train.eval_every=0")
    return in_order(source, batch_size, max_batches or None)


def validate(run: Run) -> dict[str, float]:
    """The run's validation: the objective's loss (and metrics) on the val split. With data.mix, on
    each dataset's val split (train.eval_batches micro batches each) as `loss/NAME`, and `loss` the
    mean of those weighted by data.mix (datasets of weight 0 are validated, not counted in it): an
    estimate of the loss on the mixture the run trains on. With one dataset, `loss/NAME` == `loss`.
    With one data.path prepared from several inputs, also `loss/INPUT` (`per_input_validation`)."""
    cfg, t = run.cfg, run.cfg.train
    if not cfg.data.mix:
        val = validation(run.model, run.objective, val_batches(cfg, t.micro_batch, t.eval_batches), dtype=t.dtype)
        return val | per_input_validation(run)
    from ..data.mix import input_names

    paths = list(cfg.data.mix)
    per = {name: validation(run.model, run.objective, val_batches(cfg, t.micro_batch, t.eval_batches, path=p), dtype=t.dtype)
           for name, p in zip(input_names(paths), paths)}
    weights = {name: cfg.data.mix[p] for name, p in zip(per, paths) if cfg.data.mix[p] > 0}
    overall = {k: sum(w * per[name][k] for name, w in weights.items()) / sum(weights.values()) for k in per[next(iter(weights))]}
    return overall | {f"{k}/{name}": v for name, values in per.items() for k, v in values.items()}


def per_input_validation(run: Run) -> dict[str, float]:
    """{"loss/INPUT": ...} for a data.path prepared from several inputs (next_token): each input's
    val targets alone, up to train.eval_batches micro batches of them (data/loader.py
    `input_val_batches`); {} otherwise."""
    cfg, t = run.cfg, run.cfg.train
    if t.objective != "next_token" or not cfg.data.path:
        return {}
    from ..data.loader import input_val_batches
    from ..data.manifest import input_names, read_manifest

    manifest = read_manifest(cfg.data.path)
    names = input_names(manifest) if manifest.get("kind", "text") != "dpo" else []
    if len(names) < 2:
        return {}
    d = cfg.data
    out = {f"loss/{name}": validation(run.model, run.objective, input_val_batches(
               d.path, g, seq_len=d.seq_len, batch_size=t.micro_batch, max_batches=t.eval_batches or None,
               document_mask=d.document_mask, packing=d.packing), dtype=t.dtype)["loss"]
           for g, name in enumerate(names)}
    return {k: v for k, v in out.items() if not math.isnan(v)}  # an input with no val document has no figure


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


def save(run: Run) -> Path:
    """Checkpoint the run at its current step. A failed write (a full disk, an I/O error) publishes
    nothing and stops training with one line (records.stopped_by): the previous checkpoint is intact."""
    from safetensors import SafetensorError
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: caught by name

    try:
        path = ckpt_io.save_checkpoint(
            run.run_dir, run.step, model=run.model, optimizer=run.optimizer, config=run.cfg,
            trainer_state=run.trainer_state(), tokenizer_path=run.tokenizer_path,
            tokenizer_facts=run.tokenizer_facts, base=run.lora_base, d=run.dist,
        )
    except (OSError, SafetensorError, CheckpointException, RuntimeError) as e:
        if isinstance(e, RuntimeError) and run.dist.active and distributed.lost_peer(e):
            raise  # another rank died: not a write failure (train_command says so)
        # torch's zip writer under DCP reports a short write as "unexpected pos ...", without ENOSPC:
        # a checkpoint's size (the newest one's) against the free space tells a full disk apart
        error = records.stopped_by(run, e, artifacts.checkpoints_dir(run.run_dir), needed=ckpt_io.checkpoint_bytes(run.run_dir, run.model),
                                   what=" before its checkpoint was published")
        log_event(run, "checkpoint_failed", {"error": str(error)}, best_effort=True)
        raise error from None
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


def _on_unguarded_non_finite(run: Run, result: StepResult, data_step: int) -> None:
    """guard.enabled=false: nothing rolls back, but a non-finite loss is never silent. The first
    such step of a start is a warning and a `non_finite` event; the run ends with EXIT_NON_FINITE."""
    if run.non_finite_step is not None:
        return
    run.non_finite_step = run.step
    log_event(run, "non_finite", {"loss": result.loss, "grad_norm": result.grad_norm, "data_step": data_step,
                                  "acting": False, "guard": "off"})
    warn(f"step {run.step}: non-finite loss or gradient norm (loss {result.loss:.4g}, grad norm {result.grad_norm:.4g}), "
         "and the guard is off (guard.enabled=false), so nothing rolls back: the weights are likely NaN from here on, and "
         f"the run will end with exit status {EXIT_NON_FINITE}. Stop it, or turn the guard on: --set guard.enabled=true")


def rollback(run: Run, verdict: guard.Verdict, data_step: int) -> None:
    """Go back to an earlier intact checkpoint, skip the data window, scale the lr, record it all."""
    g = run.cfg.guard
    recent = [s for s in run.rollbacks if s > run.step - 10 * g.window]
    if len(recent) >= g.max_rollbacks:
        raise TrainingUnstable(
            f"the guard rolled back {len(recent)} times within {10 * g.window} steps (steps {recent}) and "
            f"step {run.step} failed again ({verdict.describe()}); giving up. See {run.run_dir / artifacts.EVENTS_FILE}. "
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
        records.drop_records_after(run, run.step)
    save(run)  # rewrite that checkpoint with the skip and lr scale: a crash now resumes identically
    log_event(run, "rollback", {"from_step": spike_step, "to_step": run.step, "skipped_data_steps": [plan.skip_from, plan.skip_to],
                                "lr_scale": run.lr_scale, "reason": verdict.describe()})
    warn(f"rolled back from step {spike_step} to {run.step}; skipped data steps {plan.skip_from}..{plan.skip_to - 1}; "
         f"lr x {run.lr_scale:g}", label="guard:")


FAULT_FORMS = ("kill@N, nan@N, spike@N (N: a step >= 1), kill@N/R (under torchrun: rank R only), each optionally "
               "ending in ! to fire every time; e.g. LMFORGE_FAULTS=nan@15,kill@20")


def check_faults(d: Dist = SINGLE, max_steps: int | None = None) -> None:
    """Refuse a malformed LMFORGE_FAULTS when training starts (a typo would silently drill
    nothing), a rank outside this job, and (given the run's max_steps) a step it never reaches."""
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
        if max_steps is not None and int(m[2]) > max_steps:
            raise ConfigError(f"LMFORGE_FAULTS={spec!r}: {item!r} names step {m[2]}, after train.max_steps ({max_steps}): "
                              "it would never fire; name a step the run reaches")


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
        records.write_fired_faults(run, run.fired_faults)
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
