"""Starting a run: the one place a start of `lmforge train` is decided.

A start is asked for with a `StartRequest` (the config, --run-dir, --set, --from: the flags of
`lmforge train` that reach the training process, each declared once, as a field) and decided by
`plan_start`, which checks everything and writes nothing: LMFORGE_FAULTS, the run directory path,
the config and its `--set` values (for this world size: train.parallel, the batch split), the data
(train split; the val split when validation is on), the checkpoint to resume or branch from (for
`--from`, the model shape too), the changes a resume makes (only safe ones), and `train.dtype:
auto`, resolved once here for the device this process trains on. It returns a `Start`: what
`build()` needs. Its callers:

- `lmforge train` in this process: `train_command` -> `start`, which takes the run directory's
  lock, plans under it, removes what an interrupted checkpoint write left, commits the run
  directory (config.yaml) and trains;
- a parent that launches the training process (`--supervise`, `--nproc-per-node N`: supervise.py
  `launch`) plans the same start first (`device=None`: the workers resolve the dtype), so what
  every child would refuse is one line from the parent, and rebuilds the child's command line from
  the same request (`StartRequest.to_argv`);
- `lmforge quickstart` plans its run (the step-time calibration uses the resolved dtype), then
  `start`s it like any other, lock and resume checks included.

A start is checked in full before anything is written, so a refused start leaves nothing behind.
A run has started once it has a checkpoint (a fresh run writes one at step 0); a config.yaml
without one is a start that never trained, and the next start replaces it instead of resuming it.

One job per run directory: rank 0 holds an exclusive flock on it (`RunDirLock`) from before it
reads the run until training ends. Holding it, no live process can own a temporary file in the
directory, so a start removes what a killed checkpoint write, retention or atomic write left
(`checkpoint.remove_stale_temporaries`) and says what it removed.

Trade-off: the parent plans a start its child plans again (a config load and a dataset open, well
under a second) rather than handing the child a plan: the child must decide under the lock, and
the command line stays one a user could type.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from .. import artifacts
from ..artifacts import CONFIG_FILE
from ..config import Config, load_config
from ..errors import ConfigError, DataError, LmforgeError, WriteError
from ..hardware import auto_dtype
from ..util import atomic_write_text, console, write_failure
from . import checkpoint as ckpt_io
from . import distributed
from .distributed import SINGLE, Dist
from .loop import build, check_faults, device, train, val_batches
from .records import last_cwd, log_event

# Keys that may change when a run resumes: they change how the run continues, not what it is.
SAFE_TO_CHANGE = {
    "train": {
        "lr", "min_lr_ratio", "warmup_steps", "schedule", "decay_fraction", "weight_decay",
        "beta1", "beta2", "eps", "grad_clip", "max_steps", "log_every", "eval_every",
        "eval_batches", "ckpt_every_steps", "ckpt_every_minutes", "keep_last", "keep_every",
        "threads", "compile", "dtype", "micro_batch", "parallel", "deterministic_reduce",
        "activation_checkpointing", "contrastive_temperature",
    },
    "guard": "*", "eval": "*", "serve": "*", "init": "*",  # a LoRA run's init.from: its base, checked by checksum
    "data": {"mix_max_repeat"},  # a cap on the mixed order, not the order itself
    "lora": {"dropout"},
}


def _flag(flag: str | None, default: Any = None) -> Any:
    """A request field and the `lmforge train` flag it comes from (None: the positional config)."""
    return field(default=default, metadata={"flag": flag})


@dataclass(frozen=True)
class StartRequest:
    """What a `lmforge train` process is asked to start. Each field is one flag of `lmforge train`
    that reaches the training process, named as argparse's `dest` names it: cli.py builds the
    request from its namespace (`from_args`) and a launcher rebuilds the child's command line from
    it (`to_argv`), so a new flag is its argparse line and a field here. (The launcher's own flags,
    --supervise, --nproc-per-node, --max-restarts and --restart-delay, stay in the parent.)"""

    config: str | None = _flag(None)  # YAML file or bundled recipe name (positional)
    run_dir: str | None = _flag("--run-dir")
    overrides: tuple[str, ...] = _flag("--set", ())  # section.key=value, in order
    from_: str | None = _flag("--from")  # the checkpoint a new run branches from
    threads: int | None = _flag("--threads")  # train.threads, after the overrides (cli.py checks it)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> StartRequest:
        values = {f.name: getattr(args, f.name) for f in fields(cls)}
        return cls(**{k: tuple(v or ()) if isinstance(cls.__dataclass_fields__[k].default, tuple) else v
                      for k, v in values.items()})

    def to_argv(self) -> list[str]:
        """`train ...`: the command line that asks a child process for this request."""
        argv = ["train"]
        for f in fields(self):
            value, flag = getattr(self, f.name), f.metadata["flag"]
            if value is None or value == () or value is False:
                continue
            if flag is None:
                argv.append(str(value))
            elif isinstance(value, tuple):
                argv += [a for v in value for a in (flag, str(v))]
            elif value is True:
                argv.append(flag)
            else:
                argv += [flag, str(value)]
        return argv

    def run_dir_path(self) -> Path:
        """The run directory: --run-dir, else runs/<config name>. Refuses a request that names
        neither, and a directory given as the config (perhaps a run to resume)."""
        if self.config is not None and Path(self.config).is_dir():
            hint = (f"it is a run directory: resume it with `lmforge train --run-dir {self.config}`"
                    if (Path(self.config) / CONFIG_FILE).is_file() else "give a YAML config file")
            raise ConfigError(f"config file {self.config} is a directory; {hint}")
        if self.run_dir is not None:
            return Path(self.run_dir)
        if self.config is not None:
            return Path("runs") / Path(self.config).stem
        raise ConfigError("give a config file, a --run-dir to resume, or both")


@dataclass
class Start:
    """A start that `plan_start` accepted: what `build()` needs, and what the start will say."""

    request: StartRequest
    run_dir: Path
    cfg: Config  # resolved: vocab size from the data, init.from's model, train.dtype concrete (given a device)
    branch: Path | None = None  # --from: the verified checkpoint a new run branches from
    resume: bool = False  # the run directory holds a run that trained (a checkpoint): it resumes
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # what a resume changes (all safe)
    replaces: bool = False  # run_dir's config.yaml is from a start that never trained: it is replaced


# ---- deciding a start ------------------------------------------------------------------------


def plan_start(request: StartRequest, d: Dist = SINGLE, *, device: torch.device | None = None) -> Start:
    """Check a start in full and return it; writes nothing. `d`: the job this start runs as (a
    launcher passes the world it will launch). `device`: where this process trains, which decides
    `train.dtype: auto`; None for a launcher that trains nowhere itself (the dtype stays auto)."""
    check_faults(d)
    rd = request.run_dir_path()
    check_run_dir(rd)
    saved = rd / CONFIG_FILE
    resume = bool(artifacts.list_checkpoints(rd))  # a run has started once it has a checkpoint (step 0 at least)
    branch = artifacts.resolve_checkpoint(request.from_) if request.from_ else None
    if branch is not None and resume:
        raise ConfigError(f"--from starts a new run, but {rd} already has checkpoints; choose a new --run-dir")
    base = start_config(request.config, rd, branch)
    if base is None:
        raise ConfigError(f"{rd} holds no run (no config.yaml); give a config file to start one")
    threads = () if request.threads is None else (f"train.threads={request.threads}",)
    cfg = load_config(base, [*request.overrides, *threads])
    check_faults(d, max_steps=cfg.train.max_steps)
    distributed.check_parallel(cfg.train, d)
    distributed.micro_batches_per_rank(cfg.train.global_batch, cfg.train.micro_batch, d.world)
    if resume:
        _check_data_path_on_resume(cfg, rd)
    cfg = resolve_config(cfg)
    if cfg.train.objective == "dpo" and not (cfg.init.from_ or resume or branch):
        raise ConfigError("train.objective=dpo needs the model to tune: set init.from (its weights are also the frozen "
                          "reference), e.g. --set init.from=runs/support")
    if branch is not None:
        check_branch_model(cfg, branch)
    before = load_config(saved) if resume and saved.is_file() else None
    cfg.train.dtype = resolve_dtype(cfg.train.dtype, before, device, d)
    changes = before.diff(cfg) if before is not None else {}
    check_resume_changes(changes)
    return Start(request, rd, cfg, branch=branch, resume=resume, changes=changes,
                 replaces=saved.is_file() and not resume and Path(base) != saved)


def resolve_dtype(dtype: str, before: Config | None, device: torch.device | None, d: Dist = SINGLE) -> str:
    """`train.dtype` as the run will use it: a concrete value as given; `auto` keeps a resumed
    run's dtype (resume is exact) and is otherwise `hardware.auto_dtype` of this process's device
    (rank 0's answer on every rank); with no device (a launcher), `auto` stays."""
    if dtype != "auto":
        return dtype
    if before is not None and before.train.dtype != "auto":
        return before.train.dtype
    if device is None:
        return dtype
    return d.broadcast_object(auto_dtype(device))


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


def resolve_config(cfg: Config) -> Config:
    """Fill in what depends on the data (vocab size) and check the config against the dataset."""
    from ..data.loader import TokenDataset

    if cfg.train.objective == "contrastive":
        return resolve_contrastive(cfg)
    if not cfg.data.datasets:
        raise ConfigError("data.path is empty: set it to a prepared dataset, e.g. --set data.path=data/mycorp")
    if cfg.lora.rank and not cfg.init.from_:
        raise ConfigError(f"lora.rank={cfg.lora.rank} trains an adapter on a pretrained base model, and init.from is empty: "
                          "set it to the base, e.g. --set init.from=models/smol (lmforge import), or set lora.rank=0")
    if cfg.init.from_:  # the imported model decides the model section; its tokenizer must be the data's
        from .init_from import resolve_init

        cfg = resolve_init(cfg)
    if cfg.data.mix:
        return resolve_mix(cfg)
    ds = TokenDataset(cfg.data.path)
    _resolve_vocab(cfg, ds)
    check_objective_data(cfg, ds.kind)
    from ..data.loader import open_source

    if open_source(ds, seq_len=cfg.data.seq_len, document_mask=cfg.data.document_mask, packing=cfg.data.packing).n_samples < 1:
        if ds.kind == "dpo":
            raise DataError(f"{cfg.data.path}: no pair of the train split fits data.seq_len + 1 = {cfg.data.seq_len + 1} "
                            "tokens; raise data.seq_len")
        if ds.kind == "sft":
            raise DataError(f"{cfg.data.path}: no example of the train split fits data.seq_len + 1 = {cfg.data.seq_len + 1} "
                            "tokens; raise data.seq_len")
        raise DataError(f"{cfg.data.path}: the train split has {ds.n_tokens} tokens, fewer than one sample of data.seq_len+1")
    if cfg.train.eval_every:
        check_val_split(cfg)
    return cfg


def resolve_mix(cfg: Config) -> Config:
    """resolve_config for data.mix: every dataset is there, prepared with one tokenizer, of one kind
    (text or SFT), with train samples where its weight is positive (and val samples when validation
    is on), and no dataset runs out (data.mix_max_repeat passes) before train.max_steps."""
    from ..data.loader import TokenDataset, open_source
    from .loop import mixture

    d = cfg.data
    opened = []
    for path in d.mix:
        try:
            opened.append(TokenDataset(path))
        except DataError as e:
            raise DataError(f"data.mix: {e}") from None
    first = opened[0]
    for ds in opened[1:]:
        if ds.manifest["tokenizer_sha256"] != first.manifest["tokenizer_sha256"]:
            raise DataError(f"data.mix: {first.path} and {ds.path} were prepared with different tokenizers (sha256 "
                            f"{first.manifest['tokenizer_sha256'][:12]}…, {ds.manifest['tokenizer_sha256'][:12]}…, vocab "
                            f"{first.manifest['vocab_size']} and {ds.manifest['vocab_size']}); prepare them with one: "
                            f"lmforge prepare CORPUS --tokenizer {first.path / first.manifest['tokenizer']} --out DATA")
        if ds.kind != first.kind:
            raise DataError(f"data.mix: {first.path} holds {first.kind} data and {ds.path} {ds.kind} data; mix datasets "
                            "of one kind (text corpora, or SFT examples)")
    _resolve_vocab(cfg, first)
    for ds, weight in zip(opened, d.mix.values()):
        check_objective_data(cfg, ds.kind)
        n = open_source(ds, seq_len=d.seq_len, document_mask=d.document_mask, packing=d.packing).n_samples
        if n < 1 and weight > 0:
            raise DataError(f"data.mix: {ds.path}: no sample of the train split fits data.seq_len + 1 = {d.seq_len + 1} "
                            "tokens; raise data.seq_len, add data, or give it weight 0")
    mixture(cfg).check_until(cfg.train.max_steps * cfg.train.global_batch, seed=d.seed, global_batch=cfg.train.global_batch)
    if cfg.train.eval_every:
        for path in d.mix:
            check_val_split(cfg, path)
    return cfg


def check_objective_data(cfg: Config, kind: str) -> None:
    """Preference pairs (`prepare --dpo`) go with train.objective dpo, and only they."""
    if (cfg.train.objective == "dpo") == (kind == "dpo"):
        return
    if kind == "dpo":
        raise ConfigError(f"data.path {cfg.data.path} holds preference pairs (prepare --dpo): train them with "
                          f"train.objective=dpo (configs/dpo-cpu.yaml), not {cfg.train.objective}")
    raise ConfigError(f"train.objective=dpo trains on preference pairs, but data.path {cfg.data.path} holds "
                      f"{'SFT examples' if kind == 'sft' else 'a text corpus'}; prepare pairs with "
                      "`lmforge prepare PAIRS.jsonl --dpo --tokenizer MODEL --out DATA`")


def resolve_contrastive(cfg: Config) -> Config:
    """resolve_config for the contrastive stage: pairs from data.pairs (tokenized with init.from's
    tokenizer) or spans of data.path's documents; at least two pairs (in-batch negatives)."""
    from ..data.loader import TokenDataset
    from .loop import data_source

    d = cfg.data
    if not (d.pairs or d.path):
        raise ConfigError("train.objective=contrastive trains on pairs: set data.pairs to a JSONL of pairs "
                          "(docs/embeddings.md), or data.path to a prepared dataset (two spans of each document)")
    if d.pairs and not cfg.init.from_:
        raise ConfigError("data.pairs are tokenized with the model's tokenizer: set init.from to the model to train "
                          "(a run, checkpoint or model directory)")
    if cfg.init.from_:
        from .init_from import resolve_init

        cfg = resolve_init(cfg)
    if d.path:
        _resolve_vocab(cfg, TokenDataset(d.path))
    n = data_source(cfg).n_samples
    if n < 2:
        what = f"data.pairs {d.pairs}" if d.pairs else f"data.path {d.path} (documents of at least a few tokens)"
        raise DataError(f"{what}: {n} pair(s) in the train split; the contrastive stage needs at least 2 "
                        "(each query is told apart from the other pairs' positives)")
    if cfg.train.eval_every:
        check_val_split(cfg)
    return cfg


def _resolve_vocab(cfg: Config, ds: Any) -> None:
    """model.vocab_size 0 -> the dataset's tokenizer size; a smaller one is an error."""
    vocab = int(ds.manifest["vocab_size"])
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = vocab
    elif cfg.model.vocab_size < vocab:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the dataset's tokenizer ({vocab} tokens); "
            f"set model.vocab_size to 0 (automatic) or >= {vocab}"
        )


