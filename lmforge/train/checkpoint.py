"""Complete, atomic checkpoints: the training state (writing it, resuming from it, retention).

Reading checkpoints back for anything but training (listing, verifying, resolving a run to its
newest intact checkpoint, loading weights) lives in lmforge/artifacts.py, below training, so that
eval, sample, serve and export never import this package.

Layout of one checkpoint (`runs/<run>/checkpoints/step-000200/`):

  MANIFEST.json        format version, kind, lmforge version, step, sha256 and size of every other
                       file, and a sha256 of itself (artifacts.write_manifest)
  model.safetensors    the weights alone: sample, eval, serve and export read only this (no pickle)
  tokenizer.json       the run's tokenizer, so a checkpoint is self-contained
  tokenizer_config.json  bos/eos token and chat template, when the run has them (from init.from):
                       a checkpoint never sends its reader to the model it started from
  config.yaml          the resolved config the run was using at that step
  trainer.json         step, loader cursor, guard state, RNG states (python, numpy, torch), tokens
  train_state/         model + optimizer through torch.distributed.checkpoint (DCP), which also
                       works in one process today and reshards across world sizes later

A LoRA run (lora.rank > 0) trains an adapter on a frozen base: its checkpoints hold
adapter_model.safetensors + adapter_config.json (PEFT's files, lmforge/lora.py) instead of
model.safetensors, train_state/ holds the adapter and its optimizer state only (DCP's
`ignore_frozen_params`), and the manifest's `base_model` records the base's sha256 and path: a
few MB per checkpoint instead of the model twice, and a resume or a load on another base is
refused naming both checksums (train/loop.py, artifacts.py).

Atomicity: everything is written into a hidden temporary sibling directory, fsynced, and renamed
into place; `checkpoints/latest` (a one-line text file naming the directory) is then replaced
atomically. A crash at any moment therefore leaves either the previous state or the new one.

Verification: loading recomputes every sha256 listed in MANIFEST.json. `artifacts.find_resume_checkpoint`
walks checkpoints newest first and skips (loudly) any that is incomplete or corrupt, so a torn or
bit-rotted newest checkpoint costs a few steps, never the run.

Many processes (train/distributed.py): every rank writes its own shards of `train_state/` into
the same temporary directory (so the run directory must be on a filesystem every rank sees: a
shared filesystem for multi-node runs), rank 0 gathers the full weights for model.safetensors and
writes the small files, and after a barrier rank 0 alone hashes, writes the manifest, fsyncs and
renames. DCP records each tensor's global shape and the chunks each rank wrote, so a checkpoint
saved by N processes loads on any other number (2 -> 1 -> 4), replicated (DDP) or sharded (FSDP).

Trade-off: the weights are stored twice (safetensors and DCP). That doubles checkpoint size for
the model part, but keeps inference paths free of pickle and of optimizer state; DCP's metadata
file is pickled by PyTorch and is only ever read from a checkpoint whose checksums we verified.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import warnings
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import (
    ADAPTER_CONFIG, ADAPTER_FILE, BASE_MODEL, CONFIG_FILE, LATEST, MODEL_FILE, TOKENIZER_CONFIG, TOKENIZER_FILE,
    TRAIN_STATE, TRAINER_FILE, checkpoint_name, checkpoint_step, checkpoints_dir, list_checkpoints, read_trainer_state,
    write_manifest,
)
from ..config import Config
from ..util import atomic_dir, atomic_write_text
from .distributed import SINGLE, Dist


# ---- saving ----------------------------------------------------------------------------------


@functools.cache
def _state_options() -> Any:
    """DCP's view of the training state: the parameters that train (all of them, but for a LoRA
    run's frozen base, which its checkpoints do not hold) and their optimizer state. Built on first
    use: importing torch.distributed.checkpoint takes about a second, which a process that never
    saves or loads a checkpoint (a refused start, the supervisor's parent) should not pay."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True)


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model, optimizer) state dicts as DCP saves and loads them: the trained parameters only.
    A frozen weight is dropped under every name it has (DCP's `ignore_frozen_params` kept a tied
    head's second name, `lm_head.weight`: the embedding matrix in every LoRA checkpoint)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_options())
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in model_sd.items() if k not in frozen}, optim_sd


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states (and every visible GPU's) as JSON-able values (no pickle
    on disk)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():  # same GPUs: restore them
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in cuda])


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict for safetensors: contiguous CPU tensors, tied weights stored once (first name)."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        if t.data_ptr() in seen:  # lm_head tied to embed_tokens: keep embed_tokens only
            continue
        seen.add(t.data_ptr())
        out[name] = t.detach().to("cpu").contiguous()
    return out


