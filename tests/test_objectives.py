"""Objectives and data sources (train/objectives.py, data/loader.py): the masked next-token loss
is token-weighted exactly (any micro batching, any world size), document masking makes a packed
row compute what each document computes alone, SFT rows are whole examples, and an SFT run
resumes bit for bit."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_CONFIG, lmforge_cmd, lmforge_in_process, subprocess_env
from lmforge.config import OBJECTIVES, ModelConfig, load_config
from lmforge.data.loader import IGNORE, DocumentRows, Loader, Records, TokenDataset, open_source, val_batches
from lmforge.data.order import rank_batch
from lmforge.errors import ConfigError
from lmforge.model import Transformer, document_attention
from lmforge.train.distributed import Dist
from lmforge.train.loop import split_micro, train_step
from lmforge.train.objectives import REGISTRY, NextToken, validation_loss
from lmforge.train.optim import build_optimizer

SEQ = 96


def tiny_model(vocab: int = 320, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, n_layer=2, n_head=2, d_model=32, max_seq_len=SEQ))


def sft_batch(ds: Path, n: int = 8, step: int = 0) -> dict[str, torch.Tensor]:
    return Loader(ds, seq_len=SEQ, global_batch=n, seed=0).peek(step)


# ---- the registry and the config key --------------------------------------------------------------


def test_the_registry_and_the_config_name_the_same_objectives() -> None:
    assert set(REGISTRY) == set(OBJECTIVES)
    assert load_config(None, ["train.objective=next_token"]).train.objective == "next_token"
    with pytest.raises(ConfigError, match=r"train.objective must be one of next_token, dpo, contrastive, classification; got 'next_tokens'; did you mean 'next_token'"):
        load_config(None, ["train.objective=next_tokens"])


# ---- the masked loss ---------------------------------------------------------------------------------


def hand_loss(model: Transformer, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ CE over trained targets / number of trained targets, written out token by token."""
    pos, mask = document_attention(batch["documents"]) if "documents" in batch else (None, None)
    logits = model(batch["inputs"], positions=pos, attn_mask=mask) if pos is not None else model(batch["inputs"])
    per_token = F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].clamp(min=0).flatten(), reduction="none")
    weights = batch["loss_mask"].flatten().float()
    return (per_token * weights).sum() / weights.sum()


def grads_after_step(model: Transformer, micro: list[dict[str, torch.Tensor]], **kw) -> tuple[float, list[torch.Tensor]]:
    opt = build_optimizer(model, load_config(TINY_CONFIG).train)
    r = train_step(model, opt, micro, lr=0.0, grad_clip=0.0, dtype="fp32", **kw)  # lr 0: the weights stay
    return r.loss, [p.grad.clone() for p in model.parameters()]


def test_masked_loss_is_the_token_weighted_mean_over_micro_batches(tiny_sft_dataset: Path) -> None:
    batch = sft_batch(tiny_sft_dataset)
    counts = batch["loss_mask"].sum(1)
    assert counts.min() != counts.max()  # rows train different numbers of tokens: a plain mean of means would be wrong
    model = tiny_model()
    want = hand_loss(model, batch)
    want.backward()
    want = want.item()
    want_grads = [p.grad.clone() for p in model.parameters()]
    for micro_batch in (8, 4, 2, 1):
        model.zero_grad()
        loss, grads = grads_after_step(model, split_micro(batch, micro_batch, torch.device("cpu")))
        assert loss == pytest.approx(want, rel=1e-5)
        for a, b in zip(grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # the loss mask matters: without it every target (padding aside) would count
    unmasked = {k: v for k, v in batch.items() if k != "loss_mask"}
    assert NextToken().units(unmasked) > NextToken().units(batch) == int(counts.sum())


class SimulatedRank(Dist):
    """Rank r of 2 inside one process: the all-reduce of the unit count returns the global sum the
    test computed; the wrapper's gradient averaging is done by the test."""

    def __init__(self, rank: int, global_units: float) -> None:
        super().__init__(rank=rank, world=2)
        object.__setattr__(self, "global_units", global_units)
        object.__setattr__(self, "calls", 0)

    @property
    def active(self) -> bool:
        return True

    def sum_floats(self, values: list[float]) -> list[float]:
        object.__setattr__(self, "calls", self.calls + 1)
        return [self.global_units] if self.calls == 1 else values  # the count first; later sums are not checked


def test_two_ranks_give_the_gradient_of_one_process(tiny_sft_dataset: Path) -> None:
    """DDP-style: each rank scales its share by world / global units, the wrapper averages: the sum
    over ranks is one process's gradient, although the ranks train different numbers of tokens."""
    def halves(batch: dict[str, torch.Tensor]) -> list[list[dict[str, torch.Tensor]]]:
        return [split_micro({k: v[r * 4:(r + 1) * 4] for k, v in batch.items()}, 2, torch.device("cpu")) for r in (0, 1)]

    def units(micro: list[dict[str, torch.Tensor]]) -> int:
        return sum(NextToken().units(m) for m in micro)

    batch = next(b for b in (sft_batch(tiny_sft_dataset, step=s) for s in range(20)) if units(halves(b)[0]) != units(halves(b)[1]))
    _, one = grads_after_step(tiny_model(), split_micro(batch, 2, torch.device("cpu")))
    total = float(batch["loss_mask"].sum())
    per_rank = [grads_after_step(tiny_model(), halves(batch)[r], d=SimulatedRank(r, total))[1] for r in (0, 1)]
    for a, b, c in zip(one, *per_rank):
        torch.testing.assert_close((b + c) / 2, a, rtol=1e-4, atol=1e-7)  # what DDP's average leaves


def test_unmasked_next_token_keeps_the_mean_of_micro_batch_means(tiny_dataset: Path) -> None:
    """Without a loss mask the arithmetic is the pre-objective trainer's: mean per micro batch / n."""
    x = torch.randint(0, 512, (4, SEQ), generator=torch.Generator().manual_seed(0))
    micro = [{"inputs": a, "targets": b} for a, b in zip(x.split(2), x.roll(-1, 1).split(2))]
    model = tiny_model(512)
    loss, _ = grads_after_step(model, micro)
    with torch.no_grad():
        means = [float(model(m["inputs"], m["targets"])[1]) for m in micro]
    assert loss == (means[0] + means[1]) / 2  # bit for bit: float(sum on the device) / 2


# ---- document masking --------------------------------------------------------------------------------


def test_a_packed_row_computes_what_each_document_computes_alone() -> None:
    model = tiny_model().eval()
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(0, 320, (n,), generator=g) for n in (7, 19, 11)]
    row = torch.cat(docs)[None]  # (1, 37)
    documents = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    positions, attn_mask = document_attention(documents)
    assert positions[0].tolist() == list(range(7)) + list(range(19)) + list(range(11))
    with torch.no_grad():
        packed = model(row, positions=positions, attn_mask=attn_mask)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
        plain = model(row)[0]  # without the mask, later documents see earlier ones
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain[7:], alone[7:], atol=1e-3)


