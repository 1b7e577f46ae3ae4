"""Threads on a shared machine: how many a computing verb starts with, and when it changes them.

Why
---
torch's CPU kernels run on OpenMP threads that wait for each other at the end of every parallel
region, spinning first. When another process holds one of the cores, the thread that lost its
core holds up all the others, and every op waits for the slowest: on a 2-core machine with one
busy core, two threads trained ~6x slower than one (issue 20; docs/inference.md has this
machine's figures). "All cores" is therefore the wrong default wherever cores are shared.

What
----
- `default_threads(cores, others)`: with `--threads` absent (or a config's 0), the cores that no
  one else is using when the verb starts, at least 1: `cores - round(others)`. `others` is the CPU
  time other processes (and the hypervisor's steal) took over a short sample, in cores.
- `decide(...)`: a pure function of what a running verb sees (its cores, the threads it wants, the
  threads it has, the other processes' share of the machine, and its step time against the time it
  expects) -> the threads to use now. Fewer while others need cores; back up when they stop.
  The step time is the verb's own evidence: a drop needs the machine to show other work *and* the
  step to run slower than expected (or no expectation yet); a rise needs the machine to show idle
  cores for `RISE_AFTER` seconds (hysteresis: no flapping on a one-second blip).
- `Governor`: one per computing loop (training steps, serving steps, eval batches, sampled
  tokens). `governor.step(seconds)` once per step: it times nothing itself and reads /proc at most
  every `SAMPLE_EVERY` seconds, so its cost is a clock read per step. When it changes the thread
  count it calls `on_change(old, new, reason)` (training records an event in the store).
  LMFORGE_ADAPT_THREADS=0 turns adaptation off (the start count stays).

Threads and numbers
-------------------
Matrix products, attention, norms and their gradients give bit-identical fp32 results on any
thread count here (MKL and oneDNN split rows, not sums). Two kinds of op do not:
- elementwise ops with a vectorised path (SiLU's exp in the MLP): ATen splits a tensor into one
  contiguous range per thread and runs whole 8-float vectors vectorised and each range's
  leftover with scalar code, whose exp rounds differently. When numel / threads is not a multiple
  of the vector width, some elements change path: on the small-cpu shape 1, 2, 4 and 8 threads
  give the same weights after a training step, 3 and 6 do not.
- sums over a whole tensor (`t.sum()`): each thread sums its range, then the partial sums are
  added; even 1 and 2 threads differ in the last bit. Training's numbers use none (the loss is a
  cross entropy, reduced serially; the gradient norm is a norm per tensor).
So training (and the validation it records) uses power-of-two thread counts (`exact=True`:
`power_of_two`), and then threads change its speed only: the same run with 1, 2 or 4 threads,
or with the governor moving between them mid-run, gives bit-identical weights
(tests/test_threads.py). Inference (sample, serve, eval) takes any count: its logits may differ
in the last bit between counts, as between batch sizes (serve/engine.py).

/proc is Linux; elsewhere `others` is unknown (None) and the thread count stays as chosen.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

SAMPLE_EVERY = 0.5  # seconds between /proc reads while running
RISE_AFTER = 5.0  # seconds the machine must show idle cores before threads go back up
SLOW = 1.3  # a step this much slower than expected is evidence of contention
BUSY = 0.5  # another process's share (in cores) that counts as taking a core
ADAPT_ENV = "LMFORGE_ADAPT_THREADS"  # "0": keep the thread count a verb starts with (benchmarks, pinning)


def cores() -> int:
    """The cores this process may run on (its affinity mask; a cgroup CPU quota caps it)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def check_threads(threads: int | None, flag: str = "--threads") -> int | None:
    """A --threads value: None or 0 (lmforge chooses: returns None), or 1 .. cores(); anything else
    is a ConfigError. (The command line's type, ranges.thread_count, has refused what no machine
    allows already; this is the bound of this machine.)"""
    if not threads:
        return None
    limit = cores()
    if not 1 <= threads <= limit:
        raise ConfigError(f"{flag} must be within 0..{limit} (this machine's cores; 0 = lmforge chooses), got {threads}")
    return threads


