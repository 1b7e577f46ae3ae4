"""What lmforge writes to disk and reads back (other than training state), and the one loader.

Directories
-----------
  runs/<run>/                 config.yaml, metrics.jsonl, events.jsonl, eval-results.jsonl,
                              faults-fired.json, quickstart.json, checkpoints/
  runs/<run>/checkpoints/     step-000200/ ... (published checkpoints) and `latest` (one line)
  a checkpoint directory      MANIFEST.json, model.safetensors, tokenizer.json, config.yaml,
                              trainer.json, train_state/ (DCP), tokenizer_config.json when the run
                              has recorded tokenizer facts (train/checkpoint.py writes it)
  a model directory           MANIFEST.json ("kind": "model"), model.safetensors, config.yaml,
                              tokenizer.json, tokenizer_config.json, source.json (`lmforge import`)
  a LoRA checkpoint           as a checkpoint, with adapter_model.safetensors + adapter_config.json
                              (PEFT's files, lmforge/lora.py) in place of model.safetensors, and
                              its manifest's `base_model` recording the base's sha256 and path
  an adapter directory        MANIFEST.json ("kind": "adapter", `base_model` as above),
                              adapter_model.safetensors, adapter_config.json (`export --format peft`)

Every file name is a constant here; no other module spells one.

The manifest
------------
Every directory lmforge writes for reading back holds a MANIFEST.json: the format version, what
kind of directory it is ("checkpoint", "model"; index, classifier and adapter directories will add
theirs through `write_manifest`), the lmforge and torch versions that wrote it, the step (for a
checkpoint), and the sha256 and size of every other file. Format 2 also stores `manifest_sha256`,
the sha256 of the manifest's own canonical form (`json.dumps(rest, sort_keys=True,
separators=(",", ":"))`): without it a flipped bit in the manifest itself (a step, a file size, a
key) passed verification. Every field is type-checked when read, so any damage is reported as
"corrupt: MANIFEST.json (...)" and never surfaces as a KeyError or TypeError in some verb. The
self-checksum is checked before the version (a future format keeps that rule). Format 1
manifests (no self-checksum, no kind: a checkpoint) still verify by their schema.

What a path is
--------------
`resolve_origin` decides what a user's path names, in this order:
1. a directory that looks like a checkpoint (inside a `checkpoints/` directory, named step-N, or
   holding trainer.json or train_state/) is a checkpoint and must verify: a checkpoint whose
   manifest was deleted is a damaged checkpoint, never a model directory (issue 21.2);
2. a directory with a MANIFEST.json of another kind is verified as that kind (a model directory);
3. model.safetensors + config.yaml + tokenizer.json without a manifest is a model directory
   imported by an older lmforge: it loads, unverified (nothing recorded its checksums);
4. anything else is a run directory: its newest intact checkpoint, newer damaged ones warned.

The loader
----------
`load_model` is the one way sample, eval, serve, export, quickstart and `init.from` load weights.
It reads safetensors, YAML and JSON only (nothing is unpickled), and `load_safetensors` is the only
call of safetensors' `load_file` for model weights in lmforge. `into=` copies the weights into an
existing model instead of building one (init.from: a 3B model is not held twice).

LoRA. A LoRA run's checkpoints hold the adapter, not the base weights. `load_model` on one (or
on an adapter directory) finds the base by the path its manifest records (else the run's
`init.from`), refuses a base whose sha256 is not the recorded one naming both checksums, and
returns the base with the adapter attached (lmforge/lora.py): sample, eval and serve use it as
any model. `into=` (init.from of a new run) gets the adapter folded into the base's weights;
`read_bundle(merge=True)` too (export --merge).

Trade-offs: verification hashes every file, so loading a checkpoint reads it twice (a second or two
per GB); a wrong answer from damaged weights costs more. torch and the model are imported only by
the functions that need them, so the store and the dashboard can use the file names cheaply.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

from . import __version__
from .config import Config, EmbedConfig, ModelConfig, load_config
from .errors import CheckpointError
from .tokenizer import TOKENIZER_FILE, Tokenizer
from .util import atomic_dir, atomic_write_json, sha256_bytes, sha256_file, warn

if TYPE_CHECKING:
    import torch

    from .model import Transformer

# ---- file names ------------------------------------------------------------------------------

MANIFEST = "MANIFEST.json"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"  # a run's resolved config, a checkpoint's, a model directory's
TOKENIZER_CONFIG = "tokenizer_config.json"  # bos/eos/pad token, chat template
SOURCE_FILE = "source.json"  # where an imported model came from
TRAINER_FILE = "trainer.json"  # step, data cursor, guard state, RNG states
TRAIN_STATE = "train_state"  # model + optimizer through torch.distributed.checkpoint
CHECKPOINTS = "checkpoints"
LATEST = "latest"  # checkpoints/latest: the name of the newest checkpoint directory
METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
EVAL_RESULTS_FILE = "eval-results.jsonl"  # the eval sidecar's results (evaluate/watch.py)
FAULTS_FIRED_FILE = "faults-fired.json"  # LMFORGE_FAULTS already fired in a run
QUICKSTART_FILE = "quickstart.json"  # what a quickstart run was planned for
LAST_ERROR_FILE = "last-error.json"  # a training process's user error, for its supervisor
CLASSIFIER_HEAD = "head.safetensors"  # a classifier directory's head (understand/classify.py)
CLASSIFIER_MODEL = "model"  # a classifier directory's own fine-tuned model directory (setfit, finetune)
ADAPTER_FILE = "adapter_model.safetensors"  # a LoRA adapter's weights, under PEFT's names (lmforge/lora.py)
ADAPTER_CONFIG = "adapter_config.json"  # its settings, as PEFT writes them
BASE_MODEL = "base_model"  # the manifest key of a LoRA checkpoint or adapter directory: {"sha256", "path"} of its base

FORMAT_VERSION = 2
Kind = Literal["checkpoint", "model", "adapter"]
# The files a manifest of each kind must list.
REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "checkpoint": (MODEL_FILE, TRAINER_FILE, CONFIG_FILE, TOKENIZER_FILE),
    "lora checkpoint": (ADAPTER_FILE, ADAPTER_CONFIG, TRAINER_FILE, CONFIG_FILE, TOKENIZER_FILE),
    "model": (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE),
    "adapter": (ADAPTER_FILE, ADAPTER_CONFIG),
}
_STEP_DIR = re.compile(r"^step-(\d+)$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CORE_KEYS = ("format_version", "kind", "lmforge_version", "torch_version", "step", "created", "files", "manifest_sha256")


# ---- manifests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Manifest:
    """A MANIFEST.json that passed its self-checksum (format >= 2) and its schema."""

    format_version: int
    kind: str
    step: int | None
    files: dict[str, dict[str, Any]]  # relative posix path -> {"sha256": 64 hex, "bytes": int}
    fields: dict[str, Any]  # everything it records (extra keys of other kinds included)

    def sha256(self, name: str) -> str:
        return self.files[name]["sha256"]

    @property
    def base(self) -> dict[str, str] | None:
        """A LoRA checkpoint's or adapter's base model: {"sha256", "path"}; None for full weights."""
        return self.fields.get(BASE_MODEL)

    @property
    def weights_sha256(self) -> str:
        """sha256 of the weights this directory adds: model.safetensors, or a LoRA's adapter file."""
        return self.sha256(ADAPTER_FILE if self.base is not None else MODEL_FILE)


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest's canonical form, without its own `manifest_sha256`."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def write_manifest(directory: str | os.PathLike, *, kind: str = "checkpoint", step: int | None = None,
                   extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record every file below `directory` (sha256, size) in its MANIFEST.json and return it.

    Call it last, inside the temporary directory that `util.atomic_dir` publishes: the manifest
    is written in place, and the rename makes the whole directory appear at once. `extra`: keys
    of other kinds of directory (model checksum, settings); they are covered by the checksum."""
    directory = Path(directory)
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST:
            files[p.relative_to(directory).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest: dict[str, Any] = {"format_version": FORMAT_VERSION, "kind": kind, "lmforge_version": __version__}
    torch = sys.modules.get("torch")  # recorded when loaded (it wrote the weights); never imported for it
    if torch is not None:
        manifest["torch_version"] = str(torch.__version__)
    if step is not None:
        manifest["step"] = step
    manifest["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    manifest["files"] = files
    for key, value in (extra or {}).items():
        if key in _CORE_KEYS:
            raise ValueError(f"write_manifest: extra key {key!r} would replace a core field")
        manifest[key] = value
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _is_count(v: Any) -> bool:
    """An int >= 0 (bool is an int to Python, not to a manifest)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _inside(name: str) -> bool:
    """A relative path that stays inside the directory (a manifest never makes us read elsewhere)."""
    p = PurePosixPath(name)
    return bool(name) and "\\" not in name and "\x00" not in name and not p.is_absolute() and \
        all(part not in ("", ".", "..") for part in name.split("/"))


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """The verified-by-itself MANIFEST.json of a directory (its files are not hashed here: see
    `verify_manifest`), or a CheckpointError: "incomplete: MANIFEST.json is missing" or
    "corrupt: MANIFEST.json (why)"."""
    directory = Path(directory)
    path = directory / MANIFEST
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: incomplete: {MANIFEST} is missing") from None
    except IsADirectoryError:
        raise CheckpointError(f"{directory}: corrupt: {MANIFEST} (a directory, not a file)") from None
    except OSError as e:
        raise CheckpointError(f"{directory}: cannot read {MANIFEST} ({e.strerror or e})") from None

    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{directory}: corrupt: {MANIFEST} ({why})")

    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except UnicodeDecodeError:
        raise corrupt("not UTF-8 text") from None
    except RecursionError:
        raise corrupt("nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, a duplicate key
        raise corrupt(f"not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise corrupt(f"expected a JSON object, got {type(obj).__name__}")
    if "manifest_sha256" in obj:
        stored = obj["manifest_sha256"]
        if not (isinstance(stored, str) and _HEX64.match(stored)):
            raise corrupt("manifest_sha256 is not 64 hex digits")
        if stored != manifest_checksum(obj):
            raise corrupt("its contents do not match its manifest_sha256: damaged")
    version = obj.get("format_version")
    if not _is_count(version) or version < 1:
        raise corrupt(f"format_version must be an integer >= 1, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{directory}: format version {version} is newer than this lmforge understands "
                              f"({FORMAT_VERSION}); upgrade lmforge")
    if version >= 2 and "manifest_sha256" not in obj:
        raise corrupt(f"no manifest_sha256 (format version {version} records one)")
    kind = obj.get("kind", "checkpoint" if version == 1 else None)  # format 1 wrote checkpoints only
    if not isinstance(kind, str) or not kind:
        raise corrupt(f"kind must be a non-empty string, got {kind!r}")
    step = obj.get("step")
    if (kind == "checkpoint" or step is not None) and not _is_count(step):
        raise corrupt(f"step must be an integer >= 0, got {step!r}")
    files = obj.get("files")
    if not isinstance(files, dict) or not files:
        raise corrupt("files must be a non-empty mapping of file name -> {sha256, bytes}")
    for name, meta in files.items():
        if not _inside(name) or name == MANIFEST:
            raise corrupt(f"file name {name!r} is not a relative path inside {directory}")
        if not isinstance(meta, dict):
            raise corrupt(f"files[{name!r}] must be an object with sha256 and bytes")
        if not (isinstance(meta.get("sha256"), str) and _HEX64.match(meta["sha256"])):
            raise corrupt(f"files[{name!r}].sha256 must be 64 hex digits, got {meta.get('sha256')!r}")
        if not _is_count(meta.get("bytes")):
            raise corrupt(f"files[{name!r}].bytes must be an integer >= 0, got {meta.get('bytes')!r}")
    for key in ("lmforge_version", "torch_version", "created"):
        if key in obj and not isinstance(obj[key], str):
            raise corrupt(f"{key} must be a string, got {obj[key]!r}")
    base = obj.get(BASE_MODEL)
    if base is not None and not (isinstance(base, dict) and isinstance(base.get("sha256"), str)
                                 and _HEX64.match(base["sha256"]) and isinstance(base.get("path"), str)):
        raise corrupt(f"{BASE_MODEL} must be an object with a 64-hex sha256 and a path, got {base!r}")
    return Manifest(version, kind, step, files, obj)


def verify_manifest(directory: str | os.PathLike, kind: str, required: tuple[str, ...] = ()) -> list[str]:
    """Problems of a directory against its manifest (empty: complete and intact): the manifest
    itself, its kind, every listed file's size and sha256, and the files a `kind` must hold."""
    directory = Path(directory)
    if not directory.is_dir():
        return [f"{directory}: not a directory"]
    try:
        m = read_manifest(directory)
    except CheckpointError as e:
        return [str(e)]
    if m.kind != kind:
        return [f"{directory}: its {MANIFEST} describes a {m.kind} directory, not a {kind} directory"]
    problems = []
    for rel, meta in m.files.items():
        p = directory / rel
        if not p.is_file():
            problems.append(f"{directory}: missing file {rel}")
        elif p.stat().st_size != meta["bytes"]:
            problems.append(f"{directory}: {rel} has {p.stat().st_size} bytes, manifest says {meta['bytes']} (truncated?)")
        elif sha256_file(p) != meta["sha256"]:
            problems.append(f"{directory}: {rel} fails its sha256 check (corrupt)")
    if kind == "checkpoint" and m.base is not None and required == REQUIRED_FILES["checkpoint"]:
        required = REQUIRED_FILES["lora checkpoint"]  # a LoRA run's checkpoint holds its adapter, not the base
    for name in required:
        if name not in m.files:
            problems.append(f"{directory}: manifest lists no {name}")
    return problems


# ---- checkpoints -----------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Published checkpoint directories of a run, oldest first (temporary ones excluded)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(ckpt: str | os.PathLike) -> int:
    """The step a checkpoint directory is named for (step-000200 -> 200)."""
    m = _STEP_DIR.match(Path(ckpt).name)
    if m is None:
        raise CheckpointError(f"{ckpt}: not a checkpoint directory name (expected step-NNNNNN)")
    return int(m.group(1))


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """A checkpoint directory itself, complete or damaged (rather than a run directory holding
    checkpoints, or a model directory): named step-N, holding trainer.json or train_state/, with a
    manifest of kind "checkpoint", or weights without a readable manifest inside a run's
    `checkpoints/`. Such a directory is verified as a checkpoint, never loaded as a model."""
    p = Path(path)
    if _STEP_DIR.match(p.name) or (p / TRAINER_FILE).exists() or (p / TRAIN_STATE).exists():
        return True
    kind = _manifest_kind(p) if (p / MANIFEST).exists() else None
    if kind is not None:
        return kind == "checkpoint"
    parent = p.resolve().parent
    return parent.name == CHECKPOINTS and (parent.parent / CONFIG_FILE).is_file() and (p / MODEL_FILE).exists()


def _manifest_kind(directory: Path) -> str | None:
    """The kind a manifest claims, read leniently (None when it cannot be read at all)."""
    try:
        obj = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    kind = obj.get("kind", "checkpoint" if obj.get("format_version") == 1 else None)
    return kind if isinstance(kind, str) else None


def verify_checkpoint(ckpt: str | os.PathLike) -> list[str]:
    """Problems found in a checkpoint directory (empty list: it is complete and intact)."""
    ckpt = Path(ckpt)
    problems = verify_manifest(ckpt, "checkpoint", REQUIRED_FILES["checkpoint"])
    m = _STEP_DIR.match(ckpt.name)
    if not problems and m:  # the manifest is intact: its step must be the directory's
        step = read_manifest(ckpt).step
        if step != int(m.group(1)):
            problems.append(f"{ckpt}: {MANIFEST} records step {step}, but the directory is named {ckpt.name}")
    return problems


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


def _refused(what: str, problems: list[str]) -> CheckpointError:
    return CheckpointError(f"{what} refused: " + "; ".join(problems))


def _newest_intact(run_dir: Path) -> Path:
    ckpt, skipped = find_resume_checkpoint(run_dir)
    for problem in skipped:
        warn(f"skipping {problem}")
    if ckpt is None:
        if (run_dir / CHECKPOINTS).is_dir() or (run_dir / CONFIG_FILE).is_file():
            raise CheckpointError(f"{run_dir} holds no intact checkpoint (expected {run_dir}/{CHECKPOINTS}/step-NNNNNN "
                                  f"with a {MANIFEST})")
        raise CheckpointError(
            f"{run_dir} is not a run, checkpoint or model directory (a run holds {CHECKPOINTS}/step-NNNNNN; a model "
            f"directory, as `lmforge import` writes it, holds {MODEL_FILE}, {CONFIG_FILE} and {TOKENIZER_FILE})"
        )
    return ckpt


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A run directory (its newest intact checkpoint) or a checkpoint directory -> verified path."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no such run or checkpoint: {path}")
    if is_checkpoint_dir(path):
        problems = verify_checkpoint(path)
        if problems:
            raise _refused("checkpoint", problems)
        return path
    if is_model_dir(path):
        raise CheckpointError(f"{path} is a model directory, not a run or checkpoint; start a new run from its "
                              f"weights with --set init.from={path}")
    return _newest_intact(path)


def read_trainer_state(ckpt: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(ckpt) / TRAINER_FILE).read_text(encoding="utf-8"))


