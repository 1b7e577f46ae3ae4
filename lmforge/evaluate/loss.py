"""Loss metrics of a checkpoint on held-out text: a prepared dataset's val split, or a text file.

Deterministic by construction: the validation samples are the val split's read in order
(data/loader.py `val_batches`: non-overlapping windows of a text stream, or the rows of an SFT
dataset), so the same checkpoint always gets the same number, before and after a resume. (The
trainer's own `val_loss` is the objective's: train/objectives.py `validation_loss`.)

`nll_totals` sums the token NLL and the UTF-8 bytes the targets stand for (the tokenizer's
`token_nbytes`; special tokens such as the EOS between documents are scored as tokens and count 0
bytes), from which evaluate/metrics.py derives loss, perplexity and bits per byte. Only trained
targets are scored: an SFT dataset's loss mask leaves out the prompts (held-out loss on completion
tokens only), and its packed rows are scored with document masking as they were trained; for a
preference dataset (`prepare --dpo`) the scored text is each pair's chosen completion (DPO's own
val_loss needs the reference, which only the trainer has). `text_batches`
cuts any text into the same kind of windows: [EOS] + the text's tokens, consecutive windows
overlapping by one token, so every token of the text is a target exactly once; `stream_batches`
does it for tokens that arrive piece by piece (`lmforge eval --text` on a file of any size).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.loader import IGNORE, Batch, scored_targets, val_batches
from ..data.manifest import read_manifest
from ..model import document_attention


@torch.no_grad()
def nll_totals(
    model: torch.nn.Module, batches: Iterable[Batch], token_nbytes: np.ndarray
) -> tuple[float, int, int]:
    """(summed NLL in nats, scored tokens, UTF-8 bytes of the scored targets) over batches (dicts
    with `inputs`, `targets`, optionally `loss_mask` and `documents`); targets equal to -100, or
    outside a batch's loss mask, are not scored. fp32 throughout, so numbers compare."""
    return nll_by_input(model, batches, token_nbytes, 0)[0]


@torch.no_grad()
def nll_by_input(
    model: torch.nn.Module, batches: Iterable[Batch], token_nbytes: np.ndarray, n_inputs: int
) -> tuple[tuple[float, int, int], list[tuple[float, int, int]]]:
    """`nll_totals` over all targets, and the same totals per input (batches carry `input`, (B, T):
    the input of each target's document, data/loader.py `val_batches(inputs=True)`), n_inputs of
    them; the overall sum is the same reduction as without inputs, so its number does not change."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    nbytes = torch.from_numpy(token_nbytes)
    total, tokens, nbyte = 0.0, 0, 0
    per = np.zeros((n_inputs, 3), dtype=np.float64)  # per input: NLL, tokens, bytes
    try:
        for batch in batches:
            b = {k: v.to(dev) for k, v in batch.items()}
            kwargs = {}
            if "documents" in b:  # packed rows: each document attends to itself only, as in training
                kwargs["positions"], kwargs["attn_mask"] = document_attention(b["documents"])
            logits = model(b["inputs"], **kwargs)  # (B, T, V)
            y = scored_targets(b)
            total += float(F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="sum"))
            real = y[y != IGNORE].cpu()
            tokens += real.numel()
            nbyte += int(nbytes[real].sum())
            if n_inputs:
                nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE, reduction="none").cpu()
                scored = (y.flatten() != IGNORE).cpu()
                which = b["input"].flatten().cpu()[scored].numpy()
                np.add.at(per[:, 0], which, nll[scored].double().numpy())
                np.add.at(per[:, 1], which, 1)
                np.add.at(per[:, 2], which, nbytes[real].numpy())
    finally:
        model.train(was_training)
    return (total, tokens, nbyte), [(float(a), int(t), int(n)) for a, t, n in per]


def text_batches(ids: Sequence[int], *, start_id: int, seq_len: int, batch_size: int) -> Iterator[Batch]:
    """Batches over [start_id] + ids: windows of seq_len targets, the last one padded with -100."""
    return stream_batches([ids], start_id=start_id, seq_len=seq_len, batch_size=batch_size)


def stream_batches(pieces: Iterable[Sequence[int]], *, start_id: int, seq_len: int, batch_size: int) -> Iterator[Batch]:
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
                yield _batch(rows, seq_len)
                rows = []
        buf = buf[at:].copy()  # consecutive windows overlap by one token
    if len(buf) > 1:
        rows.append(buf)  # the last window: fewer than seq_len targets, padded
    if rows:
        yield _batch(rows, seq_len)


def _batch(rows: list[np.ndarray], seq_len: int) -> Batch:
    """Windows of up to seq_len + 1 tokens -> inputs (B, seq_len) zero-padded, targets (B, seq_len) padded with -100."""
    x = torch.zeros(len(rows), seq_len, dtype=torch.long)
    y = torch.full((len(rows), seq_len), IGNORE, dtype=torch.long)
    for i, window in enumerate(rows):
        n = len(window) - 1
        x[i, :n] = torch.from_numpy(window[:-1])
        y[i, :n] = torch.from_numpy(window[1:])
    return {"inputs": x, "targets": y}


def dataset_batches(data_path: str, *, seq_len: int, batch_size: int, max_batches: int | None,
                    document_mask: str = "auto", packing: bool = True, inputs: bool = False) -> Iterator[Batch]:
    """The val split's samples (data/loader.py `val_batches`; of preference pairs, the chosen
    sequences); max_batches None or 0 reads them all. inputs: with each target's input (`input`)."""
    batches = val_batches(data_path, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches or None,
                          document_mask=document_mask, packing=packing, inputs=inputs)
    if read_manifest(data_path).get("kind") == "dpo":
        return ({k: v[:, 0] for k, v in b.items()} for b in batches)  # (B, 2, T) -> the chosen rows (B, T)
    return batches
