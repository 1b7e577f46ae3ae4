"""Validation loss on a prepared dataset's held-out split.

Deterministic by construction: the validation windows are the val split's non-overlapping
windows read in order (data/loader.py `val_batches`), so the same checkpoint always gets the same
number, before and after a resume, in training and in `lmforge eval`.

`nll_totals` sums the token NLL and the UTF-8 bytes the targets stand for (the tokenizer's
`token_nbytes`; special tokens such as the EOS between documents are scored as tokens and count 0
bytes), from which evaluate/metrics.py derives loss, perplexity and bits per byte. `text_batches`
cuts any text into the same kind of windows: [EOS] + the text's tokens, consecutive windows
overlapping by one token, so every token of the text is a target exactly once; `stream_batches`
does it for tokens that arrive piece by piece (`lmforge eval --text` on a file of any size).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

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
    """Mean token cross-entropy over the first `max_batches` validation batches (0: all of them, as
    train.eval_batches 0 and `lmforge eval --max-batches 0` mean)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    dev = next(model.parameters()).device
    try:
        for x, y in val_batches(data_path, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches or None):
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


def text_batches(ids: Sequence[int], *, start_id: int, seq_len: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches over [start_id] + ids: windows of seq_len targets, the last one padded with -100."""
    return stream_batches([ids], start_id=start_id, seq_len=seq_len, batch_size=batch_size)


def stream_batches(pieces: Iterable[Sequence[int]], *, start_id: int, seq_len: int,
                   batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`text_batches` over the concatenation of `pieces` (token ids arriving piece by piece), holding
    at most one piece and one batch of windows: memory is bounded by the piece, not the text."""
    buf = np.array([start_id], dtype=np.int64)  # tokens not yet the start of a full window
    rows: list[np.ndarray] = []
    for ids in pieces:
        buf = np.concatenate([buf, np.asarray(ids, dtype=np.int64)])
        at = 0
        while len(buf) - at >= seq_len + 1:  # a full window: seq_len inputs and seq_len targets
            rows.append(buf[at : at + seq_len + 1])
            at += seq_len  # the next window starts at this one's last token: its first input is our last target
            if len(rows) == batch_size:
                yield _xy(rows, seq_len)
                rows = []
        buf = buf[at:].copy()  # consecutive windows overlap by one token
    if len(buf) > 1:
        rows.append(buf)  # the last window: fewer than seq_len targets, padded
    if rows:
        yield _xy(rows, seq_len)


def _xy(rows: list[np.ndarray], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of up to seq_len + 1 tokens -> x (B, seq_len) zero-padded, y (B, seq_len) padded with -100."""
    x = torch.zeros(len(rows), seq_len, dtype=torch.long)
    y = torch.full((len(rows), seq_len), -100, dtype=torch.long)
    for i, window in enumerate(rows):
        n = len(window) - 1
        x[i, :n] = torch.from_numpy(window[:-1])
        y[i, :n] = torch.from_numpy(window[1:])
    return x, y


def dataset_batches(data_path: str, *, seq_len: int, batch_size: int, max_batches: int | None):
    """The val split's windows (data/loader.py `val_batches`); max_batches None or 0 reads them all."""
    return val_batches(data_path, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches or None)
