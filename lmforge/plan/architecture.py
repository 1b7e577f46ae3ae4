"""From a parameter count to a model: a concrete Llama-style shape, its deployment footprint, and a
training config with a token budget, batch size and learning rate.

Every parameter count comes from `lmforge.model.num_params` (never recounted here), so the shape
the planner recommends is the one `lmforge train` builds, to the parameter.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np

from ..config import Config, DataConfig, ModelConfig, TrainConfig
from ..hardware import Hardware
from ..model import num_params


def _aspect_target(n: float) -> float:
    """Preferred d_model / n_layer: ~45 at 10M params, 64 at 100M, ~120 at 7B (GPT-2, Pythia,
    Llama shapes); Kaplan et al. 2020 found the loss flat over a wide range of aspect ratios."""
    return float(np.clip(64.0 * (n / 1e8) ** 0.15, 32.0, 128.0))


def choose_architecture(n: float, vocab_size: int = 32000, seq_len: int = 2048) -> ModelConfig:
    """A Llama-style shape whose exact parameter count (model code) is close to n.

    For every width (a multiple of the head size) the depth that best matches n is solved from
    the count being linear in n_layer; the winner minimises relative count error plus a small
    penalty for straying from the preferred aspect ratio. Head size 64 below d_model 2048, 128
    above, a multiple of four heads from d_model 1024; grouped-query attention (4 query heads per
    KV head) from 8 heads up, which quarters the KV cache.
    """
    best: tuple[float, ModelConfig] | None = None
    target_aspect = _aspect_target(n)
    for d_model in range(64, 16384 + 1, 64):
        head_dim = 64 if d_model < 2048 else 128
        # Widths friendly to tensor cores and to grouped-query attention: 64-multiples while
        # small, then a multiple of 4 heads.
        if d_model >= 1024 and d_model % (4 * head_dim):
            continue
        n_head = d_model // head_dim
        n_kv = n_head // 4 if n_head >= 8 and n_head % 4 == 0 else 0
        base = ModelConfig(
            vocab_size=vocab_size, n_layer=1, n_head=n_head, n_kv_head=n_kv, d_model=d_model,
            max_seq_len=seq_len,
        )
        one, two = num_params(base), num_params(replace(base, n_layer=2))
        per_layer, rest = two - one, 2 * one - two
        if best is not None and rest >= n * 1.5:
            break  # wider models only overshoot further (the narrowest is kept whatever n is)
        layers = max(1, round((n - rest) / per_layer))
        cfg = replace(base, n_layer=layers)
        error = abs(num_params(cfg) - n) / n
        score = error + 0.05 * abs(math.log(d_model / layers / target_aspect))
        if best is None or score < best[0]:
            best = (score, cfg)
    assert best is not None
    return best[1]


def deployment(cfg: ModelConfig, hw: Hardware, context: int, batch: int = 1, bytes_per_value: int = 2) -> dict[str, Any]:
    """Weights and KV-cache memory at `context` tokens for `batch` sequences, and the decode ceiling.

    A single-stream decode step must read every weight and the whole KV cache once, so
    tokens/s <= bandwidth / (weight bytes + KV bytes); batching amortises the weight read.
    """
    weights = num_params(cfg) * bytes_per_value
    kv_per_token = 2 * cfg.n_layer * cfg.kv_heads * cfg.head_dim * bytes_per_value  # K and V
    kv = kv_per_token * context * batch
    single = hw.mem_bandwidth / (weights + kv_per_token * context)
    return {
        "weight_bytes": weights,
        "kv_bytes_per_token": kv_per_token,
        "kv_bytes": kv,
        "context": context,
        "batch": batch,
        "total_bytes": weights + kv,
        "devices_needed": max(1, math.ceil((weights + kv) / hw.memory)) if hw.memory else None,
        "decode_tokens_per_s_single_stream": single,
    }


def training_config(cfg: ModelConfig, train_tokens: float, seq_len: int) -> Config:
    """A full training config for `cfg` on `train_tokens` tokens.

    Batch size (tokens) and peak learning rate follow DeepSeek LLM's fits (Bi et al. 2024):
    B = 0.292 C^0.3271, lr = 0.3118 C^-0.125 with C = 6 N D; the batch is rounded to a power of
    two sequences and the lr clamped to [1e-4, 3e-3] (their fit was made on 1e17-3e20 FLOPs).
    """
    compute = 6.0 * num_params(cfg) * train_tokens
    batch_tokens = 0.292 * compute**0.3271
    global_batch = int(2 ** max(0, round(math.log2(max(1.0, batch_tokens / seq_len)))))
    micro_batch = min(global_batch, 8)
    max_steps = max(1, math.ceil(train_tokens / (global_batch * seq_len)))
    lr = float(np.clip(0.3118 * compute**-0.125, 1e-4, 3e-3))
    warmup = min(2000, max(1, round(0.01 * max_steps)))
    every = max(1, min(1000, max_steps // 20))
    return Config(
        model=replace(cfg, max_seq_len=max(cfg.max_seq_len, seq_len)),
        data=DataConfig(path="", seq_len=seq_len),
        train=TrainConfig(
            global_batch=global_batch, micro_batch=micro_batch, max_steps=max_steps,
            lr=float(f"{lr:.3g}"), warmup_steps=warmup, schedule="cosine",
            eval_every=every, ckpt_every_steps=every,
        ),
    )
