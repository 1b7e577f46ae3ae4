"""Typed configuration: YAML -> dataclasses -> dotted overrides -> validation.

Design: one dataclass per concern (model, data, train, guard, eval, serve, init), grouped in
`Config`. Config flows one way: a YAML file (or nothing) is parsed into plain dicts, merged with
`--set section.key=value` overrides, converted field by field into the dataclasses with type
checks and each field's valid values, then validated as a whole (cross-field rules such as "global
batch divisible by micro batch"). The resolved config is written into the run directory and every
checkpoint, and `Config.from_dict(cfg.to_dict()) == cfg` always holds.

A field's valid values are written once, beside it: `lr: float = valid(3e-4, positive_float())`
(the rules live in ranges.py; a field without one follows its type's: a finite float, a 64-bit int,
UTF-8 text). The same rule checks the value whether it comes from YAML, `--set` or a checkpoint,
gives a command-line flag that sets the same value its argparse type (`rule_of("serve.max_batch")`),
fills the `valid` column of docs/config.md, and lets tests/test_bad_input.py derive bad values.

Trade-off: we hand-roll the ~100 lines of type conversion instead of pulling in pydantic, because
the rules are few, the error messages are ours to shape (the nearest valid key for a typo), and the
dataclasses stay plain, picklable-free and importable everywhere.
"""

from __future__ import annotations

import ast
import difflib
import io
import json
import math
import os
import tokenize
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from .bundled import bundled_names, resolve_bundled
from .errors import ConfigError
from .ranges import (MIX_MAX_REPEAT, MIX_WEIGHTS, Choice, Range, Rule, any_int, default_rule, fraction, nonneg_float,
                     nonneg_int, positive_float, positive_int, thread_count)


ROPE_SCALINGS = ("", "llama3")  # model.rope_scaling values lmforge implements
SCHEDULES = ("cosine", "wsd", "constant")  # train.schedule values (train/optim.py)
DTYPES = ("auto", "fp32", "bf16")  # train.dtype values
PARALLELS = ("none", "ddp", "fsdp")  # train.parallel values (train/distributed.py)
# The largest vocabulary lmforge accepts (model.vocab_size, prepare --vocab-size): 4x the largest in
# use (Gemma's 256K). The BPE trainer sizes its tables by it (`prepare --vocab-size 1000000000` tried to
# allocate 70 GB and aborted), and every token costs a row of the embedding.
MAX_VOCAB_SIZE = 1 << 20
VOCAB_SIZE = positive_int(hi=MAX_VOCAB_SIZE)  # a tokenizer to train (prepare --vocab-size, plan --vocab-size)
# The most sequences one optimizer step may read (train.global_batch, data inspect --global-batch):
# a step's sample ids are computed at once (8 bytes each). 1M sequences of 2,048 tokens is 2B tokens a
# step, 500x what Llama trained with.
MAX_GLOBAL_BATCH = 1 << 20


def valid(default: Any, rule: Rule) -> Any:
    """A dataclass field whose valid values are `rule` (a ranges.Range, Choice or Text): Config.validate
    checks it, the command line flags that set the same value use it, tests derive bad values from it."""
    return field(default=default, metadata={"valid": rule})
