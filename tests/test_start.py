"""Starting a run (train/start.py) and its records (train/records.py): a train flag is declared once
(argparse line + StartRequest field) and reaches a launched child unchanged; train.dtype: auto is
decided once and kept on resume; a start removes what a killed writer left; a non-finite run with
the guard off is loud and exits 3 (also under the supervisor); quickstart starts like any train."""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import TINY_CONFIG, lmforge_cmd, lmforge_in_process, subprocess_env
from test_train import assert_user_error, run_train
from lmforge import artifacts
from lmforge.cli import build_parser
from lmforge.config import load_config
from lmforge.errors import WriteError
from lmforge.jsonl import read_records
from lmforge.train import records
from lmforge.train.distributed import SINGLE
from lmforge.train.start import StartRequest, plan_start
from lmforge.train.supervise import check_supervision

LAUNCHER_FLAGS = {"supervise", "nproc_per_node", "max_restarts", "restart_delay"}  # the parent's own


def train_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["train"]


# ---- a flag is declared once -----------------------------------------------------------------


def test_every_train_flag_is_a_request_field_or_the_launchers_own() -> None:
    """A new `lmforge train` flag is its argparse line and a StartRequest field: the child's
    command line (`to_argv`) and the request (`from_args`) follow from them, nothing else."""
    dests = {a.dest for a in train_parser()._actions if a.dest != "help"}
    fields = set(StartRequest.__dataclass_fields__)
    assert dests - LAUNCHER_FLAGS == fields, "add the flag's field to StartRequest (train/start.py)"


def test_the_child_command_line_asks_for_the_same_request() -> None:
    argv = ["train", "cfg.yaml", "--run-dir", "runs/x", "--set", "train.lr=1e-3", "--set", "a.b=c d",
            "--from", "runs/y/checkpoints/step-000010", "--supervise", "--max-restarts", "3"]
    request = StartRequest.from_args(build_parser().parse_args(argv))
    assert request == StartRequest("cfg.yaml", "runs/x", ("train.lr=1e-3", "a.b=c d"), "runs/y/checkpoints/step-000010")
    child = request.to_argv()
    assert "--supervise" not in child and "--max-restarts" not in child  # the parent's flags stay in the parent
    assert StartRequest.from_args(build_parser().parse_args(child)) == request
    assert StartRequest(run_dir="r").to_argv() == ["train", "--run-dir", "r"]


@pytest.mark.parametrize("max_restarts, delay, message", [
    (-1, 5.0, "--max-restarts -1: give a number of restarts >= 0"),
    (3, -1.0, "--restart-delay -1.0: give seconds >= 0"),
    (3, float("nan"), "--restart-delay nan"),
    (3, float("inf"), "--restart-delay inf"),
])
def test_supervisor_flags_are_checked(max_restarts, delay, message) -> None:
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_supervision(max_restarts, delay)
    check_supervision(0, 0.0)


def test_a_fault_after_max_steps_is_refused(tiny_dataset, tmp_path) -> None:
    proc = run_train(tiny_dataset, tmp_path / "run", faults="nan@99999999999999999999", check=False)
    assert_user_error(proc, "'nan@99999999999999999999' names step 99999999999999999999, after train.max_steps (40)")
    assert not (tmp_path / "run").exists()


# ---- train.dtype: auto -------------------------------------------------------------------------


