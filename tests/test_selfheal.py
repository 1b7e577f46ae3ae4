"""Self-healing drills through the real CLI: injected NaN and spikes roll back and recover, a crash
after a rollback reproduces the same skips, the supervisor restarts killed runs to bit-identical
weights and refuses to loop, `--from` branches, `ckpt verify` names damage."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, lmforge_cmd, subprocess_env
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
    proc = run_train(tiny_dataset, run_dir, *extra, faults=fault)
    assert "rolled back from step" in proc.stderr
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
        proc = subprocess.run(lmforge_cmd("data", "inspect", str(a), "--step", str(step), "--json"),
                              capture_output=True, text=True, env=subprocess_env())
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
    proc = supervised(tiny_dataset, tmp_path / "run", "", "--set", "train.lrr=1")
    assert proc.returncode == 2 and "did you mean 'train.lr'" in proc.stderr
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
