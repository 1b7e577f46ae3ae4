"""Scaling laws and inference-aware sizing: `lmforge plan` and `lmforge plan fit`.

A loss law predicts the final loss of a model from its size and training tokens; the planner uses
it to find the model size and token budget that reach a target loss at the least training +
inference cost (Sardana et al. 2024), picks a concrete architecture for it and writes a config to
train it; `plan fit` fits the law to the user's own runs. Five pieces, each readable alone, with
imports pointing one way (sizing -> architecture, laws; fit -> laws; render only reads results):

    laws.py          L(N, D) = E + A/N^alpha + B/D^beta, the published constants, `--law` files,
                     the data-constrained correction for repeated tokens (Muennighoff et al. 2023)
    sizing.py        the cost model (FLOPs, utilisation, GPU-hours, dollars), the optimiser over
                     N, and `make_plan` -> `Plan` (recommendation, neighbours, warnings)
    architecture.py  N -> a Llama-style shape counted by the model code, its deployment footprint
                     (weights, KV cache, decode ceiling), and a training config for it
    fit.py           run directories -> points -> a fitted law with bootstrap uncertainty
    render.py        the terminal tables and the config YAML

The accelerator table and the CPU measurement live in `lmforge.hardware` (the trainer's MFU uses
them too). This module holds the two commands: plain arguments in (cli.py parses the flags),
exit code out, output files written atomically and checked before any work.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError
from ..hardware import get_hardware
from ..jsonl import dumps_record
from ..ranges import BOOTSTRAP
from ..util import atomic_write_text
from .fit import expand_runs, fit_law, read_run
from .laws import load_law
from .render import config_yaml, render_fit, render_plan
from .sizing import CostModel, make_plan


def plan_command(
    *,
    target_loss: float | None = None,
    quality_of: float | None = None,
    inference_tokens: float = 0.0,
    unique_tokens: float | None = None,
    law: str = "besiroglu",
    objective: str | None = None,
    hardware: str = "h100",
    peak_flops: float | None = None,
    mem_bandwidth: float | None = None,
    gpu_memory_gb: float | None = None,
    price_per_gpu_hour: float | None = None,
    train_mfu: float = 0.4,
    prefill_mfu: float = 0.5,
    decode_mfu: float = 0.1,
    prefill_fraction: float = 0.5,
    vocab_size: int = 32000,
    seq_len: int = 2048,
    batch: int = 1,
    write_config: str | None = None,
    overwrite: bool = False,
    as_json: bool = False,
) -> int:
    """`lmforge plan`: print the plan (a table, or JSON) and optionally write its training config."""
    if write_config:  # before planning: a bad path fails at once
        check_output(write_config, "--write-config", overwrite=overwrite)
    plan = make_plan(
        target_loss=target_loss,
        quality_of=quality_of,
        inference_tokens=inference_tokens,
        unique_tokens=unique_tokens,
        law=load_law(law),
        hardware=get_hardware(hardware, peak_flops=peak_flops, mem_bandwidth=mem_bandwidth, memory_gb=gpu_memory_gb),
        costs=CostModel(train_mfu, prefill_mfu, decode_mfu, prefill_fraction, price_per_gpu_hour),
        objective=objective,
        vocab_size=vocab_size,
        seq_len=seq_len,
        batch=batch,
    )
    if write_config:
        write_output(write_config, "--write-config", config_yaml(plan))
    if as_json:
        print(dumps_record(plan.to_dict(), indent=2))
    else:
        render_plan(plan)
        if write_config:
            print(f"wrote {write_config}; set data.path before training (--set data.path=...)")
    return 0


def fit_command(runs: list[str], *, bootstrap: int = 100, seed: int = 0, save: str | None = None,
                as_json: bool = False) -> int:
    """`lmforge plan fit`: fit the law to run directories (paths or globs); print it, optionally save it."""
    BOOTSTRAP.check("--bootstrap", bootstrap)
    if save:  # `plan fit --save` replaces an earlier fit (a law file is refitted in place)
        check_output(save, "--save", overwrite=True)
    points = [read_run(r) for r in expand_runs(runs)]
    fit = fit_law(points, bootstrap=bootstrap, seed=seed)
    if save:
        write_output(save, "--save", dumps_record(fit.to_dict(), indent=2) + "\n")
    if as_json:
        print(dumps_record(fit.to_dict(), indent=2))
    else:
        render_fit(fit)
        if save:
            print(f"wrote {save}; plan with it: lmforge plan --law {save} --target-loss ...")
    return 0


def check_output(path: str, flag: str, overwrite: bool) -> None:
    """Refuse an output path that cannot become a file: a directory, or (without --overwrite) an
    existing file."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; give a file path, e.g. {p / 'planned.yaml'}")
    if os.path.lexists(p) and not overwrite:
        raise ConfigError(f"{flag} {path} already exists; choose another path or pass --overwrite to replace it")


def write_output(path: str, flag: str, text: str) -> None:
    """Write an output file atomically; an OS error (no such directory, no permission, a read-only
    file system) is a ConfigError naming the path, and leaves nothing behind."""
    check_output(path, flag, overwrite=True)  # it may have become a directory while planning
    try:
        atomic_write_text(path, text)
    except OSError as e:
        where = f" ({e.filename})" if e.filename and Path(os.fsdecode(e.filename)).parent != Path(path).parent else ""
        raise ConfigError(f"cannot write {flag} {path}: {e.strerror or e}{where}") from None


__all__ = ["plan_command", "fit_command", "check_output", "write_output"]