# train.objective values: the objectives registered in train/objectives.py (REGISTRY; a test keeps
# the two equal). Named here because config sits below train/ and validates at load time.
OBJECTIVES = ("next_token", "dpo", "contrastive")
POOLINGS = ("mean", "last", "weighted_mean")  # embed.pooling values (lmforge/understand/embed.py)
# lora.target_modules values: the Linear layers of a block, by their Hugging Face Llama names (so a
# PEFT adapter's target_modules mean the same layers; lmforge/lora.py)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelConfig:
    """Llama-style decoder shape. Names follow Hugging Face `LlamaConfig` where one exists."""

    # 0 -> the prepared dataset's tokenizer size, resolved when a run starts
    vocab_size: int = valid(0, nonneg_int(hi=MAX_VOCAB_SIZE, note="0 = the dataset's tokenizer size"))
    n_layer: int = valid(4, positive_int())  # transformer blocks
    n_head: int = valid(4, positive_int())  # attention (query) heads; d_model must divide by it
    n_kv_head: int = valid(0, nonneg_int(note="0 = model.n_head"))  # 0 -> same as n_head (plain multi-head attention)
    d_model: int = valid(256, positive_int())  # width of the residual stream (hidden size)
    d_ff: int = valid(0, nonneg_int(note="0 = automatic"))  # 0 -> SwiGLU default: 8/3 * d_model rounded up to a multiple of 64
    max_seq_len: int = valid(256, positive_int())  # longest context (RoPE tables, KV cache)
    rope_theta: float = valid(10000.0, positive_float())  # RoPE base frequency
    # RoPE frequency scaling (HF `rope_scaling`): "" = plain RoPE; "llama3" = Llama 3.1/3.2's scheme
    # (model.py `llama3_inv_freq`), which uses the four fields below and ignores them otherwise.
    rope_scaling: str = valid("", Choice(ROPE_SCALINGS, note="'' = plain RoPE"))
    rope_factor: float = valid(1.0, positive_float())  # long wavelengths are divided by this (HF `factor`)
    rope_low_freq_factor: float = valid(1.0, positive_float())  # wavelengths above original_max_len / this are scaled fully
    rope_high_freq_factor: float = valid(4.0, positive_float())  # wavelengths below original_max_len / this are kept
    # the pretraining context (HF `original_max_position_embeddings`)
    rope_original_max_len: int = valid(0, nonneg_int(note="0 = unset; llama3 needs it"))
    norm_eps: float = valid(1e-5, positive_float())  # RMSNorm epsilon
    tie_embeddings: bool = True  # the output head shares the token embedding matrix
    init_std: float = valid(0.02, positive_float())  # std of the normal weight init (residual projections: / sqrt(2 n_layer))

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ff_dim(self) -> int:
        if self.d_ff:
            return self.d_ff
        return 64 * -(-(8 * self.d_model // 3) // 64)


@dataclass
class DataConfig:
    path: str = ""  # a prepared dataset directory (lmforge prepare --out)
    seq_len: int = valid(256, positive_int())  # tokens per sample; a sample reads seq_len + 1 tokens
    seed: int = valid(0, any_int())  # seeds the sample order (data/order.py)
    # attention stays inside each document of a row, and RoPE positions restart at each: packed
    # conversations never see each other. auto: on for SFT data (prepare --sft), off for pretraining
    document_mask: Literal["auto", "true", "false"] = valid("auto", Choice(("auto", "true", "false")))
    packing: bool = True  # SFT data: several whole conversations per row; false: one per row, padded
    # train.objective contrastive: a JSONL of pairs (docs/embeddings.md), tokenized with init.from's tokenizer and
    # cut to data.seq_len tokens each; empty: the pairs are two random spans of each document of data.path
    pairs: str = ""
    # data.pairs: the record fields of the query, its positive and (optional, in every record or none) a hard negative
    pair_fields: list[str] = field(default_factory=lambda: ["query", "positive", "negative"])
    # data.pairs: the share of pairs held out for val_loss (chosen by a hash of each pair's text)
    pairs_val_fraction: float = valid(0.05, fraction(hi_open=True))
    # train on several prepared datasets instead of data.path: {dataset path: weight}; a weight is the share of
    # samples read from it (docs/data.md: the mixed order); weight 0: validated on (val_loss/NAME), never trained on
    mix: dict[str, float] = field(default_factory=dict, metadata={"valid": MIX_WEIGHTS})
    # data.mix: a dataset may be read at most this many passes over its train split; a run that needs more is refused
    mix_max_repeat: float = valid(4.0, MIX_MAX_REPEAT)

    @property
    def datasets(self) -> list[str]:
        """The prepared datasets the run reads: data.mix's paths, else data.path (none when unset)."""
        return list(self.mix) if self.mix else [self.path] if self.path else []


@dataclass
class TrainConfig:
    # sequences per optimizer step, whatever the micro batch / world size
    global_batch: int = valid(32, positive_int(hi=MAX_GLOBAL_BATCH))
    micro_batch: int = valid(8, positive_int())  # sequences per forward/backward on one process
    max_steps: int = valid(1000, positive_int())  # optimizer steps of the run; the schedule is laid out over them
    lr: float = valid(3e-4, positive_float())  # peak learning rate (after warmup)
    min_lr_ratio: float = valid(0.1, fraction())  # final lr = lr * min_lr_ratio
    warmup_steps: int = valid(100, nonneg_int())  # linear warmup to lr over this many steps
    schedule: str = valid("cosine", Choice(SCHEDULES))  # learning-rate schedule: cosine | wsd | constant (train/optim.py)
    decay_fraction: float = valid(0.2, fraction(lo_open=True))  # wsd: fraction of max_steps spent decaying at the end
    # AdamW decoupled weight decay on 2-D weights (not embeddings or norms)
    weight_decay: float = valid(0.1, nonneg_float())
    beta1: float = valid(0.9, fraction(hi_open=True))  # AdamW first-moment decay
    beta2: float = valid(0.95, fraction(hi_open=True))  # AdamW second-moment decay
    eps: float = valid(1e-8, positive_float())  # AdamW epsilon
    # clip the global gradient norm to this; 0 disables clipping
    grad_clip: float = valid(1.0, nonneg_float(note="0 disables clipping"))
    # compute precision: auto | fp32 | bf16 (bf16: autocast; master weights stay fp32). auto: bf16 where the
    # device multiplies bf16 natively (CUDA with bf16 support; a CPU with AMX-BF16 or AVX512-BF16), else fp32,
    # decided once when a run starts and written into its config (a resume keeps the run's dtype)
    dtype: str = valid("auto", Choice(DTYPES))
    compile: bool = False  # run the forward pass through torch.compile
    threads: int = valid(0, thread_count(note="0 = lmforge chooses"))  # torch intra-op threads; 0 -> the cores other processes leave free (lmforge/threads.py)
    seed: int = valid(0, any_int())  # seeds weight init
    log_every: int = valid(10, positive_int())  # write a metrics line (loss, lr, grad norm, throughput) every N steps
    eval_every: int = valid(200, nonneg_int(note="0 disables"))  # validation loss every N steps; 0 disables
    # micro batches of the val split per validation; 0 -> the whole val split (as `lmforge eval --max-batches 0`)
    eval_batches: int = valid(20, nonneg_int(note="0 = the whole val split"))
    # save a checkpoint every N steps; 0 disables step cadence
    ckpt_every_steps: int = valid(200, nonneg_int(note="0 disables"))
    # also save one every N minutes of training; 0 disables time cadence
    ckpt_every_minutes: float = valid(0.0, nonneg_float(note="0 disables"))
    keep_last: int = valid(3, positive_int())  # retention: keep the newest K checkpoints (plus those keep_every keeps)
    # retention: also keep every checkpoint whose step is a multiple of M (0: none)
    keep_every: int = valid(0, nonneg_int(note="0 = none"))
    # data parallelism under torchrun: none | ddp | fsdp (docs/distributed.md)
    parallel: str = valid("none", Choice(PARALLELS))
    deterministic_reduce: bool = False  # sum micro-batch gradients in a fixed order: bit-identical on any world size
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory)
    # what the loss is (train/objectives.py): next_token (with the data's loss mask) | dpo (preference pairs
    # from `prepare --dpo`, against the frozen init.from weights as the reference) | contrastive (embeddings:
    # in-batch negatives, docs/embeddings.md)
    objective: str = valid("next_token", Choice(OBJECTIVES))
    # dpo: how far the policy may move from the reference (the beta of DPO's loss): larger keeps it closer
    dpo_beta: float = valid(0.1, positive_float())
    # contrastive: similarities (cosines) are divided by this before the softmax; lower is sharper
    contrastive_temperature: float = valid(0.05, positive_float(hi=10.0))


@dataclass
class GuardConfig:
    enabled: bool = True  # watch loss and gradient norm; roll back on a spike or a non-finite value
    window: int = valid(50, positive_int())  # steps of history the detector looks at
    warmup: int = valid(50, nonneg_int())  # no spike verdict before this many steps of history
    spike_factor: float = valid(6.0, positive_float())  # robust z-score (median/MAD) above which a step is a spike
    patience: int = valid(1, positive_int())  # consecutive spiking steps before acting
    rollback_margin: int = valid(0, nonneg_int())  # roll back to a checkpoint at least this many steps before
    skip_steps: int = valid(0, nonneg_int())  # data window skipped after a rollback, in steps
    lr_scale: float = valid(1.0, positive_float())  # lr multiplier applied after each rollback
    # give up (TrainingUnstable) after this many rollbacks within 10 * window steps
    max_rollbacks: int = valid(5, nonneg_int())


@dataclass
class EvalConfig:
    batch_size: int = valid(8, positive_int())  # rows per forward in `lmforge eval` (--batch-size overrides)
    # torch threads of the `eval --watch` sidecar beside training (--threads overrides)
    threads: int = valid(1, thread_count(lo=1, note=""))
    tasks: list[str] = field(default_factory=list)  # task files or bundled task names the sidecar scores by default


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # address `lmforge serve` binds; other than loopback needs an API key or --insecure
    port: int = valid(8000, Range(int, lo=1, hi=65535))  # TCP port `lmforge serve` listens on
    max_batch: int = valid(16, positive_int())  # requests decoded together in the running batch
    # requests waiting for a slot before new ones get HTTP 429 (0: none wait, a busy server answers 429 at once)
    max_queue: int = valid(64, nonneg_int())
    max_tokens: int = valid(256, positive_int())  # the largest max_tokens a request may ask for
    # the most inputs (texts or token lists) one /v1/embeddings request may carry
    max_embed_inputs: int = valid(256, positive_int())
    # LoRA adapters (serve --adapter) held in memory at once; the least recently used one is unloaded to load another
    max_adapters: int = valid(16, positive_int(hi=4096))


@dataclass
class EmbedConfig:
    # How token states become one vector (docs/embeddings.md): mean | last (the last token's state) |
    # weighted_mean (position-weighted mean, later tokens weigh more; the best raw pooling measured).
    pooling: str = valid("weighted_mean", Choice(POOLINGS))
    normalize: bool = True  # L2-normalise each vector, so a dot product is the cosine similarity
    bidirectional: bool = False  # embedding passes attend both ways (only for a model trained so; no sentence-transformers export)
    query_prefix: str = ""  # text put before every query (`embed --kind query`, search), e.g. "query: "
    document_prefix: str = ""  # text put before every document (`embed`, index), e.g. "passage: "


@dataclass
class LoraConfig:
    # LoRA rank r: train a low-rank adapter (B A, r x in and out x r per target layer) on a frozen base model
    # (init.from) instead of every weight; 0 = off, a full fine-tune (lmforge/lora.py, docs/finetune.md)
    rank: int = valid(0, nonneg_int(hi=4096, note="0 = off: every weight trains"))
    alpha: float = valid(16.0, positive_float())  # the adapter's output is scaled by alpha / rank (PEFT's lora_alpha)
    dropout: float = valid(0.0, fraction(hi_open=True))  # dropout on the adapter's input while training (PEFT's lora_dropout)
    # the layers that get an adapter, by name, in every block (PEFT's target_modules)
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS), metadata={"valid": Choice(LORA_TARGETS)})

    @property
    def scaling(self) -> float:
        """What the adapter's output is multiplied by: alpha / rank (0 when off)."""
        return self.alpha / self.rank if self.rank else 0.0


