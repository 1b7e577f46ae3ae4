"""`lmforge ckpt average`: the weighted mean of a run's checkpoints, written as a model directory.

    lmforge ckpt average runs/exp1 --last 5 --out models/exp1-avg           # uniform over the newest 5
    lmforge ckpt average runs/exp1 --steps 600,800,1000 --out models/avg    # chosen steps
    lmforge ckpt average runs/exp1 --last 5 --ema 0.999 --out models/avg    # EMA-style weights

Averaging the weights of the last checkpoints of a run (Polyak averaging; "latest weight averaging",
e.g. Kaddour 2022, Sanyal et al. 2023) often lowers validation loss for free, most when the learning
rate is still high at the end; docs/training.md measures it on a tiny run.

Weights: uniform 1/N, or with `--ema D` proportional to D ** (s_last - s), s a checkpoint's step:
the weight an exponential moving average of the parameters with per-step decay D would give the
state at step s, if only the selected checkpoints were kept (so checkpoint cadence does not change
the meaning of D). The weights sum to 1 and are recorded.

The output is a normal model directory (artifacts.py): model.safetensors (fp32), the newest source
checkpoint's config.yaml (the run's resolved config: data.path included, so `eval` finds the run's
data), tokenizer.json and tokenizer_config.json, source.json (run, steps, per-checkpoint weights and
model sha256, method), and a MANIFEST.json of kind "model" over all of them, written atomically.
eval, sample, serve, export and `init.from` accept it through `load_model`.

Safety: every source checkpoint is verified against its manifest before anything is read (a
damaged one is refused, by name, never skipped silently), and all must share the model config
and the tokenizer. Memory: tensors are read one at a time from each checkpoint (safetensors'
`safe_open`) and summed in float64, so the peak is the fp32 output plus one tensor, not N models.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .artifacts import (
    CHECKPOINTS, CONFIG_FILE, MODEL_FILE, SOURCE_FILE, TOKENIZER_CONFIG, TOKENIZER_FILE, checkpoint_step, expected_shapes,
    is_checkpoint_dir, list_checkpoints, read_config, read_manifest, verify_checkpoint, write_manifest,
)
from .errors import CheckpointError
from .ranges import AVERAGE_LAST, EMA_DECAY
from .tokenizer import Tokenizer
from .util import atomic_dir, atomic_write_json, writes_to, out as results_out


def select(run_dir: Path, last: int | None, steps: list[int] | None) -> list[Path]:
    """The checkpoints to average, oldest first: the newest `last` ones, or the named steps."""
    if (last is None) == (steps is None):
        raise CheckpointError("ckpt average: give either --last N or --steps S1,S2,... (one of them)")
    if is_checkpoint_dir(run_dir):
        raise CheckpointError(f"{run_dir} is a checkpoint; ckpt average takes the run directory that holds its checkpoints")
    found = list_checkpoints(run_dir)
    if not found:
        raise CheckpointError(f"{run_dir} holds no checkpoints (expected {run_dir}/{CHECKPOINTS}/step-NNNNNN)")
    if last is not None:
        AVERAGE_LAST.check("--last", last)
        if last > len(found):
            raise CheckpointError(f"--last {last}: {run_dir} has only {len(found)} checkpoint(s) "
                                  f"({', '.join(str(checkpoint_step(c)) for c in found)}); keep more with train.keep_last")
        return found[-last:]
    assert steps is not None
    by_step = {checkpoint_step(c): c for c in found}
    if len(set(steps)) != len(steps) or len(steps) < 2:
        raise CheckpointError(f"--steps needs two or more different steps, got {','.join(map(str, steps))}")
    missing = [s for s in steps if s not in by_step]
    if missing:
        raise CheckpointError(f"--steps: no checkpoint at step(s) {', '.join(map(str, missing))} in {run_dir} "
                              f"(have {', '.join(map(str, sorted(by_step)))})")
    return [by_step[s] for s in sorted(steps)]


def weights_for(steps: list[int], ema: float | None) -> list[float]:
    if ema is None:
        return [1.0 / len(steps)] * len(steps)
    EMA_DECAY.check("--ema", ema)
    raw = [ema ** (steps[-1] - s) for s in steps]
    total = sum(raw)
    return [w / total for w in raw]


def average(run_dir: str | os.PathLike, out: str | os.PathLike, *, last: int | None = None,
            steps: list[int] | None = None, ema: float | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Average checkpoints of a run into the model directory `out`; returns what source.json records."""
    import torch
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file

    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise CheckpointError(f"no such run directory: {run_dir}")
    ckpts = select(run_dir, last, steps)
    ckpt_steps = [checkpoint_step(c) for c in ckpts]
    weights = weights_for(ckpt_steps, ema)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another --out or pass --overwrite")
    if out.resolve().parent.name == CHECKPOINTS:
        raise CheckpointError(f"--out {out} is inside a run's {CHECKPOINTS}/ directory, where it would be taken for a "
                              f"checkpoint; write the averaged model elsewhere (e.g. models/NAME)")
    problems = [p for c in ckpts for p in verify_checkpoint(c)]
    if problems:
        raise CheckpointError("ckpt average refused, a source checkpoint is damaged: " + "; ".join(problems))
    newest = ckpts[-1]
    cfg = read_config(newest)
    tok_sha = Tokenizer.load(newest / TOKENIZER_FILE).sha256
    for c in ckpts[:-1]:
        other = read_config(c)
        if other.model != cfg.model:
            diff = {k: (v, getattr(cfg.model, k)) for k, v in asdict(other.model).items() if getattr(cfg.model, k) != v}
            raise CheckpointError(f"{c} has another model shape than {newest}: {diff}; average checkpoints of one model")
        if Tokenizer.load(c / TOKENIZER_FILE).sha256 != tok_sha:
            raise CheckpointError(f"{c} has another tokenizer than {newest}; average checkpoints of one model")

    names = list(expected_shapes(cfg.model))
    sums: dict[str, torch.Tensor] = {}
    for c, w in zip(ckpts, weights):
        try:
            with safe_open(str(c / MODEL_FILE), framework="pt") as f:
                present = set(f.keys())
                if present != set(names):
                    raise CheckpointError(f"{c / MODEL_FILE}: tensors do not fit the model config "
                                          f"(missing {sorted(set(names) - present)[:3]}, unexpected {sorted(present - set(names))[:3]})")
                for name in names:
                    t = f.get_tensor(name).to(torch.float64)
                    if name in sums:
                        sums[name].add_(t, alpha=w)
                    else:
                        sums[name] = t.mul_(w)
        except SafetensorError as e:
            raise CheckpointError(f"not a valid safetensors file: {c / MODEL_FILE} ({e})") from None
    tensors = {name: t.to(torch.float32).contiguous() for name, t in sums.items()}
    del sums

    record = {
        "format": "lmforge-average",
        "run": str(run_dir.resolve()),
        "method": "uniform" if ema is None else "ema",
        "ema_decay": ema,
        "checkpoints": [{"step": s, "weight": w, "path": str(c.resolve()), "model_sha256": read_manifest(c).sha256(MODEL_FILE)}
                        for s, w, c in zip(ckpt_steps, weights, ckpts)],
    }
    with writes_to(out), atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        shutil.copyfile(newest / CONFIG_FILE, tmp / CONFIG_FILE)
        shutil.copyfile(newest / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        if (newest / TOKENIZER_CONFIG).is_file():
            shutil.copyfile(newest / TOKENIZER_CONFIG, tmp / TOKENIZER_CONFIG)
        else:
            atomic_write_json(tmp / TOKENIZER_CONFIG, {})
        atomic_write_json(tmp / SOURCE_FILE, record)
        write_manifest(tmp, kind="model", extra={"average": {"steps": ckpt_steps, "weights": weights, "method": record["method"]}})
    return record


def average_command(run_dir: str, out: str, *, last: int | None, steps: str | None, ema: float | None,
                    overwrite: bool) -> int:
    parsed = None
    if steps is not None:
        try:
            parsed = [int(s) for s in steps.split(",") if s.strip()]
        except ValueError:
            raise CheckpointError(f"--steps must be comma-separated step numbers, e.g. 600,800,1000; got {steps!r}") from None
    rec = average(run_dir, out, last=last, steps=parsed, ema=ema, overwrite=overwrite)
    parts = ", ".join(f"{c['step']} ({c['weight']:.3f})" for c in rec["checkpoints"])
    results_out.print(f"averaged {len(rec['checkpoints'])} checkpoints of {run_dir}, {rec['method']}: step (weight) {parts} "
                      f"-> {out} (a model directory: eval, sample, serve and export accept it)", markup=False)
    return 0
