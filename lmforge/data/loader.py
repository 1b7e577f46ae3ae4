"""Reading samples from a prepared dataset; the loader's whole state is one integer, `step`.

Two questions are kept apart: WHICH samples a step reads (the order: `order.rank_batch(step, rank,
world, seed, n_samples, global_batch)`, a pure function, the same on any world size), and WHAT a
sample is (a *source*). A source has `n_samples`, a `fingerprint` and `batch(sample_ids) -> dict of
tensors` with a leading batch dimension; an objective (train/objectives.py) reads the keys it needs.

Sources:
- `TokenWindows` (pretraining, continued pretraining): sample i is the window
  `[i*seq_len, i*seq_len + seq_len + 1)` of the split's token stream -> `inputs`, `targets`
  (B, seq_len) int64 (docs/data.md), plus `documents` (B, seq_len) when document masking is on.
- `DocumentRows` (SFT data, `prepare --sft`): sample i is a row of whole documents (conversations):
  with `packing`, consecutive documents are packed greedily, in stream order, into rows of at most
  seq_len + 1 tokens; without it, one document per row. A batch pads its rows to its longest one
  -> `inputs`, `targets` (pad: -100), `loss_mask` (B, T) bool (the data's mask of each target;
  never a target that starts another document, never padding), and `documents` (B, T) int64 (the
  document of each input position; -1 for padding) when document masking is on. A document longer
  than seq_len + 1 tokens fits no row: it is left out and counted (`dropped`, `longest`), never cut
  mid-answer; the trainer says so once when it starts.
- `PreferencePairs` (preference data, `prepare --dpo`): sample i is the i-th (chosen, rejected)
  pair, two consecutive documents of the stream (prompt + chosen completion, prompt + rejected
  completion), each with its loss mask on the completion -> `inputs`, `targets` (pad: -100),
  `loss_mask` (B, 2, T): [:, 0] the chosen sequences, [:, 1] the rejected ones, padded to the
  longest sequence of the batch. A pair with a sequence longer than seq_len + 1 tokens is left out
  and counted (`dropped`, `longest`), never cut.
- `Mixture` (`data.mix`): several prepared datasets' sources (of one kind, one tokenizer) with
  weights; sample id `offsets[k] + i` is sample i of dataset k, and the order is order.py's mixed
  order (`Mixture.sample_ids`), not the plain one. A dataset is read at most `max_repeat` passes
  over its train split: a step that would read past that raises DataError naming the dataset
  (the trainer checks the whole run against it when it starts).
- `Records`: variable-length records held as flat per-token columns and offsets (e.g. tokenized
  JSONL rows), padded per (global) batch: `batch` gives each column as (B, L) plus `lengths` (B,). The base
  for objectives whose samples are not token streams (pairs, triples, labelled examples).

`TokenDataset` memory-maps the shards of one split (np.memmap: the OS page cache does the caching,
nothing is read up front) and presents them as one token stream (and, for SFT data, one loss-mask
stream); `window(start, n)` may cross shard boundaries. Opening it checks that tokenizer.json is
the one the manifest names (sha256) and that each shard has the size the manifest says; full
checksums are `lmforge data verify`'s job (they read every byte).

`Loader` turns data steps into one rank's batches. Because the order is a function of (seed,
position), `state_dict()` is a handful of numbers and `load_state_dict()` resumes at the exact
next batch in O(1), on any world size. The fingerprint in the state catches data that changed
under a run. `val_batches` reads the validation split's samples in order, so every evaluation sees
the same tokens.

Trade-off: a sample is gathered with one small copy per window or row (global_batch // world
copies per step); that is far cheaper than any model step here, so there is no background prefetch
thread to reason about. Greedy in-order packing fills rows less tightly than a bin-packing sort
would (figures: benchmarks/finetune.py), but a row stays one contiguous span of the stream, which
`data inspect` traces back to the source lines.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ..errors import DataError
from ..tokenizer import Tokenizer
from . import order
from .manifest import document_inputs, document_starts, read_manifest

Batch = dict[str, torch.Tensor]  # tensors with a leading batch dimension
IGNORE = -100  # a target that is not scored (padding, untrained tokens): model.py's ignore_index


@runtime_checkable
class Source(Protocol):
    """What a sample is: `n_samples` samples, identified by `fingerprint`, read by id."""

    n_samples: int

    @property
    def fingerprint(self) -> str: ...

    def width(self, sample_ids: np.ndarray) -> int:
        """The padded length a batch of these samples needs (the longest of them)."""
        ...

    def batch(self, sample_ids: np.ndarray, width: int | None = None) -> Batch:
        """The samples `sample_ids` ((N,) int64) as a dict of (N, ...) tensors, padded to `width`
        (default: `width(sample_ids)`)."""
        ...


class TokenDataset:
    """One split of a prepared dataset as a single memory-mapped token stream (and, for SFT data,
    the loss-mask stream beside it)."""

    def __init__(self, path: str | os.PathLike, split: str = "train"):
        self.path = Path(path)
        self.manifest: dict[str, Any] = read_manifest(self.path)
        if split not in self.manifest["splits"]:
            raise DataError(f"{self.path}: no split {split!r} (have {sorted(self.manifest['splits'])})")
        self.split = split
        self.kind: str = self.manifest.get("kind", "text")  # "text" (prepare) or "sft" (prepare --sft)
        self.tokenizer_path = self.path / self.manifest["tokenizer"]
        sha = Tokenizer.load(self.tokenizer_path).sha256
        if sha != self.manifest["tokenizer_sha256"]:
            raise DataError(
                f"{self.tokenizer_path} is not the tokenizer this dataset was prepared with "
                f"(sha256 {sha[:12]}…, manifest {self.manifest['tokenizer_sha256'][:12]}…); run `lmforge data verify`"
            )
        self.fingerprint: str = self.manifest["fingerprint"]
        self.dtype = np.dtype(self.manifest["dtype"])
        self.shards: list[np.ndarray] = []
        self.masks: list[np.ndarray] | None = None
        shards = [s for s in self.manifest["splits"][split]["shards"] if s["tokens"]]
        for shard in self.manifest["splits"][split]["shards"]:
            self._check(self.path / shard["file"], shard["tokens"] * self.dtype.itemsize)
            if "mask" in shard:
                self._check(self.path / shard["mask"]["file"], shard["tokens"])
        self.shards = [np.memmap(self.path / s["file"], dtype=self.dtype, mode="r") for s in shards]
        if shards and all("mask" in s for s in shards):
            self.masks = [np.memmap(self.path / s["mask"]["file"], dtype=np.uint8, mode="r") for s in shards]
        # starts[k] is the stream position of shard k's first token; starts[-1] == n_tokens
        self.starts: list[int] = np.cumsum([0] + [len(s) for s in self.shards]).tolist()
        self.n_tokens: int = self.starts[-1]
        self._documents: np.ndarray | None = None

    def _check(self, f: Path, size: int) -> None:
        if not f.is_file():
            raise DataError(f"shard missing: {f}; run `lmforge data verify {self.path}`")
        if f.stat().st_size != size:
            raise DataError(f"shard has the wrong size: {f}; run `lmforge data verify {self.path}`")

    @property
    def document_starts(self) -> np.ndarray:
        """(D,) int64: where each document of the split starts in the stream (the document index)."""
        if self._documents is None:
            self._documents = document_starts(self.manifest, self.split)
        return self._documents

    def num_samples(self, seq_len: int) -> int:
        return order.num_samples(self.n_tokens, seq_len)

    def require_samples(self, seq_len: int) -> int:
        """num_samples(seq_len), or a DataError naming the split's tokens and the window it needs."""
        n = self.num_samples(seq_len)
        if n < 1:
            raise DataError(
                f"{self.path}: the {self.split} split has {self.n_tokens} tokens, fewer than one sample of "
                f"seq_len + 1 = {seq_len + 1}; use a smaller seq_len or more data"
            )
        return n

    def window(self, start: int, length: int) -> np.ndarray:
        """(length,) tokens stream[start : start + length] in the dataset dtype (a view when in one shard)."""
        return self._window(self.shards, start, length)

    def mask_window(self, start: int, length: int) -> np.ndarray:
        """(length,) uint8 loss mask of the same tokens (1: trained); all ones for data without a mask."""
        if self.masks is None:
            return np.ones(length, dtype=np.uint8)
        return self._window(self.masks, start, length)

    def trained_targets(self, start: int, length: int) -> np.ndarray:
        """(length - 1,) bool: whether each target of stream[start : start + length] is trained: for
        data with a loss mask, where the mask says so and the target continues its input's document
        (never the first token of the next one); for a text stream, every target."""
        if self.masks is None:
            return np.ones(length - 1, dtype=bool)
        docs = self.document_ids(start, length)
        return self.mask_window(start, length)[1:].astype(bool) & (docs[1:] == docs[:-1])

    def document_ids(self, start: int, length: int) -> np.ndarray:
        """(length,) int64: the index of the document each of stream[start : start + length] belongs to."""
        return np.searchsorted(self.document_starts, np.arange(start, start + length), side="right") - 1

    def _window(self, arrays: list[np.ndarray], start: int, length: int) -> np.ndarray:
        if start < 0 or start + length > self.n_tokens:
            raise IndexError(f"window [{start}, {start + length}) outside the {self.split} stream of {self.n_tokens} tokens")
        k = bisect.bisect_right(self.starts, start) - 1
        offset = start - self.starts[k]
        if offset + length <= len(arrays[k]):  # the common case: one shard
            return arrays[k][offset : offset + length]
        parts = []
        while length > 0:
            take = arrays[k][offset : offset + length]
            parts.append(take)
            length -= len(take)
            k, offset = k + 1, 0
        return np.concatenate(parts)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """(N, length) int64: one window per start position."""
        out = np.empty((len(starts), length), dtype=np.int64)
        for row, start in enumerate(starts.tolist()):
            out[row] = self.window(start, length)
        return out