def test_document_mask_switch_and_windows(tiny_dataset: Path, tiny_sft_dataset: Path) -> None:
    """auto: on for SFT data, off for a text stream (whose batches are then exactly as before)."""
    text = open_source(tiny_dataset, seq_len=SEQ)
    assert set(text.batch(np.arange(2))) == {"inputs", "targets"}
    on = open_source(tiny_dataset, seq_len=SEQ, document_mask="true").batch(np.arange(2))
    assert torch.equal(on["inputs"], text.batch(np.arange(2))["inputs"]) and on["documents"].shape == (2, SEQ)
    assert "documents" in open_source(tiny_sft_dataset, seq_len=SEQ).batch(np.arange(2))
    assert "documents" not in open_source(tiny_sft_dataset, seq_len=SEQ, document_mask="false").batch(np.arange(2))


# ---- SFT rows -----------------------------------------------------------------------------------------


def test_rows_hold_whole_examples_and_train_only_their_own_targets(tiny_sft_dataset: Path) -> None:
    ds = TokenDataset(tiny_sft_dataset)
    rows = DocumentRows(ds, SEQ)
    starts = set(ds.document_starts.tolist()) | {ds.n_tokens}
    assert rows.dropped == 0 and rows.n_samples < len(ds.document_starts)  # several examples per row
    for start, length in rows.rows.tolist():
        assert start in starts and start + length in starts and length <= SEQ + 1  # cut only between examples
    assert sum(n for _, n in rows.rows.tolist()) == ds.n_tokens  # every example once
    b = rows.batch(np.arange(4))
    T = b["inputs"].shape[1]
    assert T == max(n for _, n in rows.spans(np.arange(4))) - 1  # padded to the batch's longest row
    for i, (start, length) in enumerate(rows.spans(np.arange(4))):
        tokens = ds.window(start, length).astype(np.int64)
        assert b["inputs"][i, : length - 1].tolist() == tokens[:-1].tolist()
        assert (b["targets"][i, length - 1:] == IGNORE).all() and not b["loss_mask"][i, length - 1:].any()
        docs = ds.document_ids(start, length)
        crossing = np.nonzero(docs[1:] != docs[:-1])[0]
        assert len(crossing) >= 1 and not b["loss_mask"][i, crossing].any()  # no target starts another example
        assert b["documents"][i, : length - 1].tolist() == (docs[:-1] - docs[0]).tolist()
    unpacked = DocumentRows(ds, SEQ, packing=False)
    assert unpacked.n_samples == len(ds.document_starts) and unpacked.fingerprint != rows.fingerprint


def test_examples_longer_than_a_row_are_left_out_and_counted(tiny_sft_dataset: Path) -> None:
    ds = TokenDataset(tiny_sft_dataset)
    lengths = np.diff(np.append(ds.document_starts, ds.n_tokens))
    cut = int(np.median(lengths))
    rows = DocumentRows(ds, cut - 1)
    assert rows.dropped == int((lengths > cut).sum()) > 0 and rows.longest == lengths.max()
    kept = sum(n for _, n in rows.rows.tolist())
    assert kept == lengths[lengths <= cut].sum()  # no example was cut: kept whole or left out


