"""`lmforge train --supervise`: restart the training process after a crash or kill.

The supervisor is a small parent process. It runs the same `lmforge train` command as a child,
and when the child dies from anything other than success, a user error or a stop the user asked
for, it waits (exponential backoff: delay, 2x, 4x ..., capped at 5 minutes) and starts it again.
The child resumes from its newest intact checkpoint by itself, so the supervisor needs to know
nothing about training.

It refuses to loop: when the last `same_failure_limit` failures ended with the same exit status at
the same step (read from the run's newest checkpoint), restarting again would only repeat them,
so it stops with a report. Exit statuses that are never restarted: 0 (done), 2 (a user error such
as a bad config, a full disk or a guard that gave up), 130/143 (the user pressed Ctrl-C or sent
SIGTERM to the child; the supervisor forwards those signals to the child and stops after it).

Many processes on one machine (`--supervise --nproc-per-node N`): the child is the whole torchrun
job (`python -m torch.distributed.run --standalone --nproc-per-node N -m lmforge train ...`).
A rank that dies makes torchrun stop the others and exit 1; the supervisor then restarts the
whole job, which resumes from the newest checkpoint on the same (or any) number of processes.
torchrun reports every worker failure as exit 1, so a rank that stops on a user error writes it to
the file named by LMFORGE_ERROR_FILE (in a temporary directory of the supervisor's, so that a start
refused before its run directory exists can report too) and the supervisor treats that attempt as
exit 2 (no restart). Multi-node jobs use torchrun's own `--max-restarts` instead (docs/distributed.md).

Before anything is launched with `--nproc-per-node N`, `check_job` refuses what every rank would
refuse because of the world size (the config and `--set` values, train.parallel, the batch split,
LMFORGE_FAULTS ranks), with the workers' own checks: one line and exit 2 from the parent instead of
the same error under torchrun's report of N failed workers.
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
from ..util import console

NO_RESTART = {0: "finished", 2: "stopped on an error that a restart cannot fix", 130: "interrupted (SIGINT)", 143: "stopped (SIGTERM)"}


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


def supervise(
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
    from .loop import check_run_dir

    check_run_dir(run_dir)  # a file is no run directory: say so here, not in a traceback about .last-error.json
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


def check_job(config: str | None, *, run_dir: str | None, overrides: list[str], from_: str | None,
              nproc_per_node: int) -> None:
    """Refuse, in the parent, a start every rank of an `nproc_per_node`-process job would refuse:
    the same checks the workers make (`_train_command`/`build` in loop.py, distributed.py), on the
    config they would load (the config file, else the run's saved config.yaml, else the --from
    checkpoint's). A start that does not name a config is left to the workers to judge."""
    from ..config import load_config
    from .distributed import Dist, check_parallel, micro_batches_per_rank
    from .loop import check_faults, check_run_dir, run_dir_of, start_config

    d = Dist(rank=0, world=nproc_per_node)
    check_faults(d)  # kill@STEP/R must name a rank of this job
    rd = run_dir_of(config, run_dir)
    if rd is None:
        return  # the workers say that a config or a --run-dir is needed
    check_run_dir(rd)
    if config is not None and Path(config).is_dir():
        return  # the workers explain a directory given as the config (perhaps a run to resume)
    base = start_config(config, rd, artifacts.resolve_checkpoint(from_) if from_ else None)
    if base is None:
        return
    cfg = load_config(base, overrides)  # a bad --set value, deterministic_reduce with fsdp, ...
    check_parallel(cfg.train, d)
    micro_batches_per_rank(cfg.train.global_batch, cfg.train.micro_batch, d.world)


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
