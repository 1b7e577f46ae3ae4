"""Interop: Hugging Face (safetensors + config.json) and GGUF <-> lmforge.

Design
------
Everything goes through one in-memory form, a `Bundle`: an lmforge `ModelConfig`, a state dict of
fp32 CPU tensors under lmforge's parameter names (which ARE Hugging Face `LlamaForCausalLM` keys,
docs/model.md; a tied head is stored once, as `model.embed_tokens.weight`), a `Tokenizer`, and
the tokenizer facts a tokenizers JSON cannot hold (bos/eos token, chat template). Each format has
one reader (file -> Bundle) and one writer (Bundle -> file):

  Hugging Face dir   config.json <-> ModelConfig (a field map, `hf_config`/`model_config_from_hf`);
                     the tensors are a pure key map because the names and the RoPE layout
                     (rotate_half) are HF's.
  GGUF (llama.cpp)   metadata <-> ModelConfig; tensor names `blk.{i}.attn_q.weight` <-> HF names;
                     q/k rows permuted the way llama.cpp's convert_hf_to_gguf.py does (it expects
                     RoPE pairs (2i, 2i+1) interleaved, HF pairs (i, i + hd/2)), tensors
                     dequantized by the `gguf` package; the tokenizer rebuilt from the GGUF
                     vocabulary and merges as a `tokenizers` byte-level BPE.
  model directory    what `lmforge import` writes and `init.from`, `sample`, `export` read:
                     model.safetensors + config.yaml (an lmforge config, model section filled)
                     + tokenizer.json (+ tokenizer_config.json with bos/eos/chat template, and
                     source.json recording where it came from) + MANIFEST.json. The format, its
                     reader and writer, and the one model loader live in lmforge/artifacts.py;
                     export reads runs, checkpoints and model directories through it too.

Trade-offs
----------
- Weights are held and written as fp32: that is what lmforge trains (fp32 master weights), and
  dequantized GGUF weights are exact in fp32. A bf16 HF checkpoint therefore doubles on disk.
- Architectures lmforge cannot represent (biases, RoPE scaling other than Llama 3.1's "llama3",
  other activations, ...) are refused naming the field, rather than imported approximately.
- llama3 RoPE scaling goes to GGUF as llama.cpp's `rope_freqs` tensor plus lmforge's own
  `lmforge.rope.llama3.*` keys; a GGUF with `rope_freqs` but without those keys (e.g. one made by
  llama.cpp's converter) is refused: the tensor alone does not determine the four parameters.
- Only byte-level BPE tokenizers ("gpt2" in GGUF terms) are rebuilt from GGUF; SentencePiece
  GGUFs (`tokenizer.ggml.model = llama`) are refused: import their HF directory instead.
- Nothing is unpickled: safetensors, JSON, YAML and GGUF only; `pytorch_model.bin` is refused.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .artifacts import (
    MODEL_FILE, TOKENIZER_CONFIG, Bundle, check_tensors, expected_shapes, is_model_dir, load_safetensors,
    read_bundle, read_json, write_model_dir,
)
from .config import Config, EmbedConfig, ModelConfig
from .errors import CheckpointError, ConfigError
from .tokenizer import TOKENIZER_FILE, Tokenizer
from .util import (
    FILE_MODE, atomic_dir, atomic_write_json, fsync_dir, progress_bar, replace_path, warn, writes_to,
)
from .util import out as results_out  # command results: stdout, every progress mode

# ---- names and shapes ------------------------------------------------------------------------


def bundle_from_model(model: torch.nn.Module, tokenizer: Tokenizer, special: dict[str, Any] | None = None,
                      embed: EmbedConfig | None = None) -> Bundle:
    """A Bundle of a live lmforge `Transformer` (its weights copied to fp32 CPU tensors)."""
    params = {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.named_parameters()}
    return Bundle(model.cfg, check_tensors(model.cfg, params, "model"), tokenizer, dict(special or {}), {"format": "lmforge"},
                  embed or EmbedConfig())


# ---- Hugging Face config ---------------------------------------------------------------------


def hf_config(cfg: ModelConfig, special_ids: dict[str, int | None]) -> dict[str, Any]:
    """`config.json` of a `LlamaForCausalLM` with this shape."""
    out: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ff_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": _hf_rope_scaling(cfg),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if special_ids.get(key) is not None:
            out[key] = special_ids[key]
    return out


def _hf_rope_scaling(cfg: ModelConfig) -> dict[str, Any] | None:
    """HF `rope_scaling` of a config (None for plain RoPE); transformers 5 folds it into rope_parameters."""
    if cfg.rope_scaling != "llama3":
        return None
    return {"rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor, "original_max_position_embeddings": cfg.rope_original_max_len}


def model_config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    """ModelConfig from a Hugging Face `config.json`; fields lmforge cannot represent are refused."""

    def refuse(field_name: str, value: Any, why: str) -> CheckpointError:
        return CheckpointError(f"{source}: unsupported {field_name} = {value!r}: {why}")

    model_type = hf.get("model_type")
    if model_type != "llama":
        raise refuse("model_type", model_type, "lmforge imports Llama-family models (model_type 'llama')")
    if hf.get("hidden_act", "silu") != "silu":
        raise refuse("hidden_act", hf["hidden_act"], "lmforge's MLP is SwiGLU (silu)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise refuse(key, hf[key], "lmforge's linear layers have no biases")
    rope = hf.get("rope_parameters") or {}  # transformers >= 5 nests theta, type and scaling here
    if not isinstance(rope, dict):
        raise refuse("rope_parameters", rope, "expected a mapping")
    scaling = hf.get("rope_scaling") or rope  # transformers < 5: a separate rope_scaling dict
    if not isinstance(scaling, dict):
        raise refuse("rope_scaling", scaling, "expected a mapping with a rope_type")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise refuse("rope_scaling", scaling, f"lmforge implements plain RoPE and rope_type 'llama3' only, not {rope_type!r}")
    llama3: dict[str, Any] = {}
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        missing = [k for k in keys if scaling.get(k) is None]
        if missing:
            raise refuse("rope_scaling", scaling, f"rope_type 'llama3' needs {', '.join(missing)}")
        try:
            llama3 = dict(rope_scaling="llama3", rope_factor=float(scaling["factor"]),
                          rope_low_freq_factor=float(scaling["low_freq_factor"]),
                          rope_high_freq_factor=float(scaling["high_freq_factor"]),
                          rope_original_max_len=int(scaling["original_max_position_embeddings"]))
        except (TypeError, ValueError):
            raise refuse("rope_scaling", scaling, "its llama3 parameters must be numbers") from None
    try:
        cfg = ModelConfig(
            vocab_size=int(hf["vocab_size"]),
            n_layer=int(hf["num_hidden_layers"]),
            n_head=int(hf["num_attention_heads"]),
            n_kv_head=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
            d_model=int(hf["hidden_size"]),
            d_ff=int(hf["intermediate_size"]),
            max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),  # LlamaConfig's default
            init_std=float(hf.get("initializer_range", 0.02)),
            **llama3,
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: config.json lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:  # a size that is not a number, a list where a number belongs ...
        raise CheckpointError(f"{source}: config.json has a value of the wrong type ({e})") from None
    if hf.get("head_dim") not in (None, cfg.head_dim):
        raise refuse("head_dim", hf["head_dim"], f"lmforge's head dim is hidden_size / num_attention_heads = {cfg.head_dim}")
    _validate_shape(cfg, source)
    return cfg


def _validate_shape(cfg: ModelConfig, source: str) -> None:
    try:
        Config(model=cfg, data=replace(Config().data, seq_len=min(256, cfg.max_seq_len))).validate()
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


# ---- Hugging Face directories ----------------------------------------------------------------


def read_hf_dir(path: Path) -> Bundle:
    """A local Hugging Face Llama-family directory (single or sharded safetensors) -> Bundle."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face model directory)")
    hf = read_json(cfg_path)
    cfg = model_config_from_hf(hf, str(cfg_path))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: expected a non-empty \"weight_map\" of tensor name -> shard file name")
        files = sorted(set(weight_map.values()))
    elif (path / MODEL_FILE).is_file():
        files = [MODEL_FILE]
    elif list(path.glob("*.bin")) or list(path.glob("*.pt")):
        raise CheckpointError(
            f"{path}: only pickled weights (*.bin/*.pt) found; lmforge never unpickles model files. "
            "Convert them to safetensors first (transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if Path(f).is_absolute() or ".." in Path(f).parts:
            raise CheckpointError(f"{index}: shard {f!r} is not a file name inside {path}")
        if not (path / f).is_file():
            raise CheckpointError(f"{path}: shard {f} named in the index is missing")
        tensors.update(load_safetensors(path / f))
    # Older checkpoints store RoPE's inverse frequencies; lmforge recomputes them from rope_theta.
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store the head too
    if not (path / TOKENIZER_FILE).is_file():
        raise CheckpointError(
            f"{path}: no tokenizer.json (a Hugging Face `tokenizers` file); a SentencePiece-only "
            "tokenizer.model is not supported: save the fast tokenizer with transformers first"
        )
    tok = Tokenizer.load(path / TOKENIZER_FILE)
    special: dict[str, Any] = {}
    if (path / TOKENIZER_CONFIG).is_file():
        special = _special_from_tokenizer_config(read_json(path / TOKENIZER_CONFIG))
    embed = read_sentence_transformers(path) or EmbedConfig()
    return Bundle(cfg, check_tensors(cfg, tensors, str(path)), tok, special, {"format": "hf", "path": str(path)}, embed)


def write_hf_dir(bundle: Bundle, out: Path, overwrite: bool = False) -> Path:
    """Bundle -> a directory transformers loads with `from_pretrained` (atomically)."""
    from safetensors.torch import save_file

    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another --out or pass --overwrite")
    special = _special_tokens(bundle)
    ids = {f"{k}_id": _token_id(bundle.tokenizer, special.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_file(bundle.tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", hf_config(bundle.cfg, ids))
        bundle.tokenizer.save(tmp / TOKENIZER_FILE)
        tok_cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": bundle.cfg.max_seq_len,
            "clean_up_tokenization_spaces": False,  # decode(encode(text)) == text, as in lmforge
            "add_bos_token": False,
            "add_eos_token": False,
        }
        tok_cfg.update({k: v for k, v in special.items() if v is not None})
        atomic_write_json(tmp / TOKENIZER_CONFIG, tok_cfg)
        atomic_write_json(tmp / "special_tokens_map.json",
                          {k: special[k] for k in ("bos_token", "eos_token", "pad_token") if special.get(k)})
        gen = {k: v for k, v in ids.items() if v is not None}
        atomic_write_json(tmp / "generation_config.json", dict(gen, _from_model_config=False))
        if bundle.embed.bidirectional:
            warn("embed.bidirectional is true: this model embeds with bidirectional attention, which Hugging Face Llama "
                 "(always causal) cannot express, so no sentence-transformers files were written; embed with lmforge "
                 "(`lmforge embed`, `lmforge serve` /v1/embeddings) to get its vectors", label="note:")
        else:
            write_sentence_transformers(tmp, bundle.embed, bundle.cfg, pad=None if special.get("pad_token") else
                                        special.get("eos_token"))
    return out


# ---- sentence-transformers -------------------------------------------------------------------

ST_POOLING = {"mean": "pooling_mode_mean_tokens", "last": "pooling_mode_lasttoken",
              "weighted_mean": "pooling_mode_weightedmean_tokens"}
_ST_MODES = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
             "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


def write_sentence_transformers(directory: Path, embed: EmbedConfig, cfg: ModelConfig, pad: str | None = None) -> None:
    """The sentence-transformers layout beside a Hugging Face model directory, so
    `SentenceTransformer(directory)` embeds as lmforge does: Transformer (this directory) ->
    Pooling (1_Pooling/config.json: the legacy `pooling_mode_*` keys every version reads) ->
    Normalize (2_Normalize, when embed.normalize), max_seq_length = the model's context, and the
    query/document prefixes as its prompts "query" and "document" (`encode_query`, `encode_document`,
    `encode(..., prompt_name=...)`). The prompt's tokens are pooled too (include_prompt), as in
    lmforge. `pad`: a pad token to name when the tokenizer has none (sentence-transformers pads
    batches; padding is masked out of pooling, so which token it is does not matter)."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if embed.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (directory / "2_Normalize").mkdir()
    atomic_write_json(directory / "modules.json", modules)
    atomic_write_json(directory / "1_Pooling" / "config.json", {
        "word_embedding_dimension": cfg.d_model, **{k: k == ST_POOLING[embed.pooling] for k in _ST_MODES},
        "include_prompt": True})
    atomic_write_json(directory / "sentence_bert_config.json", {"max_seq_length": cfg.max_seq_len, "do_lower_case": False})
    atomic_write_json(directory / "config_sentence_transformers.json", {
        "model_type": "SentenceTransformer",
        "prompts": {"query": embed.query_prefix, "document": embed.document_prefix},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine" if embed.normalize else "dot",
    })
    if pad is not None:
        tc = read_json(directory / TOKENIZER_CONFIG)
        atomic_write_json(directory / TOKENIZER_CONFIG, dict(tc, pad_token=pad))


def read_sentence_transformers(directory: Path) -> EmbedConfig | None:
    """The pooling of a sentence-transformers layout that lmforge can reproduce (Transformer ->
    Pooling mean / lasttoken / weightedmean -> optional Normalize), or None when the directory has
    none; a layout lmforge cannot reproduce is refused naming what."""
    if not (directory / "modules.json").is_file():
        return None
    try:
        modules = json.loads((directory / "modules.json").read_text(encoding="utf-8"))
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"{directory / 'modules.json'}: not a sentence-transformers modules list ({e})") from None
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise CheckpointError(f"{directory}: sentence-transformers modules {kinds} cannot be reproduced by lmforge "
                              "(it reads Transformer -> Pooling [-> Normalize])")
    pool_cfg = read_json(directory / modules[1]["path"] / "config.json")
    legacy = [k for k in _ST_MODES if pool_cfg.get(k)]
    modes = {"mean": "mean", "lasttoken": "last", "weightedmean": "weighted_mean"}
    mode = pool_cfg.get("pooling_mode")
    if legacy:
        method = next((m for m, key in ST_POOLING.items() if [key] == legacy), None)
    else:
        method = modes.get(mode) if isinstance(mode, str) else None
    if method is None or pool_cfg.get("include_prompt", True) is not True:
        raise CheckpointError(f"{directory}: sentence-transformers pooling {legacy or mode!r} "
                              f"(include_prompt {pool_cfg.get('include_prompt', True)}) has no lmforge equivalent "
                              "(mean, lasttoken or weightedmean, prompt included)")
    prompts: dict[str, Any] = {}
    if (directory / "config_sentence_transformers.json").is_file():
        prompts = read_json(directory / "config_sentence_transformers.json").get("prompts") or {}
    return EmbedConfig(pooling=method, normalize=kinds[-1] == "Normalize", bidirectional=False,
                       query_prefix=str(prompts.get("query") or ""), document_prefix=str(prompts.get("document") or ""))


# ---- GGUF ------------------------------------------------------------------------------------

# lmforge/HF name (per layer, after "model.layers.{i}.") -> GGUF name (after "blk.{i}.")
_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


def gguf_name(name: str) -> str:
    if name in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[name]
    _, _, i, rest = name.split(".", 3)  # model.layers.{i}.rest
    return f"blk.{i}.{_GGUF_LAYER[rest]}"


def permute_for_gguf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF q/k rows -> llama.cpp order: within each head, rows (i, i + hd/2) become (2i, 2i+1).

    w is (n_heads * hd, d); viewed as (heads, 2, hd/2, d) -> swap to (heads, hd/2, 2, d).
    """
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_from_gguf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_for_gguf`: (heads, hd/2, 2, d) -> (heads, 2, hd/2, d)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# llama.cpp pre-tokenizer names <-> tokenizers pre-tokenizers (byte-level BPE). Each regex is the
# one llama.cpp uses for that name (src/llama-vocab.cpp), so text splits identically.
_GPT2_PRE = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "gpt-2": _GPT2_PRE,
    "default": _GPT2_PRE,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _GPT2_PRE]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        dict(_GPT2_PRE, use_regex=False)]},
}


_GGUF_LLAMA3 = "lmforge.rope.llama3."  # GGUF metadata prefix of lmforge's llama3 parameters


def _rope_freqs(cfg: ModelConfig) -> torch.Tensor:
    """llama.cpp's rope_freqs (hd/2,) fp32: plain inverse frequency / scaled one, per frequency."""
    from .model import llama3_inv_freq

    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim))
    scaled = llama3_inv_freq(inv_freq, cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor,
                             cfg.rope_original_max_len)
    return (inv_freq / scaled).float()


def llama3_from_rope_freqs(freqs: torch.Tensor, theta: float, head_dim: int) -> dict[str, Any] | None:
    """llama3 scaling parameters that reproduce a rope_freqs tensor (hd/2,) as llama.cpp's converter
    writes it (1 for kept frequencies, `factor` for divided ones, a blend between), or None.

    The tensor fixes `factor` (its largest entry) and, through the blended entries, the line
    s(x) = (L * x - low) / (high - low) in x = 1 / wavelength, i.e. only L / (high - low) and
    low / (high - low). Every Llama 3.x model uses low_freq_factor 1; with that, high and L follow
    (L rounded to an integer). With one blended entry, or none, Llama 3.x's high_freq_factor 4 is
    assumed as well. A candidate is accepted only when it reproduces the tensor, and any that does
    gives the model the same frequencies.
    """
    f = freqs.double()
    factor = float(f.max())
    if factor <= 1.0:
        return None
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    x = inv_freq / (2 * math.pi)  # 1 / wavelength
    blended = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))
    s = (1 / f - 1 / factor) / (1 - 1 / factor)  # the blend weight of each frequency, linear in x
    candidates = []  # (low, high, original_max_len)
    if int(blended.sum()) >= 2:  # the line itself: low = 1 fixes the rest
        a = torch.stack([x[blended], torch.ones_like(x[blended])], 1)
        slope, intercept = torch.linalg.lstsq(a, s[blended][:, None]).solution[:, 0].tolist()
        if intercept < 0 < slope:
            span = -1.0 / intercept  # high - low
            candidates.append((1.0, round(1.0 + span, 4), round(slope * span)))
    if int(blended.sum()) >= 1:  # one point on the line, with Llama 3.x's low 1 and high 4
        i = int(blended.nonzero()[0])
        candidates.append((1.0, 4.0, round((3 * float(s[i]) + 1) / float(x[i]))))
    kept, divided = 1 / x[f <= 1 + 1e-6], 1 / x[f >= factor * (1 - 1e-6)]  # wavelengths
    if len(kept) and len(divided):  # no blend in between: any L with 4 * kept < L < divided
        candidates.append((1.0, 4.0, math.floor(4 * float(kept.max())) + 1))
    candidates.append((1.0, 4.0, 8192))
    from .model import llama3_inv_freq

    for low, high, original in candidates:
        divisors = inv_freq / llama3_inv_freq(inv_freq, factor, low, high, int(original))  # as _rope_freqs computes them
        if torch.allclose(divisors, f, rtol=1e-5, atol=0):
            return dict(rope_scaling="llama3", rope_factor=factor, rope_low_freq_factor=low,
                        rope_high_freq_factor=high, rope_original_max_len=int(original))
    return None


def read_gguf(path: Path, keep_quantized: bool = False) -> Bundle:
    """A llama-architecture GGUF file -> Bundle (tensors dequantized to fp32).

    keep_quantized: the matrices also as int8 in groups of 32 (`Bundle.quantized`, written as
    int8 by `write_model_dir`): Q8_0 blocks exactly as stored; other quantized types (Q4_0, Q4_1,
    K-quants) re-quantized from their dequantized values (lmforge runs no 4-bit kernels); F32,
    F16 and BF16 matrices stay fp32."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors on damaged files
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta = {k: _field_value(f) for k, f in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: unsupported general.architecture = {arch!r}: lmforge imports 'llama' GGUFs")
    a = "llama."
    for key in (a + "rope.scaling.type",):
        if meta.get(key) not in (None, "none"):
            raise CheckpointError(f"{path}: unsupported {key} = {meta[key]!r}: lmforge implements plain RoPE only")
    by_name = {t.name: t for t in reader.tensors}
    llama3: dict[str, Any] = {}
    if "rope_freqs.weight" in by_name and meta.get(_GGUF_LLAMA3 + "type") != "llama3":
        # written by llama.cpp's converter (Llama 3.1/3.2): the parameters come from the tensor itself
        try:
            theta = _f32(meta.get(a + "rope.freq_base", 10000.0))
            head_dim = int(meta[a + "embedding_length"]) // int(meta[a + "attention.head_count"])
        except KeyError as e:
            raise CheckpointError(f"{path}: GGUF metadata lacks {e.args[0]!r}") from None
        except (TypeError, ValueError, ZeroDivisionError) as e:
            raise CheckpointError(f"{path}: GGUF metadata has a value of the wrong type ({e})") from None
        found = llama3_from_rope_freqs(_gguf_tensor(by_name["rope_freqs.weight"], path), theta, head_dim)
        if found is None:
            raise CheckpointError(
                f"{path}: tensor rope_freqs.weight is not a llama3 RoPE scaling lmforge can reproduce; import the "
                "model's Hugging Face directory instead (its config.json names the rope_scaling)"
            )
        llama3 = found
    elif "rope_freqs.weight" in by_name:  # lmforge's own export: its parameters, checked below
        try:
            llama3 = dict(rope_scaling="llama3", rope_factor=_f32(meta[_GGUF_LLAMA3 + "factor"]),
                          rope_low_freq_factor=_f32(meta[_GGUF_LLAMA3 + "low_freq_factor"]),
                          rope_high_freq_factor=_f32(meta[_GGUF_LLAMA3 + "high_freq_factor"]),
                          rope_original_max_len=int(meta[_GGUF_LLAMA3 + "original_max_len"]))
        except KeyError as e:
            raise CheckpointError(f"{path}: GGUF metadata lacks {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: GGUF metadata {_GGUF_LLAMA3}* has a value of the wrong type ({e})") from None
    try:
        d, n_head = int(meta[a + "embedding_length"]), int(meta[a + "attention.head_count"])
        vocab = int(meta.get(a + "vocab_size") or len(meta["tokenizer.ggml.tokens"]))
        cfg = ModelConfig(
            vocab_size=vocab,
            n_layer=int(meta[a + "block_count"]),
            n_head=n_head,
            n_kv_head=int(meta.get(a + "attention.head_count_kv") or n_head),
            d_model=d,
            d_ff=int(meta[a + "feed_forward_length"]),
            max_seq_len=int(meta.get(a + "context_length", 2048)),
            rope_theta=_f32(meta.get(a + "rope.freq_base", 10000.0)),
            norm_eps=_f32(meta.get(a + "attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings="output.weight" not in by_name,
            **llama3,
        )
    except KeyError as e:
        raise CheckpointError(f"{path}: GGUF metadata lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:  # a damaged field reads back as None or as the wrong type
        raise CheckpointError(f"{path}: GGUF metadata has a value of the wrong type ({e})") from None
    if meta.get(a + "rope.dimension_count") not in (None, cfg.head_dim):
        raise CheckpointError(f"{path}: unsupported {a}rope.dimension_count = {meta[a + 'rope.dimension_count']} "
                              f"(partial RoPE); lmforge rotates whole heads ({cfg.head_dim})")
    _validate_shape(cfg, str(path))
    if llama3:  # the tensor llama.cpp uses must be the one these parameters give
        freqs = _gguf_tensor(by_name["rope_freqs.weight"], path)
        if not torch.allclose(freqs, _rope_freqs(cfg), rtol=1e-5, atol=0):
            raise CheckpointError(f"{path}: rope_freqs.weight disagrees with its {_GGUF_LLAMA3}* parameters")

    from rich.progress import Progress

    tensors: dict[str, torch.Tensor] = {}
    quantized: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    names = list(expected_shapes(cfg))
    with progress_bar(*Progress.get_default_columns(), transient=True) as progress:
        task = progress.add_task("dequantize", total=len(names))
        for name in names:
            g = gguf_name(name)
            if g not in by_name:
                raise CheckpointError(f"{path}: tensor {g} (for {name}) is missing")
            tensors[name] = _gguf_tensor(by_name[g], path)
            if keep_quantized and len(tensors[name].shape) == 2 and by_name[g].tensor_type.name not in _FLOAT_TYPES:
                quantized[name] = _gguf_int8(by_name[g], tensors[name], path)
            progress.advance(task)
    tensors = check_tensors(cfg, tensors, str(path))  # shapes first: the unpermutation reshapes q/k
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}.self_attn."
        for name, heads in ((p + "q_proj.weight", cfg.n_head), (p + "k_proj.weight", cfg.kv_heads)):
            tensors[name] = unpermute_from_gguf(tensors[name], heads)
            if name in quantized:  # a row permutation: the rows' scales move with them
                quantized[name] = tuple(unpermute_from_gguf(t, heads).contiguous() for t in quantized[name])  # type: ignore[assignment]
    tok, special = _tokenizer_from_gguf(meta, path)
    types = sorted({by_name[gguf_name(n)].tensor_type.name for n in names})
    return Bundle(cfg, tensors, tok, special,
                  {"format": "gguf", "path": str(path), "tensor_types": types, "name": meta.get("general.name")},
                  _read_gguf_embed(meta, path), quantized)


_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
Q8_0_GROUP = 32  # weights per Q8_0 block: an fp16 scale, then 32 int8


def _gguf_int8(t: Any, dequantized: torch.Tensor, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), scale fp32 (N, K / 32)) of a quantized GGUF matrix: a Q8_0 tensor's own
    blocks, any other type re-quantized from its dequantized values."""
    import gguf

    from .quant import quantize_int8

    N, K = dequantized.shape
    if t.tensor_type != gguf.GGMLQuantizationType.Q8_0:
        return quantize_int8(dequantized, Q8_0_GROUP)
    blocks = np.asarray(t.data, dtype=np.uint8).reshape(N, K // Q8_0_GROUP, 2 + Q8_0_GROUP)
    scale = np.ascontiguousarray(blocks[:, :, :2]).view(np.float16)[:, :, 0].astype(np.float32)
    q = np.ascontiguousarray(blocks[:, :, 2:]).view(np.int8).reshape(N, K)
    return torch.from_numpy(q.copy()), torch.from_numpy(scale)


def _q8_0_blocks(q: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """int8 (N, K) in groups of 32 with fp16-exact scales -> GGUF Q8_0 bytes (N, K / 32 * 34)."""
    N, K = q.shape
    out = np.empty((N, K // Q8_0_GROUP, 2 + Q8_0_GROUP), dtype=np.uint8)
    out[:, :, :2] = scale.numpy().astype(np.float16)[:, :, None].view(np.uint8)
    out[:, :, 2:] = q.numpy().reshape(N, K // Q8_0_GROUP, Q8_0_GROUP).view(np.uint8)
    return out.reshape(N, -1)


def _gguf_tensor(t: Any, path: Path) -> torch.Tensor:
    import gguf

    shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGML lists the fastest dim first
    try:
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            arr = np.array(t.data, dtype=np.float32)  # a copy: the reader's array maps the file
        else:
            arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        arr = arr.reshape(shape)
    except NotImplementedError:
        raise CheckpointError(f"{path}: tensor {t.name} uses {t.tensor_type.name}, which the gguf package "
                              "cannot dequantize; re-quantize it as F16, Q8_0 or Q4_K") from None
    except ValueError as e:  # data that does not fill the recorded shape: a damaged tensor header
        raise CheckpointError(f"{path}: tensor {t.name} is damaged ({e})") from None
    return torch.from_numpy(np.ascontiguousarray(arr))


def _tokenizer_from_gguf(meta: dict[str, Any], path: Path) -> tuple[Tokenizer, dict[str, Any]]:
    """Rebuild the model's tokenizer as a tokenizers byte-level BPE from the GGUF vocabulary."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointError(
            f"{path}: unsupported tokenizer.ggml.model = {kind!r}: lmforge rebuilds byte-level BPE ('gpt2') "
            "tokenizers only; import the model's Hugging Face directory instead"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise CheckpointError(
            f"{path}: unsupported tokenizer.ggml.pre = {pre!r} (known: {', '.join(_PRE_TOKENIZERS)}); "
            "import the model's Hugging Face directory instead"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens or [])
    merges = meta.get("tokenizer.ggml.merges") or []
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise CheckpointError(f"{path}: tokenizer.ggml.tokens is missing or damaged (expected a list of strings)")
    if not isinstance(types, list) or len(types) != len(tokens) or not all(isinstance(k, int) for k in types):
        raise CheckpointError(f"{path}: tokenizer.ggml.token_type is damaged (expected {len(tokens)} integers)")
    if not isinstance(merges, list) or not all(isinstance(m, str) and " " in m for m in merges):
        raise CheckpointError(f"{path}: tokenizer.ggml.merges is damaged (expected strings 'left right')")
    merges = [m.split(" ", 1) for m in merges]
    spec = {
        "version": "1.0",
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": _PRE_TOKENIZERS[pre],
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  # UNUSED (5) entries only pad the vocabulary to the embedding rows (see write_gguf)
                  "vocab": {t: i for i, (t, k) in enumerate(zip(tokens, types)) if k != 5}, "merges": merges},
    }
    try:
        hf = HFTokenizer.from_str(json.dumps(spec))
        # Control (3) and user-defined (4) tokens are whole tokens, never split by BPE.
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k in (3, 4)])
    except Exception as e:  # the Rust side raises plain Exception (a merge of unknown tokens, ...)
        raise CheckpointError(f"{path}: the GGUF vocabulary does not form a valid BPE tokenizer ({e})") from None
    tok = Tokenizer(hf)

    def name(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    special = {"bos_token": name("bos"), "eos_token": name("eos"), "pad_token": name("padding"),
               "chat_template": meta.get("tokenizer.chat_template")}
    return tok, {k: v for k, v in special.items() if v is not None}


GGUF_DTYPES = ("f32", "f16", "q8_0")


def write_gguf(bundle: Bundle, out: Path, dtype: str = "f32", overwrite: bool = False) -> Path:
    """Bundle -> a llama.cpp GGUF (F32, F16 or Q8_0 matrices; 1-D norm weights stay F32 as
    llama.cpp's converter writes them). Q8_0: matrices the bundle holds as int8 in groups of 32
    with fp16 scales (a kept Q8_0 import) are written as they are, the others quantized by the gguf
    package (llama.cpp's reference Q8_0). Written to a temporary sibling and renamed into place."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ConfigError(f"GGUF export dtype must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another --out or pass --overwrite")
    cfg, tok = bundle.cfg, bundle.tokenizer
    pre = _gguf_pre_name(tok)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")  # unique: no two exports share it
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, FILE_MODE)  # mkstemp's file is private; the GGUF gets the mode open() would give
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(str(bundle.source.get("name") or out.stem))
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(cfg.ff_dim)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.kv_heads)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_vocab_size(cfg.vocab_size)
        w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                         "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
        # Tokenizer: tokens by id (padded to the embedding rows, as llama.cpp expects), merges.
        vocab = tok.hf.get_vocab(with_added_tokens=True)
        by_id = {i: t for t, i in vocab.items()}
        special_ids = {i for i, t in tok.hf.get_added_tokens_decoder().items() if t.special}
        tokens, types = [], []
        for i in range(cfg.vocab_size):
            if i in by_id:
                tokens.append(by_id[i])
                types.append(gguf.TokenType.CONTROL if i in special_ids else gguf.TokenType.NORMAL)
            else:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
        model = json.loads(tok.hf.to_str())["model"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        special = _special_tokens(bundle)
        for key, adder in (("bos_token", w.add_bos_token_id), ("eos_token", w.add_eos_token_id),
                           ("pad_token", w.add_pad_token_id)):
            i = _token_id(tok, special.get(key))
            if i is not None:
                adder(i)
        w.add_add_bos_token(False)
        if special.get("chat_template"):
            w.add_chat_template(special["chat_template"])
        for name, t in bundle.tensors.items():
            heads = cfg.n_head if name.endswith("q_proj.weight") else cfg.kv_heads if name.endswith("k_proj.weight") else 0
            kept = bundle.quantized.get(name)
            if dtype == "q8_0" and kept is not None and _is_q8_0(*kept):
                q, scale = (permute_for_gguf(x, heads) for x in kept) if heads else kept
                w.add_tensor(gguf_name(name), _q8_0_blocks(q.contiguous(), scale.contiguous()),
                             raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                continue
            arr = (permute_for_gguf(t, heads) if heads else t).numpy()
            if dtype == "f16" and arr.ndim > 1:
                arr = arr.astype(np.float16)
            elif dtype == "q8_0" and arr.ndim > 1 and arr.shape[1] % Q8_0_GROUP == 0:
                w.add_tensor(gguf_name(name), gguf.quants.quantize(np.ascontiguousarray(arr), gguf.GGMLQuantizationType.Q8_0),
                             raw_dtype=gguf.GGMLQuantizationType.Q8_0)
                continue
            w.add_tensor(gguf_name(name), np.ascontiguousarray(arr))
        if cfg.rope_scaling == "llama3":
            # llama.cpp applies llama3 scaling through rope_freqs (it divides frequency i by entry i);
            # the parameters go beside it under lmforge's own keys (llama.cpp ignores them) so that
            # lmforge reads back the exact config.
            w.add_tensor("rope_freqs.weight", _rope_freqs(cfg).numpy())
            w.add_string(_GGUF_LLAMA3 + "type", "llama3")
            w.add_float32(_GGUF_LLAMA3 + "factor", cfg.rope_factor)
            w.add_float32(_GGUF_LLAMA3 + "low_freq_factor", cfg.rope_low_freq_factor)
            w.add_float32(_GGUF_LLAMA3 + "high_freq_factor", cfg.rope_high_freq_factor)
            w.add_uint32(_GGUF_LLAMA3 + "original_max_len", cfg.rope_original_max_len)
        _write_gguf_embed(w, bundle.embed)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        replace_path(tmp, out)  # over a file: one rename; over a directory (--overwrite): see replace_path
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)
    return out


def _is_q8_0(q: torch.Tensor, scale: torch.Tensor) -> bool:
    """int8 in groups of 32 whose scales survive fp16: written to Q8_0 without a change."""
    return scale.shape[1] * Q8_0_GROUP == q.shape[1] and bool((scale.half().float() == scale).all())


_GGUF_EMBED = "lmforge.embed."  # lmforge's own keys: the whole embed section (llama.cpp ignores them)
_GGUF_POOLING = {"mean": 1, "last": 3}  # llama.cpp's enum llama_pooling_type: none 0, mean 1, cls 2, last 3, rank 4


def _write_gguf_embed(w: Any, embed: EmbedConfig) -> None:
    """`llama.pooling_type` where llama.cpp has the pooling (mean, last; not weighted_mean), and the
    whole embed section under lmforge's keys, so an import gives the same vectors back. llama.cpp
    embeds causally and normalises on its own (its --embd-normalize), so a bidirectional model's
    GGUF embeds differently there (a note says so)."""
    import gguf

    if embed.pooling in _GGUF_POOLING:
        w.add_pooling_type(gguf.PoolingType(_GGUF_POOLING[embed.pooling]))
    w.add_string(_GGUF_EMBED + "pooling", embed.pooling)
    w.add_bool(_GGUF_EMBED + "normalize", embed.normalize)
    w.add_bool(_GGUF_EMBED + "bidirectional", embed.bidirectional)
    w.add_string(_GGUF_EMBED + "query_prefix", embed.query_prefix)
    w.add_string(_GGUF_EMBED + "document_prefix", embed.document_prefix)
    if embed.bidirectional:
        warn("embed.bidirectional is true: llama.cpp embeds with causal attention, so its vectors of this GGUF "
             "differ from lmforge's; the setting is recorded under lmforge.embed.* for `lmforge import`", label="note:")


def _read_gguf_embed(meta: dict[str, Any], path: Path) -> EmbedConfig:
    """The embed section of lmforge's own keys, else llama.cpp's pooling_type where it is mean or
    last, else the defaults."""
    if _GGUF_EMBED + "pooling" in meta:
        try:
            embed = EmbedConfig(pooling=str(meta[_GGUF_EMBED + "pooling"]), normalize=bool(meta[_GGUF_EMBED + "normalize"]),
                                bidirectional=bool(meta[_GGUF_EMBED + "bidirectional"]),
                                # the gguf writer leaves an empty string out
                                query_prefix=str(meta.get(_GGUF_EMBED + "query_prefix") or ""),
                                document_prefix=str(meta.get(_GGUF_EMBED + "document_prefix") or ""))
        except KeyError as e:
            raise CheckpointError(f"{path}: GGUF metadata lacks {e.args[0]!r}") from None
        try:
            Config(embed=embed).validate()
        except ConfigError as e:
            raise CheckpointError(f"{path}: GGUF metadata {_GGUF_EMBED}*: {e}") from None
        return embed
    by_enum = {v: k for k, v in _GGUF_POOLING.items()}
    pooling = meta.get("llama.pooling_type")
    return EmbedConfig(pooling=by_enum[pooling]) if pooling in by_enum else EmbedConfig()


def _gguf_pre_name(tok: Tokenizer) -> str:
    """The llama.cpp pre-tokenizer name whose split equals this tokenizer's pre-tokenizer."""
    pre = json.loads(tok.hf.to_str()).get("pre_tokenizer")
    for name in ("smollm", "llama-bpe", "gpt-2"):
        if _same_pre(pre, _PRE_TOKENIZERS[name]):
            return name
    raise CheckpointError(
        f"this tokenizer's pre-tokenizer ({json.dumps(pre)[:120]}) has no llama.cpp equivalent lmforge knows "
        f"({', '.join(_PRE_TOKENIZERS)}); export to Hugging Face format instead"
    )


def _same_pre(a: Any, b: Any) -> bool:
    """Pre-tokenizer JSONs equal on the keys that decide the split (ignoring offset bookkeeping)."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (set(a) | set(b)) - {"trim_offsets"}
        return all(_same_pre(a.get(k), b.get(k)) for k in keys)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_pre(x, y) for x, y in zip(a, b))
    return a == b


def _f32(v: Any) -> float:
    """A GGUF float32 as the shortest decimal that rounds to it (1e-5, not 9.999999747378752e-06),
    so a float written from a config reads back as the same number."""
    return float(str(np.float32(v)))


def _field_value(f: Any) -> Any:
    try:
        return f.contents()
    except Exception:  # a field type this gguf version cannot render: not one we read
        return None


# ---- any source ------------------------------------------------------------------------------


def read_any(path: str | os.PathLike, *, merge: bool = False, keep_quantized: bool = False) -> Bundle:
    """Whatever `lmforge import` and `export` accept: a .gguf file, a Hugging Face directory, or
    what `artifacts.load_model` accepts (a run, checkpoint or model directory, verified; a LoRA
    adapter folded into its base with `merge`). keep_quantized applies to GGUF files (`read_gguf`)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no such file or directory: {p}")
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return read_gguf(p, keep_quantized=keep_quantized)
        raise CheckpointError(f"{p}: expected a .gguf file or a directory (Hugging Face model, lmforge run or checkpoint)")
    if (p / "config.json").is_file() and not is_model_dir(p):
        if merge:
            raise CheckpointError(f"--merge: {p} is a Hugging Face model, with no LoRA adapter to fold in; leave out --merge")
        return read_hf_dir(p)
    return read_bundle(p, merge=merge)


# ---- commands --------------------------------------------------------------------------------


def _check_out(source: str, out: str, overwrite: bool) -> None:
    """--overwrite replaces --out whole (a file or a directory); refuse when that would delete the
    very model being converted (--out is the source or a directory holding it)."""
    if not overwrite or not os.path.lexists(out):
        return
    src, dst = Path(source).resolve(), Path(out).resolve()
    if dst == src or dst in src.parents:
        raise CheckpointError(f"--out {out} holds the source {source}; --overwrite would delete it: choose another --out")


def import_command(source: str, out: str, overwrite: bool = False, keep_quantized: bool = False) -> int:
    """`lmforge import`: a GGUF file or Hugging Face directory -> a model directory. keep_quantized:
    a quantized GGUF's matrices are stored as int8 (lmforge/quant.py) instead of fp32."""
    _check_out(source, out, overwrite)
    if keep_quantized and not (Path(source).is_file() and Path(source).suffix.lower() == ".gguf"):
        raise ConfigError("--keep-quantized applies to a quantized .gguf file; for any model, "
                          "`lmforge sample/serve --quantize int8` quantizes at load")
    bundle = read_any(source, keep_quantized=keep_quantized)
    if keep_quantized and not bundle.quantized:
        raise ConfigError(f"--keep-quantized: {source} holds no quantized matrices "
                          f"(tensor types {', '.join(bundle.source.get('tensor_types', []))}); import it without the flag")
    with writes_to(out):
        write_model_dir(bundle, Path(out), overwrite=overwrite)
    from .model import num_params

    kept = f", {len(bundle.quantized)} matrices kept as int8" if bundle.quantized else ""
    results_out.print(
        f"imported {source} -> {out}: {num_params(bundle.cfg) / 1e6:.1f}M parameters{kept}, {bundle.cfg.n_layer} layers, "
        f"d_model {bundle.cfg.d_model}, heads {bundle.cfg.n_head}/{bundle.cfg.kv_heads}, "
        f"vocab {bundle.cfg.vocab_size}, tokenizer {bundle.tokenizer.vocab_size} tokens"
    )
    results_out.print(f"use it: lmforge sample {out} --prompt ...  |  lmforge prepare CORPUS --tokenizer {out} --out data/NAME  |  "
                  f"lmforge train CONFIG --set init.from={out}")
    return 0


def export_command(source: str, fmt: str, out: str, dtype: str = "f32", overwrite: bool = False,
                   merge: bool = False) -> int:
    """`lmforge export`: a run, checkpoint or model directory -> Hugging Face dir or GGUF file; a
    LoRA run -> a PEFT adapter directory (`peft`), or with `merge` its adapter folded into the base
    for hf and gguf."""
    _check_out(source, out, overwrite)
    if fmt == "peft":
        return export_adapter(source, out, overwrite=overwrite, merge=merge, dtype=dtype)
    bundle = read_any(source, merge=merge)
    if bundle.cfg.num_labels:  # HF's Llama and GGUF name no such layer; a silent drop would lose what was trained
        raise ConfigError(f"{source} carries a classification head (model.num_labels = {bundle.cfg.num_labels}, from "
                          "`classify train --method finetune`), which hf and gguf export do not write; serve it with "
                          "`lmforge serve CLASSIFIER` or export the model it was tuned from")
    weights = sum(t.numel() for t in bundle.tensors.values()) * (2 if fmt == "gguf" and dtype == "f16" else 4)
    with writes_to(out, needed=weights):
        if fmt == "hf":
            if dtype != "f32":
                raise ConfigError("--dtype applies to GGUF export only (Hugging Face export writes fp32 safetensors)")
            write_hf_dir(bundle, Path(out), overwrite=overwrite)
        elif fmt == "gguf":
            write_gguf(bundle, Path(out), dtype=dtype, overwrite=overwrite)
        else:
            raise ConfigError(f"--format must be hf or gguf, got {fmt!r}")
    merged = ", adapter merged into its base" if merge else ""
    results_out.print(f"exported {source} -> {out} ({fmt}{'' if fmt == 'hf' else ' ' + dtype.upper()}{merged})")
    return 0


def export_adapter(source: str, out: str, *, overwrite: bool = False, merge: bool = False, dtype: str = "f32") -> int:
    """`lmforge export RUN --format peft`: a LoRA run, checkpoint or adapter directory -> an adapter
    directory that `peft.PeftModel.from_pretrained(model, out)` loads (the base's path in
    base_model_name_or_path, its sha256 in the manifest)."""
    from .artifacts import ADAPTER_FILE, lora_parts, resolve_origin, write_adapter_dir

    if merge or dtype != "f32":
        raise ConfigError("--format peft writes the adapter alone, in fp32: --merge and --dtype apply to hf and gguf")
    origin = resolve_origin(source)
    if not origin.is_adapter:
        raise CheckpointError(f"{source} holds whole weights (a run with lora.rank 0, or a model): there is no LoRA "
                              "adapter to export; use --format hf or gguf")
    parts = lora_parts(origin)  # the base verified, the adapter's names and shapes checked
    with writes_to(out, needed=(origin.path / ADAPTER_FILE).stat().st_size):
        write_adapter_dir(out, parts.adapter, parts.lora, parts.base, overwrite=overwrite)
    results_out.print(f"exported {source} -> {out} (PEFT LoRA adapter, rank {parts.lora.rank}, on {parts.base.path}, "
                      f"sha256 {origin.base_sha256[:12]}...)")
    return 0


# ---- helpers ---------------------------------------------------------------------------------


def _token_text(v: Any) -> str | None:
    if isinstance(v, dict):  # transformers' serialized AddedToken
        return v.get("content")
    return v if isinstance(v, str) else None


def _special_from_tokenizer_config(tc: dict[str, Any]) -> dict[str, Any]:
    out = {k: _token_text(tc.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
    if isinstance(tc.get("chat_template"), str):
        out["chat_template"] = tc["chat_template"]
    return {k: v for k, v in out.items() if v is not None}


def _special_tokens(bundle: Bundle) -> dict[str, Any]:
    """bos/eos/pad token strings and chat template: recorded ones first, else the tokenizer's own."""
    tok = bundle.tokenizer
    names = {i: t for t, i in tok.hf.get_vocab(with_added_tokens=True).items()}
    out = {"bos_token": names.get(tok.bos_id) if tok.bos_id is not None else None,
           "eos_token": names.get(tok.eos_id) if tok.eos_id is not None else None,
           "pad_token": names.get(tok.pad_id) if tok.pad_id is not None else None}
    out.update({k: v for k, v in _special_from_tokenizer_config(bundle.special).items()})
    return out


def _token_id(tok: Tokenizer, text: str | None) -> int | None:
    return tok.hf.token_to_id(text) if text else None


__all__ = [
    "bundle_from_model", "read_hf_dir", "write_hf_dir", "write_sentence_transformers", "read_sentence_transformers", "read_gguf", "write_gguf", "read_any", "hf_config",
    "model_config_from_hf", "permute_for_gguf", "unpermute_from_gguf", "import_command", "export_command",
    "export_adapter",
]
