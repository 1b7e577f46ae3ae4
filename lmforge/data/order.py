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

Mixed order (`data.mix`: several prepared datasets, each with a weight). Positions are cut into
blocks of MIX_BLOCK; block b holds exactly q_k positions of dataset k, the weights' shares of
MIX_BLOCK rounded by largest remainder (`mix_quotas`), laid out by the keyed permutation of the
block (`mix_seed(seed)`, epoch b): slot s of the block belongs to dataset k when
`Q_{k-1} <= s < Q_k` (Q the cumulative quotas), and position i of the block reads the slot
`perm[i]`. The j-th position that falls to dataset k (j counts over all earlier blocks, b*q_k, plus
the earlier positions of its own block) reads that dataset's own order:
`sample_indices(j, seed=source_seed(seed, k), n_samples=n_k)`, so every sample of a dataset is read
once per pass over it. Everything is a pure function of (seed, position, quotas, sizes): a batch
needs its one or two blocks (O(MIX_BLOCK), cached), any world size reads the same global batch, and
a resume needs only the step. With one dataset the mixed order *is* the plain order (its quota is
the whole block, and dataset 0 keeps the seed). Trade-off: a weight is resolved to 1/MIX_BLOCK
(a positive share below that is refused, config.py), and within a block the layout is random, so a
batch's shares vary around the weights while every block's are exact.
"""

from __future__ import annotations

import functools

import numpy as np

from ..errors import ConfigError, DataError
from ..ranges import MIX_BLOCK

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


# ---- mixed order (data.mix) -------------------------------------------------------------------

_MIX_TAG = 0x6D6978  # "mix": keys the block layout apart from every dataset's own order


def mix_quotas(weights: list[float], block: int = MIX_BLOCK) -> tuple[int, ...]:
    """Each weight's share of `block` positions, rounded by largest remainder (ties: the earlier
    dataset); the quotas sum to `block`. Weights must be finite, >= 0, with a positive sum."""
    total = float(sum(weights))
    if not weights or not total > 0 or any(not (w >= 0) for w in weights):
        raise ConfigError(f"mix weights must be >= 0 with a positive sum, got {weights}")
    exact = [w / total * block for w in weights]
    quotas = [int(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda k: (-(exact[k] - quotas[k]), k))
    for k in by_remainder[: block - sum(quotas)]:
        quotas[k] += 1
    return tuple(quotas)


def mix_seed(seed: int) -> int:
    """The key of the block layout (derived from data.seed, independent of every dataset's order)."""
    return _splitmix64((seed & _M64) ^ _MIX_TAG)


def source_seed(seed: int, k: int) -> int:
    """The seed of dataset k's own order: data.seed for the first (so a mix of one dataset is the
    plain order), a derived one for the others (two datasets of one size are not read in step)."""
    return seed if k == 0 else _splitmix64(_splitmix64(seed & _M64) ^ k)


@functools.lru_cache(maxsize=8)
def _mix_block(seed: int, block: int, quotas: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """((B,) dataset of each position of block `block`, (B,) its rank among that dataset's
    positions of the block); B = sum(quotas)."""
    size = sum(quotas)
    slots = _permute(np.arange(size, dtype=np.uint64), mix_seed(seed), block, size).astype(np.int64)
    which = np.searchsorted(np.cumsum(quotas), slots, side="right")  # slot -> dataset
    rank = np.empty(size, dtype=np.int64)
    for k in range(len(quotas)):
        sel = which == k
        rank[sel] = np.arange(int(sel.sum()), dtype=np.int64)
    which.flags.writeable = rank.flags.writeable = False  # cached: shared by every caller
    return which, rank


def mixed_draws(positions: np.ndarray, *, seed: int, quotas: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(N,) positions -> ((N,) dataset k of each, (N,) draw j: how many earlier positions fell to k)."""
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size and positions.min() < 0:
        raise ValueError("positions must be >= 0")
    size = sum(quotas)
    blocks, within = positions // size, positions % size
    which = np.empty(positions.shape, dtype=np.int64)
    draw = np.empty(positions.shape, dtype=np.int64)
    q = np.asarray(quotas, dtype=np.int64)
    for b in np.unique(blocks):
        sel = blocks == b
        kb, rb = _mix_block(seed, int(b), quotas)
        which[sel] = kb[within[sel]]
        draw[sel] = int(b) * q[which[sel]] + rb[within[sel]]
    return which, draw


def mixed_indices(positions: np.ndarray, *, seed: int, quotas: tuple[int, ...], sizes: list[int]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N,) positions -> ((N,) dataset k, (N,) draw j, (N,) sample id within dataset k): the j-th
    sample of dataset k's own order (`sample_indices` with `source_seed(seed, k)`)."""
    which, draw = mixed_draws(positions, seed=seed, quotas=quotas)
    ids = np.empty(which.shape, dtype=np.int64)
    for k in np.unique(which):
        sel = which == k
        ids[sel] = sample_indices(draw[sel], seed=source_seed(seed, int(k)), n_samples=sizes[int(k)])
    return which, draw, ids


def mixed_draw_counts(n_positions: int, *, seed: int, quotas: tuple[int, ...]) -> list[int]:
    """How many of positions [0, n_positions) fall to each dataset (its draws so far)."""
    if n_positions < 0:
        raise ValueError("n_positions must be >= 0")
    size = sum(quotas)
    full, rest = divmod(n_positions, size)
    counts = [full * q for q in quotas]
    if rest:
        which, _ = _mix_block(seed, full, quotas)
        for k, c in enumerate(np.bincount(which[:rest], minlength=len(quotas)).tolist()):
            counts[k] += c
    return counts
