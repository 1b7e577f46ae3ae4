"""Self-healing drills through the real CLI: injected NaN and spikes roll back and recover, a crash
after a rollback reproduces the same skips, the supervisor restarts killed runs to bit-identical
weights and refuses to loop, `--from` branches, `ckpt verify` names damage."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, lmforge_cmd, lmforge_in_process, subprocess_env
from test_train import final_weights, run_train


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def final_val_loss(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in rows if "val_loss" in r][-1]


@pytest.fixture(scope="module")
def clean_run(tiny_dataset, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("clean") / "run"
    run_train(tiny_dataset, run_dir)
    return run_dir


@pytest.mark.parametrize("fault, extra", [("nan@15", []), ("spike@25", ["guard.warmup=10"])])
def test_injected_fault_rolls_back_and_recovers(tiny_dataset, clean_run, tmp_path, fault, extra):
    run_dir = tmp_path / "run"
    quiet = fault.startswith("nan")  # a rollback is a warning: it shows in quiet mode too
    proc = run_train(tiny_dataset, run_dir, *extra, faults=fault, env={"LMFORGE_PROGRESS": "quiet"} if quiet else None)
    assert "guard: rolled back from step" in proc.stderr and "guard: step" in proc.stderr
    ev = events(run_dir)
    kinds = [e["kind"] for e in ev]
    assert ("non_finite" if fault.startswith("nan") else "spike") in kinds
    rb = next(e for e in ev if e["kind"] == "rollback")
    step = int(fault.split("@")[1])
    assert rb["from_step"] == step and rb["to_step"] == step // 10 * 10
    assert rb["skipped_data_steps"] == [step // 10 * 10, step]  # the window that led into the fault
    assert kinds[-1] == "completed"
    clean, healed = final_val_loss(clean_run), final_val_loss(run_dir)
    assert abs(healed - clean) / clean < 0.01, (healed, clean)


def test_crash_after_rollback_reproduces_the_same_skips(tiny_dataset, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_train(tiny_dataset, a, faults="nan@15")
    killed = run_train(tiny_dataset, b, faults="nan@15,kill@18", check=False)
    assert killed.returncode == -9
    run_train(tiny_dataset, b)  # plain resume, no faults
    assert final_weights(a) == final_weights(b)
    assert [e["skipped_data_steps"] for e in events(b) if e["kind"] == "rollback"] == [[10, 15]]
    # data inspect on the run maps training steps through the rollback
    for step, data_step in [(15, 14), (10, 9), (11, 15), (16, 20)]:  # 15: the NaN step as it was read
        proc = lmforge_in_process(["data", "inspect", str(a), "--step", str(step), "--json"])
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["step"] == data_step
        assert "skipped data steps 10..14" in proc.stderr


def test_too_many_rollbacks_gives_up_with_a_report(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(tiny_dataset, run_dir, "guard.max_rollbacks=1", faults="nan@12,nan@14", check=False)
    assert proc.returncode == 2
    assert "giving up" in proc.stderr and "Traceback" not in proc.stderr


def supervised(data: Path, run_dir: Path, faults: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = lmforge_cmd("train", str(TINY_CONFIG), "--run-dir", str(run_dir), "--set", f"data.path={data}",
                      "--supervise", "--max-restarts", "5", "--restart-delay", "0", *extra)
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(LMFORGE_FAULTS=faults), timeout=600)


def test_supervised_run_survives_kills_bit_identical(tiny_dataset, clean_run, tmp_path):
    steps = sorted(random.Random(1234).sample(range(1, 40), 3))
    run_dir = tmp_path / "run"
    proc = supervised(tiny_dataset, run_dir, ",".join(f"kill@{s}" for s in steps))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("supervisor: training killed by SIGKILL") == 3
    assert final_weights(run_dir) == final_weights(clean_run)


def test_supervisor_stops_a_failure_that_repeats(tiny_dataset, tmp_path):
    proc = supervised(tiny_dataset, tmp_path / "run", "kill@12!")
    assert proc.returncode != 0
    assert "restarting again would repeat it" in proc.stderr
    assert proc.stderr.count("supervisor: training killed by SIGKILL") == 3


def test_supervisor_does_not_restart_user_errors(tiny_dataset, tmp_path):
    # a start every child would refuse: refused by the supervisor itself (the children's own check), nothing launched
    proc = lmforge_in_process(["train", str(TINY_CONFIG), "--run-dir", str(tmp_path / "run"), "--set",
                               f"data.path={tiny_dataset}", "--supervise", "--set", "train.lrr=1"])
    assert proc.returncode == 2 and "did you mean 'train.lr'" in proc.stderr and "Traceback" not in proc.stderr
    assert "supervisor:" not in proc.stderr and not (tmp_path / "run").exists()
    # a user error that only training meets (the guard gives up: exit 2) is not restarted either
    proc = supervised(tiny_dataset, tmp_path / "run", "nan@12,nan@14", "--set", "guard.max_rollbacks=1")
    assert proc.returncode == 2 and "giving up" in proc.stderr, proc.stderr[-3000:]
    assert "not restarting" in proc.stderr and "supervisor: restart 1" not in proc.stderr


def test_branch_from_a_checkpoint(tiny_dataset, clean_run, tmp_path):
    src = clean_run / "checkpoints" / "step-000030"
    run_dir = tmp_path / "branch"
    proc = run_train(tiny_dataset, run_dir, "train.lr=5e-4", extra_args=["--from", str(src)])
    assert "branched from" in proc.stderr and "at step 30" in proc.stderr
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert min(r["step"] for r in metrics) > 30
    assert any(e["kind"] == "branch" for e in events(run_dir))
    again = run_train(tiny_dataset, run_dir, extra_args=["--from", str(src)], check=False)
    assert again.returncode == 2 and "already has checkpoints" in again.stderr


def test_branch_must_keep_the_model_shape_and_writes_nothing_when_refused(tiny_dataset, clean_run, tmp_path):
    run_dir = tmp_path / "branch"
    src = clean_run / "checkpoints" / "step-000030"
    proc = run_train(tiny_dataset, run_dir, "model.n_layer=3", "model.d_model=128", extra_args=["--from", str(src)], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"--from {src}: the model must keep the checkpoint's shape" in proc.stderr
    assert "model.n_layer: checkpoint 2, now 3; model.d_model: checkpoint 64, now 128" in proc.stderr
    assert not run_dir.exists()  # refused before anything was written: the corrected command starts cleanly


def test_branch_with_another_batch_shape_reads_a_fresh_data_order(tiny_dataset, clean_run, tmp_path):
    run_dir = tmp_path / "branch"
    proc = run_train(tiny_dataset, run_dir, "data.seq_len=32", "train.global_batch=16", "train.max_steps=32",
                     "train.eval_every=0", extra_args=["--from", str(clean_run / "checkpoints" / "step-000030")])
    assert proc.stderr.count("cannot carry over") == 1
    assert "(data.seq_len: checkpoint 64, now 32; train.global_batch: checkpoint 8, now 16)" in proc.stderr
    branch = next(e for e in events(run_dir) if e["kind"] == "branch")
    assert branch["step"] == 30 and branch["data_order"] == "fresh" and "data.seq_len" in branch["data_order_reason"]
    trainer = json.loads((run_dir / "checkpoints" / "step-000032" / "trainer.json").read_text())
    assert trainer["step"] == 32 and trainer["loader"]["step"] == 2  # two steps read from the new order's start
    # a plain resume in the run directory still refuses such a change
    again = run_train(tiny_dataset, run_dir, "data.seq_len=64", "train.global_batch=16", "train.max_steps=34", check=False)
    assert again.returncode == 2 and "cannot resume with a changed data.seq_len: 32 -> 64" in again.stderr


@pytest.mark.parametrize("spec", ["kil@3", "nan15", "nan@x", "nan@3/1", "spike@0", "kill@3/1"])
def test_malformed_fault_spec_is_refused(spec, monkeypatch):
    from lmforge.errors import ConfigError
    from lmforge.train.loop import check_faults

    monkeypatch.setenv("LMFORGE_FAULTS", f"nan@15, {spec}")
    with pytest.raises(ConfigError) as e:
        check_faults()
    assert repr(spec) in str(e.value)
    assert "valid forms: kill@N, nan@N, spike@N" in str(e.value) or "names rank 1" in str(e.value)


def test_valid_fault_specs_pass_and_a_bad_one_stops_the_cli(tiny_dataset, monkeypatch, tmp_path):
    from lmforge.train.loop import check_faults

    monkeypatch.setenv("LMFORGE_FAULTS", "kill@3,nan@15!,spike@27,kill@12/0!,")
    check_faults()
    proc = run_train(tiny_dataset, tmp_path / "run", faults="kil@3", check=False)
    assert proc.returncode == 2 and "'kil@3' is not a fault" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_ckpt_verify_names_the_damage(clean_run, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(clean_run, run_dir)
    ok = subprocess.run(lmforge_cmd("ckpt", "verify", str(run_dir)), capture_output=True, text=True)
    assert ok.returncode == 0 and "damaged" in ok.stdout and "0 damaged" in ok.stdout  # the verdict: stdout
    p = run_dir / "checkpoints" / "step-000040" / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    p.write_bytes(bytes(data))
    (run_dir / "checkpoints" / "step-000030" / "MANIFEST.json").unlink()
    bad = subprocess.run(lmforge_cmd("ckpt", "verify", str(run_dir)), capture_output=True, text=True)
    assert bad.returncode == 1
    assert "model.safetensors fails its sha256 check" in bad.stdout
    assert "incomplete" in bad.stdout and "2 damaged" in bad.stdout
    assert f"incomplete {run_dir}" in bad.stdout and f"corrupt    {run_dir}" in bad.stdout  # aligned columns
