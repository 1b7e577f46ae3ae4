"""Optimizer construction and learning-rate schedules.

Schedules are pure functions of the step (and the config), so a resumed run, a test table and the
dashboard all compute the same learning rate for the same step with no scheduler object to save.
Three shapes:

  cosine    linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `max_steps`
  wsd       warmup-stable-decay: linear warmup, constant `lr`, then a linear decay over the last
            `decay_fraction * max_steps` steps to `lr * min_lr_ratio` (a run can be extended by
            raising max_steps on resume while still in the stable phase)
  constant  linear warmup, then constant `lr`

Warmup uses (step + 1) / warmup_steps so the very first update is not a wasted zero-lr step.

Parameter groups follow common practice: matrices (2-D weights of linear layers) get weight decay;
embeddings, norms and biases do not. Embeddings are excluded because decaying rarely-seen token
rows towards zero hurts them more than it regularises.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based)."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * cfg.max_steps))
        decay_start = max(cfg.warmup_steps, cfg.max_steps - decay_steps)
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start) / max(1, cfg.max_steps - decay_start))
        return peak + (floor - peak) * progress
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into decay (2-D non-embedding weights) and no-decay groups."""
    embedding_params = {
        id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)
    }
    decay, no_decay, seen = [], [], set()
    for _name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear once
            continue
        seen.add(id(p))
        if p.ndim >= 2 and id(p) not in embedding_params:
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # fused AdamW exists for CPU and CUDA in current PyTorch and is deterministic on CPU.
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=True,
    )