@dataclass
class InitConfig:
    from_: str = ""  # a model directory (lmforge import) to initialise weights from


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)  # the decoder's shape (Llama-style)
    data: DataConfig = field(default_factory=DataConfig)  # the prepared dataset and how samples are cut from it
    train: TrainConfig = field(default_factory=TrainConfig)  # batches, optimizer, schedule, precision, checkpoints
    guard: GuardConfig = field(default_factory=GuardConfig)  # spike detection and rollback of training
    eval: EvalConfig = field(default_factory=EvalConfig)  # `lmforge eval` and its --watch sidecar
    serve: ServeConfig = field(default_factory=ServeConfig)  # defaults of `lmforge serve`
    init: InitConfig = field(default_factory=InitConfig)  # where a new run's weights come from
    embed: EmbedConfig = field(default_factory=EmbedConfig)  # how the model turns a text into a vector (pooling, prefixes)
    lora: LoraConfig = field(default_factory=LoraConfig)  # train a LoRA adapter on a frozen base instead of every weight

    # ---- conversion ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for f in fields(self):
            section = getattr(self, f.name)
            out[f.name] = {_yaml_key(g.name): _copy(getattr(section, g.name)) for g in fields(section)}
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None, source: str = "config",
                  overridden: dict[str, str] | None = None) -> "Config":
        """`overridden` maps "section.key" to the `--set` item that gave its value, so an error in
        that value names the `--set` rather than `source`."""
        raw = raw or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
        kwargs = {}
        section_fields = {f.name: f for f in fields(cls)}
        for name in raw:
            if name not in section_fields:
                raise ConfigError(_unknown(source, str(name), list(section_fields), "section"))
        for name in section_fields:
            section_cls = _HINTS[cls][name]
            kwargs[name] = _build_section(section_cls, raw.get(name) or {}, f"{source}: {name}", name, overridden or {})
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | os.PathLike) -> None:
        from .util import atomic_write_text

        atomic_write_text(path, self.to_yaml())

    def diff(self, other: "Config") -> dict[str, tuple[Any, Any]]:
        """{"section.key": (self value, other value)} for every key that differs."""
        a, b = self.to_dict(), other.to_dict()
        return {
            f"{s}.{k}": (a[s][k], b[s][k]) for s in a for k in a[s] if a[s][k] != b[s][k]
        }

    # ---- validation ------------------------------------------------------------------------
    def validate(self) -> None:
        """Each value against its field's rule (`valid(...)`, or the type's: finite, int64, text), then
        the rules between values."""
        for f in fields(self):
            section = getattr(self, f.name)
            for g in fields(section):
                value = getattr(section, g.name)
                rule = field_rule(type(section), g.name)
                for v in value if isinstance(value, list) else [value]:
                    if rule is not None:
                        rule.check(f"{f.name}.{_yaml_key(g.name)}", v)
        m, d, t = self.model, self.data, self.train
        if m.rope_scaling == "llama3":
            _positive("model.rope_original_max_len", m.rope_original_max_len)
            if not m.rope_low_freq_factor < m.rope_high_freq_factor:
                raise ConfigError(
                    f"model.rope_low_freq_factor ({m.rope_low_freq_factor}) must be > 0 and below "
                    f"model.rope_high_freq_factor ({m.rope_high_freq_factor})"
                )
        if m.d_model % m.n_head:
            raise ConfigError(
                f"model.d_model ({m.d_model}) must be divisible by model.n_head ({m.n_head})"
            )
        if m.head_dim % 2:
            raise ConfigError(f"head dim d_model/n_head = {m.head_dim} must be even for RoPE")
        if m.n_head % m.kv_heads:
            raise ConfigError(
                f"model.n_kv_head ({m.n_kv_head}) must divide model.n_head ({m.n_head}); "
                "use 0 for plain multi-head attention"
            )
        if d.seq_len > m.max_seq_len:
            raise ConfigError(
                f"data.seq_len ({d.seq_len}) is longer than model.max_seq_len ({m.max_seq_len}); "
                f"raise model.max_seq_len or lower data.seq_len"
            )
        if t.global_batch % t.micro_batch:
            raise ConfigError(
                f"train.global_batch ({t.global_batch}) must be divisible by train.micro_batch "
                f"({t.micro_batch}); e.g. set train.micro_batch to a divisor such as "
                f"{_largest_divisor_at_most(t.global_batch, t.micro_batch)}"
            )
        if self.lora.rank and not self.lora.target_modules:
            raise ConfigError("lora.target_modules is empty, so lora.rank > 0 would train nothing; name layers, e.g. "
                              f"[{', '.join(LORA_TARGETS)}], or set lora.rank=0 for a full fine-tune")
        if self.lora.rank and t.parallel == "fsdp":
            raise ConfigError("LoRA (lora.rank > 0) trains a few small matrices on a frozen base: use train.parallel=ddp "
                              "(or none); FSDP shards weights that LoRA never updates")
        if d.mix and d.path:
            raise ConfigError(f"data.path ({d.path}) and data.mix are both set: data.mix names every dataset the run "
                              "reads; set data.path to '' (or data.mix to {})")
        if d.mix and t.objective != "next_token":
            raise ConfigError(f"data.mix mixes datasets for train.objective=next_token (it is {t.objective}); "
                              "train on one dataset with data.path")
        if d.pairs and t.objective != "contrastive":
            raise ConfigError(f"data.pairs ({d.pairs}) is read by train.objective=contrastive only (it is {t.objective}); "
                              "set train.objective=contrastive, or data.pairs to ''")
        if t.objective == "contrastive":
            if d.pairs and d.path:
                raise ConfigError(f"data.pairs ({d.pairs}) and data.path ({d.path}) are both set: the contrastive stage "
                                  "reads one (a JSONL of pairs, or the documents of a prepared dataset); set the other to ''")
            if not self.embed.normalize:
                raise ConfigError("train.objective=contrastive trains cosine similarities: set embed.normalize=true")
        if not 2 <= len(d.pair_fields) <= 3 or len(set(d.pair_fields)) != len(d.pair_fields) or not all(d.pair_fields):
            raise ConfigError(f"data.pair_fields must name 2 or 3 different fields (query, positive[, negative]), "
                              f"got {d.pair_fields!r}")
        if t.deterministic_reduce and t.parallel == "fsdp":
            raise ConfigError(
                "train.deterministic_reduce needs replicated weights (train.parallel=none or ddp); FSDP reduces "
                "sharded gradients through its own reduce-scatter. Use ddp, or set train.deterministic_reduce=false"
            )


