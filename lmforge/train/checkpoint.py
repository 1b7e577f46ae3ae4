"""Complete, atomic, verified checkpoints.

Layout of one checkpoint (`runs/<run>/checkpoints/step-000200/`):

  MANIFEST.json        format version, lmforge version, step, sha256 and size of every other file
  model.safetensors    the weights alone: sample, eval, serve and export read only this (no pickle)
  tokenizer.json       the run's tokenizer, so a checkpoint is self-contained
  config.yaml          the resolved config the run was using at that step
  trainer.json         step, loader cursor, guard state, RNG states (python, numpy, torch), tokens
  train_state/         model + optimizer through torch.distributed.checkpoint (DCP), which also
                       works in one process today and reshards across world sizes later

Atomicity: everything is written into a hidden temporary sibling directory, fsynced, and renamed
into place; `checkpoints/latest` (a one-line text file naming the directory) is then replaced
atomically. A crash at any moment therefore leaves either the previous state or the new one.

Verification: loading recomputes every sha256 listed in MANIFEST.json. `find_resume_checkpoint`
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

import json
import os
import re
import random
import shutil
import time
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..config import Config
from ..errors import CheckpointError
from ..util import atomic_dir, atomic_write_text, sha256_file, warn
from .distributed import SINGLE, Dist

FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Published checkpoint directories of a run, oldest first (temporary ones excluded)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


# ---- saving ----------------------------------------------------------------------------------


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
    d: Dist = SINGLE,
) -> Path:
    """Write a complete checkpoint for `step` atomically and point `latest` at it.

    Under many processes every rank calls this (DCP and the FSDP gather are collectives); rank 0
    owns the temporary directory, the small files, the manifest and the rename."""
    from safetensors.torch import save_file
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = checkpoints_dir(run_dir) / checkpoint_name(step)
    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_dir(final, overwrite=True)) if d.is_main else None
        tmp = Path(d.broadcast_object(str(tmp) if tmp else ""))  # every rank writes into rank 0's temp dir
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "train_state"))
        tensors = full_model_tensors(model, d)
        if d.is_main:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # one key: safetensors orders metadata arbitrarily, and files must be byte-stable
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
            (tmp / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
            state = dict(trainer_state, step=step, rng=rng_state())
            (tmp / "trainer.json").write_text(json.dumps(state), encoding="utf-8")
        d.barrier()  # every rank's shards are on disk before rank 0 hashes them
        if d.is_main:
            write_manifest(tmp, step)
    # leaving the stack fsynced and renamed the directory (rank 0)
    if d.is_main:
        atomic_write_text(checkpoints_dir(run_dir) / "latest", final.name + "\n")
    d.barrier()  # nobody goes on (or reads the run directory) before the checkpoint is published
    return final


def write_manifest(ckpt: Path, step: int) -> None:
    files = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(ckpt).as_posix()
            files[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {
        "format_version": FORMAT_VERSION,
        "lmforge_version": __version__,
        "torch_version": torch.__version__,
        "step": step,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
    }
    (ckpt / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def apply_retention(run_dir: str | os.PathLike, keep_last: int, keep_every: int) -> list[Path]:
    """Delete checkpoints that are neither among the newest `keep_last` nor a multiple of
    `keep_every`. Returns the deleted paths. The newest checkpoint is always kept."""
    ckpts = list_checkpoints(run_dir)
    keep = set(ckpts[-keep_last:]) if keep_last > 0 else set(ckpts[-1:])
    if keep_every > 0:
        keep |= {p for p in ckpts if int(_STEP_DIR.match(p.name).group(1)) % keep_every == 0}
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


def discard_after(run_dir: str | os.PathLike, step: int) -> list[Path]:
    """Delete checkpoints newer than `step` (after a rollback they belong to an abandoned path)."""
    doomed = [p for p in list_checkpoints(run_dir) if int(_STEP_DIR.match(p.name).group(1)) > step]
    for p in doomed:
        remove_checkpoint(p)
    return doomed


# ---- verification and loading ----------------------------------------------------------------


def verify_checkpoint(ckpt: str | os.PathLike) -> list[str]:
    """Problems found in a checkpoint directory (empty list: it is complete and intact)."""
    ckpt = Path(ckpt)
    mpath = ckpt / MANIFEST
    if not ckpt.is_dir():
        return [f"{ckpt}: not a directory"]
    if not mpath.is_file():
        return [f"{ckpt}: incomplete: {MANIFEST} is missing"]
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(m, dict) and {"sha256", "bytes"} <= m.keys() for m in files.values()):
            raise ValueError("'files' is not a mapping of name -> {sha256, bytes}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:  # ValueError includes JSONDecodeError
        return [f"{mpath}: unreadable manifest ({e})"]
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        return [
            f"{ckpt}: format version {manifest.get('format_version')} is newer than this lmforge "
            f"understands ({FORMAT_VERSION}); upgrade lmforge"
        ]
    problems = []
    for rel, meta in files.items():
        p = ckpt / rel
        if not p.is_file():
            problems.append(f"{ckpt}: missing file {rel}")
        elif p.stat().st_size != meta["bytes"]:
            problems.append(f"{ckpt}: {rel} has {p.stat().st_size} bytes, manifest says {meta['bytes']} (truncated?)")
        elif sha256_file(p) != meta["sha256"]:
            problems.append(f"{ckpt}: {rel} fails its sha256 check (corrupt)")
    for required in ("model.safetensors", "trainer.json", "config.yaml", "tokenizer.json"):
        if required not in files:
            problems.append(f"{ckpt}: manifest lists no {required}")
    return problems


def is_checkpoint_dir(path: Path) -> bool:
    """A checkpoint directory itself (rather than a run directory holding checkpoints)."""
    return (path / MANIFEST).exists() or bool(_STEP_DIR.match(path.name))


def checkpoint_step(ckpt: str | os.PathLike) -> int:
    """The step a checkpoint directory is named for (step-000200 -> 200)."""
    return int(_STEP_DIR.match(Path(ckpt).name).group(1))


def scan_checkpoints(run_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, list[str]]]]:
    """Newest intact checkpoint of a run, and every newer (damaged) one with its problems, newest
    first: when no checkpoint is intact, that is every checkpoint of the run."""
    damaged: list[tuple[Path, list[str]]] = []
    for ckpt in reversed(list_checkpoints(run_dir)):
        problems = verify_checkpoint(ckpt)
        if not problems:
            return ckpt, damaged
        damaged.append((ckpt, problems))
    return None, damaged


def find_resume_checkpoint(run_dir: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """Newest intact checkpoint of a run, and the problems of the newer ones that were skipped."""
    ckpt, damaged = scan_checkpoints(run_dir)
    return ckpt, [problem for _, problems in damaged for problem in problems]


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory (its newest intact checkpoint) or a checkpoint directory -> verified path."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such run or checkpoint: {path}")
    if is_checkpoint_dir(path):
        problems = verify_checkpoint(path)
        if problems:
            raise CheckpointError("checkpoint refused:\n  " + "\n  ".join(problems))
        return path
    ckpt, skipped = find_resume_checkpoint(path)
    for problem in skipped:
        warn(f"skipping {problem}")
    if ckpt is None:
        raise CheckpointError(
            f"{path} holds no intact checkpoint (expected {path}/checkpoints/step-NNNNNN with a {MANIFEST})"
        )
    return ckpt


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "trainer.json").read_text(encoding="utf-8"))


def read_config(ckpt: Path) -> Config:
    from ..config import load_config

    return load_config(ckpt / "config.yaml")


def load_training_state(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load model + optimizer (DCP) and RNG states in place; return trainer.json's contents.

    The caller verified the checkpoint first (find_resume_checkpoint / resolve_checkpoint). Under
    many processes every rank calls this: DCP reads the chunks each rank needs for its own state
    dict (the full tensors for a replicated model, its shards under FSDP), whatever world size
    wrote them. Every rank restores rank 0's RNG states.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=str(ckpt / "train_state"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer = read_trainer_state(ckpt)
    set_rng_state(trainer["rng"])
    return trainer


def load_model_weights(ckpt: Path, model: torch.nn.Module) -> None:
    """Load model.safetensors into a model (strict; tied weights restored through the tie)."""
    from safetensors.torch import load_file

    tensors = load_file(str(ckpt / "model.safetensors"))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {k for k in missing if _is_tied(model, k)}
    if set(missing) - tied or unexpected:
        raise CheckpointError(
            f"{ckpt}/model.safetensors does not fit the model: missing {sorted(set(missing) - tied)}, "
            f"unexpected {sorted(unexpected)}"
        )


def _is_tied(model: torch.nn.Module, key: str) -> bool:
    sd = model.state_dict()
    ptr = sd[key].data_ptr()
    return any(k != key and t.data_ptr() == ptr for k, t in sd.items())


def load_for_inference(path: str | os.PathLike):
    """(model in eval mode, tokenizer, resolved config, step) from a run or checkpoint directory,
    or a model directory; the model is on `util.default_device()` (the GPU when there is one).

    Reads only safetensors, YAML and JSON: nothing is unpickled.
    """
    from ..util import default_device

    model, tok, cfg, step = _load_for_inference(path)
    return model.to(default_device()), tok, cfg, step


def _load_for_inference(path: str | os.PathLike):
    from ..convert import is_model_dir, load_model_dir, origin_facts
    from ..model import Transformer
    from ..tokenizer import Tokenizer

    if is_model_dir(path):  # `lmforge import` output: weights, config, tokenizer; step 0
        return load_model_dir(path)
    ckpt = resolve_checkpoint(path)
    cfg = read_config(ckpt)
    model = Transformer(cfg.model)
    load_model_weights(ckpt, model)
    model.eval()
    tok = Tokenizer.load(ckpt / "tokenizer.json")
    tok.use_model_facts(origin_facts(cfg, tok))  # a fine-tuned model keeps its origin's chat template and end of turn
    step = int(json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))["step"])
    return model, tok, cfg, step
