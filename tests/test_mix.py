"""data.mix: training over several prepared datasets with weights (issue 19 part 5).

The mixed order (data/order.py) as tables: quotas, a golden order, shares within tolerance, every
dataset read once per pass, the same global batches on 1, 2 and 4 processes, O(1) resume; the
run-out rule (data.mix_max_repeat passes, then refused at the start or stopped at the step);
config mistakes (one line each); a training run's per-dataset val_loss (a mix of one dataset is
the plain run, bit for bit), its bit-exact resume and its bit-identical 2-process twin (torchrun,
deterministic_reduce), and `lmforge eval`'s per-dataset and per-input loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_CONFIG
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.data import order
from lmforge.data.loader import Loader, Mixture
from lmforge.data.prepare import prepare
from lmforge.errors import ConfigError, DataError
from lmforge.track.store import Store

from test_train import final_weights, run_train


# ---- the mixed order, pure ----------------------------------------------------------------------


@pytest.mark.parametrize("weights, quotas", [
    ([1.0], (4096,)),
    ([1, 1], (2048, 2048)),
    ([0.5, 0.3, 0.2], (2048, 1229, 819)),
    ([0.7, 0.3], (2867, 1229)),
    ([1, 1, 1], (1366, 1365, 1365)),  # the remainder goes to the earlier dataset
    ([1, 0], (4096, 0)),  # weight 0: validated on, never read
])
def test_quotas_table(weights, quotas) -> None:
    assert order.mix_quotas(weights) == quotas and sum(quotas) == order.MIX_BLOCK


def test_golden_mixed_order() -> None:
    # frozen: an accidental change of the mixed order (every mixed run's data) fails here
    which, _, ids = order.mixed_indices(np.arange(16), seed=0, quotas=(2048, 1229, 819), sizes=[10, 6, 4])
    assert which.tolist() == [2, 2, 1, 0, 2, 2, 2, 0, 0, 2, 2, 0, 0, 2, 0, 2]
    assert ids.tolist() == [2, 3, 1, 8, 0, 1, 3, 2, 4, 2, 1, 9, 5, 0, 6, 2]


def test_a_mix_of_one_dataset_is_the_plain_order() -> None:
    _, draw, ids = order.mixed_indices(np.arange(20_000), seed=3, quotas=(4096,), sizes=[777])
    assert np.array_equal(draw, np.arange(20_000))
    assert np.array_equal(ids, order.sample_indices(np.arange(20_000), seed=3, n_samples=777))


@pytest.mark.parametrize("weights, seed", [([0.5, 0.3, 0.2], 0), ([0.9, 0.1], 7), ([1, 1, 1, 1], 2**40), ([0.01, 0.99], 5)])
def test_shares_follow_the_weights(weights, seed) -> None:
    quotas = order.mix_quotas(weights)
    which, _ = order.mixed_draws(np.arange(3 * order.MIX_BLOCK), seed=seed, quotas=quotas)
    for b in range(3):  # every whole block holds each dataset's exact quota
        assert np.bincount(which[b * order.MIX_BLOCK:(b + 1) * order.MIX_BLOCK], minlength=len(quotas)).tolist() == list(quotas)
    share = np.bincount(which[:1000], minlength=len(weights)) / 1000  # a part of a block: within tolerance
    assert np.allclose(share, np.array(weights) / sum(weights), atol=0.05)
    counts = order.mixed_draw_counts(5000, seed=seed, quotas=quotas)  # the closed form agrees with counting
    assert counts == np.bincount(order.mixed_draws(np.arange(5000), seed=seed, quotas=quotas)[0], minlength=len(quotas)).tolist()


def test_each_dataset_is_read_once_per_pass() -> None:
    quotas, sizes = order.mix_quotas([0.6, 0.4]), [50, 7]
    which, draw, ids = order.mixed_indices(np.arange(2000), seed=1, quotas=quotas, sizes=sizes)
    for k, n in enumerate(sizes):
        mine = ids[which == k]
        assert np.array_equal(draw[which == k], np.arange(len(mine)))  # draws count up without gaps
        for p in range(len(mine) // n):
            assert sorted(mine[p * n:(p + 1) * n].tolist()) == list(range(n))


class Ids:
    """A fake source whose sample i is the row [offset + i]: batches show which samples were read."""

    def __init__(self, n: int, offset: int) -> None:
        self.n_samples, self.offset = n, offset

    @property
    def fingerprint(self) -> str:
        return f"ids-{self.n_samples}-{self.offset}"

    def width(self, sample_ids: np.ndarray) -> int:
        return 1

    def batch(self, sample_ids: np.ndarray, width: int | None = None) -> dict[str, torch.Tensor]:
        return {"inputs": torch.from_numpy(np.asarray(sample_ids, dtype=np.int64)[:, None] + self.offset)}


def mixture(max_repeat: float = 4.0, weights=(0.5, 0.3, 0.2)) -> Mixture:
    return Mixture([Ids(40, 0), Ids(25, 1000), Ids(9, 2000)], list(weights), ["a", "b", "c"], max_repeat=max_repeat)


def rows(loader: Loader, step: int) -> list[int]:
    return loader.peek(step)["inputs"][:, 0].tolist()


def test_same_global_batches_on_any_world_size_and_exact_resume() -> None:
    gb, seed = 8, 11
    one = Loader(mixture(), seq_len=1, global_batch=gb, seed=seed)
    straight = [rows(one, s) for s in range(12)]
    for world in (2, 4):
        ranks = [Loader(mixture(), seq_len=1, global_batch=gb, seed=seed, rank=r, world=world) for r in range(world)]
        assert [sum((rows(r, s) for r in ranks), []) for s in range(12)] == straight
    resumed = Loader(mixture(), seq_len=1, global_batch=gb, seed=seed)
    one.skip(5)
    resumed.load_state_dict(one.state_dict())  # O(1): the state is the step
    assert [resumed.next()["inputs"][:, 0].tolist() for _ in range(7)] == straight[5:]
    other = Loader(mixture(weights=(0.2, 0.3, 0.5)), seq_len=1, global_batch=gb, seed=seed)
    with pytest.raises(DataError, match="fingerprint"):  # other weights: another order, refused on resume
        other.load_state_dict(one.state_dict())


def test_run_out_rule_repeat_up_to_the_cap_then_stop() -> None:
    """A dataset is read at most data.mix_max_repeat passes: the run is refused at its start when
    train.max_steps would need more, and a step that reads past the cap (e.g. after a guard skip)
    stops with the same message."""
    mix = mixture(max_repeat=2.0)
    assert mix.caps == [80, 50, 18]
    counts = order.mixed_draw_counts(10**6, seed=0, quotas=mix.quotas)
    first = min(range(3), key=lambda k: mix.caps[k] / counts[k])  # the dataset that runs out first: c (9 samples)
    assert first == 2
    positions = np.arange(200)
    which, draw = order.mixed_draws(positions, seed=0, quotas=mix.quotas)
    end = int(positions[(which == 2) & (draw == mix.caps[2])][0])  # the 19th draw of c
    mix.check_until(end, seed=0)  # up to the cap: fine
    with pytest.raises(DataError, match=rf"data.mix: c runs out at sample position {end}: it has 9 train samples"):
        mix.check_until(end + 1, seed=0)
    mix.sample_ids(np.arange(end), seed=0)
    with pytest.raises(DataError, match="data.mix_max_repeat = 2"):
        mix.sample_ids(np.arange(end + 1), seed=0)
    assert mixture(max_repeat=3.0).check_until(end + 1, seed=0)  # a higher cap reads on


# ---- datasets, config and training ---------------------------------------------------------------


def write_corpus(root: Path, name: str, n_docs: int, salt: int) -> Path:
    corpus = root / name
    corpus.mkdir()
    for i in range(n_docs):
        words = " ".join(f"{name}{(i * salt + j) % 41}" for j in range(30 + i % 11))
        (corpus / f"d{i:03d}.txt").write_text(f"Doc {i}: {words}.\n")
    return corpus


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    """wiki and tickets share a tokenizer; other has its own; both = one dataset of two inputs."""
    root = tmp_path_factory.mktemp("mix")
    wiki, tickets = write_corpus(root, "wiki", 60, 7), write_corpus(root, "tickets", 60, 3)
    kw = dict(val_fraction=0.25, shard_tokens=5000)
    out = {"wiki": prepare([wiki], root / "d" / "wiki", vocab_size=400, **kw)}
    tok = str(out["wiki"] / "tokenizer.json")
    out["tickets"] = prepare([tickets], root / "d" / "tickets", tokenizer=tok, **kw)
    out["both"] = prepare([wiki, tickets], root / "d" / "both", tokenizer=tok, **kw)
    out["other"] = prepare([tickets], root / "d" / "other", vocab_size=300, **kw)
    return out


def mix_set(weights: dict[Path, float]) -> str:
    return "data.mix={" + ", ".join(f"'{p}': {w}" for p, w in weights.items()) + "}"


SMALL = ("data.seq_len=16", "train.max_steps=20", "train.eval_every=10", "model.vocab_size=0")


def refused(argv: list[str], capsys, *mentions: str) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    for m in mentions:
        assert m in lines[0], (m, lines[0])
    return lines[0]


def test_config_mistakes_are_one_line(sets, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("LMFORGE_PROGRESS", "quiet")
    base = ["train", str(TINY_CONFIG), "--run-dir", str(tmp_path / "r")] + [a for s in SMALL for a in ("--set", s)]
    refused([*base, "--set", mix_set({sets["wiki"]: 0.5, tmp_path / "nowhere": 0.5})], capsys,
            "data.mix", str(tmp_path / "nowhere"))
    refused([*base, "--set", mix_set({sets["wiki"]: 0.5, sets["other"]: 0.5})], capsys,
            "different tokenizers", str(sets["wiki"]), str(sets["other"]))
    refused([*base, "--set", mix_set({sets["wiki"]: 0.5}), "--set", f"data.path={sets['wiki']}"], capsys, "data.mix", "data.path")
    refused([*base, "--set", "data.mix={a: 0, b: 0}"], capsys, "data.mix", "sum to 0")
    refused([*base, "--set", "data.mix={a: lots}"], capsys, "data.mix[a]", "expected a number")
    refused([*base, "--set", "data.mix=wiki"], capsys, "data.mix", "expected a mapping")
    refused([*base, "--set", mix_set({sets["wiki"]: 0.99, sets["tickets"]: 0.01}), "--set", "train.max_steps=2000"], capsys,
            "data.mix: wiki runs out at data step", "data.mix_max_repeat")
    assert not (tmp_path / "r").exists()  # a refused start writes nothing
    with pytest.raises(ConfigError, match=r"data.mix_max_repeat must be within \[1, 100\]"):
        load_config(TINY_CONFIG, ["data.mix_max_repeat=0.5"])
    with pytest.raises(ConfigError, match="train.objective=next_token"):
        load_config(TINY_CONFIG, ["data.mix={a: 1}", "train.objective=contrastive"])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_mix_of_one_dataset_is_the_plain_run_bit_for_bit(sets, tmp_path) -> None:
    run_train(sets["wiki"], tmp_path / "plain", *SMALL)
    run_train(sets["wiki"], tmp_path / "mixed", *SMALL, "data.path=", mix_set({sets["wiki"]: 1.0}))
    assert final_weights(tmp_path / "mixed", 20) == final_weights(tmp_path / "plain", 20)
    plain = [m for m in metrics(tmp_path / "plain") if "val_loss" in m]
    mixed = [m for m in metrics(tmp_path / "mixed") if "val_loss" in m]
    assert [m["step"] for m in mixed] == [10, 20]
    for p, m in zip(plain, mixed):
        assert m["val_loss"] == m["val_loss/wiki"] == p["val_loss"]  # per-dataset == overall == the single-dataset run


def test_two_datasets_train_validate_resume_and_eval_per_source(sets, tmp_path, capsys, monkeypatch) -> None:
    mix = mix_set({sets["wiki"]: 0.75, sets["tickets"]: 0.25})
    straight = tmp_path / "straight"
    run_train(sets["wiki"], straight, *SMALL, "data.path=", mix)
    val = [m for m in metrics(straight) if "val_loss" in m]
    assert len(val) == 2
    for m in val:  # the overall val_loss: the per-dataset ones weighted as the run mixes them
        assert m["val_loss"] == pytest.approx(0.75 * m["val_loss/wiki"] + 0.25 * m["val_loss/tickets"], rel=1e-12)
    with Store.open(readonly=True) as store:  # the experiment store has them too (conftest: LMFORGE_DB)
        assert {"val_loss", "val_loss/wiki", "val_loss/tickets"} <= set(store.metric_keys(store.run_id(str(straight))))
    start = json.loads((straight / "events.jsonl").read_text().splitlines()[0])
    assert start["kind"] == "start" and set(start["mix"]) == {"wiki", "tickets"}  # recorded for reproducibility
    assert start["mix"]["wiki"]["share"] == 3072 / 4096 and start["mix"]["tickets"]["fingerprint"]
    # killed at step 7 and resumed: bit-identical to the straight run
    killed = run_train(sets["wiki"], tmp_path / "k", *SMALL, "data.path=", mix, faults="kill@7", check=False)
    assert killed.returncode != 0
    run_train(sets["wiki"], tmp_path / "k", *SMALL, "data.path=", mix)
    assert final_weights(tmp_path / "k", 20) == final_weights(straight, 20)
    # lmforge eval of the run: each dataset, and the weighted mean
    monkeypatch.setenv("LMFORGE_PROGRESS", "quiet")
    capsys.readouterr()
    assert main(["eval", str(straight), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["metrics"]
    assert got["loss"] == pytest.approx(0.75 * got["loss/wiki"] + 0.25 * got["loss/tickets"], rel=1e-12)
    assert main(["eval", str(straight), "--data", str(sets["wiki"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"]["loss"] == got["loss/wiki"]
    # a dataset prepared from two inputs: per-input loss, whose token-weighted mean is the overall loss
    assert main(["eval", str(straight), "--data", str(sets["both"]), "--json"]) == 0
    both = json.loads(capsys.readouterr().out)["metrics"]
    assert {"loss/wiki", "loss/tickets"} <= set(both)
    lo, hi = sorted([both["loss/wiki"], both["loss/tickets"]])
    assert lo <= both["loss"] <= hi


def test_two_processes_read_the_same_mixture_bit_for_bit(sets, tmp_path) -> None:
    """Under torchrun with deterministic_reduce, 2 processes train a mixed run bit-identically to 1."""
    from test_distributed import launch, weight_bytes

    mix = mix_set({sets["wiki"]: 0.6, sets["tickets"]: 0.4})
    extra = ("data.path=", mix, "data.seq_len=16", "model.vocab_size=0", "train.max_steps=6", "train.ckpt_every_steps=3")
    launch(1, sets["wiki"], tmp_path / "one", *extra)
    launch(2, sets["wiki"], tmp_path / "two", *extra, "train.parallel=ddp", "train.deterministic_reduce=true")
    assert weight_bytes(tmp_path / "two", 6) == weight_bytes(tmp_path / "one", 6)


def test_a_dataset_of_several_inputs_gets_per_input_val_loss(sets, tmp_path, capsys, monkeypatch) -> None:
    """Training scores each input's val targets alone (masking the others); `lmforge eval` counts each
    target for its document's input. Two ways to the same numbers, on the whole val split."""
    rd = tmp_path / "both"
    run_train(sets["both"], rd, "data.seq_len=16", "model.vocab_size=0", "train.max_steps=10", "train.eval_every=10",
              "train.eval_batches=0")
    val = [m for m in metrics(rd) if "val_loss" in m][-1]
    assert {"val_loss/wiki", "val_loss/tickets"} <= set(val) and val["val_loss/wiki"] != val["val_loss/tickets"]
    monkeypatch.setenv("LMFORGE_PROGRESS", "quiet")
    capsys.readouterr()
    assert main(["eval", str(rd), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["metrics"]
    assert got["loss"] == pytest.approx(val["val_loss"], rel=1e-5)
    for name in ("wiki", "tickets"):
        assert got[f"loss/{name}"] == pytest.approx(val[f"val_loss/{name}"], rel=1e-5)
    single = tmp_path / "single"  # a dataset of one input: no per-input keys
    run_train(sets["wiki"], single, "data.seq_len=16", "model.vocab_size=0", "train.max_steps=10", "train.eval_every=10")
    assert not any("/" in k for m in metrics(single) for k in m)
