"""Threads on a shared machine (lmforge/threads.py): the decisions as a table, the governor on a
scripted machine, the --threads flags of every computing verb, the event training records, that
the thread counts training uses do not change its numbers, and a real busy process beside a
tiny training run (a few seconds; the speed-up it buys is measured by benchmarks/threads.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import lmforge_cmd, subprocess_env
from lmforge import threads as T
from lmforge.config import Config, ModelConfig
from lmforge.errors import ConfigError
from lmforge.model import Transformer
from lmforge.train.loop import train_step
from safetensors.torch import load_file
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


@pytest.mark.parametrize("n_cores,wanted,current,others,idle_for,threads", [
    (8, 8, 8, 3.0, 0.0, 4),         # 5 free: 4 (a power of two) when the numbers must not change
    (8, 8, 4, 0.0, 10.0, 8),        # all free again: back to 8
    (6, 6, 4, 0.0, 10.0, 4),        # 6 cores: 4 is the most that keeps the numbers
    (4, 4, 4, 1.0, 0.0, 2),         # 3 free: 2
    (2, 2, 2, 1.0, 0.0, 1),
])
def test_decide_exact_keeps_to_powers_of_two(n_cores, wanted, current, others, idle_for, threads) -> None:
    assert T.decide(n_cores=n_cores, wanted=wanted, current=current, others=others, slowdown=None,
                    idle_for=idle_for, exact=True) == threads


def test_power_of_two() -> None:
    assert [T.power_of_two(n) for n in range(1, 10)] == [1, 2, 2, 4, 4, 4, 4, 8, 8] and T.power_of_two(0) == 1


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


def test_governor_started_low_on_a_busy_machine_rises_to_what_it_wants(monkeypatch) -> None:
    """A verb that started with 1 thread because the machine was busy goes up to `wanted` once it is not."""
    monkeypatch.delenv(T.ADAPT_ENV, raising=False)
    m = Machine()
    g = T.Governor(2, start=1, n_cores=2, read=m.read, clock=lambda: m.now)
    assert torch.get_num_threads() == 1
    trace = []
    for _ in range(int(2 * T.RISE_AFTER / 0.25)):
        m.advance(0.25)
        trace.append(g.step(0.25))
    assert trace[0] == 1 and trace[-1] == 2 and torch.get_num_threads() == 2


def test_governor_can_be_turned_off(monkeypatch) -> None:
    monkeypatch.setenv(T.ADAPT_ENV, "0")
    m = Machine()
    g = T.Governor(2, n_cores=2, read=m.read, clock=lambda: m.now)
    m.others = 2.0
    for _ in range(30):
        m.advance(0.5)
        assert g.step(0.5) == 2


# ---- flags -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1, T.cores() + 1, 10_000])
def test_check_threads_refuses_more_than_this_machines_cores(value: int) -> None:
    with pytest.raises(ConfigError, match=rf"--threads must be within 0\.\.{T.cores()} \(this machine's cores"):
        T.check_threads(value)


def test_check_threads_zero_or_none_lets_lmforge_choose() -> None:
    assert T.check_threads(None) is None and T.check_threads(0) is None and T.check_threads(1) == 1


ABOVE_CORES = str(T.cores() + 1)  # valid on some machine (<= 1024), not on this one


@pytest.mark.parametrize("verb,value", [
    (["sample", "no-such-run"], ABOVE_CORES), (["sample", "no-such-run"], "-2"), (["sample", "no-such-run"], "100000"),
    (["eval", "no-such-run"], ABOVE_CORES), (["serve", "no-such-run"], "-1"), (["serve", "no-such-run"], ABOVE_CORES),
    (["quickstart", "--workdir", "qs"], ABOVE_CORES), (["prepare", "corpus", "--out", "data/x"], ABOVE_CORES),
    (["train", "tiny-cpu"], ABOVE_CORES), (["train", "tiny-cpu"], "-1"),
])
def test_every_computing_verb_refuses_a_bad_threads_value_in_one_line(verb, value, tmp_path) -> None:
    proc = subprocess.run(lmforge_cmd(*verb, "--threads", value), capture_output=True, text=True, cwd=tmp_path,
                          env=subprocess_env(), timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--threads" in lines[0] and "must be within 0.." in lines[0], proc.stderr
    assert not list(tmp_path.iterdir())  # refused before anything was written


# ---- numbers do not depend on threads ----------------------------------------------------------


# The small-cpu recipe's widths (2 layers and a small vocabulary to stay fast): a shape on which 3
# threads does give other weights (SiLU's vectorised exp, lmforge/threads.py; the MLP's (2, 256, 704)
# activations are split among threads), so the test would see a thread count that changes numbers.
SHAPE = ModelConfig(vocab_size=512, n_layer=2, n_head=4, n_kv_head=4, d_model=256, max_seq_len=256)


def _train_steps(threads: int) -> tuple[dict[str, torch.Tensor], list[tuple[float, float]]]:
    """Weights and (loss, grad norm) after 2 steps: one plain, one with a loss mask (SFT's summed loss)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = Transformer(SHAPE)
    opt = build_optimizer(model, Config().train)
    g = torch.Generator().manual_seed(1)
    numbers = []
    for masked in (False, True):
        micro = []
        for _ in range(2):
            batch = {"inputs": torch.randint(0, SHAPE.vocab_size, (2, 256), generator=g),
                     "targets": torch.randint(0, SHAPE.vocab_size, (2, 256), generator=g)}
            if masked:
                batch["loss_mask"] = torch.rand(2, 256, generator=g) < 0.5
            micro.append(batch)
        result = train_step(model, opt, micro, lr=1e-3, grad_clip=0.5, dtype="fp32")
        numbers.append((result.loss, result.grad_norm))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, numbers


def test_fp32_training_steps_are_bit_identical_on_every_power_of_two_thread_count() -> None:
    """1, 2 and 4 threads (4 oversubscribes a 2-core machine: slower, the same numbers); 3 threads
    does change them on this shape, which is why training keeps to powers of two."""
    one, numbers_one = _train_steps(1)
    for threads in (2, 4):
        other, numbers = _train_steps(threads)
        assert numbers == numbers_one, threads
        assert [k for k in one if not torch.equal(one[k], other[k])] == [], threads
    three, _ = _train_steps(3)
    assert [k for k in one if not torch.equal(one[k], three[k])], "3 threads gave the same weights: the test's shape no longer splits a vectorised op unevenly"


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
        real_init(self, 2, **dict(kw, start=2, read=m.read, clock=lambda: m.now, n_cores=2))

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


# ---- a real busy process beside training ---------------------------------------------------------


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(run_dir / "checkpoints" / latest / "model.safetensors")


@pytest.mark.skipif(T.cores() < 2 or not Path("/proc/stat").is_file(), reason="needs two cores and /proc")
def test_a_busy_core_beside_training_drops_a_thread_and_changes_no_number(tiny_dataset, tmp_path, monkeypatch) -> None:
    """A CPU-bound process takes one of training's two cores for the whole run: training (asked for
    2 threads) drops to 1 within its first second, records why, and ends with the very weights of
    a 1-thread run on a quiet machine."""
    from lmforge.train.start import StartRequest, train_command

    monkeypatch.delenv(T.ADAPT_ENV, raising=False)
    cpus = sorted(os.sched_getaffinity(0))[:2]  # training and the busy loop share these two cores
    before = os.sched_getaffinity(0)
    # 150 steps: ~4 s, eight or more /proc samples (one each 0.5 s); with 60 a fast machine finished in
    # 1.7 s, and when the scheduler gave the busy loop only half its core in those few samples
    # (others 0.5, which rounds to 0), no sample showed a core taken
    overrides = (f"data.path={tiny_dataset}", "train.max_steps=150", "train.eval_every=0", "train.ckpt_every_steps=150",
                 "train.log_every=50")

    def train(run_dir: Path, threads: int) -> list[dict]:
        code = train_command(StartRequest(config="tiny-cpu", run_dir=str(run_dir),
                                          overrides=(*overrides, f"train.threads={threads}")))
        assert code == 0
        return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]

    os.sched_setaffinity(0, cpus)
    try:
        monkeypatch.setenv(T.ADAPT_ENV, "0")
        train(tmp_path / "quiet", 1)
        monkeypatch.delenv(T.ADAPT_ENV)
        busy = subprocess.Popen([sys.executable, "-c", "import os, time\n"
                                 f"os.sched_setaffinity(0, {{{cpus[1]}}})\n"
                                 "print('spinning', flush=True)\n"
                                 "end = time.monotonic() + 120\n"  # bounded even if the test dies
                                 "while time.monotonic() < end: pass"], stdout=subprocess.PIPE, text=True)
        try:
            assert busy.stdout.readline().strip() == "spinning"  # it holds its core before training starts
            events = train(tmp_path / "busy", 2)
        finally:
            busy.kill()
            busy.wait()
    finally:
        os.sched_setaffinity(0, before)
    changes = [e for e in events if e.get("kind") == "threads"]
    assert changes and (changes[0]["from"], changes[0]["to"]) == (2, 1), events
    assert "other processes use" in changes[0]["reason"] and "of 2 cores" in changes[0]["reason"]
    quiet, busy_weights = _final_weights(tmp_path / "quiet"), _final_weights(tmp_path / "busy")
    assert [k for k in quiet if not torch.equal(quiet[k], busy_weights[k])] == []
