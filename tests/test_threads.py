"""Threads on a shared machine (lmforge/threads.py): the decisions as a table, the governor on a
scripted machine, the --threads flags of every computing verb, the event training records, and
that the thread count does not change a training step's numbers."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from conftest import lmforge_cmd, subprocess_env
from lmforge import threads as T
from lmforge.config import Config, ModelConfig
from lmforge.errors import ConfigError
from lmforge.model import Transformer
from lmforge.train.loop import train_step
from lmforge.train.optim import build_optimizer


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ---- decisions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n_cores,others,threads", [
    (2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 1.9, 1), (2, 7.5, 1),  # never below 1
    (8, 0.0, 8), (8, 2.2, 6), (8, 3.5, 4), (1, 0.0, 1), (4, None, 4),  # None: /proc unreadable, all cores
])
def test_default_threads_leaves_the_cores_others_use(n_cores, others, threads) -> None:
    assert T.default_threads(n_cores, others) == threads


@pytest.mark.parametrize("n_cores,wanted,current,others,slowdown,idle_for,threads", [
    (2, 2, 2, 0.0, 1.0, 0.0, 2),    # quiet machine, steps as expected: keep
    (2, 2, 2, 1.0, 3.0, 0.0, 1),    # a busy core and steps 3x slower: drop to the free core
    (2, 2, 2, 1.0, None, 0.0, 1),   # a busy core, no expectation yet: drop on the machine's word
    (2, 2, 2, 1.0, 1.1, 0.0, 2),    # a busy core, but our steps are not slower: keep
    (2, 2, 2, 0.3, 5.0, 0.0, 2),    # slow steps but no one else on the cores (our own causes): keep
    (8, 8, 8, 3.0, 2.0, 0.0, 5),    # 3 cores taken of 8: 5 threads
    (2, 2, 1, 0.0, None, 2.0, 1),   # cores free again, but only for 2 s: wait (hysteresis)
    (2, 2, 1, 0.0, None, T.RISE_AFTER, 2),  # free for long enough: back up
    (8, 4, 2, 0.0, None, 10.0, 4),  # back up, never above what the verb wanted
    (2, 2, 1, 1.0, 1.0, 0.0, 1),    # still busy: stay
    (2, 2, 2, None, 9.0, 0.0, 2),   # /proc unreadable: nothing to decide on
])
def test_decide_table(n_cores, wanted, current, others, slowdown, idle_for, threads) -> None:
    assert T.decide(n_cores=n_cores, wanted=wanted, current=current, others=others, slowdown=slowdown,
                    idle_for=idle_for) == threads


class Machine:
    """A scripted /proc: `others` cores busy from now on; our own CPU time is not counted."""

    def __init__(self) -> None:
        self.now, self.busy, self.others = 0.0, 0.0, 0.0

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.busy += self.others * seconds

    def read(self) -> T.Sample:
        return T.Sample(self.now, self.busy, 0.0, 0.0)


def test_governor_drops_while_another_process_runs_and_comes_back(monkeypatch) -> None:
    monkeypatch.delenv(T.ADAPT_ENV, raising=False)
    m, changes = Machine(), []
    g = T.Governor(2, n_cores=2, read=m.read, clock=lambda: m.now,
                   on_change=lambda old, new, why: changes.append((old, new, why)))
    assert torch.get_num_threads() == 2

    def steps(n: int, seconds: float) -> list[int]:
        out = []
        for _ in range(n):
            m.advance(seconds)
            out.append(g.step(seconds))
        return out

    assert set(steps(20, 0.1)) == {2}  # quiet: calibrates 0.1 s per step at 2 threads
    m.others = 1.0  # a busy loop takes a core; our steps get 4x slower
    assert steps(10, 0.4)[-1] == 1 and torch.get_num_threads() == 1
    assert changes[0][:2] == (2, 1) and "1.0 of 2 cores" in changes[0][2] and "slower than expected" in changes[0][2]
    assert set(steps(20, 0.15)) == {1}  # it goes on: stay at 1
    m.others = 0.0  # it ended: back to 2 after RISE_AFTER seconds of free cores, not at once
    trace = steps(60, 0.15)
    first_two = trace.index(2)
    assert first_two * 0.15 >= T.RISE_AFTER - T.SAMPLE_EVERY and set(trace[first_two:]) == {2}
    assert [c[:2] for c in changes] == [(2, 1), (1, 2)] and torch.get_num_threads() == 2


def test_governor_can_be_turned_off(monkeypatch) -> None:
    monkeypatch.setenv(T.ADAPT_ENV, "0")
    m = Machine()
    g = T.Governor(2, n_cores=2, read=m.read, clock=lambda: m.now)
    m.others = 2.0
    for _ in range(30):
        m.advance(0.5)
        assert g.step(0.5) == 2


# ---- flags -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, 10_000])
def test_check_threads_refuses_out_of_range(value: int) -> None:
    with pytest.raises(ConfigError, match=r"--threads must be between 1 and \d+"):
        T.check_threads(value)


@pytest.mark.parametrize("verb,value", [
    (["sample", "no-such-run"], "0"), (["sample", "no-such-run"], "-2"), (["sample", "no-such-run"], "100000"),
    (["eval", "no-such-run"], "0"), (["serve", "no-such-run"], "-1"), (["quickstart", "--workdir", "qs"], "0"),
    (["prepare", "corpus", "--out", "data/x"], "100000"), (["train", "tiny-cpu"], "0"),
])
def test_every_computing_verb_refuses_a_bad_threads_value_in_one_line(verb, value, tmp_path) -> None:
    proc = subprocess.run(lmforge_cmd(*verb, "--threads", value), capture_output=True, text=True, cwd=tmp_path,
                          env=subprocess_env(), timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--threads must be between 1 and" in lines[0], proc.stderr
    assert not list(tmp_path.iterdir())  # refused before anything was written


# ---- numbers do not depend on threads ----------------------------------------------------------


def _train_steps(threads: int) -> tuple[dict[str, torch.Tensor], float]:
    torch.set_num_threads(threads)
    cfg = ModelConfig(vocab_size=512, n_layer=2, n_head=4, n_kv_head=2, d_model=64, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = build_optimizer(model, Config().train)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        micro = [(torch.randint(0, 512, (4, 64), generator=g), torch.randint(0, 512, (4, 64), generator=g))
                 for _ in range(2)]
        result = train_step(model, opt, micro, lr=1e-3, grad_clip=1.0, dtype="fp32")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, result.loss


@pytest.mark.skipif(T.cores() < 2, reason="needs two cores")
def test_fp32_training_steps_are_bit_identical_on_one_and_two_threads() -> None:
    one, loss_one = _train_steps(1)
    two, loss_two = _train_steps(2)
    assert loss_one == loss_two
    assert [k for k in one if not torch.equal(one[k], two[k])] == []


# ---- training records the change ---------------------------------------------------------------


def test_training_records_a_threads_event_when_the_governor_acts(tiny_dataset, tmp_path, monkeypatch) -> None:
    """A run whose machine turns busy after its first steps drops a thread, and says so in its events."""
    from lmforge.train.start import StartRequest, train_command

    monkeypatch.delenv(T.ADAPT_ENV, raising=False)
    monkeypatch.setattr(T, "cores", lambda: 2)
    m = Machine()
    m.others = 1.5  # busy from the first sample on
    real_init = T.Governor.__init__

    def scripted(self, wanted, **kw):  # the loop's governor, on a scripted machine and clock
        real_init(self, 2, **dict(kw, read=m.read, clock=lambda: m.now, n_cores=2))

    monkeypatch.setattr(T.Governor, "__init__", scripted)
    real_step = T.Governor.step
    monkeypatch.setattr(T.Governor, "step", lambda self, seconds, work=1.0: (m.advance(1.0), real_step(self, 1.0, work))[1])
    run_dir = tmp_path / "run"
    code = train_command(StartRequest(config="tiny-cpu", run_dir=str(run_dir),
                                      overrides=(f"data.path={tiny_dataset}", "train.max_steps=4", "train.threads=0")))
    assert code == 0
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    threads = [e for e in events if e.get("kind") == "threads"]
    assert threads and threads[0]["from"] == 2 and threads[0]["to"] == 1 and "of 2 cores" in threads[0]["reason"], events
