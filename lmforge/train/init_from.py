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
A run directory given as the source is resolved twice, once by the check and once by the load (each
verifies the checksums): a source run that checkpoints meanwhile gives the newer weights, which the
check's shape and tokenizer rules still fit.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import torch

from ..artifacts import TOKENIZER_FILE, Loaded, load_model, read_config, resolve_origin
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
    source_cfg = read_config(origin.path)
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
    if not cfg.data.path:  # contrastive pairs from data.pairs: tokenized with the source's own tokenizer
        return cfg
    ds = TokenDataset(cfg.data.path)
    model_sha = Tokenizer.load(origin.path / TOKENIZER_FILE).sha256
    data_sha = ds.manifest.get("tokenizer_sha256")
    if data_sha != model_sha:
        raise ConfigError(
            f"data.path {cfg.data.path} was prepared with another tokenizer (sha256 {str(data_sha)[:12]}...) than "
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
    o = loaded.origin
    return {"path": str(o.path), "kind": o.kind, "step": o.step, "model_sha256": o.model_sha256}
