"""`lmforge train --supervise`: restart the training process after a crash or kill.

The supervisor is a small parent process. It runs the same `lmforge train` command as a child,
and when the child dies from anything other than success, a user error or a stop the user asked
for, it waits (exponential backoff: delay, 2x, 4x ..., capped at 5 minutes) and starts it again.
The child resumes from its newest intact checkpoint by itself, so the supervisor needs to know
nothing about training.

It refuses to loop: when the last `same_failure_limit` failures ended with the same exit status at
the same step (read from the run's newest checkpoint), restarting again would only repeat them,
so it stops with a report. Exit statuses that are never restarted: 0 (done), 2 (a user error such
as a bad config, a full disk or a guard that gave up: a restart would meet it again), 3 (the run
reached its end with a non-finite loss or weights: a restart would resume at the end and say
nothing), 130/143 (the user pressed Ctrl-C or sent SIGTERM to the child; the supervisor forwards
those signals to the child and stops after it).

Many processes on one machine (`--supervise --nproc-per-node N`): the child is the whole torchrun
job (`python -m torch.distributed.run --standalone --nproc-per-node N -m lmforge train ...`).
A rank that dies makes torchrun stop the others and exit 1; the supervisor then restarts the
whole job, which resumes from the newest checkpoint on the same (or any) number of processes.
torchrun reports every worker failure as exit 1, so a rank that stops on a user error writes it to
the file named by LMFORGE_ERROR_FILE (in a temporary directory of the supervisor's, so that a start
refused before its run directory exists can report too) and the supervisor treats that attempt as
exit 2 (no restart). Multi-node jobs use torchrun's own `--max-restarts` instead (docs/distributed.md).

`launch` is what `lmforge train --supervise` / `--nproc-per-node N` run in the parent. Before
anything is launched it plans the child's start with the children's own function
(start.plan_start, for the world size it will launch; without a device, so the parent never
touches the GPU the children train on): what every child would refuse is one line and exit 2 from
the parent, instead of the same error from a child (or under torchrun's report of N failed
workers). The child's command line is the request's own (`StartRequest.to_argv`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import artifacts
from ..errors import ConfigError
from ..util import console
from .distributed import Dist, LaunchError, check_not_nested
from .loop import EXIT_NON_FINITE
from .start import StartRequest, plan_start

NO_RESTART = {0: "finished", 2: "stopped on an error that a restart cannot fix",
              EXIT_NON_FINITE: "finished with a non-finite loss or weights", 130: "interrupted (SIGINT)",
              143: "stopped (SIGTERM)"}


def launch(request: StartRequest, *, supervise: bool, nproc_per_node: int | None, max_restarts: int = 10,
           restart_delay: float = 5.0) -> int:
    """The parent of `lmforge train --supervise` and/or `--nproc-per-node N`: plan the start the
    child will make, then run the child (under torchrun with N processes) once, or supervised."""
    check_not_nested(nproc_per_node=nproc_per_node, supervise=supervise)
    if nproc_per_node is not None and nproc_per_node < 1:
        raise LaunchError(f"--nproc-per-node {nproc_per_node}: give a number of processes >= 1 "
                          "(or leave it out to train in this one process)")
    if supervise:
        check_supervision(max_restarts, restart_delay)
    nproc = nproc_per_node or 0  # 0: no torchrun (supervise/launch_command's meaning)
    planned = plan_start(request, Dist(rank=0, world=max(1, nproc)))  # device=None: the children resolve the dtype
    child = request.to_argv()
    if not supervise:  # one machine, N processes: the same command under torchrun
        return subprocess.call(launch_command(child, nproc))
    return supervise_child(child, planned.run_dir, max_restarts=max_restarts, delay=restart_delay,
                           nproc_per_node=nproc)


def check_supervision(max_restarts: int, restart_delay: float) -> None:
    """--max-restarts: a whole number >= 0; --restart-delay: finite seconds >= 0."""
    if max_restarts < 0:
        raise ConfigError(f"--max-restarts {max_restarts}: give a number of restarts >= 0 (0: never restart)")
    if not (restart_delay >= 0 and restart_delay != float("inf")):  # NaN fails both comparisons
        raise ConfigError(f"--restart-delay {restart_delay}: give seconds >= 0 (the first backoff; it doubles, "
                          "at most 300 s)")


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def newest_step(run_dir: Path) -> int:
    ckpts = artifacts.list_checkpoints(run_dir)
    return artifacts.checkpoint_step(ckpts[-1]) if ckpts else -1


def supervise_child(
    child_args: list[str],
    run_dir: Path,
    *,
    max_restarts: int,
    delay: float = 5.0,
    same_failure_limit: int = 3,
    nproc_per_node: int = 0,
) -> int:
    """Run `python -m lmforge <child_args>` (under torchrun when nproc_per_node > 0) until it
    succeeds or restarting is pointless."""
    check_supervision(max_restarts, delay)
    cmd = launch_command(child_args, nproc_per_node)
    error_dir = Path(tempfile.mkdtemp(prefix="lmforge-supervise-"))  # not in the run directory: a refused start writes nothing there
    error_file = error_dir / artifacts.LAST_ERROR_FILE
    env = dict(os.environ, LMFORGE_ERROR_FILE=str(error_file))
    restarts, failures = 0, []  # failures: (exit code, step) of each crash
    stopping = {"signal": 0}
    child: dict[str, Any] = {"proc": None}

    def forward(signum: int, _frame: Any) -> None:
        stopping["signal"] = signum
        if child["proc"] is not None and child["proc"].poll() is None:
            child["proc"].send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            error_file.unlink(missing_ok=True)
            child["proc"] = subprocess.Popen(cmd, env=env)
            code = child["proc"].wait()
            if code != 0 and _user_error(error_file):
                code = 2  # a rank stopped on a user error; torchrun only said "1"
            if code in NO_RESTART or stopping["signal"]:
                if code != 0:
                    console.print(f"supervisor: the training process {NO_RESTART.get(code, describe_exit(code))}; not restarting")
                return code
            step = newest_step(run_dir)
            failures.append((code, step))
            console.print(f"[yellow]supervisor:[/] training {describe_exit(code)} (newest checkpoint: step {step})")
            recent = failures[-same_failure_limit:]
            if len(recent) == same_failure_limit and len(set(recent)) == 1:
                console.print(
                    f"[red]supervisor:[/] the last {same_failure_limit} attempts all ended with {describe_exit(code)} "
                    f"from the checkpoint of step {step}; restarting again would repeat it. Stopping. "
                    f"Look at {run_dir / 'events.jsonl'} and the output above."
                )
                return code if code > 0 else 1
            if restarts >= max_restarts:
                console.print(f"[red]supervisor:[/] {restarts} restarts used (--max-restarts {max_restarts}); stopping")
                return code if code > 0 else 1
            wait = min(300.0, delay * 2 ** min(restarts, 10))
            restarts += 1
            console.print(f"supervisor: restart {restarts}/{max_restarts} in {wait:g} s")
            time.sleep(wait)
            if stopping["signal"]:
                return 128 + stopping["signal"]
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        shutil.rmtree(error_dir, ignore_errors=True)


def launch_command(child_args: list[str], nproc_per_node: int = 0) -> list[str]:
    """`python -m lmforge <args>`, or the same under torchrun with N processes on this machine
    (`--standalone`: torchrun picks a free port for its rendezvous on every start)."""
    if nproc_per_node > 0:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc_per_node),
                "-m", "lmforge", *child_args]
    return [sys.executable, "-m", "lmforge", *child_args]


def _user_error(error_file: Path) -> bool:
    try:
        return json.loads(error_file.read_text(encoding="utf-8")).get("exit") == 2
    except (OSError, ValueError):
        return False