def test_dtype_auto_is_decided_once_and_a_resume_keeps_it(tiny_dataset, tmp_path, monkeypatch) -> None:
    import lmforge.train.start as start_mod

    run_dir = tmp_path / "run"
    sets = (f"data.path={tiny_dataset}", "train.dtype=auto", "train.max_steps=2", "train.eval_every=0")
    monkeypatch.setattr(start_mod, "auto_dtype", lambda device: "fp32")
    plan = plan_start(StartRequest(str(TINY_CONFIG), str(run_dir), sets), device=SimpleNamespace(type="cpu"))
    assert plan.cfg.train.dtype == "fp32" and not run_dir.exists()  # decided, nothing written
    assert plan_start(StartRequest(str(TINY_CONFIG), str(run_dir), sets)).cfg.train.dtype == "auto"  # a launcher: no device
    run_train(tiny_dataset, run_dir, *sets, process=True)  # this CPU (AVX2 here: fp32) decides, in the subprocess
    written = load_config(run_dir / "config.yaml").train.dtype
    assert written in ("fp32", "bf16")
    assert load_config(run_dir / "checkpoints" / "step-000002" / "config.yaml").train.dtype == written
    # the same command on a machine whose answer differs: the run keeps its dtype (resume is exact), no change
    monkeypatch.setattr(start_mod, "auto_dtype", lambda device: "bf16" if written == "fp32" else "fp32")
    again = plan_start(StartRequest(str(TINY_CONFIG), str(run_dir), sets), device=SimpleNamespace(type="cpu"))
    assert again.resume and again.cfg.train.dtype == written and again.changes == {}


def test_cpu_recipes_say_auto_and_gpu_recipes_bf16() -> None:
    for name in ("small-cpu", "finetune-cpu"):
        assert load_config(name).train.dtype == "auto"
    for name in ("gpu-125m", "gpu-350m", "gpu-1b"):
        assert load_config(name).train.dtype == "bf16"
    assert load_config().train.dtype == "auto"  # the default


# ---- stale temporaries -----------------------------------------------------------------------


def test_a_start_removes_what_a_killed_writer_left_and_says_so(tiny_dataset, tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_train(tiny_dataset, run_dir, "train.max_steps=2", "train.eval_every=0")
    ckpts = run_dir / "checkpoints"
    litter = [ckpts / ".step-000004.k3j9x.tmp", ckpts / ".deleting-step-000001", ckpts / ".step-000002.ab12.old"]
    for d in litter:  # a kill during a checkpoint write, a retention pass, a replacement
        (d / "train_state").mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"\0" * 1000)
    files = [ckpts / ".latest.x1y2.tmp", run_dir / ".metrics.jsonl.q7.tmp", run_dir / ".config.yaml.z.tmp"]
    for f in files:
        f.write_text("half")
    proc = run_train(tiny_dataset, run_dir, "train.max_steps=3", "train.eval_every=0")
    assert "removed 6 leftover(s) of an interrupted write" in proc.stderr
    assert ".step-000004.k3j9x.tmp" in proc.stderr and ".metrics.jsonl.q7.tmp" in proc.stderr
    assert not [p for p in [*litter, *files] if os.path.lexists(p)]
    assert [p.name for p in artifacts.list_checkpoints(run_dir)][-1] == "step-000003"
    quiet = run_train(tiny_dataset, run_dir, "train.max_steps=4", "train.eval_every=0")
    assert "leftover" not in quiet.stderr  # nothing left to remove, nothing said


def test_a_refused_start_removes_nothing(tiny_dataset, tmp_path) -> None:
    """Only the lock holder tidies, and only a start that was accepted."""
    run_dir = tmp_path / "run"
    run_train(tiny_dataset, run_dir, "train.max_steps=2", "train.eval_every=0")
    tmp = run_dir / "checkpoints" / ".step-000004.busy.tmp"
    tmp.mkdir()
    fd = os.open(run_dir, os.O_RDONLY)  # another live `lmforge train` holds the run
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert_user_error(run_train(tiny_dataset, run_dir, "train.max_steps=3", check=False), "is in use by another")
        assert tmp.is_dir()
    finally:
        os.close(fd)
    assert_user_error(run_train(tiny_dataset, run_dir, "model.n_layer=3", check=False), "cannot resume with a changed")
    assert tmp.is_dir()


# ---- non-finite with the guard off ---------------------------------------------------------------