def read_config(directory: str | os.PathLike) -> Config:
    """The config recorded in a run, checkpoint or model directory."""
    return load_config(Path(directory) / CONFIG_FILE)


# ---- model directories -----------------------------------------------------------------------


@dataclass
class Bundle:
    """A model in transit between formats (convert.py): an lmforge `ModelConfig`, fp32 CPU
    tensors under lmforge's parameter names (= Hugging Face Llama keys; a tied head stored once,
    as `model.embed_tokens.weight`), its tokenizer, the tokenizer facts a tokenizers JSON
    cannot hold (bos/eos/pad token, chat template), and how it embeds text (pooling, prefixes)."""

    cfg: ModelConfig
    tensors: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    special: dict[str, Any] = field(default_factory=dict)  # bos_token, eos_token, pad_token, chat_template
    source: dict[str, Any] = field(default_factory=dict)
    embed: EmbedConfig = field(default_factory=EmbedConfig)  # the config's `embed:` section
    # Matrices held as int8 as well (lmforge/quant.py): name -> (q int8 (N, K), scale fp32 (N, K / G)),
    # `tensors[name]` being exactly q * scale. A model directory stores these as int8.
    quantized: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def _has_model_files(p: Path) -> bool:
    return all((p / f).is_file() for f in (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE))


