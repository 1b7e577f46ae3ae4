"""`init.from`: start a new run from the weights of a run, a checkpoint or a model directory.

The source is whatever `artifacts.load_model` accepts (`--set init.from=runs/exp1`, a checkpoint
directory, `models/smol` from `lmforge import`), verified the same way. Policy: the source decides
its architecture. A model key the user left at its default is filled from the source's config; one
the user set to a different value is an error (it would not fit the weights). The `embed:` section
(pooling, prefixes) follows the same fill-in rule, but a key set here (to another value than its
default) simply wins. `max_seq_len` and
`init_std` may be set freely (RoPE tables and the init of nothing, respectively). The dataset must
have been prepared with the source's own tokenizer (same sha256), or token ids would mean
different words; contrastive pairs from `data.pairs` are tokenized with that tokenizer itself.

Only a fresh run loads the weights (step 0, a fresh optimizer); a run that resumes loads its own
checkpoint, and `init.from` is then only checked (its config and tokenizer must still be readable).

The DPO reference (train/objectives.py) is the weights a run started from. A fresh run copies them
as it loads them; every checkpoint records where they came from (`reference_record`: the resolved
directory, absolute, and the sha256 of its model.safetensors), and a resume re-derives them
(`load_reference`): from `init.from` as configured now when its weights still have that sha256
(a model directory; a source run that has not moved on), else from the exact checkpoint or model
directory recorded. The sha256 makes the reference of a resumed run the one it started with, bit
for bit, or the resume is refused: a reference that changed would make a different run.
A run directory given as the source is resolved twice, once by the check and once by the load (each
verifies the checksums): a source run that checkpoints meanwhile gives the newer weights, which the
check's shape and tokenizer rules still fit.

LoRA (lora.rank > 0): init.from is the frozen base, loaded on every start (fresh or resumed: the
run's checkpoints hold the adapter alone), and the adapter is attached to it (lmforge/lora.py).
init.from may also be a LoRA run or adapter directory: then its base is the base, and a fresh run
starts from its adapter (with the same rank and layers), e.g. preference tuning after a LoRA SFT.
A full fine-tune from a LoRA source starts from the adapter folded into its base.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from ..artifacts import TOKENIZER_FILE, Loaded, Origin, find_base, load_model, load_weights, lora_parts, read_config, resolve_origin
from ..config import Config, EmbedConfig, ModelConfig
from ..errors import CheckpointError, ConfigError
from ..tokenizer import Tokenizer
from ..util import console

# Model keys that define the weights' shapes or meaning; the source decides them.
ARCH_KEYS = ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "rope_theta", "rope_scaling", "rope_factor",
             "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_len", "norm_eps", "tie_embeddings")


def resolve_init(cfg: Config) -> Config:
    """Take the model section from `init.from`'s config and check that the data matches it."""
    from ..data.loader import TokenDataset

    src = cfg.init.from_
    try:
        origin = resolve_origin(src)
    except CheckpointError as e:
        raise ConfigError(f"init.from = {src}: {e}") from None
    shaped_by = find_base(origin).path if origin.kind == "adapter" else origin.path  # an adapter directory holds no config
    source_cfg = read_config(shaped_by)
    source = source_cfg.model
    default = ModelConfig()
    for key in ARCH_KEYS:
        mine, theirs = getattr(cfg.model, key), getattr(source, key)
        if mine != getattr(default, key) and mine != theirs and not (key == "n_kv_head" and cfg.model.kv_heads == source.kv_heads):
            raise ConfigError(
                f"model.{key} = {mine!r} does not match init.from {src} ({key} = {theirs!r}); "
                f"remove model.{key} from the config (the model in init.from decides its shape)"
            )
        setattr(cfg.model, key, theirs)
    if cfg.model.max_seq_len == default.max_seq_len:
        cfg.model.max_seq_len = source.max_seq_len
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len ({cfg.data.seq_len}) is longer than model.max_seq_len ({cfg.model.max_seq_len})")
    inherit_embed(cfg, source_cfg.embed)
    if not cfg.data.datasets:  # contrastive pairs from data.pairs: tokenized with the source's own tokenizer
        return cfg
    ds = TokenDataset(cfg.data.datasets[0])  # data.mix: its datasets share one tokenizer (start.resolve_mix)
    model_sha = Tokenizer.load(shaped_by / TOKENIZER_FILE).sha256
    data_sha = ds.manifest.get("tokenizer_sha256")
    if data_sha != model_sha:
        raise ConfigError(
            f"data.path {ds.path} was prepared with another tokenizer (sha256 {str(data_sha)[:12]}...) than "
            f"init.from {src} ({model_sha[:12]}...); prepare the corpus with the model's tokenizer: "
            f"lmforge prepare CORPUS --tokenizer {origin.path} --out DATA"
        )
    return cfg