def check_val_split(cfg: Config, path: str | None = None) -> None:
    """Validation (train.eval_every > 0) needs a val window of data.seq_len + 1 tokens: found now,
    before any step, rather than at the first validation after steps of work. `path`: one of data.mix."""
    try:
        next(val_batches(cfg, 1, 1, path=path))
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


def model_shape(m: Any) -> dict[str, Any]:
    """The model keys that decide its parameters (their shapes and meaning), with automatic values
    (0) resolved; the others (RoPE settings, max_seq_len, norm_eps, init_std) may change under --from."""
    return {"vocab_size": m.vocab_size, "n_layer": m.n_layer, "n_head": m.n_head, "n_kv_head": m.kv_heads,
            "d_model": m.d_model, "d_ff": m.ff_dim, "tie_embeddings": m.tie_embeddings}


def check_branch_model(cfg: Config, ckpt: Path) -> None:
    """`--from` continues the checkpoint's weights and optimizer state: the model must have its shape."""
    saved = artifacts.read_config(ckpt)
    theirs, mine = model_shape(saved.model), model_shape(cfg.model)
    differ = [f"model.{k}: checkpoint {theirs[k]!r}, now {mine[k]!r}" for k in theirs if theirs[k] != mine[k]]
    for key in ("rank", "target_modules"):  # the adapter's shapes (its optimizer state fits no other)
        a, b = getattr(saved.lora, key), getattr(cfg.lora, key)
        if (sorted(a) if isinstance(a, list) else a) != (sorted(b) if isinstance(b, list) else b):
            differ.append(f"lora.{key}: checkpoint {a!r}, now {b!r}")
    if differ:
        raise ConfigError(
            f"--from {ckpt}: the model must keep the checkpoint's shape (its weights and optimizer state fit no "
            f"other), but {'; '.join(differ)}. Undo the change, or train the new shape from scratch in a new run "
            "(without --from)."
        )


