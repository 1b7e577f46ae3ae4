"""The sample order: golden tables, bijection per epoch, world-size independence, epoch boundaries."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.data.order import global_batch, num_samples, rank_batch, sample_index, sample_indices
from lmforge.errors import ConfigError


@pytest.mark.parametrize(
    "n_tokens, seq_len, expected",
    [(0, 4, 0), (1, 4, 0), (4, 4, 0), (5, 4, 1), (8, 4, 1), (9, 4, 2), (1025, 1024, 1), (10_000, 1, 9_999)],
)
def test_num_samples_table(n_tokens: int, seq_len: int, expected: int) -> None:
    # a sample needs seq_len + 1 tokens and windows advance by seq_len
    assert num_samples(n_tokens, seq_len) == expected


def test_golden_order_seed0_n10() -> None:
    # positions 0..19 = epochs 0 and 1 of 10 samples; frozen so an accidental change of the order
    # (which would silently change every run's data) fails here
    got = sample_indices(np.arange(20), seed=0, n_samples=10).tolist()
    assert got == [8, 2, 4, 9, 5, 6, 3, 0, 7, 1, 3, 1, 9, 8, 6, 4, 0, 5, 7, 2]


def test_golden_batches_table() -> None:
    # n=10, global batch 4: step 2 straddles the epoch boundary (positions 8, 9 | 10, 11)
    table = {0: [8, 2, 4, 9], 1: [5, 6, 3, 0], 2: [7, 1, 3, 1], 3: [9, 8, 6, 4]}
    for step, ids in table.items():
        assert global_batch(step, seed=0, n_samples=10, global_batch=4).tolist() == ids
    assert rank_batch(2, 0, 2, seed=0, n_samples=10, global_batch=4).tolist() == [7, 1]
    assert rank_batch(2, 1, 2, seed=0, n_samples=10, global_batch=4).tolist() == [3, 1]


def test_seed_and_epoch_change_the_order() -> None:
    a = sample_indices(np.arange(100), seed=0, n_samples=100)
    b = sample_indices(np.arange(100), seed=1, n_samples=100)
    c = sample_indices(np.arange(100, 200), seed=0, n_samples=100)
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.array_equal(a, np.arange(100))  # it is shuffled at all


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**63), epoch=st.integers(0, 1000))
def test_each_epoch_is_a_permutation(n: int, seed: int, epoch: int) -> None:
    ids = sample_indices(np.arange(epoch * n, (epoch + 1) * n), seed=seed, n_samples=n)
    assert ids.dtype == np.int64
    assert np.array_equal(np.sort(ids), np.arange(n))


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(1, 500),
    seed=st.integers(0, 2**32),
    step=st.integers(0, 10_000),
    per=st.integers(1, 4),
)
def test_union_of_rank_batches_is_the_global_batch(n: int, seed: int, step: int, per: int) -> None:
    gb = 24 * per  # divisible by every world size below
    want = global_batch(step, seed=seed, n_samples=n, global_batch=gb)
    for world in (1, 2, 3, 4, 6, 8):
        parts = [rank_batch(step, r, world, seed=seed, n_samples=n, global_batch=gb) for r in range(world)]
        assert all(len(p) == gb // world for p in parts)
        assert np.array_equal(np.concatenate(parts), want)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 300), gb=st.integers(1, 64), seed=st.integers(0, 2**32), epochs=st.integers(1, 3))
def test_every_sample_read_once_per_epoch_across_steps(n: int, gb: int, seed: int, epochs: int) -> None:
    # read whole steps until `epochs` epochs are covered; boundaries fall mid-batch when gb does not divide n
    steps = -(-epochs * n // gb)
    stream = np.concatenate([global_batch(s, seed=seed, n_samples=n, global_batch=gb) for s in range(steps)])
    for e in range(epochs):
        assert np.array_equal(np.sort(stream[e * n : (e + 1) * n]), np.arange(n))


def test_sample_index_agrees_with_batches_and_is_pure() -> None:
    ids = global_batch(7, seed=3, n_samples=1000, global_batch=16)
    assert [sample_index(7 * 16 + j, seed=3, n_samples=1000) for j in range(16)] == ids.tolist()
    assert np.array_equal(ids, global_batch(7, seed=3, n_samples=1000, global_batch=16))


def test_huge_datasets_need_no_memory() -> None:
    # 10^12 samples: an explicit permutation would need 8 TB
    ids = global_batch(123_456_789, seed=0, n_samples=10**12, global_batch=1024)
    assert len(set(ids.tolist())) == 1024 and ids.min() >= 0 and ids.max() < 10**12


def test_world_must_divide_global_batch() -> None:
    with pytest.raises(ConfigError, match=r"global_batch=10 is not divisible by world=3"):
        rank_batch(0, 0, 3, seed=0, n_samples=100, global_batch=10)
    with pytest.raises(ConfigError, match=r"rank=2, world=2"):
        rank_batch(0, 2, 2, seed=0, n_samples=100, global_batch=10)


def test_negative_step_is_a_user_error() -> None:
    # `lmforge data inspect --step -1` must exit 2 with a message, not a ValueError traceback
    with pytest.raises(ConfigError, match=r"step must be >= 0 \(data steps count from 0\), got -1"):
        global_batch(-1, seed=0, n_samples=100, global_batch=4)
    with pytest.raises(ConfigError, match=r"step must be >= 0 .*got -3"):
        rank_batch(-3, 0, 2, seed=0, n_samples=100, global_batch=4)