def pad_rows(rows: Sequence[np.ndarray], value: int, length: int | None = None) -> np.ndarray:
    """(N, length) int64 of rows of any lengths, each left-aligned and padded with `value`
    (length: the longest row by default)."""
    width = max((len(r) for r in rows), default=0) if length is None else length
    out = np.full((len(rows), width), value, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _relative(documents: np.ndarray) -> np.ndarray:
    """Document ids of a row renumbered from 0 (only equality matters; small numbers read better)."""
    return documents - documents[0] if len(documents) else documents


class TokenWindows:
    """Pretraining samples: fixed windows of the split's token stream (module docstring)."""

    def __init__(self, dataset: TokenDataset, seq_len: int, *, document_mask: bool = False) -> None:
        self.dataset, self.seq_len, self.document_mask = dataset, seq_len, document_mask
        self.n_samples = dataset.num_samples(seq_len)

    @property
    def fingerprint(self) -> str:
        return self.dataset.fingerprint

    def spans(self, sample_ids: np.ndarray) -> list[tuple[int, int]]:
        """(start, length) in the stream of each sample."""
        return [(i * self.seq_len, self.seq_len + 1) for i in sample_ids.tolist()]

    def width(self, sample_ids: np.ndarray) -> int:
        return self.seq_len  # every window is full

    def batch(self, sample_ids: np.ndarray, width: int | None = None) -> Batch:
        t = torch.from_numpy(self.dataset.windows(np.asarray(sample_ids, dtype=np.int64) * self.seq_len, self.seq_len + 1))
        out = {"inputs": t[:, :-1].contiguous(), "targets": t[:, 1:].contiguous()}  # (B, T) each: targets shifted by one
        if self.document_mask:
            docs = [_relative(self.dataset.document_ids(s, n - 1)) for s, n in self.spans(sample_ids)]
            out["documents"] = torch.from_numpy(np.stack(docs))
        return out


class DocumentRows:
    """SFT samples: rows of whole documents, packed or one per row, padded per batch (module docstring)."""

    def __init__(self, dataset: TokenDataset, seq_len: int, *, document_mask: bool = True, packing: bool = True,
                 pad_id: int | None = None) -> None:
        self.dataset, self.seq_len, self.document_mask, self.packing = dataset, seq_len, document_mask, packing
        self.pad_id = pad_id if pad_id is not None else int(dataset.manifest.get("pad_id") or dataset.manifest.get("eos_id") or 0)
        starts = dataset.document_starts
        lengths = np.diff(np.append(starts, dataset.n_tokens))
        fits = lengths <= seq_len + 1
        self.n_documents = len(starts)
        self.dropped = int((~fits).sum())  # documents longer than a row: left out, never cut
        self.longest = int(lengths.max()) if len(lengths) else 0
        self.rows = _pack(starts[fits], lengths[fits], seq_len + 1) if packing else np.stack([starts[fits], lengths[fits]], 1)
        self.n_samples = len(self.rows)
        self.filled = float(lengths[fits].sum()) / max(1, self.n_samples * (seq_len + 1))  # tokens / row capacity

    @property
    def fingerprint(self) -> str:
        return self.dataset.fingerprint if self.packing else f"{self.dataset.fingerprint}-unpacked"

    def spans(self, sample_ids: np.ndarray) -> list[tuple[int, int]]:
        return [(int(self.rows[i, 0]), int(self.rows[i, 1])) for i in np.asarray(sample_ids).tolist()]

    def width(self, sample_ids: np.ndarray) -> int:
        return int(self.rows[np.asarray(sample_ids, dtype=np.int64), 1].max()) - 1  # T: the longest row's inputs

    def batch(self, sample_ids: np.ndarray, width: int | None = None) -> Batch:
        spans = self.spans(sample_ids)
        width = self.width(sample_ids) if width is None else width
        tokens = [np.asarray(self.dataset.window(s, n), dtype=np.int64) for s, n in spans]
        trained = [self.dataset.trained_targets(s, n) for s, n in spans]
        out = {
            "inputs": torch.from_numpy(pad_rows([t[:-1] for t in tokens], self.pad_id, width)),
            "targets": torch.from_numpy(pad_rows([t[1:] for t in tokens], IGNORE, width)),
            "loss_mask": torch.from_numpy(pad_rows(trained, 0, width).astype(bool)),
        }
        if self.document_mask:
            docs = [_relative(self.dataset.document_ids(s, n - 1)) for s, n in spans]
            out["documents"] = torch.from_numpy(pad_rows(docs, -1, width))
        return out


class PreferencePairs:
    """DPO samples: (chosen, rejected) pairs of whole sequences, padded per batch (module docstring)."""

    def __init__(self, dataset: TokenDataset, seq_len: int, *, pad_id: int | None = None) -> None:
        self.dataset, self.seq_len = dataset, seq_len
        self.pad_id = pad_id if pad_id is not None else int(dataset.manifest.get("pad_id") or dataset.manifest.get("eos_id") or 0)
        starts = dataset.document_starts
        if len(starts) % 2:
            raise DataError(f"{dataset.path}: the {dataset.split} split has {len(starts)} documents, not (chosen, rejected) "
                            "pairs; re-run `lmforge prepare --dpo`")
        lengths = np.diff(np.append(starts, dataset.n_tokens))
        pairs = np.stack([starts[0::2], lengths[0::2], starts[1::2], lengths[1::2]], 1)  # (P, 4) chosen, rejected spans
        fits = np.maximum(pairs[:, 1], pairs[:, 3]) <= seq_len + 1
        self.n_pairs = len(pairs)
        self.dropped = int((~fits).sum())  # pairs with a sequence longer than a row: left out, never cut
        self.longest = int(lengths.max()) if len(lengths) else 0
        self.pairs = pairs[fits]
        self.n_samples = len(self.pairs)

    @property
    def fingerprint(self) -> str:
        return self.dataset.fingerprint

    def spans(self, sample_ids: np.ndarray) -> list[tuple[int, int]]:
        """(start, length) of each pair in the stream: its chosen sequence, then its rejected one."""
        return [(int(self.pairs[i, 0]), int(self.pairs[i, 1] + self.pairs[i, 3])) for i in np.asarray(sample_ids).tolist()]

    def width(self, sample_ids: np.ndarray) -> int:
        rows = self.pairs[np.asarray(sample_ids, dtype=np.int64)]
        return int(max(rows[:, 1].max(), rows[:, 3].max())) - 1  # T: the longest sequence's inputs

    def batch(self, sample_ids: np.ndarray, width: int | None = None) -> Batch:
        width = self.width(sample_ids) if width is None else width
        spans = [(int(r[0]), int(r[1])) if side == 0 else (int(r[2]), int(r[3]))
                 for r in self.pairs[np.asarray(sample_ids, dtype=np.int64)] for side in (0, 1)]  # chosen, rejected, ...
        tokens = [np.asarray(self.dataset.window(s, n), dtype=np.int64) for s, n in spans]
        trained = [self.dataset.trained_targets(s, n) for s, n in spans]
        out = {"inputs": pad_rows([t[:-1] for t in tokens], self.pad_id, width),
               "targets": pad_rows([t[1:] for t in tokens], IGNORE, width),
               "loss_mask": pad_rows(trained, 0, width).astype(bool)}
        return {k: torch.from_numpy(v.reshape(-1, 2, width)) for k, v in out.items()}  # (B, 2, T)


def _pack(starts: np.ndarray, lengths: np.ndarray, capacity: int) -> np.ndarray:
    """(R, 2) int64 [start, length] rows of consecutive documents, greedily in stream order: a row
    takes documents while they fit in `capacity` tokens. Consecutive kept documents are contiguous
    in the stream unless a dropped one lies between them, which ends the row."""
    rows: list[tuple[int, int]] = []
    row_start, row_len = -1, 0
    for s, n in zip(starts.tolist(), lengths.tolist()):
        if row_len and row_start + row_len == s and row_len + n <= capacity:
            row_len += n
            continue
        if row_len:
            rows.append((row_start, row_len))
        row_start, row_len = s, n
    if row_len:
        rows.append((row_start, row_len))
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


class Records:
    """Variable-length records: per-token columns held flat (each (total,)) and cut by `offsets`
    ((n + 1,) int64: record i is [offsets[i], offsets[i + 1])), padded per batch with each
    column's pad value. `batch` gives {column: (B, L) int64, "lengths": (B,) int64}, L the
    longest record of the batch. The fingerprint is the caller's (what the records were made from)."""

    def __init__(self, columns: dict[str, np.ndarray], offsets: np.ndarray, *, fingerprint: str,
                 pad: dict[str, int] | None = None) -> None:
        self.columns, self.offsets = columns, np.asarray(offsets, dtype=np.int64)
        total = int(self.offsets[-1]) if len(self.offsets) else 0
        bad = [name for name, col in columns.items() if len(col) != total]
        if bad or len(self.offsets) < 1 or np.any(np.diff(self.offsets) < 0):
            raise ValueError(f"records: offsets must rise from 0 to every column's length ({total}); bad: {bad}")
        self.pad = {name: 0 for name in columns} | (pad or {})
        self.n_samples = len(self.offsets) - 1
        self._fingerprint = fingerprint

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def width(self, sample_ids: np.ndarray) -> int:
        ids = np.asarray(sample_ids, dtype=np.int64)
        return int((self.offsets[ids + 1] - self.offsets[ids]).max(initial=0))

    def batch(self, sample_ids: np.ndarray, width: int | None = None) -> Batch:
        ids = np.asarray(sample_ids, dtype=np.int64)
        a, b = self.offsets[ids], self.offsets[ids + 1]
        width = self.width(ids) if width is None else width
        out = {name: torch.from_numpy(pad_rows([col[s:e] for s, e in zip(a, b)], self.pad[name], width))
               for name, col in self.columns.items()}
        out["lengths"] = torch.from_numpy(b - a)
        return out


class Mixture:
    """Several datasets' samples read in the weighted mixed order (module docstring; order.py)."""

    def __init__(self, sources: Sequence[Source], weights: Sequence[float], names: Sequence[str], *,
                 max_repeat: float) -> None:
        if not (len(sources) == len(weights) == len(names)) or not sources:
            raise ValueError("a mixture needs one weight and one name per source, and at least one source")
        self.sources, self.weights, self.names = list(sources), [float(w) for w in weights], list(names)
        self.quotas = order.mix_quotas(self.weights)
        self.sizes = [s.n_samples for s in self.sources]
        self.offsets = np.cumsum([0] + self.sizes).astype(np.int64)  # dataset k's ids: [offsets[k], offsets[k + 1])
        self.n_samples = int(self.offsets[-1])
        self.max_repeat = max_repeat
        # the most draws of dataset k a run may make: max_repeat passes over its samples
        self.caps = [math.floor(max_repeat * n) for n in self.sizes]

    @property
    def fingerprint(self) -> str:
        """What decides the order: each dataset's fingerprint and share (not max_repeat, a cap)."""
        parts = [[s.fingerprint, q] for s, q in zip(self.sources, self.quotas)]
        return "mix-" + hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def sample_ids(self, positions: np.ndarray, *, seed: int, global_batch: int = 0) -> np.ndarray:
        """(N,) global sample ids read at `positions`; DataError when one would read a dataset past its
        cap (naming the data step when `global_batch` is given)."""
        which, draw, ids = order.mixed_indices(positions, seed=seed, quotas=self.quotas, sizes=self.sizes)
        over = draw >= np.asarray(self.caps, dtype=np.int64)[which]
        if over.any():
            k = int(which[over][0])
            raise DataError(self.ran_out(k, int(np.asarray(positions)[over][0]), global_batch))
        return self.offsets[which] + ids

    def record(self) -> dict[str, Any]:
        """What the run's events record of the mixture: per dataset (by name) its path, weight,
        share of every block of the order, fingerprint, train samples and cap (max_repeat passes)."""
        return {name: {"path": str(getattr(src, "dataset", None) and src.dataset.path), "weight": w,  # type: ignore[attr-defined]
                       "share": q / sum(self.quotas), "fingerprint": src.fingerprint, "samples": n, "max_draws": cap}
                for name, src, w, q, n, cap in zip(self.names, self.sources, self.weights, self.quotas, self.sizes, self.caps)}

    def ran_out(self, k: int, position: int, global_batch: int = 0) -> str:
        """The message for dataset k running out (its cap reached) at `position`."""
        where = f"data step {position // global_batch} (sample position {position})" if global_batch else f"sample position {position}"
        return (f"data.mix: {self.names[k]} runs out at {where}: it has {self.sizes[k]} train samples and "
                f"may be read at most data.mix_max_repeat = {self.max_repeat:g} times ({self.caps[k]} draws); lower "
                f"its weight, raise data.mix_max_repeat, add data, or stop the run sooner (train.max_steps)")

    def check_until(self, n_positions: int, *, seed: int, global_batch: int = 0) -> list[int]:
        """Each dataset's draws over positions [0, n_positions); DataError (`ran_out`) if any passes its cap."""
        counts = order.mixed_draw_counts(n_positions, seed=seed, quotas=self.quotas)
        for k, c in enumerate(counts):
            if c > self.caps[k]:
                # the first position past the cap: found by bisection over the pure count function
                lo, hi = 0, n_positions
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (mid, hi) if order.mixed_draw_counts(mid, seed=seed, quotas=self.quotas)[k] <= self.caps[k] else (lo, mid)
                raise DataError(self.ran_out(k, lo, global_batch))
        return counts

    def _split(self, sample_ids: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """[(dataset k, rows of the batch, local ids)] for each dataset present."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        which = np.searchsorted(self.offsets, ids, side="right") - 1
        return [(int(k), np.flatnonzero(which == k), ids[which == k] - self.offsets[k]) for k in np.unique(which)]

    def width(self, sample_ids: np.ndarray) -> int:
        return max(self.sources[k].width(local) for k, _, local in self._split(sample_ids))

    def batch(self, sample_ids: np.ndarray, width: int | None = None) -> Batch:
        width = self.width(sample_ids) if width is None else width
        n = len(sample_ids)
        out: Batch = {}
        for k, rows, local in self._split(sample_ids):
            part = self.sources[k].batch(local, width=width)
            if out and set(part) != set(out):
                raise DataError(f"data.mix: {self.names[k]} gives samples with {sorted(part)}, another dataset "
                                f"{sorted(out)}; mix datasets of one kind")
            for key, t in part.items():
                if key not in out:
                    out[key] = t.new_empty((n, *t.shape[1:]))
                out[key][torch.from_numpy(rows)] = t
        return out


def document_mask_on(setting: str, dataset: TokenDataset) -> bool:
    """`data.document_mask` for this dataset: "auto" is on for SFT data, off for a text stream."""
    return dataset.kind == "sft" if setting == "auto" else setting == "true"


DatasetSource = TokenWindows | DocumentRows | PreferencePairs  # what a prepared dataset's split is read as


def open_source(dataset: str | os.PathLike | TokenDataset, split: str = "train", *, seq_len: int,
                document_mask: str = "auto", packing: bool = True) -> DatasetSource:
    """The source of a prepared dataset's split: DocumentRows for SFT data, PreferencePairs for
    preference data (one sequence per row: document masking and packing do not apply), TokenWindows
    otherwise."""
    ds = dataset if isinstance(dataset, TokenDataset) else TokenDataset(dataset, split)
    if seq_len < 1:
        order.num_samples(0, seq_len)  # the one seq_len error
    if ds.kind == "dpo":
        return PreferencePairs(ds, seq_len)
    if ds.kind == "sft":
        return DocumentRows(ds, seq_len, document_mask=document_mask_on(document_mask, ds), packing=packing)
    return TokenWindows(ds, seq_len, document_mask=document_mask_on(document_mask, ds))


def require_samples(source: DatasetSource) -> int:
    """The source's n_samples, or a DataError saying why it has none."""
    if source.n_samples >= 1:
        return source.n_samples
    ds = source.dataset
    if isinstance(source, PreferencePairs):
        raise DataError(
            f"{ds.path}: the {ds.split} split has no pair whose sequences fit seq_len + 1 = {source.seq_len + 1} tokens "
            f"({source.dropped} longer ones, the longest sequence {source.longest}); raise data.seq_len or add shorter pairs")
    if isinstance(source, DocumentRows):
        raise DataError(
            f"{ds.path}: the {ds.split} split has no document of at most seq_len + 1 = {source.seq_len + 1} tokens "
            f"({source.dropped} longer ones, the longest {source.longest}); raise data.seq_len or add shorter examples")
    return ds.require_samples(source.seq_len)


class Loader:
    """Batches of one rank for consecutive data steps; resumable from `state_dict()`.

    `data` is a prepared dataset's path (its source chosen by `open_source`) or any Source."""

    def __init__(
        self,
        data: str | os.PathLike | Source,
        *,
        seq_len: int,
        global_batch: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        split: str = "train",
        document_mask: str = "auto",
        packing: bool = True,
    ):
        if isinstance(data, (str, os.PathLike)):
            self.source: Source = open_source(data, split, seq_len=seq_len, document_mask=document_mask, packing=packing)
            self.n_samples = require_samples(self.source)  # type: ignore[arg-type]
        elif isinstance(data, (TokenWindows, DocumentRows)):
            self.source, self.n_samples = data, require_samples(data)
        else:
            self.source, self.n_samples = data, data.n_samples
            if self.n_samples < 1:
                raise DataError("the data source has no samples")
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.seed = seed
        self.rank = rank
        self.world = world
        order.rank_batch(0, rank, world, seed=seed, n_samples=self.n_samples, global_batch=global_batch)  # validate now
        self.step = 0  # the next data step to read

    @property
    def fingerprint(self) -> str:
        return self.source.fingerprint

    @property
    def epoch(self) -> int:
        """Epoch of the next sample to read."""
        return self.step * self.global_batch // self.n_samples

    def global_ids(self, step: int) -> np.ndarray:
        """(global_batch,) sample ids of data step `step`: the plain order, or a Mixture's mixed order."""
        if not isinstance(self.source, Mixture):
            return order.global_batch(step, seed=self.seed, n_samples=self.n_samples, global_batch=self.global_batch)
        order._check_step(step)
        start = step * self.global_batch
        return self.source.sample_ids(np.arange(start, start + self.global_batch, dtype=np.int64), seed=self.seed,
                                      global_batch=self.global_batch)

    def peek(self, step: int) -> Batch:
        """This rank's batch of data step `step`: global_batch // world samples, padded to the
        longest sample of the whole global batch, so that every rank on any world size computes
        with the same shapes (deterministic_reduce stays bit-identical to one process)."""
        everyone = self.global_ids(step)
        per = self.global_batch // self.world
        return self.source.batch(everyone[self.rank * per : (self.rank + 1) * per], width=self.source.width(everyone))

    def next(self) -> Batch:
        batch = self.peek(self.step)
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next()

    def tokens(self, step: int) -> int:
        """The tokens of data step `step`'s global batch: the source's count of real tokens when it
        keeps one (`tokens(sample_ids)`: pairs), else global_batch x seq_len."""
        count = getattr(self.source, "tokens", None)
        if count is None:
            return self.global_batch * self.seq_len
        return int(count(self.global_ids(step)))

    def skip(self, n_steps: int) -> None:
        """Advance the cursor without reading (e.g. past a data window that made the loss spike)."""
        if n_steps < 0:
            raise ValueError(f"cannot skip a negative number of steps ({n_steps})")
        self.step += n_steps

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch": self.global_batch,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Resume at sd["step"] (O(1)); refuses a state written for other data or another shape."""
        changed = [
            f"{key}: checkpoint {sd.get(key)!r}, now {mine!r}"
            for key, mine in (
                ("fingerprint", self.fingerprint),
                ("seq_len", self.seq_len),
                ("global_batch", self.global_batch),
                ("seed", self.seed),
            )
            if sd.get(key) != mine
        ]
        if changed:
            hint = " (the dataset changed under this run: re-prepare the original data or start a new run)" if sd.get(
                "fingerprint"
            ) != self.fingerprint else ""
            raise DataError("cannot resume the data loader: " + "; ".join(changed) + hint)
        self.step = int(sd["step"])


def val_batches(
    path: str | os.PathLike, *, seq_len: int, batch_size: int, max_batches: int | None = None,
    document_mask: str = "auto", packing: bool = True, inputs: bool = False,
) -> Iterator[Batch]:
    """The val split's samples in order, in batches of up to batch_size (the last may be smaller).
    inputs: each batch also has `input` (B, T) int64, the input (manifest.input_names) the document
    of each target came from (-1: padding), for per-input loss.

    For a text stream, window j covers val tokens [j*seq_len, j*seq_len + seq_len + 1): every
    evaluation sees the same non-overlapping windows; for SFT data, the rows of the val split; for
    preference data, its pairs.
    """
    source = open_source(path, "val", seq_len=seq_len, document_mask=document_mask, packing=packing)
    n = source.n_samples
    if n < 1:
        if isinstance(source, PreferencePairs):
            raise DataError(
                f"{path}: the val split has no pair whose sequences fit seq_len + 1 = {seq_len + 1} tokens "
                f"({source.dropped} longer ones); re-run prepare with a larger --val-fraction, or raise data.seq_len")
        if isinstance(source, DocumentRows):
            raise DataError(
                f"{path}: the val split has no document of at most seq_len + 1 = {seq_len + 1} tokens "
                f"({source.dropped} longer ones); re-run prepare with a larger --val-fraction, or raise data.seq_len")
        raise DataError(
            f"{path}: the val split has {source.dataset.n_tokens} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}; "
            f"re-run prepare with a larger --val-fraction, or evaluate with a smaller seq_len"
        )
    if not inputs:
        yield from in_order(source, batch_size, max_batches)
        return
    if isinstance(source, PreferencePairs):
        raise DataError(f"{path}: per-input loss is for text and SFT data, not preference pairs")
    of_document = document_inputs(source.dataset.manifest, "val")
    for ids, batch in in_order(source, batch_size, max_batches, with_ids=True):
        batch["input"] = torch.from_numpy(_target_inputs(source, ids, of_document, batch["targets"].shape[1]))
        yield batch


def _target_inputs(source: TokenWindows | DocumentRows, ids: np.ndarray, of_document: np.ndarray, width: int) -> np.ndarray:
    """(N, width) int64: the input (index into manifest.input_names) of each target's document; -1: padding."""
    rows = [of_document[source.dataset.document_ids(s + 1, n - 1)] for s, n in source.spans(ids)]  # target -> input
    return pad_rows(rows, -1, width)


def input_val_batches(
    path: str | os.PathLike, input_index: int, *, seq_len: int, batch_size: int, max_batches: int | None = None,
    document_mask: str = "auto", packing: bool = True,
) -> Iterator[Batch]:
    """One input's share of the val split (a dataset prepared from several inputs): the val samples
    that hold a target of a document of input `input_index`, in order, with every other input's
    targets unscored (IGNORE, and out of the loss mask), so a loss over them is that input's alone.
    max_batches caps the batches of this input (not of the split: the split is in input order)."""
    source = open_source(path, "val", seq_len=seq_len, document_mask=document_mask, packing=packing)
    if isinstance(source, PreferencePairs):
        raise DataError(f"{path}: per-input loss is for text and SFT data, not preference pairs")
    of_document = document_inputs(source.dataset.manifest, "val")
    starts = source.dataset.document_starts
    # sample i holds input g iff a document of g lies within its targets' first and last documents
    spans = np.array(source.spans(np.arange(source.n_samples, dtype=np.int64)), dtype=np.int64).reshape(-1, 2)
    first = np.searchsorted(starts, spans[:, 0] + 1, side="right") - 1
    last = np.searchsorted(starts, spans[:, 0] + spans[:, 1] - 1, side="right") - 1
    seen = np.concatenate([[0], np.cumsum(of_document == input_index)])  # documents of g before each document
    ids = np.flatnonzero(seen[last + 1] - seen[first] > 0).astype(np.int64)
    n_batches = -(-len(ids) // batch_size)
    for b in range(n_batches if max_batches is None else min(n_batches, max_batches)):
        chunk = ids[b * batch_size : (b + 1) * batch_size]
        batch = source.batch(chunk)
        other = torch.from_numpy(_target_inputs(source, chunk, of_document, batch["targets"].shape[1]) != input_index)
        batch["targets"] = batch["targets"].masked_fill(other, IGNORE)
        if "loss_mask" in batch:
            batch["loss_mask"] = batch["loss_mask"] & ~other
        yield batch


def in_order(source: Source, batch_size: int, max_batches: int | None = None, *, with_ids: bool = False) -> Iterator[Any]:
    """A source's samples 0, 1, 2, ... in batches of up to batch_size (the last may be smaller),
    at most max_batches of them (None: all); with_ids: (sample ids, batch) pairs."""
    n = source.n_samples
    n_batches = -(-n // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        ids = np.arange(b * batch_size, min(n, (b + 1) * batch_size), dtype=np.int64)
        yield (ids, source.batch(ids)) if with_ids else source.batch(ids)


def scored_targets(batch: Batch) -> torch.Tensor:
    """(B, T) targets with IGNORE wherever the batch's loss mask says a target is not trained."""
    if "loss_mask" not in batch:
        return batch["targets"]
    return batch["targets"].masked_fill(~batch["loss_mask"], IGNORE)