def inherit_embed(cfg: Config, source: EmbedConfig) -> None:
    """The `embed:` keys (pooling, prefixes) the user left at their defaults take init.from's values,
    so a model keeps how it embeds through further training; a key set to another value wins (no weights
    depend on it)."""
    default = EmbedConfig()
    for f in fields(EmbedConfig):
        if getattr(cfg.embed, f.name) == getattr(default, f.name):
            setattr(cfg.embed, f.name, getattr(source, f.name))


def load_init(model: torch.nn.Module, cfg: Config) -> Loaded:
    """Load `init.from`'s weights into a freshly built model (its shape was set by `resolve_init`)."""
    loaded = load_model(cfg.init.from_, into=model)
    console.print(f"initialised weights from {loaded.origin.path} ({loaded.origin.describe()})")
    return loaded


def origin_record(loaded: Loaded) -> dict[str, Any]:
    """What a run records about the weights it started from (its start event)."""
    return _record(loaded.origin)


def _record(o: Origin) -> dict[str, Any]:
    out = {"path": str(o.path), "kind": o.kind, "step": o.step, "model_sha256": o.model_sha256}
    return out | ({"base_model_sha256": o.base_sha256} if o.is_adapter else {})


def load_lora_init(model: torch.nn.Module, cfg: Config) -> tuple[Origin, Path, dict[str, Any]]:
    """A LoRA run's start: init.from's weights (the base of a LoRA source) into the built model,
    every weight frozen, an adapter attached (a LoRA source's own adapter, else a fresh one).
    Returns the base, the directory whose tokenizer facts the run carries on, and the start record."""
    from ..lora import attach, load_adapter

    origin = resolve_origin(cfg.init.from_)
    if not origin.is_adapter:
        loaded = load_model(cfg.init.from_, into=model)
        attach(model, cfg.lora)
        console.print(f"LoRA rank {cfg.lora.rank} on {loaded.origin.path} ({loaded.origin.describe()}), frozen")
        return loaded.origin, loaded.origin.path, origin_record(loaded)
    parts = lora_parts(origin)
    mine, theirs = cfg.lora, parts.lora
    if (mine.rank, sorted(mine.target_modules)) != (theirs.rank, sorted(theirs.target_modules)):
        raise ConfigError(f"init.from {cfg.init.from_} is a rank-{theirs.rank} LoRA adapter of {sorted(theirs.target_modules)}; "
                          f"this run's is rank {mine.rank} of {sorted(mine.target_modules)}: set lora.rank and "
                          "lora.target_modules to the adapter's to continue it")
    load_weights(model, parts.base_tensors, str(parts.base.path))
    attach(model, cfg.lora)
    load_adapter(model, parts.adapter, str(origin.path))
    console.print(f"LoRA rank {cfg.lora.rank} on {parts.base.path}, frozen; adapter from {origin.path} ({origin.describe()})")
    facts = origin.path if origin.kind == "checkpoint" else parts.base.path
    return parts.base, facts, _record(origin)


def reference_record(origin: Origin) -> dict[str, Any]:
    """What a checkpoint records about a DPO run's reference weights (module docstring)."""
    return {"path": str(origin.path.resolve()), "model_sha256": origin.model_sha256}


def load_reference(record: dict[str, Any], cfg: Config) -> torch.nn.Module:
    """A DPO run's reference weights, re-derived from `init.from` or the recorded directory,
    whichever has the recorded sha256 (module docstring), as a new model on the CPU."""
    from ..model import Transformer

    want, tried = record["model_sha256"], []
    for path in dict.fromkeys(p for p in (cfg.init.from_, record["path"]) if p):
        try:
            origin = resolve_origin(path)
        except CheckpointError as e:
            tried.append(str(e))
            continue
        if origin.model_sha256 == want:
            reference = Transformer(cfg.model)
            load_model(origin.path, into=reference)
            console.print(f"DPO reference: the weights of {origin.path} ({origin.describe()})")
            return reference
        tried.append(f"{origin.path} now holds other weights (sha256 {origin.model_sha256[:12]}…)")
    raise CheckpointError(
        f"cannot resume: this DPO run's reference, the weights it started from (model.safetensors sha256 {want[:12]}…, "
        f"from {record['path']}), is not found ({'; '.join(tried)}); restore that directory, or start a new run"
    )