def test_the_loader_reads_rows_in_the_order_of_the_pure_function(tiny_sft_dataset: Path) -> None:
    """The same rows in the same steps on any world size, padded alike (the global batch's longest)."""
    source = open_source(tiny_sft_dataset, seq_len=SEQ)
    whole = rank_batch(5, 0, 1, seed=4, n_samples=source.n_samples, global_batch=8)
    assert source.width(whole) > min(source.width(whole[:4]), source.width(whole[4:]))  # the halves alone would differ
    for world in (1, 2, 4):
        for rank in range(world):
            loader = Loader(tiny_sft_dataset, seq_len=SEQ, global_batch=8, seed=4, rank=rank, world=world)
            ids = rank_batch(5, rank, world, seed=4, n_samples=source.n_samples, global_batch=8)
            got, want = loader.peek(5), source.batch(ids, width=source.width(whole))
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


def test_records_pad_each_column_per_batch() -> None:
    recs = Records({"ids": np.arange(10), "label": np.arange(10) % 2}, np.array([0, 3, 4, 10]), fingerprint="f",
                   pad={"ids": -1})
    b = recs.batch(np.array([1, 0]))
    assert b["ids"].tolist() == [[3, -1, -1], [0, 1, 2]] and b["lengths"].tolist() == [1, 3]
    assert recs.n_samples == 3 and Loader(recs, seq_len=1, global_batch=3, seed=0).peek(0)["ids"].shape[0] == 3
    with pytest.raises(ValueError):
        Records({"ids": np.arange(5)}, np.array([0, 6]), fingerprint="f")


def test_validation_loss_is_on_trained_tokens_only(tiny_sft_dataset: Path) -> None:
    model = tiny_model()
    batches = list(val_batches(tiny_sft_dataset, seq_len=SEQ, batch_size=4))
    with torch.no_grad():
        want = sum(float(hand_loss(model, b)) * float(b["loss_mask"].sum()) for b in batches) / sum(
            float(b["loss_mask"].sum()) for b in batches)
    assert validation_loss(model, NextToken(), batches) == pytest.approx(want, rel=1e-5)


# ---- whole runs ---------------------------------------------------------------------------------------

SFT_SETS = ["model.vocab_size=0", f"model.max_seq_len={SEQ}", f"data.seq_len={SEQ}", "train.max_steps=12", "train.ckpt_every_steps=4",
            "train.eval_every=6", "train.log_every=1", "train.micro_batch=2", "train.keep_last=3"]


def train(data: Path, run_dir: Path, *extra: str, faults: str = "", nproc: int = 1) -> subprocess.CompletedProcess:
    args = ["train", str(TINY_CONFIG), "--run-dir", str(run_dir),
            *[a for kv in (f"data.path={data}", *SFT_SETS, *extra) for a in ("--set", kv)]]
    if nproc > 1:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
               "--master-port", str(port), "-m", "lmforge", *args]
    elif "kill" in faults:  # it SIGKILLs the process
        cmd = lmforge_cmd(*args)
    else:
        return lmforge_in_process(args, env={"LMFORGE_FAULTS": faults} if faults else None)
    env = subprocess_env(LMFORGE_FAULTS=faults) if faults else subprocess_env()
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def weights(run_dir: Path, step: int = 12) -> bytes:
    return (run_dir / "checkpoints" / f"step-{step:06d}" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def straight_sft(tiny_sft_dataset: Path, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("sftrun") / "run"
    proc = train(tiny_sft_dataset, run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_an_sft_run_resumes_bit_for_bit_after_sigkill(tiny_sft_dataset: Path, straight_sft: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    killed = train(tiny_sft_dataset, run_dir, faults="kill@7")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = train(tiny_sft_dataset, run_dir)
    assert resumed.returncode == 0 and "at step 4" in resumed.stderr, resumed.stderr[-2000:]
    assert weights(run_dir) == weights(straight_sft)
    metrics = [json.loads(line) for line in (straight_sft / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 12 and losses[-1] < losses[0]  # it learns the answers
    assert any("val_loss" in m for m in metrics)
    config = (straight_sft / "config.yaml").read_text()
    assert "objective: next_token" in config and "document_mask: auto" in config


def test_an_sft_run_on_two_processes_is_bit_identical_to_one(tiny_sft_dataset: Path, straight_sft: Path, tmp_path: Path) -> None:
    """deterministic_reduce sums micro-batch gradients in one order on any world size; the ranks read
    different numbers of trained tokens, so only a global unit count gives the same weights."""
    one, two = tmp_path / "one", tmp_path / "two"
    for run_dir, n in ((one, 1), (two, 2)):
        proc = train(tiny_sft_dataset, run_dir, "train.deterministic_reduce=true", "train.parallel=ddp", "train.max_steps=4",
                     nproc=n)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert weights(one, 4) == weights(two, 4)
