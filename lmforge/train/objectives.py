"""Training objectives: what the loss of a batch is. Every objective runs in the one training
loop (train/loop.py `train_step`), so each inherits its promises: deterministic order, exact
resume, the guard, the store, the eval sidecar.

The interface (for a new objective, e.g. contrastive, classification, DPO):

    class MyObjective:
        name = "my_objective"                               # train.objective (config.OBJECTIVES too)
        def units(self, batch: Batch) -> int: ...           # what the loss averages over, before forward
        def loss(self, model, batch: Batch) -> LossOut: ...

- `batch` is a dict of tensors with a leading batch dimension, as a data source gives it
  (data/loader.py: `inputs`, `targets`, `loss_mask`, `documents` for token data; any keys for a
  `Records` source). The trainer splits a rank's batch into micro batches by slicing every tensor
  along dim 0, and moves them to the device; an objective only reads the keys it needs.
- `units(batch)` is the number of units the loss is averaged over (trained tokens, pairs,
  examples), known without a forward pass. The trainer sums it over all micro batches of the step
  and all ranks (one all-reduce) BEFORE any backward, and divides every micro batch's summed
  loss by that global count: a masked loss is weighted per unit exactly, and the gradient is the
  same on any number of processes and any micro batch size.
- `loss(model, batch)` runs the forward (under the trainer's autocast) and returns `LossOut`:
  `loss` the fp32 loss SUMMED over the batch's units, `count` those units (== units(batch)),
  `metrics` extra figures summed over units (the trainer logs each as its global mean per unit,
  e.g. DPO's reward accuracy). `averaged=True` says `loss` is already the mean over `count`; it is
  meant for objectives whose every micro batch has the same number of units (next-token without a
  mask), and keeps the trainer's arithmetic for them (mean per micro batch / number of micro
  batches) bit for bit what it was before objectives existed.
- Register it in REGISTRY below and its name in config.OBJECTIVES (config sits below train/ and
  validates names at load time; tests/test_objectives.py keeps the two equal).

`validation_loss` is the objective's mean loss over batches of held-out data (the trainer's
`val_loss`): for next-token with a loss mask that is the loss on trained (completion) tokens only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from ..data.loader import IGNORE, Batch, scored_targets
from ..errors import ConfigError
from ..model import autocast, document_attention


@dataclass
class LossOut:
    loss: torch.Tensor  # () fp32: summed over the batch's units (their mean when `averaged`)
    count: int  # units the loss is over: trained tokens, pairs, examples
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # () each, summed over units
    averaged: bool = False  # `loss` is the mean over `count` (see the module docstring)


class Objective(Protocol):
    name: str

    def units(self, batch: Batch) -> int:
        """The units `loss` of this batch is over, without running the model."""
        ...

    def loss(self, model: torch.nn.Module, batch: Batch) -> LossOut:
        """The batch's loss, summed over its units (module docstring)."""
        ...


def model_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    """The attention keywords of a batch: with `documents` (packed rows), positions restarting per
    document and a block-diagonal causal mask (model.document_attention); else none."""
    if "documents" not in batch:
        return {}
    positions, attn_mask = document_attention(batch["documents"])
    return {"positions": positions, "attn_mask": attn_mask}


class NextToken:
    """Next-token cross-entropy (pretraining, continued pretraining, SFT).

    With a `loss_mask` (SFT data) the loss is summed over the trained targets only and its units
    are those targets; without one it is the model's own mean over every target (`averaged`), the
    pretraining arithmetic unchanged. `documents` (packed rows) switch on document masking."""

    name = "next_token"

    def units(self, batch: Batch) -> int:
        if "loss_mask" in batch:
            return int(batch["loss_mask"].sum())
        return int((batch["targets"] != IGNORE).sum())

    def loss(self, model: torch.nn.Module, batch: Batch) -> LossOut:
        x = batch["inputs"]  # (B, T)
        if "loss_mask" not in batch:
            _, mean = model(x, batch["targets"], **model_inputs(batch))
            return LossOut(mean, int((batch["targets"] != IGNORE).sum()), averaged=True)
        logits = model(x, **model_inputs(batch))  # (B, T, V)
        y = scored_targets(batch)
        total = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum")
        return LossOut(total, int(batch["loss_mask"].sum()))


REGISTRY: dict[str, type] = {NextToken.name: NextToken}


def get_objective(name: str) -> Objective:
    """The registered objective `name` (config validation names the nearest one for a typo)."""
    if name not in REGISTRY:
        raise ConfigError(f"train.objective: unknown objective {name!r} (valid: {', '.join(REGISTRY)})")
    return REGISTRY[name]()


@torch.no_grad()
def validation_loss(model: torch.nn.Module, objective: Objective, batches: Iterable[Batch], *, dtype: str = "fp32") -> float:
    """The objective's mean loss per unit over `batches` (NaN when they hold no unit)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    dev = next(model.parameters()).device
    try:
        for batch in batches:
            batch = {k: v.to(dev) for k, v in batch.items()}
            with autocast(dtype, dev.type):
                out = objective.loss(model, batch)
            total += float(out.loss) * (out.count if out.averaged else 1)
            count += out.count
    finally:
        model.train(was_training)
    return total / count if count else math.nan


__all__ = ["LossOut", "Objective", "NextToken", "REGISTRY", "get_objective", "validation_loss", "model_inputs"]
