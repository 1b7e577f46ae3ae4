"""The order in which training reads samples: pure functions of (seed, position), no state.

Definitions (see docs/data.md):
- A *sample* i of the train stream is the token window `[i*seq_len, i*seq_len + seq_len + 1)` of
  the concatenated train shards (inputs are its first seq_len tokens, targets its last seq_len),
  so `num_samples(n_tokens, seq_len) = (n_tokens - 1) // seq_len`.
- A *position* counts samples read since the start of training, over all epochs:
  `epoch = position // n_samples`, and the sample read at that position is
  `perm(seed, epoch)[position % n_samples]`, where `perm(seed, epoch)` is a keyed bijection
  of `range(n_samples)`.
- Data step s reads positions `[s*global_batch, (s+1)*global_batch)`; rank r of `world` reads the
  contiguous slice `[r*per, (r+1)*per)` of that global batch, `per = global_batch // world`.

Consequences: the order does not depend on the number of processes (the union of rank batches is
the global batch for every world that divides it), every sample is read exactly once per epoch,
an epoch boundary may fall in the middle of a batch (nothing is dropped or repeated), and resuming
at data step s needs only s (no replay).

The permutation is a balanced Feistel network on 2k bits (the smallest even width with
2^(2k) >= n_samples) with cycle walking: values that land outside range(n) are permuted again
until they land inside, which keeps the map a bijection on range(n). Memory is O(batch), not
O(n_samples); a batch of ids is computed vectorised in numpy (uint64 arithmetic wraps mod 2^64).
Round keys come from splitmix64 over (seed, epoch, round). Six rounds: more than enough mixing for
data order (this is not cryptography).
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, DataError

_ROUNDS = 6
_M64 = (1 << 64) - 1


def num_samples(n_tokens: int, seq_len: int) -> int:
    """Samples (windows of seq_len + 1 tokens, stride seq_len) in a stream of n_tokens."""
    if seq_len < 1:
        raise ConfigError(f"seq_len must be >= 1, got {seq_len}")
    return max(0, (n_tokens - 1) // seq_len)


def _splitmix64(x: int) -> int:
    """One splitmix64 output for a Python int state (used to derive round keys)."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _round_keys(seed: int, epoch: int) -> list[int]:
    base = _splitmix64(_splitmix64(seed & _M64) ^ (epoch & _M64))
    return [_splitmix64(base ^ r) for r in range(_ROUNDS)]


def _mix(x: np.ndarray, key: int) -> np.ndarray:
    """(N,) uint64 -> (N,) uint64: a keyed avalanche (murmur3 finalizer of x ^ key)."""
    x = x ^ np.uint64(key)
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xFF51AFD7ED558CCD)
    x = x ^ (x >> np.uint64(33))
    x = x * np.uint64(0xC4CEB9FE1A85EC53)
    return x ^ (x >> np.uint64(33))


def _feistel(x: np.ndarray, keys: list[int], half_bits: int) -> np.ndarray:
    """A bijection of range(2**(2*half_bits)), applied elementwise to (N,) uint64."""
    mask = np.uint64((1 << half_bits) - 1)
    shift = np.uint64(half_bits)
    left, right = x >> shift, x & mask
    for key in keys:
        left, right = right, left ^ (_mix(right, key) & mask)
    return (left << shift) | right


def _permute(idx: np.ndarray, seed: int, epoch: int, n: int) -> np.ndarray:
    """perm(seed, epoch)[idx] for (N,) uint64 idx in range(n), by cycle walking."""
    half_bits = max(1, ((n - 1).bit_length() + 1) // 2)  # 2**(2*half_bits) >= n
    keys = _round_keys(seed, epoch)
    out = _feistel(idx, keys, half_bits)
    outside = out >= np.uint64(n)
    # Each walk step lands inside with probability n / 2**(2*half_bits) >= 1/4; the walk from an
    # inside point returns inside before it cycles, so this loop ends.
    while outside.any():
        out[outside] = _feistel(out[outside], keys, half_bits)
        outside = out >= np.uint64(n)
    return out


def sample_indices(positions: np.ndarray, *, seed: int, n_samples: int) -> np.ndarray:
    """Vectorised `sample_index`: (N,) positions -> (N,) int64 sample ids."""
    if n_samples < 1:
        raise DataError("the train split has no complete sample (fewer than seq_len + 1 tokens)")
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size and positions.min() < 0:
        raise ValueError("positions must be >= 0")
    epochs = positions // n_samples
    within = (positions % n_samples).astype(np.uint64)
    out = np.empty(positions.shape, dtype=np.int64)
    # A batch spans one epoch, or two at a boundary (more only if global_batch > n_samples).
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = _permute(within[sel], seed, int(epoch), n_samples).astype(np.int64)
    return out


def sample_index(position: int, *, seed: int, n_samples: int) -> int:
    """The sample id read at `position` (samples read since the start of training)."""
    return int(sample_indices(np.array([position]), seed=seed, n_samples=n_samples)[0])


def _check_step(step: int) -> None:
    if step < 0:
        raise ConfigError(f"step must be >= 0 (data steps count from 0), got {step}")


def global_batch(step: int, *, seed: int, n_samples: int, global_batch: int) -> np.ndarray:
    """(global_batch,) int64 sample ids of data step `step` (positions step*B ... step*B + B - 1)."""
    if global_batch < 1:
        raise ConfigError(f"global_batch must be >= 1, got {global_batch}")
    _check_step(step)
    start = step * global_batch
    return sample_indices(np.arange(start, start + global_batch, dtype=np.int64), seed=seed, n_samples=n_samples)


def rank_batch(step: int, rank: int, world: int, *, seed: int, n_samples: int, global_batch: int) -> np.ndarray:
    """(global_batch // world,) int64: rank's contiguous slice of the global batch of `step`."""
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"rank must be in [0, world); got rank={rank}, world={world}")
    if global_batch % world:
        raise ConfigError(
            f"global_batch={global_batch} is not divisible by world={world} processes; "
            f"choose a global batch that is a multiple of the number of processes"
        )
    _check_step(step)
    per = global_batch // world
    start = step * global_batch + rank * per
    return sample_indices(np.arange(start, start + per, dtype=np.int64), seed=seed, n_samples=n_samples)
