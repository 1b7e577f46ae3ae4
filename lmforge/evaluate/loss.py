"""Validation loss on a prepared dataset's held-out split.

Deterministic by construction: the validation windows are the val split's non-overlapping
windows read in order (data/loader.py `val_batches`), so the same checkpoint always gets the same
number, before and after a resume, in training and in `lmforge eval`.

`nll_totals` sums the token NLL and the UTF-8 bytes the targets stand for (the tokenizer's
`token_nbytes`; special tokens such as the EOS between documents are scored as tokens and count 0
bytes), from which evaluate/metrics.py derives loss, perplexity and bits per byte. `text_batches`
cuts any text file into the same kind of windows: [EOS] + the text's tokens, consecutive windows
overlapping by one token, so every token of the text is a target exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..data.loader import val_batches
from ..model import autocast


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
            with autocast(dtype, dev.type):
                _, loss = model(x, y)
            n = y.numel()
            total += float(loss) * n
            count += n
    finally:
        model.train(was_training)
    return total / count if count else math.nan


@torch.no_grad()
def nll_totals(
    model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], token_nbytes: np.ndarray
) -> tuple[float, int, int]:
    """(summed NLL in nats, scored tokens, UTF-8 bytes of the scored targets) over (x, y) batches;
    targets equal to -100 are padding and not scored. fp32 throughout, so numbers compare."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    nbytes = torch.from_numpy(token_nbytes)
    total, tokens, nbyte = 0.0, 0, 0
    try:
        for x, y in batches:
            logits = model(x.to(dev))  # (B, T, V)
            y = y.to(dev)
            total += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum"))
            real = y[y != -100].cpu()
            tokens += real.numel()
            nbyte += int(nbytes[real].sum())
    finally:
        model.train(was_training)
    return total, tokens, nbyte


def text_batches(ids: list[int], *, start_id: int, seq_len: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches over [start_id] + ids: windows of seq_len targets, the last one padded with -100."""
    stream = [start_id] + list(ids)
    starts = list(range(0, len(stream) - 1, seq_len))
    for b in range(0, len(starts), batch_size):
        chunk = starts[b : b + batch_size]
        x = torch.zeros(len(chunk), seq_len, dtype=torch.long)
        y = torch.full((len(chunk), seq_len), -100, dtype=torch.long)
        for i, s in enumerate(chunk):
            window = stream[s : s + seq_len + 1]
            n = len(window) - 1
            x[i, :n] = torch.tensor(window[:-1])
            y[i, :n] = torch.tensor(window[1:])
        yield x, y


def dataset_batches(data_path: str, *, seq_len: int, batch_size: int, max_batches: int | None):
    """The val split's windows (data/loader.py `val_batches`); max_batches None or 0 reads them all."""
    return val_batches(data_path, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches or None)