def is_model_dir(path: str | os.PathLike) -> bool:
    """A model directory (`lmforge import`'s output, or an averaged or exported model): a manifest
    of kind "model", or, written by an earlier lmforge, the three model files and no manifest.
    Never a directory that looks like a checkpoint (see the module docstring)."""
    p = Path(path)
    if not p.is_dir() or is_checkpoint_dir(p):
        return False
    if (p / MANIFEST).exists():
        return _manifest_kind(p) in ("model", None)  # an unreadable one is refused when loaded
    return _has_model_files(p)


def verify_model_dir(path: str | os.PathLike) -> list[str]:
    """Problems of a model directory (empty: intact, or a legacy one without a manifest)."""
    p = Path(path)
    if not (p / MANIFEST).exists() and _has_model_files(p) and not is_checkpoint_dir(p):
        return []  # imported by an earlier lmforge: nothing recorded its checksums
    return verify_manifest(p, "model", REQUIRED_FILES["model"])


def write_model_dir(bundle: Bundle, out: Path, overwrite: bool = False) -> Path:
    """A Bundle -> a model directory with its manifest (atomically)."""
    from safetensors.torch import save_file

    cfg = Config(model=bundle.cfg, data=replace(Config().data, seq_len=min(256, bundle.cfg.max_seq_len)), embed=bundle.embed)
    cfg.validate()
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another --out or pass --overwrite")
    extra: dict[str, Any] = {}
    tensors = bundle.tensors
    if bundle.quantized:  # int8 + scales (lmforge/quant.py), recorded in the manifest
        from .quant import QUANT_KEY, stored_tensors

        tensors = stored_tensors(bundle.tensors, bundle.quantized)
        extra[QUANT_KEY] = quantization_record(bundle.quantized)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(cfg.to_yaml(), encoding="utf-8")
        bundle.tokenizer.save(tmp / TOKENIZER_FILE)
        atomic_write_json(tmp / TOKENIZER_CONFIG, {k: v for k, v in bundle.special.items() if v is not None})
        atomic_write_json(tmp / SOURCE_FILE, bundle.source)
        write_manifest(tmp, kind="model", extra=extra)
    return out