def full_model_tensors(model: torch.nn.Module, d: Dist = SINGLE) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 (None elsewhere), as `model_tensors` lays them out.

    A sharded (FSDP) model is gathered through DCP's full state dict, one collective every rank
    joins; tied weights are dropped by identity (the later name of a shared parameter), since the
    gathered copies of a shared parameter no longer share storage."""
    from torch.distributed.fsdp import FSDPModule

    if not (d.active and isinstance(model, FSDPModule)):
        return model_tensors(model) if d.is_main else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.is_main:
        return None
    seen, tied = set(), set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    return {k: t.detach().to("cpu").contiguous() for k, t in full.items() if k not in tied}


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: Config,
    trainer_state: dict[str, Any],
    tokenizer_path: str | os.PathLike,
    tokenizer_facts: dict[str, Any] | None = None,
    base: dict[str, str] | None = None,
    d: Dist = SINGLE,
) -> Path:
    """Write a complete checkpoint for `step` atomically and point `latest` at it. `tokenizer_facts`
    (bos/eos token, chat template of the model the run started from; None: the run has no origin)
    go into tokenizer_config.json. `base` (a LoRA run: artifacts.base_record of its frozen base)
    makes it a LoRA checkpoint: the adapter instead of the weights, the base recorded.

    Under many processes every rank calls this (DCP and the FSDP gather are collectives); rank 0
    owns the temporary directory, the small files, the manifest and the rename."""
    from safetensors.torch import save_file
    import torch.distributed.checkpoint as dcp

    final = checkpoints_dir(run_dir) / checkpoint_name(step)
    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(final, overwrite=True)) if d.is_main else None
        tmp = Path(d.broadcast_object(str(tmp) if tmp else ""))  # every rank writes into rank 0's temp dir
        model_sd, optim_sd = training_state(model, optimizer)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / TRAIN_STATE))
        tensors = full_model_tensors(model, d) if base is None else None  # a LoRA run: the adapter alone, below
        if d.is_main:
            if base is not None:
                from ..lora import adapter_tensors, peft_config

                save_file(adapter_tensors(model), str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
                (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config(config.lora, base["path"]), indent=2) + "\n",
                                                  encoding="utf-8")
            else:
                save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})  # one key: safetensors orders metadata arbitrarily, and files must be byte-stable
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
            if tokenizer_facts is not None:
                (tmp / TOKENIZER_CONFIG).write_text(json.dumps(tokenizer_facts, indent=2) + "\n", encoding="utf-8")
            (tmp / CONFIG_FILE).write_text(config.to_yaml(), encoding="utf-8")
            state = dict(trainer_state, step=step, rng=rng_state())
            (tmp / TRAINER_FILE).write_text(json.dumps(state), encoding="utf-8")
        d.barrier()  # every rank's shards are on disk before rank 0 hashes them
        if d.is_main:
            write_manifest(tmp, kind="checkpoint", step=step, extra={BASE_MODEL: base} if base is not None else None)
    # leaving the stack fsynced and renamed the directory (rank 0)
    if d.is_main:
        atomic_write_text(checkpoints_dir(run_dir) / LATEST, final.name + "\n")
    d.barrier()  # nobody goes on (or reads the run directory) before the checkpoint is published
    return final


def checkpoint_bytes(run_dir: str | os.PathLike, model: torch.nn.Module) -> int:
    """About what the next checkpoint of a run takes on disk: the newest one's size, or (none yet)
    16 bytes per parameter (fp32 weights twice, safetensors and DCP, and two AdamW moments)."""
    ckpts = list_checkpoints(run_dir)
    if ckpts:
        return sum(f.stat().st_size for f in ckpts[-1].rglob("*") if f.is_file())
    return 16 * sum(p.numel() for p in model.parameters())


def apply_retention(run_dir: str | os.PathLike, keep_last: int, keep_every: int) -> list[Path]:
    """Delete checkpoints that are neither among the newest `keep_last` nor a multiple of
    `keep_every`. Returns the deleted paths. The newest checkpoint is always kept."""
    ckpts = list_checkpoints(run_dir)
    keep = set(ckpts[-keep_last:]) if keep_last > 0 else set(ckpts[-1:])
    if keep_every > 0:
        keep |= {p for p in ckpts if checkpoint_step(p) % keep_every == 0}
    for leftover in checkpoints_dir(run_dir).glob(".deleting-*"):  # a kill during an earlier deletion
        shutil.rmtree(leftover, ignore_errors=True)
    deleted = []
    for p in ckpts:
        if p not in keep:
            remove_checkpoint(p)
            deleted.append(p)
    return deleted


def remove_checkpoint(ckpt: Path) -> None:
    """Delete a checkpoint without ever showing a half-deleted one: first rename it to a hidden
    name (one atomic step, after which it is no longer a checkpoint to any reader), then remove
    its files. A kill in between leaves only the hidden directory, which the next retention
    pass removes; `ckpt verify` and resume never see it."""
    doomed = ckpt.with_name(f".deleting-{ckpt.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(ckpt, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Remove what interrupted writers left in a run directory and its checkpoints/: a checkpoint's
    temporary directory (`.step-NNNNNN.XXXX.tmp`, a kill during `save_checkpoint`), a checkpoint
    being deleted (`.deleting-step-NNNNNN`), the old version of a replaced checkpoint
    (`.step-NNNNNN.XXXX.old`) and atomic writes' temporary files (`.latest.XXXX.tmp`,
    `.metrics.jsonl.XXXX.tmp`, ...). Only for the holder of the run directory's lock: then no live
    process owns any of them. Returns the removed paths."""
    removed = []
    for folder in (Path(run_dir), checkpoints_dir(run_dir)):
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            name = p.name
            if name.startswith(".") and (name.endswith((".tmp", ".old")) or name.startswith(".deleting-")):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def discard_after(run_dir: str | os.PathLike, step: int) -> list[Path]:
    """Delete checkpoints newer than `step` (after a rollback they belong to an abandoned path)."""
    doomed = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) > step]
    for p in doomed:
        remove_checkpoint(p)
    return doomed


# ---- resuming ----------------------------------------------------------------------------------


def load_training_state(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load model + optimizer (DCP) and RNG states in place; return trainer.json's contents.

    The caller verified the checkpoint first (artifacts.scan_checkpoints / resolve_checkpoint). Under
    many processes every rank calls this: DCP reads the chunks each rank needs for its own state
    dict (the full tensors for a replicated model, its shards under FSDP), whatever world size
    wrote them. Every rank restores rank 0's RNG states.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model_sd, optim_sd = training_state(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=str(ckpt / TRAIN_STATE))
    # DCP loaded every key asked for (a missing one raised); the frozen base is left out of the set, not missing
    frozen = any(not p.requires_grad for p in model.parameters())
    options = replace(_state_options(), strict=False) if frozen else _state_options()
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
    trainer = read_trainer_state(ckpt)
    set_rng_state(trainer["rng"])
    return trainer
