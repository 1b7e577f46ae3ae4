"""Loader: windows across shards, batches per rank, exact O(1) resume, fingerprint checks, val batches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.data.loader import Loader, TokenDataset, val_batches
from lmforge.data.order import rank_batch
from lmforge.data.prepare import prepare
from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer import Tokenizer

SEQ, GB = 16, 8


def write_corpus(root: Path, n_docs: int = 40, tag: str = "") -> Path:
    corpus = root / f"corpus{tag}"
    corpus.mkdir()
    for i in range(n_docs):
        words = " ".join(f"w{(i * 7 + j) % 53}" for j in range(20 + i % 9))
        (corpus / f"d{i:03d}.txt").write_text(f"{tag}Doc {i}: {words}.\n")
    return corpus


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    # tiny shards (97 tokens) so that most windows cross a shard boundary
    return prepare([write_corpus(root)], root / "ds", vocab_size=300, val_fraction=0.25, shard_tokens=97)


def xy(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A token-window batch's (inputs, targets), the only keys a text stream's batch has."""
    assert set(batch) == {"inputs", "targets"}
    return batch["inputs"], batch["targets"]


def stream(path: Path, split: str) -> np.ndarray:
    m = json.loads((path / "manifest.json").read_text())
    return np.concatenate([np.fromfile(path / s["file"], dtype=m["dtype"]) for s in m["splits"][split]["shards"]]).astype(np.int64)


def test_dataset_windows_cross_shards(ds: Path) -> None:
    d = TokenDataset(ds)
    ref = stream(ds, "train")
    assert d.n_tokens == len(ref) and len(d.shards) > 5
    assert d.num_samples(SEQ) == (len(ref) - 1) // SEQ
    for start, length in [(0, 17), (90, 17), (96, 2), (97, 1), (50, 300), (len(ref) - 17, 17)]:
        assert np.array_equal(d.window(start, length), ref[start : start + length])
    with pytest.raises(IndexError):
        d.window(len(ref) - 5, 6)


def test_batches_are_the_ordered_windows(ds: Path) -> None:
    loader = Loader(ds, seq_len=SEQ, global_batch=GB, seed=3)
    ref = stream(ds, "train")
    x, y = xy(loader.next())
    assert x.shape == y.shape == (GB, SEQ) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    ids = rank_batch(0, 0, 1, seed=3, n_samples=loader.n_samples, global_batch=GB)
    for row, i in enumerate(ids):
        assert x[row].tolist() == ref[i * SEQ : i * SEQ + SEQ].tolist()
        assert y[row].tolist() == ref[i * SEQ + 1 : i * SEQ + SEQ + 1].tolist()
    assert loader.step == 1


@settings(max_examples=15, deadline=None)
@given(k=st.integers(0, 40), world=st.sampled_from([1, 2, 4]), rank=st.integers(0, 3))
def test_resume_at_any_step_gives_the_same_batches(ds: Path, k: int, world: int, rank: int) -> None:
    rank %= world
    total = k + 4
    straight = Loader(ds, seq_len=SEQ, global_batch=GB, seed=11, rank=rank, world=world)
    want = [xy(straight.next()) for _ in range(total)]
    first = Loader(ds, seq_len=SEQ, global_batch=GB, seed=11, rank=rank, world=world)
    first.skip(k)  # skip == having read k steps: the cursor is the whole state
    sd = json.loads(json.dumps(first.state_dict()))  # must survive JSON
    resumed = Loader(ds, seq_len=SEQ, global_batch=GB, seed=11, rank=rank, world=world)
    resumed.load_state_dict(sd)
    for step in range(k, total):
        x, y = xy(resumed.next())
        assert torch.equal(x, want[step][0]) and torch.equal(y, want[step][1])


def test_ranks_partition_the_global_batch(ds: Path) -> None:
    whole = Loader(ds, seq_len=SEQ, global_batch=GB, seed=5)
    for step in (0, 3, 50):  # 50 steps is past one epoch of this small set
        x_all, y_all = xy(whole.peek(step))
        for world in (2, 4, 8):
            xs = [xy(Loader(ds, seq_len=SEQ, global_batch=GB, seed=5, rank=r, world=world).peek(step)) for r in range(world)]
            assert torch.equal(torch.cat([x for x, _ in xs]), x_all)
            assert torch.equal(torch.cat([y for _, y in xs]), y_all)


