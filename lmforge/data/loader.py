"""Reading samples from a prepared dataset; the loader's whole state is one integer, `step`.

- `TokenDataset` memory-maps the shards of one split (np.memmap: the OS page cache does the
  caching, nothing is read up front) and presents them as one token stream; `window(start, n)`
  may cross shard boundaries. Opening it checks that tokenizer.json is the one the manifest names
  (sha256) and that each shard has the size the manifest says; full checksums are
  `lmforge data verify`'s job (they read every byte).
- `Loader` turns data steps into (inputs, targets) batches for one rank using the pure functions of
  `order.py`. Because the order is a function of (seed, position), `state_dict()` is a handful of
  numbers and `load_state_dict()` resumes at the exact next batch in O(1), on any world size.
  The dataset fingerprint in the state catches data that changed under a run.
- `val_batches` reads the validation split's non-overlapping windows in stream order, so every
  evaluation sees the same tokens.

Trade-off: a sample is gathered with one small copy per window (global_batch // world copies of
seq_len + 1 tokens per step); that is far cheaper than any model step here, so there is no
background prefetch thread to reason about.
"""

from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import numpy as np
import torch

from ..errors import DataError
from ..tokenizer import Tokenizer
from . import order
from .manifest import read_manifest


class TokenDataset:
    """One split of a prepared dataset as a single memory-mapped token stream."""

    def __init__(self, path: str | os.PathLike, split: str = "train"):
        self.path = Path(path)
        self.manifest: dict[str, Any] = read_manifest(self.path)
        if split not in self.manifest["splits"]:
            raise DataError(f"{self.path}: no split {split!r} (have {sorted(self.manifest['splits'])})")
        self.split = split
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
        for shard in self.manifest["splits"][split]["shards"]:
            f = self.path / shard["file"]
            if not f.is_file():
                raise DataError(f"shard missing: {f}; run `lmforge data verify {self.path}`")
            if f.stat().st_size != shard["tokens"] * self.dtype.itemsize:
                raise DataError(f"shard has the wrong size: {f}; run `lmforge data verify {self.path}`")
            if shard["tokens"]:
                self.shards.append(np.memmap(f, dtype=self.dtype, mode="r"))
        # starts[k] is the stream position of shard k's first token; starts[-1] == n_tokens
        self.starts: list[int] = np.cumsum([0] + [len(s) for s in self.shards]).tolist()
        self.n_tokens: int = self.starts[-1]

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
        if start < 0 or start + length > self.n_tokens:
            raise IndexError(f"window [{start}, {start + length}) outside the {self.split} stream of {self.n_tokens} tokens")
        k = bisect.bisect_right(self.starts, start) - 1
        offset = start - self.starts[k]
        if offset + length <= len(self.shards[k]):  # the common case: one shard
            return self.shards[k][offset : offset + length]
        parts = []
        while length > 0:
            take = self.shards[k][offset : offset + length]
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


def _split_xy(tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T + 1) int64 windows -> inputs (B, T), targets (B, T) (targets shifted by one)."""
    t = torch.from_numpy(tokens)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class Loader:
    """Batches of one rank for consecutive data steps; resumable from `state_dict()`."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        seq_len: int,
        global_batch: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        split: str = "train",
    ):
        self.dataset = TokenDataset(path, split)
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.seed = seed
        self.rank = rank
        self.world = world
        self.n_samples = self.dataset.require_samples(seq_len)
        order.rank_batch(0, rank, world, seed=seed, n_samples=self.n_samples, global_batch=global_batch)  # validate now
        self.step = 0  # the next data step to read

    @property
    def fingerprint(self) -> str:
        return self.dataset.fingerprint

    @property
    def epoch(self) -> int:
        """Epoch of the next sample to read."""
        return self.step * self.global_batch // self.n_samples

    def peek(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs, targets) of data step `step`, each (global_batch // world, seq_len) int64."""
        ids = order.rank_batch(
            step, self.rank, self.world, seed=self.seed, n_samples=self.n_samples, global_batch=self.global_batch
        )
        return _split_xy(self.dataset.windows(ids * self.seq_len, self.seq_len + 1))

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.peek(self.step)
        self.step += 1
        return batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next()

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
    path: str | os.PathLike, *, seq_len: int, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The val split's non-overlapping windows in stream order: (inputs, targets) of up to batch_size rows.

    Window j covers val tokens [j*seq_len, j*seq_len + seq_len + 1); the last batch may be smaller.
    """
    ds = TokenDataset(path, "val")
    n = ds.num_samples(seq_len)
    if n < 1:
        raise DataError(
            f"{path}: the val split has {ds.n_tokens} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}; "
            f"re-run prepare with a larger --val-fraction, or evaluate with a smaller seq_len"
        )
    n_batches = -(-n // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        starts = np.arange(b * batch_size, min(n, (b + 1) * batch_size), dtype=np.int64) * seq_len
        yield _split_xy(ds.windows(starts, seq_len + 1))