def quantization_record(quantized: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """The manifest's record of a directory's int8 matrices: {"format": "int8", "group_size": G}
    (G = 0: one scale per row). One group size per directory."""
    sizes = {q.shape[1] // scale.shape[1] if scale.shape[1] > 1 else 0 for q, scale in quantized.values()}
    if len(sizes) != 1:
        raise CheckpointError(f"int8 matrices with different group sizes {sorted(sizes)} cannot share one directory")
    return {"format": "int8", "group_size": sizes.pop()}


def stored_quantization(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The quantization record of a model directory's manifest (None: fp32 weights)."""
    p = Path(directory)
    if not (p / MANIFEST).exists():
        return None
    return read_manifest(p).fields.get("quantization")


def read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """model.safetensors of a checkpoint or model directory -> (fp32-dequantised tensors, int8 ones)."""
    from .quant import read_stored

    return read_stored(load_safetensors(directory / MODEL_FILE), stored_quantization(directory), str(directory / MODEL_FILE))


def read_model_dir(path: str | os.PathLike) -> Bundle:
    """A model directory (verified against its manifest when it has one) -> Bundle."""
    p = Path(path)
    if not is_model_dir(p):
        raise CheckpointError(f"{p} is not a model directory (expected {MODEL_FILE}, {CONFIG_FILE} and {TOKENIZER_FILE})")
    return read_bundle(p)


def read_bundle(path: str | os.PathLike, *, merge: bool = False) -> Bundle:
    """Whatever `load_model` accepts (a run, checkpoint or model directory) -> a verified Bundle
    (export's reader: the tensors without a model built around them). A LoRA's adapter is folded
    into its base's weights when `merge` (export --merge) and refused otherwise."""
    origin = resolve_origin(path)
    if origin.is_adapter:
        if not merge:
            raise CheckpointError(f"{path} is a LoRA adapter on {origin.base_path}, not a whole model: export the adapter "
                                  "with --format peft, or fold it into its base's weights with --merge")
        parts = lora_parts(origin)
        from .lora import merge as fold

        tensors = fold(parts.base_tensors, parts.lora, parts.adapter, str(origin.path / ADAPTER_FILE))
        source = {"format": "lmforge", "path": str(origin.path), "name": origin.name, "merged_adapter": origin.model_sha256,
                  "base_model_sha256": origin.base_sha256}
        return Bundle(parts.cfg.model, check_tensors(parts.cfg.model, tensors, str(origin.path)), parts.tokenizer,
                      parts.facts, source, parts.cfg.embed)
    if merge:
        raise CheckpointError(f"--merge: {path} holds whole weights, no LoRA adapter to fold in; leave out --merge")
    cfg = read_config(origin.path)
    tok = Tokenizer.load(origin.path / TOKENIZER_FILE)
    tensors, quantized = read_weights(origin.path)
    if origin.kind == "model":
        source = read_json(origin.path / SOURCE_FILE) if (origin.path / SOURCE_FILE).is_file() else {}
    else:
        source = {"format": "lmforge", "path": str(origin.path), "name": origin.name}
    return Bundle(cfg.model, check_tensors(cfg.model, tensors, str(origin.path)), tok,
                  tokenizer_facts(origin.path, cfg, tok), source, cfg.embed, quantized)


def origin_facts(cfg: Config, tok: Tokenizer) -> dict[str, Any]:
    """The tokenizer facts (tokenizer_config.json) of the model directory a run started from
    (`init.from`), if it uses the same tokenizer; else {}. Only for checkpoints written before
    checkpoints recorded their own facts: it follows the init.from path, which may have moved."""
    if not (cfg.init.from_ and is_model_dir(cfg.init.from_)):
        return {}
    origin = Path(cfg.init.from_)
    if not (origin / TOKENIZER_CONFIG).is_file() or Tokenizer.load(origin / TOKENIZER_FILE).sha256 != tok.sha256:
        return {}
    return read_json(origin / TOKENIZER_CONFIG)


def tokenizer_facts(directory: str | os.PathLike, cfg: Config | None = None, tok: Tokenizer | None = None) -> dict[str, Any]:
    """bos/eos/pad token and chat template recorded in a checkpoint or model directory
    (tokenizer_config.json); for an older checkpoint without one, its run's origin's (`origin_facts`)."""
    d = Path(directory)
    if (d / TOKENIZER_CONFIG).is_file():
        return read_json(d / TOKENIZER_CONFIG)
    if (d / CONFIG_FILE).is_file() and (d / TOKENIZER_FILE).is_file():
        return origin_facts(cfg or read_config(d), tok or Tokenizer.load(d / TOKENIZER_FILE))
    return {}


# ---- weights ---------------------------------------------------------------------------------


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every stored tensor of a model with this config (tied head omitted), with its shape."""
    d, hd, ff, V = cfg.d_model, cfg.head_dim, cfg.ff_dim, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, d)}
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (cfg.n_head * hd, d)
        shapes[p + "self_attn.k_proj.weight"] = (cfg.kv_heads * hd, d)
        shapes[p + "self_attn.v_proj.weight"] = (cfg.kv_heads * hd, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, cfg.n_head * hd)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (ff, d)
        shapes[p + "mlp.up_proj.weight"] = (ff, d)
        shapes[p + "mlp.down_proj.weight"] = (d, ff)
    shapes["model.norm.weight"] = (d,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (V, d)
    if cfg.num_labels:  # the classification head (model.py `score`)
        shapes["score.weight"] = (cfg.num_labels, d)
        shapes["score.bias"] = (cfg.num_labels,)
    return shapes


def check_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Exactly the expected names and shapes, as contiguous fp32; else a CheckpointError naming them."""
    import torch

    shapes = expected_shapes(cfg)
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: tensors do not fit the model config: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    out = {}
    for name, shape in shapes.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{source}: {name} has shape {tuple(t.shape)}, the config implies {shape}")
        out[name] = t.detach().to("cpu", torch.float32).contiguous()
    return out


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file: the one call of safetensors' `load_file` for model
    weights in lmforge. A damaged or unreadable file (truncated, not safetensors at all) is a
    CheckpointError naming it, never the library's traceback."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise CheckpointError(f"not a valid safetensors file: {path} ({e})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str = "tensors") -> None:
    """Copy tensors into a model's parameters in place, names and shapes checked (a tied head
    appears once, as model.embed_tokens.weight, and follows its embedding)."""
    import torch

    params = dict(model.named_parameters())
    if set(params) != set(tensors):
        raise CheckpointError(f"{source}: weights do not fit the model: missing {sorted(set(params) - set(tensors))[:5]}, "
                              f"unexpected {sorted(set(tensors) - set(params))[:5]}")
    wrong = [f"{n} {tuple(tensors[n].shape)} (model: {tuple(p.shape)})" for n, p in params.items() if tensors[n].shape != p.shape]
    if wrong:
        raise CheckpointError(f"{source}: weights do not fit the model's shape: {', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


# ---- the loader ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Origin:
    """Where loaded weights came from."""

    kind: Kind
    path: Path  # the checkpoint directory (a run resolved to its newest intact one), model or adapter directory
    step: int | None  # a checkpoint's step; None for a model or adapter directory
    name: str  # the run's name for a checkpoint, the directory's for a model or adapter
    # of model.safetensors (from the manifest; computed for a legacy model directory), or of a LoRA's adapter file
    model_sha256: str
    base_sha256: str = ""  # a LoRA checkpoint's or adapter's base model (its model_sha256); "" for full weights
    base_path: str = ""  # where that base was when the adapter was made

    @property
    def is_adapter(self) -> bool:
        return bool(self.base_sha256)

    def describe(self) -> str:
        """"step 200", "model directory" or "adapter directory": what `sample`, `eval` and `serve` print beside the path."""
        where = f"step {self.step}" if self.kind == "checkpoint" else f"{self.kind} directory"
        return f"{where}, LoRA adapter on {self.base_path}" if self.is_adapter else where


@dataclass
class Loaded:
    """What `load_model` returns."""

    model: Transformer
    tokenizer: Tokenizer  # with its recorded facts applied (chat template, end of turn)
    config: Config  # the resolved config recorded beside the weights (a LoRA's: its `lora` section set)
    origin: Origin
    base: Origin | None = None  # a LoRA's base model, verified against the checksum the adapter recorded


def resolve_origin(path: str | os.PathLike) -> Origin:
    """What a path names (see the module docstring), verified; a CheckpointError says why not."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no such run, checkpoint or model directory: {p}")
    if not p.is_dir():
        raise CheckpointError(f"{p} is a file; expected a run, checkpoint or model directory")
    if is_checkpoint_dir(p):
        problems = verify_checkpoint(p)
        if problems:
            raise _refused("checkpoint", problems)
        return _checkpoint_origin(p)
    if (p / MANIFEST).exists() and _manifest_kind(p) == "adapter":
        problems = verify_manifest(p, "adapter", REQUIRED_FILES["adapter"])
        if problems:
            raise _refused("adapter directory", problems)
        m = read_manifest(p)
        if m.base is None:
            raise _refused("adapter directory", [f"{p}: its {MANIFEST} records no {BASE_MODEL}"])
        return Origin("adapter", p, None, p.resolve().name, m.weights_sha256, **_base_fields(m))
    if (p / MANIFEST).exists() or _has_model_files(p):
        problems = verify_model_dir(p)
        if problems:
            raise _refused("model directory", problems)
        if (p / MANIFEST).exists():
            sha = read_manifest(p).sha256(MODEL_FILE)
        else:  # a legacy model directory: nothing recorded the weights' checksum
            sha = sha256_file(p / MODEL_FILE)
        return Origin("model", p, None, p.resolve().name, sha)
    return _checkpoint_origin(_newest_intact(p))


def _checkpoint_origin(ckpt: Path) -> Origin:
    m = read_manifest(ckpt)
    parent = ckpt.resolve().parent
    name = parent.parent.name if parent.name == CHECKPOINTS else ckpt.resolve().name
    return Origin("checkpoint", ckpt, m.step, name, m.weights_sha256, **_base_fields(m))


def _base_fields(m: Manifest) -> dict[str, str]:
    return {"base_sha256": m.base["sha256"], "base_path": m.base["path"]} if m.base else {}


def load_model(path: str | os.PathLike, *, device: Any = None, dtype: torch.dtype | None = None,
               into: torch.nn.Module | None = None, quantize: str | None = None) -> Loaded:
    """The one way lmforge loads weights: a run directory (its newest intact checkpoint), a
    checkpoint directory, a model directory or an adapter directory, verified, into a new model in
    eval mode on `device` (default: `util.default_device()`), fp32 as stored unless `dtype` casts
    it. A LoRA run's checkpoint (or an adapter directory) gives its base with the adapter attached.

    quantize: None loads the weights as stored (a directory with int8 weights gives an int8
    model, lmforge/quant.py); "fp32", "f16" or "int8" gives a model prepared for inference with
    its weights held that way (`quant.prepare`; "fp32" dequantises stored int8 exactly).

    into: copy the weights into this existing model instead (its names and shapes must fit; it
    keeps its device, dtype and mode): `init.from` loads a model it has already built; a LoRA's
    adapter is folded into the base's weights there. Stored int8 weights are dequantised into it."""
    origin = resolve_origin(path)
    if origin.is_adapter:
        return _load_lora(origin, device=device, dtype=dtype, into=into)
    cfg = read_config(origin.path)
    tok = Tokenizer.load(origin.path / TOKENIZER_FILE)
    tok.use_model_facts(tokenizer_facts(origin.path, cfg, tok))  # a fine-tune keeps its origin's chat template
    tensors, quantized = read_weights(origin.path)
    source = f"{origin.path / MODEL_FILE}"
    if into is not None:
        load_weights(into, tensors, source)
        return Loaded(into, tok, cfg, origin)  # type: ignore[arg-type]
    from .model import Transformer
    from .util import default_device

    model = Transformer(cfg.model)
    load_weights(model, tensors, source)
    del tensors
    model = model.eval().to(device if device is not None else default_device())
    if dtype is not None:
        model = model.to(dtype)
    if quantize is None and quantized:
        quantize = "int8"
    if quantize is not None:
        from .quant import prepare

        prepare(model, quantize, stored=quantized)
    return Loaded(model, tok, cfg, origin)


# ---- LoRA adapters -----------------------------------------------------------------------------


@dataclass
class LoraParts:
    """What a LoRA checkpoint or adapter directory loads into: its verified base and the adapter."""

    base: Origin
    cfg: Config  # the base's model section, the adapter's lora section
    tokenizer: Tokenizer
    facts: dict[str, Any]  # tokenizer facts (chat template, end of turn)
    base_tensors: dict[str, torch.Tensor]
    lora: Any  # config.LoraConfig of adapter_config.json
    adapter: dict[str, torch.Tensor]  # PEFT-named A and B


def find_base(origin: Origin) -> Origin:
    """The verified base model of a LoRA checkpoint or adapter directory: the path its manifest
    recorded, else (a checkpoint) its run's init.from. A base whose weights' sha256 is not the
    recorded one is refused naming both checksums: an adapter only means something on its own base."""
    candidates = [origin.base_path]
    if origin.kind == "checkpoint":
        init = read_config(origin.path).init.from_
        if init and init not in candidates:
            candidates.append(init)
    found = [c for c in candidates if c and Path(c).exists()]
    if not found:
        raise CheckpointError(f"the base model of the LoRA adapter {origin.path} is not found (looked for "
                              f"{' and '.join(c for c in candidates if c)}); it was the model with sha256 {origin.base_sha256}: "
                              "put it back there, or serve the adapter on it: lmforge serve BASE --adapter NAME=" + str(origin.path))
    for where in found:  # the recorded path may hold another model by now: the run's init.from may still fit
        with contextlib.suppress(CheckpointError):
            base = resolve_origin(where)
            if base.model_sha256 == origin.base_sha256 and not base.is_adapter:
                return base
    base = resolve_origin(found[0])  # none fits: refused, naming the first one's checksum
    check_base(origin, base, found[0])
    return base


def check_base(adapter: Origin, base: Origin, where: str | os.PathLike) -> None:
    """Refuse `base` for `adapter` unless it is the model the adapter was trained on (by sha256)."""
    if base.is_adapter:
        raise CheckpointError(f"{where} is itself a LoRA adapter (on {base.base_path}); an adapter's base must be whole "
                              "weights: a model directory or a full fine-tune's checkpoint")
    if base.model_sha256 != adapter.base_sha256:
        raise CheckpointError(f"the LoRA adapter {adapter.path} was trained on the base model with sha256 "
                              f"{adapter.base_sha256}, but {where} has sha256 {base.model_sha256}: another model; "
                              f"use the adapter's own base ({adapter.base_path})")


def read_adapter_config(directory: str | os.PathLike) -> Any:
    """A LoRA checkpoint's or adapter directory's adapter_config.json as a config.LoraConfig."""
    from .lora import config_from_peft

    path = Path(directory) / ADAPTER_CONFIG
    return config_from_peft(read_json(path), str(path))


def read_adapter_tensors(origin: Origin) -> dict[str, torch.Tensor]:
    """The adapter's PEFT-named tensors, checked against the sha256 its manifest recorded (the
    server loads adapters long after it verified their directories)."""
    path = origin.path / ADAPTER_FILE
    if sha256_file(path) != origin.model_sha256:
        raise CheckpointError(f"{path} fails its sha256 check (changed or corrupt since the server started)")
    return load_safetensors(path)


def lora_parts(origin: Origin, base: Origin | None = None) -> LoraParts:
    """Everything a LoRA checkpoint or adapter directory loads: base (found and verified, or the
    given one, checked), tensors, config, tokenizer."""
    from .lora import check_adapter, split_tensors

    base = base or find_base(origin)
    lora = read_adapter_config(origin.path)
    if origin.kind == "checkpoint":
        cfg = read_config(origin.path)
        tok = Tokenizer.load(origin.path / TOKENIZER_FILE)
        facts = tokenizer_facts(origin.path, cfg, tok)
    else:
        cfg = read_config(base.path)
        tok = Tokenizer.load(base.path / TOKENIZER_FILE)
        facts = tokenizer_facts(base.path, cfg, tok)
    cfg = replace(cfg, lora=lora)
    base_tensors = check_tensors(cfg.model, load_safetensors(base.path / MODEL_FILE), str(base.path / MODEL_FILE))
    adapter = load_safetensors(origin.path / ADAPTER_FILE)
    check_adapter(lora, split_tensors(adapter, str(origin.path / ADAPTER_FILE)), expected_shapes(cfg.model),
                  str(origin.path / ADAPTER_FILE))
    return LoraParts(base, cfg, tok, facts, base_tensors, lora, adapter)


def _load_lora(origin: Origin, *, device: Any, dtype: torch.dtype | None, into: torch.nn.Module | None) -> Loaded:
    from .lora import attach, load_adapter, merge

    parts = lora_parts(origin)
    tok = parts.tokenizer
    tok.use_model_facts(parts.facts)
    source = str(origin.path / ADAPTER_FILE)
    if into is not None:  # a new run starts from the merged weights
        load_weights(into, merge(parts.base_tensors, parts.lora, parts.adapter, source), str(origin.path))
        return Loaded(into, tok, parts.cfg, origin, parts.base)  # type: ignore[arg-type]
    from .model import Transformer
    from .util import default_device

    model = Transformer(parts.cfg.model)
    load_weights(model, parts.base_tensors, str(parts.base.path / MODEL_FILE))
    attach(model, parts.lora, init=False)
    load_adapter(model, parts.adapter, source)
    model = model.eval().to(device if device is not None else default_device())
    if dtype is not None:
        model = model.to(dtype)
    return Loaded(model, tok, parts.cfg, origin, parts.base)


def write_adapter_dir(out: str | os.PathLike, tensors: dict[str, torch.Tensor], lora: Any, base: Origin,
                      overwrite: bool = False) -> Path:
    """An adapter directory (atomically): PEFT's adapter_model.safetensors and adapter_config.json
    (base_model_name_or_path: the base's path) and a manifest recording the base's sha256."""
    from safetensors.torch import save_file

    from .lora import peft_config

    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another --out or pass --overwrite")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        atomic_write_json(tmp / ADAPTER_CONFIG, peft_config(lora, str(base.path)))
        write_manifest(tmp, kind="adapter", extra={BASE_MODEL: base_record(base)})
    return out


def base_record(base: Origin) -> dict[str, str]:
    """What a LoRA checkpoint's or adapter's manifest records about its base model."""
    return {"sha256": base.model_sha256, "path": str(base.path.resolve())}


# ---- helpers ---------------------------------------------------------------------------------


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from a file lmforge reads back (or a model's config.json, tokenizer_config.json),
    or a CheckpointError naming the file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


__all__ = [
    "MANIFEST", "MODEL_FILE", "CONFIG_FILE", "TOKENIZER_FILE", "TOKENIZER_CONFIG", "SOURCE_FILE", "TRAINER_FILE",
    "TRAIN_STATE", "CHECKPOINTS", "LATEST", "METRICS_FILE", "EVENTS_FILE", "EVAL_RESULTS_FILE", "FAULTS_FIRED_FILE",
    "QUICKSTART_FILE", "LAST_ERROR_FILE", "CLASSIFIER_HEAD", "CLASSIFIER_MODEL", "FORMAT_VERSION", "REQUIRED_FILES",
    "Manifest", "manifest_checksum", "write_manifest", "read_manifest", "verify_manifest",
    "checkpoint_name", "checkpoints_dir", "list_checkpoints", "checkpoint_step", "is_checkpoint_dir",
    "verify_checkpoint", "scan_checkpoints", "find_resume_checkpoint", "resolve_checkpoint", "read_config",
    "read_trainer_state", "Bundle", "is_model_dir", "verify_model_dir", "read_model_dir", "write_model_dir",
    "read_bundle", "quantization_record", "stored_quantization", "read_weights", "origin_facts", "tokenizer_facts", "expected_shapes", "check_tensors", "load_safetensors",
    "load_weights", "Origin", "Loaded", "resolve_origin", "load_model", "read_json",
    "ADAPTER_FILE", "ADAPTER_CONFIG", "BASE_MODEL", "LoraParts", "find_base", "check_base", "read_adapter_config",
    "read_adapter_tensors", "lora_parts", "write_adapter_dir", "base_record",
]