def field_rule(cls: type, name: str) -> Rule | None:
    """The valid values of a config field: its `valid(...)` rule, else its type's (ranges.default_rule);
    for a list field, the rule of each item. None for a bool."""
    f = next(g for g in fields(cls) if g.name == name)
    if "valid" in f.metadata:
        return f.metadata["valid"]
    hint = _hints(cls)[name]
    if typing.get_origin(hint) is list:
        (hint,) = typing.get_args(hint)
    return default_rule(hint)


def rule_of(key: str) -> Rule:
    """The rule of a config key "section.key" (for a command-line flag that sets the same value)."""
    section, name = key.split(".")
    cls = _HINTS[Config][section]
    rule = field_rule(cls, next(f.name for f in fields(cls) if _yaml_key(f.name) == name))
    assert rule is not None, key
    return rule


# ---- loading ---------------------------------------------------------------------------------


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or start from defaults), apply `section.key=value` overrides, validate.
    `path` may also name a bundled recipe (`small-cpu`; see bundled.py)."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = resolve_bundled(path, "config")
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {p} is not a file; give a YAML config file")
        raw = _read_yaml(p)
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping of sections at the top level")
    raw = apply_overrides(raw, overrides or [])
    return Config.from_dict(raw, source=source, overridden=_override_items(overrides or []))


MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB; a bigger file is another file given by mistake (a model, a dataset)


def _read_yaml(p: Path) -> Any:
    """The YAML document of a config file, or ConfigError saying in one line why it is none."""
    size = p.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: {size:,} bytes is not a config file (a config is a few KB, at most "
                          f"{MAX_CONFIG_BYTES:,} bytes); give a YAML config file")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a text file (byte {e.start} is not UTF-8); give a YAML config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"{p}: not a config: its YAML nests too deeply") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Merge `section.key=value` strings into a raw config dict (values parsed as YAML scalars)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    sections = {f.name: _HINTS[Config][f.name] for f in fields(Config)}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.lr=3e-4")
        dotted, value = item.split("=", 1)
        parts = dotted.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override key {dotted!r} must be section.key, e.g. train.lr")
        section, key = parts
        if section not in sections:
            raise ConfigError(_unknown("--set", section, list(sections), "section"))
        valid = [_yaml_key(f.name) for f in fields(sections[section])]
        if key not in valid:
            raise ConfigError(_unknown("--set", f"{section}.{key}", [f"{section}.{v}" for v in valid], "key"))
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except (yaml.YAMLError, RecursionError):  # not YAML (or nested beyond the parser): the text itself
            parsed = value
        if not isinstance(out.get(section), dict):
            out[section] = {}
        out[section][key] = parsed
    return out


