"""Validation loss on a prepared dataset's held-out split.

Deterministic by construction: the validation windows are the val split's non-overlapping
windows read in order (data/loader.py `val_batches`), so the same checkpoint always gets the same
number, before and after a resume, in training and in `lmforge eval`.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from ..data.loader import val_batches


def autocast(dtype: str):
    """bf16 autocast on CPU/GPU for dtype "bf16", nothing for "fp32"."""
    if dtype == "bf16":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.autocast(device, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    data_path: str,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    dtype: str = "fp32",
) -> float:
    """Mean token cross-entropy over the first `max_batches` validation batches."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    dev = next(model.parameters()).device
    try:
        for x, y in val_batches(data_path, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches):
            x, y = x.to(dev), y.to(dev)
            with autocast(dtype):
                _, loss = model(x, y)
            n = y.numel()
            total += float(loss) * n
            count += n
    finally:
        model.train(was_training)
    return total / count if count else math.nan