def test_nan_with_the_guard_off_is_loud_once_and_exits_3(tiny_dataset, tmp_path) -> None:
    run_dir = tmp_path / "run"
    proc = run_train(tiny_dataset, run_dir, "guard.enabled=false", "train.max_steps=20", faults="nan@7",
                     env={"LMFORGE_PROGRESS": "quiet"}, check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert proc.stderr.count("non-finite loss or gradient norm") == 1  # at its step, once (not at every NaN step after it)
    assert "step 7: non-finite" in proc.stderr and "guard.enabled=false" in proc.stderr
    assert "Exit status 3" in proc.stderr and "Traceback" not in proc.stderr and "done:" not in proc.stderr
    events = read_records(run_dir / "events.jsonl")
    nf = [e for e in events if e["kind"] == "non_finite"]
    assert len(nf) == 1 and nf[0]["step"] == 7 and nf[0]["acting"] is False and nf[0]["loss"] == "nan"
    assert events[-1]["kind"] == "diverged" and events[-1]["first_non_finite_step"] == 7
    assert events[-1]["weights_finite"] is False and not any(e["kind"] == "completed" for e in events)
    # resumed at its end, it still says so (the weights are NaN), and the supervisor does not restart it
    sup = subprocess.run(lmforge_cmd("train", str(TINY_CONFIG), "--run-dir", str(run_dir), "--set", f"data.path={tiny_dataset}",
                                     "--set", "guard.enabled=false", "--set", "train.max_steps=20", "--supervise",
                                     "--restart-delay", "0"), capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert sup.returncode == 3, sup.stderr[-3000:]
    assert "finished with a non-finite loss or weights; not restarting" in sup.stderr and "restart 1" not in sup.stderr


def test_a_clean_run_with_the_guard_off_exits_0(tiny_dataset, tmp_path) -> None:
    proc = run_train(tiny_dataset, tmp_path / "run", "guard.enabled=false", "train.max_steps=3", "train.eval_every=0")
    assert "done: 3 steps" in proc.stderr and "non-finite" not in proc.stderr


# ---- records ---------------------------------------------------------------------------------


def test_a_record_that_cannot_be_written_stops_in_one_line(tmp_path, monkeypatch) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-000010").mkdir(parents=True)
    run = SimpleNamespace(run_dir=run_dir, dist=SINGLE, step=12, store=None, run_id=0)

    def full(path, record, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(records, "append_jsonl", full)
    with pytest.raises(WriteError) as e:
        records.log_metrics(run, {"loss": 1.0})
    text = str(e.value)
    assert text.startswith(f"disk full at {run_dir / 'metrics.jsonl'}, ") and " bytes free; training stopped at step 12" in text
    assert "the newest checkpoint (" in text and "step-000010) is intact" in text and "\n" not in text
    records.log_event(run, "crash", {"error": "x"}, best_effort=True)  # a failing run's own record never hides its error
    monkeypatch.setattr(records, "append_jsonl", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    with pytest.raises(WriteError, match=r"cannot write .*events.jsonl: Permission denied; .* Fix the path"):
        records.log_event(run, "spike", {})


# ---- quickstart starts like any train ---------------------------------------------------------


def test_quickstart_takes_the_run_directory_lock(tmp_path) -> None:
    from lmforge.quickstart import source_name

    src = tmp_path / "src"
    src.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "shlex.py"):
        shutil.copy(stdlib / name, src / name)
    work = tmp_path / "qs"
    run_dir = work / "runs" / source_name(str(src))
    run_dir.mkdir(parents=True)
    fd = os.open(run_dir, os.O_RDONLY)  # a `lmforge train` already training this run
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # in this process: flock locks belong to an open file, so this one's own open of the run is refused too
        proc = lmforge_in_process(["quickstart", "--workdir", str(work), "--minutes", "0.05", "--source", str(src)],
                                  cwd=tmp_path)
    finally:
        os.close(fd)
    assert_user_error(proc, f"--run-dir {run_dir} is in use by another `lmforge train`")
    assert not (run_dir / "config.yaml").exists() and not artifacts.list_checkpoints(run_dir)  # it trained nothing