def test_skip_and_state_dict(ds: Path) -> None:
    loader = Loader(ds, seq_len=SEQ, global_batch=GB, seed=0)
    want = xy(loader.peek(3))
    loader.skip(3)
    assert torch.equal(xy(loader.next())[0], want[0])
    sd = loader.state_dict()
    n = loader.n_samples
    assert sd == {"step": 4, "epoch": 4 * GB // n, "seed": 0, "seq_len": SEQ, "global_batch": GB, "fingerprint": loader.fingerprint}
    loader.skip(n)  # n steps of GB samples = GB epochs
    assert loader.state_dict()["epoch"] == (4 + n) * GB // n


def test_resume_refuses_changed_data_or_shape(ds: Path, tmp_path: Path) -> None:
    sd = Loader(ds, seq_len=SEQ, global_batch=GB, seed=0).state_dict()
    with pytest.raises(DataError, match=r"seq_len: checkpoint 16, now 32"):
        Loader(ds, seq_len=32, global_batch=GB, seed=0).load_state_dict(sd)
    with pytest.raises(DataError, match=r"global_batch: checkpoint 8, now 4"):
        Loader(ds, seq_len=SEQ, global_batch=4, seed=0).load_state_dict(sd)
    other = prepare([write_corpus(tmp_path, 30, tag="X")], tmp_path / "other", vocab_size=300, val_fraction=0.0)
    with pytest.raises(DataError, match=r"fingerprint: checkpoint '\w{16}', now '\w{16}'.*dataset changed"):
        Loader(other, seq_len=SEQ, global_batch=GB, seed=0).load_state_dict(sd)


def test_open_checks_tokenizer_and_shards(ds: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(ds, copy)
    Tokenizer.train(["something else entirely"] * 5, vocab_size=280).save(copy / "tokenizer.json")
    with pytest.raises(DataError, match="not the tokenizer this dataset was prepared with"):
        TokenDataset(copy)
    shutil.copy(ds / "tokenizer.json", copy / "tokenizer.json")
    (copy / "train-00002.bin").write_bytes(b"\0\0")
    with pytest.raises(DataError, match="shard has the wrong size: .*train-00002.bin"):
        TokenDataset(copy)
    with pytest.raises(DataError, match="dataset not found"):
        TokenDataset(tmp_path / "nothing")


def test_loader_argument_errors(ds: Path) -> None:
    with pytest.raises(ConfigError, match="global_batch=8 is not divisible by world=3"):
        Loader(ds, seq_len=SEQ, global_batch=GB, seed=0, rank=0, world=3)
    with pytest.raises(DataError, match="fewer than one sample"):
        Loader(ds, seq_len=10**7, global_batch=GB, seed=0)


def test_val_batches_read_the_val_stream_in_order(ds: Path) -> None:
    ref = stream(ds, "val")
    n = (len(ref) - 1) // SEQ
    batches = [xy(b) for b in val_batches(ds, seq_len=SEQ, batch_size=4, max_batches=None)]
    assert len(batches) == -(-n // 4) and batches[-1][0].shape[0] == n - 4 * (len(batches) - 1)
    xs = torch.cat([x for x, _ in batches]).reshape(-1)
    ys = torch.cat([y for _, y in batches]).reshape(-1)
    assert xs.tolist() == ref[: n * SEQ].tolist()  # non-overlapping windows, in order
    assert ys.tolist() == ref[1 : n * SEQ + 1].tolist()
    again = [xy(b) for b in val_batches(ds, seq_len=SEQ, batch_size=4, max_batches=2)]
    assert len(again) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(again, batches))
    with pytest.raises(DataError, match="val split has .* fewer than one window .*--val-fraction"):
        next(val_batches(ds, seq_len=len(ref), batch_size=4))