# ---- what the machine shows ------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    wall: float  # time.monotonic()
    busy_all: float  # seconds of CPU time all processes took (user+nice+system+irq+softirq), from /proc/stat
    steal: float  # seconds the hypervisor gave our virtual CPUs to others
    busy_self: float  # seconds of CPU time this process took


def _read_sample() -> Sample | None:
    """The CPU time spent on the cores this process may run on (its affinity mask: others' work on
    cores it cannot use does not slow it), from /proc/stat's per-CPU lines."""
    try:
        mine = os.sched_getaffinity(0)
    except AttributeError:
        mine = None
    try:
        tick = os.sysconf("SC_CLK_TCK")
        busy = steal = 0
        for line in Path("/proc/stat").read_text().splitlines():
            name, *fields = line.split()
            if not (name.startswith("cpu") and name[3:].isdigit()):
                continue  # the "cpu" total, intr, ctxt, ...
            if mine is not None and int(name[3:]) not in mine:
                continue
            user, nice, system, _idle, _iowait, irq, softirq, st = (int(v) for v in fields[:8])
            busy += user + nice + system + irq + softirq
            steal += st
        me = os.times()
        return Sample(time.monotonic(), busy / tick, steal / tick, me.user + me.system)
    except (OSError, ValueError, IndexError):
        return None


def others_between(a: Sample, b: Sample) -> float:
    """Cores' worth of CPU that other processes (and steal) took between two samples."""
    dt = b.wall - a.wall
    if dt <= 0:
        return 0.0
    return max(0.0, ((b.busy_all - a.busy_all) - (b.busy_self - a.busy_self) + (b.steal - a.steal)) / dt)


def measure_others(seconds: float = 0.2) -> float | None:
    """Other processes' share of the machine right now, in cores (None where /proc is missing)."""
    a = _read_sample()
    if a is None:
        return None
    time.sleep(seconds)
    b = _read_sample()
    return None if b is None else others_between(a, b)


# ---- decisions (pure) ------------------------------------------------------------------------


def power_of_two(n: int) -> int:
    """The largest power of two <= n (n >= 1): a thread count that keeps training's numbers."""
    return 1 << (max(1, n).bit_length() - 1)


def default_threads(n_cores: int, others: float | None) -> int:
    """The threads a verb starts with when none are asked for: the cores nobody else uses, >= 1."""
    if others is None:
        return n_cores
    return max(1, min(n_cores, n_cores - round(others)))


def decide(*, n_cores: int, wanted: int, current: int, others: float | None, slowdown: float | None,
           idle_for: float, exact: bool = False) -> int:
    """The threads to run with now.

    n_cores   cores this process may use
    wanted    the most threads it should use (--threads, or the default chosen at start)
    current   threads it runs with now
    others    other processes' CPU share over the last sample, in cores (None: unknown)
    slowdown  recent step time / expected step time at `current` threads (None: no expectation yet)
    idle_for  seconds the machine has shown enough idle cores for more threads (hysteresis)
    exact     only powers of two (training: the counts that keep its numbers, module doc)
    """
    if others is None:
        return current
    free = max(1, min(wanted, n_cores - round(others)))  # cores nobody else uses (BUSY rounds at 0.5)
    if exact:
        free = power_of_two(free)
    if free < current:
        # Others hold cores we run on. Drop when our own steps show it (or we cannot tell yet).
        return free if slowdown is None or slowdown >= SLOW else current
    if free > current and idle_for >= RISE_AFTER:
        return free
    return current


# ---- the running side ------------------------------------------------------------------------


def set_threads(n: int) -> None:
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def choose(requested: int | None, *, exact: bool = False) -> int:
    """The thread count a verb starts with: `requested` (checked; None or 0: the default), rounded
    down to a power of two when `exact`, and applies it."""
    n = check_threads(requested) or default_threads(cores(), measure_others())
    n = power_of_two(n) if exact else n
    set_threads(n)
    return n