# ---- helpers ---------------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _yaml_key(name: str) -> str:
    # `from` is a Python keyword, so the field is `from_` and the YAML key is `from`.
    return name[:-1] if name.endswith("_") else name


def _copy(v: Any) -> Any:
    return list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v


def _override_items(overrides: list[str]) -> dict[str, str]:
    """{"section.key": the `--set` item that set it} (the last one wins, as in apply_overrides)."""
    return {item.split("=", 1)[0].strip(): item for item in overrides if "=" in item}


def _build_section(cls: type, raw: Any, where: str, section: str, overridden: dict[str, str]) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(raw).__name__}")
    hints = _hints(cls)
    by_key = {_yaml_key(f.name): f for f in fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in by_key:
            raise ConfigError(_unknown(where, str(key), list(by_key), "key"))
        f = by_key[key]
        dotted = f"{section}.{key}"
        key_where = f"--set {overridden[dotted]}: {dotted}" if dotted in overridden else f"{where}.{key}"
        kwargs[f.name] = _coerce(value, hints[f.name], key_where)
        rule = field_rule(cls, f.name)
        for v in kwargs[f.name] if isinstance(kwargs[f.name], list) else [kwargs[f.name]]:
            if rule is not None and not rule.contains(v):  # here the message can say where the value came from
                raise ConfigError(rule.message(key_where, v))
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:  # a choice of strings; YAML's true/false (and yes/no, on/off) read as "true"/"false"
        allowed = typing.get_args(hint)
        text = str(value).lower() if isinstance(value, bool) else value
        if text not in allowed:
            raise ConfigError(f"{where}: expected one of {', '.join(allowed)}, got {value!r}")
        return text
    if origin is dict:  # {text: number} (data.mix); its rule judges the mapping as a whole
        key_hint, item = typing.get_args(hint)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, e.g. {{data/wiki: 0.7, data/tickets: 0.3}}, got {value!r}")
        return {_coerce(k, key_hint, where): _coerce(v, item, f"{where}[{k}]") for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(hint)
        if value is None:
            return []
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)  # accepts "1e6"
                if f.is_integer():
                    return int(f)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value) if abs(value) < 2**1023 else math.inf  # an int beyond any float: out of every range
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if hint is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {hint!r} at {where}")  # a bug, not a user error


