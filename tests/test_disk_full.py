"""A full disk, on a small filesystem each test mounts itself (tmpfs; skipped where mounting is not
permitted): training stops with one line "disk full at PATH, N bytes free" and exit 2, the previous
checkpoint intact and nothing half-written left; the supervisor does not restart into it; the
experiment store on a full disk warns once and training goes on; `export` says it in one line."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, lmforge_cmd, lmforge_in_process, subprocess_env
from test_train import assert_user_error, run_train
from lmforge import artifacts


@pytest.fixture
def small_fs(tmp_path):
    """mount(size) -> a fresh tmpfs of that size (e.g. "4m"), unmounted after the test."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a small filesystem needs root")
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def fill(fs: Path, leave: int = 0) -> None:
    """Fill `fs` up, then free `leave` bytes again."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError:
        pass
    try:
        while True:
            os.write(fd, b"\0" * 512)
    except OSError:
        pass
    os.close(fd)
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error:" in line]


def test_a_full_disk_stops_training_in_one_line_and_the_supervisor_stops(tiny_dataset, small_fs) -> None:
    run_dir = small_fs("4m") / "run"  # room for the step-0 checkpoint (2.6 MB), not for the next one
    proc = run_train(tiny_dataset, run_dir, check=False)
    assert_user_error(proc, f"disk full at {run_dir / 'checkpoints'}, ", " bytes free; training stopped at step 10 before "
                      "its checkpoint was published", f"the newest checkpoint ({run_dir / 'checkpoints' / 'step-000000'}) "
                      "is intact", "Free space, then run the same command to resume")
    assert len(error_lines(proc.stderr)) == 1 and "unexpected pos" not in proc.stderr and "SafetensorError" not in proc.stderr
    ckpts = artifacts.list_checkpoints(run_dir)
    assert [p.name for p in ckpts] == ["step-000000"] and artifacts.verify_checkpoint(ckpts[0]) == []
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-000000"
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporary left
    events = [e["kind"] for e in artifacts_events(run_dir)]
    assert events[-2:] == ["checkpoint_failed", "crash"]

    # the supervisor: a full disk is an error a restart cannot fix (exit 2), not a crash to retry
    sup = subprocess.run(lmforge_cmd("train", str(TINY_CONFIG), "--run-dir", str(run_dir), "--set", f"data.path={tiny_dataset}",
                                     "--supervise", "--max-restarts", "5", "--restart-delay", "0"),
                         capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert sup.returncode == 2, sup.stderr[-3000:]
    assert "disk full at" in sup.stderr and "not restarting" in sup.stderr and "restart 1" not in sup.stderr
    assert "Traceback" not in sup.stderr
    assert [p.name for p in artifacts.list_checkpoints(run_dir)] == ["step-000000"]


def artifacts_events(run_dir: Path) -> list[dict]:
    from lmforge.jsonl import read_records

    return read_records(run_dir / artifacts.EVENTS_FILE)


def test_a_run_directory_that_cannot_be_created_on_a_full_disk(tiny_dataset, small_fs) -> None:
    fs = small_fs("1m")
    fill(fs)
    proc = run_train(tiny_dataset, fs / "run", check=False)
    assert_user_error(proc, f"disk full at {fs / 'run' / 'config.yaml'}, 0 bytes free; nothing was trained")


def test_the_store_on_a_full_disk_warns_once_and_marks_what_it_can(small_fs, tmp_path, monkeypatch) -> None:
    from lmforge.track import store as store_mod
    from lmforge.track.store import Store

    monkeypatch.setattr(store_mod, "FLUSH_S", 0.05)
    fs = small_fs("1m")
    db = fs / "lmforge.db"
    s = Store.open(db)
    rid = s.start_run("r", str(tmp_path / "r"), {"train": {"lr": 1e-3}})
    s.flush()
    fill(fs, leave=40_000)  # room for a few rows (the run's status), not for a run's metrics
    for step in range(3000):
        s.log_metrics(rid, step, {"loss": 1.0, "lr": 1e-3, "grad_norm": 0.5})
    s.log_event(rid, "checkpoint_saved", 3000, {"path": str(tmp_path / "r" / "checkpoints" / "step-003000")})
    s.finish_run(rid, "completed", 3000)  # never raises
    s.close()
    assert len(s.warnings) == 1 and s.warnings[0].startswith(f"experiment store: disk full at {db}, ")
    assert "cannot rollback" not in s.warnings[0] and s.dropped > 0
    with Store.open(db, readonly=True) as r:
        row = r.get_run(rid)
        assert row["status"] == "completed" and row["last_step"] == 3000  # marked, though the metrics did not fit
        assert [e["kind"] for e in r.events(rid)] == ["checkpoint_saved"]


def test_training_goes_on_when_the_store_is_on_a_full_disk(tiny_dataset, small_fs, tmp_path) -> None:
    fs = small_fs("1m")
    from lmforge.track.store import Store

    Store.open(fs / "lmforge.db").close()
    fill(fs)
    proc = run_train(tiny_dataset, tmp_path / "run", "train.max_steps=3", "train.eval_every=0",
                     env={"LMFORGE_DB": str(fs / "lmforge.db")}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warned = [line for line in proc.stderr.splitlines() if "experiment store" in line]
    assert len(warned) == 1 and f"disk full at {fs / 'lmforge.db'}, 0 bytes free" in warned[0]
    assert "cannot rollback" not in proc.stderr and "Traceback" not in proc.stderr and "done: 3 steps" in proc.stderr


def test_export_to_a_full_disk_is_one_line(tiny_dataset, small_fs, tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_train(tiny_dataset, run_dir, "train.max_steps=1", "train.eval_every=0")
    fs = small_fs("256k")  # the weights alone are 560 kB
    for fmt in ("hf", "gguf"):
        out = fs / ("out" if fmt == "hf" else "m.gguf")
        proc = lmforge_in_process(["export", str(run_dir), "--format", fmt, "--out", str(out)])
        assert_user_error(proc, f"disk full at {out}, ", f"nothing was written to {out}")
        assert len(error_lines(proc.stderr)) == 1
        assert sorted(p.name for p in fs.iterdir()) == []  # no temporary left behind


@pytest.mark.parametrize("verb", ["ckpt average", "embed", "index build", "topics", "classify train"])
def test_the_other_writing_verbs_on_a_full_disk_are_one_line(verb: str, tiny_run, small_fs, tmp_path, capsys,
                                                            monkeypatch) -> None:
    """Each verb that writes an --out, given one on a full disk: exit 2 and one line "disk full at
    OUT, N bytes free; nothing was written", and no temporary left (before: a traceback from
    safetensors or a write in topics and ckpt average). In-process: the cheap way to run five verbs."""
    import json

    from lmforge.cli import main

    monkeypatch.setenv("LMFORGE_PROGRESS", "quiet")  # main() sets it; monkeypatch puts it back
    corpus = tmp_path / "labelled.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{w} speaks of the night, line {i}", "label": w}) + "\n"
                              for i in range(12) for w in ("ROMEO", "JULIET")), encoding="utf-8")
    fs = small_fs("1m")
    fill(fs)
    out = fs / ("v.npy" if verb == "embed" else "out")
    args = {"ckpt average": [str(tiny_run), "--last", "2"], "embed": [str(tiny_run), str(corpus)],
            "index build": [str(tiny_run), str(corpus)], "topics": [str(tiny_run), str(corpus), "--min-cluster-size", "3",
                                                                      "--reduce", "pca"],  # UMAP: 15 s of numba
            "classify train": [str(tiny_run), str(corpus)]}[verb]
    capsys.readouterr()
    code = main([*verb.split(), *args, "--out", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: disk full at {out}, "), (code, err)
    assert "nothing was written" in err[0], err
    assert sorted(p.name for p in fs.iterdir() if not p.name.endswith(".lock")) == ["filler"]


def test_index_add_on_a_full_disk_is_one_line_and_the_old_index_still_verifies(tiny_run, small_fs, tmp_path, capsys,
                                                                              monkeypatch) -> None:
    """`index add` replaces an existing index by a new version: on a full disk it says the index is
    unchanged (SQLite's "database or disk is full" is a disk-full line too), and it still verifies."""
    from lmforge.cli import main

    monkeypatch.setenv("LMFORGE_PROGRESS", "quiet")
    corpus = tmp_path / "docs"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Romeo speaks of the night and of the stars.\n" * 4, encoding="utf-8")
    fs = small_fs("2m")
    idx = fs / "idx"
    assert main(["index", "build", str(tiny_run), str(corpus), "--out", str(idx)]) == 0
    before = sorted((p.relative_to(idx), p.read_bytes()) for p in idx.rglob("*") if p.is_file())
    (corpus / "b.txt").write_text("Juliet answers from the balcony, line by line.\n" * 40, encoding="utf-8")
    fill(fs)
    capsys.readouterr()
    code = main(["index", "add", str(idx), str(corpus)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: disk full at {idx}, "), (code, err)
    assert err[0].endswith(f"; {idx} is unchanged. Free space and run it again"), err
    assert sorted((p.relative_to(idx), p.read_bytes()) for p in idx.rglob("*") if p.is_file()) == before
    (fs / "filler").unlink()
    capsys.readouterr()
    assert main(["index", "verify", str(idx)]) == 0, capsys.readouterr().err