def _check_data_path_on_resume(cfg: Config, rd: Path) -> None:
    """A relative data.path (or data.mix path) is read from the current directory: say so when
    resuming from another one."""
    key = "data.mix" if cfg.data.mix else "data.path"
    for path in map(Path, cfg.data.datasets):
        if path.is_absolute() or path.exists():
            continue
        where = last_cwd(rd)
        then = f"this run last ran in {where}: run the command from there" if where else "run the command from where the run was started"
        raise DataError(f"{key} {path} of {rd} is not found from the current directory ({Path.cwd()}): a relative "
                        f"{key} path is read from the directory lmforge runs in; {then}")


# ---- starting it -------------------------------------------------------------------------------


def train_command(request: StartRequest) -> int:
    """`lmforge train` in this process: start a run, resume it (with safe changes) when its run
    directory has one, or branch a new run from another's checkpoint. Under torchrun: one rank of
    a process group."""
    try:
        d = distributed.init()
    except LmforgeError as e:  # a malformed torchrun environment, LMFORGE_DEVICE: the same on every rank
        _record_error(e)
        raise
    try:
        return start(request, d)
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


def start(request: StartRequest, d: Dist = SINGLE) -> int:
    """Take the run directory's lock, decide the start under it (`plan_start`), tidy what a killed
    writer left, build the run, commit the run directory and train; returns the exit code."""
    rd = request.run_dir_path()
    check_run_dir(rd)
    lock = RunDirLock(rd, active=d.is_main)
    try:
        lock.take()  # an existing run directory: locked before anything in it is read
        plan = plan_start(request, d, device=device())
        if d.is_main:
            _remove_stale_temporaries(rd)
        for key, (old, new) in plan.changes.items():
            console.print(f"config change on resume: {key}: {old!r} -> {new!r}")
        if plan.replaces:
            console.print(f"note: {rd / CONFIG_FILE} is from an earlier start that never trained (no checkpoint); replacing it")
        run = build(plan.cfg, rd, from_checkpoint=plan.branch, d=d)  # the last check: nothing of a new run is written before it
        d.barrier()  # every rank has read the saved config before rank 0 replaces it
        if d.is_main:
            _commit_run_dir(rd, plan.cfg, lock)
        d.barrier()
        if plan.changes:
            log_event(run, "config_change", {k: list(v) for k, v in plan.changes.items()})
        return train(run)
    finally:
        lock.release()


def _remove_stale_temporaries(rd: Path) -> None:
    removed = ckpt_io.remove_stale_temporaries(rd)
    if removed:
        names = ", ".join(str(p.relative_to(rd)) for p in removed)
        console.print(f"removed {len(removed)} leftover(s) of an interrupted write in {rd}: {names}")


def _record_error(e: LmforgeError) -> None:
    """For `--supervise --nproc-per-node`: torchrun reports any worker failure as exit 1, so a user
    error (exit 2, never worth a restart) is written where the supervisor looks for it."""
    target = os.environ.get("LMFORGE_ERROR_FILE")
    if target:
        try:
            atomic_write_text(target, json.dumps({"exit": 2, "error": str(e), "time": time.time()}))
        except OSError:
            pass


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
        line = write_failure(e, rd / CONFIG_FILE)
        if line is not None and line.startswith("disk full"):
            raise WriteError(f"{line}; nothing was trained. Free space, then run the same command.") from None
        raise ConfigError(f"--run-dir {rd}: cannot write the run directory ({e.strerror or e}); choose another path") from None