def _unknown(where: str, key: str, valid: list[str], what: str) -> str:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return f"{where}: unknown {what} {key!r}{hint} (valid: {', '.join(valid)})"


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _largest_divisor_at_most(n: int, k: int) -> int:
    return max(d for d in range(1, min(n, k) + 1) if n % d == 0)



# ---- reference (docs/config.md) ----------------------------------------------------------------
# A key's meaning is written once: as the `# comment` of its field above (at the end of the field's
# line, else the comment lines right above it). The reference is generated from those comments, the
# annotations and the defaults, and `reference_markdown` refuses a field without one.


def field_docs() -> dict[tuple[str, str], tuple[str, str]]:
    """{(class name, field name): (annotation, meaning)} for the dataclass fields of this file, read
    from its source (ast for the fields, tokenize for the comments); meaning "" where there is none."""
    source = Path(__file__).read_text(encoding="utf-8")
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    lines = source.splitlines()  # 0-based; ast and tokenize count lines from 1
    out: dict[tuple[str, str], tuple[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            text = [comments[n] for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1) if n in comments]
            first = stmt.lineno
            while not text and first - 1 in comments and lines[first - 2].lstrip().startswith("#"):
                first -= 1  # no comment on the field's line: the comment block right above it
            text = text or [comments[n] for n in range(first, stmt.lineno)]
            out[(node.name, stmt.target.id)] = (ast.unparse(stmt.annotation), " ".join(text))
    return out


def reference_markdown() -> str:
    """docs/config.md: every section and key with its type, default and meaning. Raises
    AssertionError naming the fields that have no `# meaning` comment."""
    docs = field_docs()
    sections = [(f.name, _HINTS[Config][f.name]) for f in fields(Config)]
    missing = [f"Config.{name}" for name, _ in sections if not docs[("Config", name)][1]]
    missing += [f"{cls.__name__}.{g.name}" for _, cls in sections for g in fields(cls)
                if not docs[(cls.__name__, g.name)][1]]
    if missing:
        raise AssertionError(f"lmforge/config.py: write a `# meaning` comment for {', '.join(missing)}")
    out = [
        "# Config reference",
        "",
        "<!-- Generated from lmforge/config.py by `python3 scripts/gen_config_doc.py`; do not edit by hand. -->",
        "",
        "A config is a YAML file with the sections below; every key is optional (its default applies). An",
        "unknown section or key, or a value of the wrong type, is an error that names it and the nearest valid",
        "one. Any key can be set on the command line: `lmforge train CONFIG --set section.key=value` (the value",
        "is read as YAML). A value outside its `valid` column is refused when the config loads, naming the key,",
        "the valid values and the value (lmforge/ranges.py; a command-line flag that sets the same value checks",
        "the same rule). A run writes its resolved config into `runs/<run>/config.yaml` and every checkpoint.",
        "Bundled recipes (lmforge/configs/), usable by name from any directory, as in `lmforge train small-cpu`:",
        f"{', '.join(bundled_names('config'))}.",
        "",
        "| section | holds |",
        "|---|---|",
        *[f"| [`{name}`](#{name}) | {_cell(docs[('Config', name)][1])} |" for name, _ in sections],
    ]
    for name, cls in sections:
        meaning = docs[("Config", name)][1]
        out += ["", f"## {name}", "", f"{meaning[0].upper()}{meaning[1:]}.", "",
                "| key | type | default | valid | meaning |", "|---|---|---|---|---|"]
        for g in fields(cls):
            default = g.default if g.default is not MISSING else g.default_factory()  # type: ignore[misc]
            annotation, meaning = docs[(cls.__name__, g.name)]
            out.append(f"| `{_yaml_key(g.name)}` | {_cell(annotation)} | `{json.dumps(default)}` | "
                       f"{_cell(_valid_text(cls, g.name))} | {_cell(meaning)} |")
    return "\n".join(out) + "\n"


def _valid_text(cls: type, name: str) -> str:
    """The valid values of a field in words, for the reference: "> 0", "within 0..1024 (0 = all cores)"."""
    rule = field_rule(cls, name)
    if rule is None:
        return "true, false"
    note = getattr(rule, "note", "")
    text = rule.describe() + (f" ({note})" if note else "")
    return f"each: {text}" if typing.get_origin(_hints(cls)[name]) is list else text


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a literal | inside a Markdown table cell

for _cls in (Config, ModelConfig, DataConfig, TrainConfig, GuardConfig, EvalConfig, ServeConfig, InitConfig, EmbedConfig,
             LoraConfig):
    _hints(_cls)

__all__ = [
    "Config",
    "ModelConfig",
    "DataConfig",
    "TrainConfig",
    "GuardConfig",
    "EvalConfig",
    "ServeConfig",
    "InitConfig",
    "EmbedConfig",
    "LoraConfig",
    "LORA_TARGETS",
    "POOLINGS",
    "load_config",
    "apply_overrides",
    "reference_markdown",
]