def govern(requested: int | None, *, exact: bool = False, on_change: Callable[[int, int, str], None] | None = None,
           adapt: bool = True) -> Governor:
    """The threads of a computing loop: start with `choose(requested)` and adapt from there, up to
    `requested` (None or 0: all this process's cores) while the machine has them free."""
    start = choose(requested, exact=exact)
    return Governor(requested or cores(), start=start, exact=exact, on_change=on_change, adapt=adapt)


class Governor:
    """Adapts a loop's torch thread count to the machine (see the module doc). Not thread-safe:
    one per loop, called from the thread that runs the loop's torch ops.

    wanted: the most threads to use; start: the threads to use first (default `wanted`, e.g. fewer
    because the machine was busy when the verb started); exact: powers of two only (both counts are
    rounded down too); read, clock: where samples of the machine and the time come from (tests
    script both; a sample's `wall` is on `clock`); n_cores: the cores this process may use
    (default `cores()`)."""

    def __init__(self, wanted: int, *, start: int | None = None, exact: bool = False,
                 on_change: Callable[[int, int, str], None] | None = None, adapt: bool = True, window: int = 5,
                 read: Callable[[], Sample | None] | None = None, clock: Callable[[], float] = time.monotonic,
                 n_cores: int | None = None) -> None:
        self.n_cores = n_cores or cores()
        self.exact = exact
        fit = power_of_two if exact else (lambda n: n)
        self.wanted = fit(max(1, min(wanted, self.n_cores)))
        self.current = fit(max(1, min(start or self.wanted, self.wanted)))
        self.on_change = on_change
        self.adapt = adapt and os.environ.get(ADAPT_ENV, "1") != "0"
        self.read, self.clock = read or _read_sample, clock
        self.expected: dict[int, float] = {}  # threads -> seconds per unit of work, measured when quiet
        self.recent: deque[float] = deque(maxlen=window)
        self.last = self.read() if self.adapt else None
        self.others: float | None = None
        self.idle_since: float | None = None
        set_threads(self.current)

    def step(self, seconds: float, work: float = 1.0) -> int:
        """Record one step (its wall time, and its size in any unit the loop keeps fixed, e.g.
        tokens); maybe change the thread count. Returns the thread count for the next step."""
        if not self.adapt or self.last is None or seconds <= 0 or work <= 0:
            return self.current
        self.recent.append(seconds / work)
        if self.clock() - self.last.wall < SAMPLE_EVERY:  # a clock read per step; /proc twice a second
            return self.current
        sample = self.read()
        if sample is None:
            return self.current
        self.others = others_between(self.last, sample)
        self.last = sample
        typical = sorted(self.recent)[len(self.recent) // 2]
        if self.others < BUSY / 2 and len(self.recent) == self.recent.maxlen:  # quiet: calibrate
            self.expected[self.current] = min(self.expected.get(self.current, typical), typical)
        if min(self.wanted, self.n_cores - round(self.others)) > self.current:  # room to rise: for how long (hysteresis)
            self.idle_since = self.idle_since if self.idle_since is not None else sample.wall
        else:
            self.idle_since = None
        expected = self.expected.get(self.current)
        slowdown = typical / expected if expected else None
        new = decide(n_cores=self.n_cores, wanted=self.wanted, current=self.current, others=self.others,
                     slowdown=slowdown, idle_for=sample.wall - self.idle_since if self.idle_since is not None else 0.0,
                     exact=self.exact)
        if new != self.current:
            old, self.current = self.current, new
            set_threads(new)
            self.recent.clear()
            self.idle_since = None
            why = (f"other processes use {self.others:.1f} of {self.n_cores} cores" if new < old
                   else f"cores free again (others use {self.others:.1f} of {self.n_cores})")
            if slowdown is not None and new < old:
                why += f"; steps ran {slowdown:.1f}x slower than expected"
            if self.on_change is not None:
                self.on_change(old, new, why)
        return self.current


__all__ = ["SAMPLE_EVERY", "RISE_AFTER", "SLOW", "BUSY", "ADAPT_ENV", "cores", "check_threads", "Sample", "others_between",
           "measure_others", "power_of_two", "default_threads", "decide", "set_threads", "choose", "govern", "Governor"]
