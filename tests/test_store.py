"""The experiment store: round trips, resume, crash status, locking, concurrency, schema, CLI."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.errors import LmforgeError
from lmforge.track import store as store_mod
from lmforge.track.store import Store, config_diff, migrate

REPO = Path(__file__).resolve().parents[1]
CFG = {"model": {"n_layer": 2, "d_model": 64}, "train": {"lr": 3e-4, "max_steps": 100}}


def run_cli(*args: str, db: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args, "--db", str(db)], cwd=REPO,
                          capture_output=True, text=True, input=stdin, timeout=60)


def fill(db: Path, tmp: Path) -> dict[str, int]:
    """Two finished runs with known values, the second with a different lr and a spike."""
    ids = {}
    with Store.open(db) as s:
        for name, lr, status in (("exp1", 3e-4, "completed"), ("exp2", 1e-3, "interrupted")):
            cfg = {**CFG, "train": {**CFG["train"], "lr": lr}}
            rid = s.start_run(name, str(tmp / "runs" / name), cfg)
            for step in range(0, 50, 10):
                s.log_metrics(rid, step, {"loss": 4.0 - step / 100, "lr": lr, "tokens": step * 512})
            s.log_event(rid, "checkpoint_saved", 40, {"path": f"runs/{name}/checkpoints/step-000040"})
            if name == "exp2":
                s.log_event(rid, "spike", 30, {"loss": 9.5, "z": 12.0})
            s.finish_run(rid, status, 40)
            ids[name] = rid
    return ids


# ---- round trips -------------------------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    db = tmp_path / "lmforge.db"
    ids = fill(db, tmp_path)
    with Store.open(db, readonly=True) as s:
        runs = {r["name"]: r for r in s.list_runs()}
        assert [r["name"] for r in s.list_runs()] == ["exp2", "exp1"]  # newest first
        assert runs["exp1"]["status"] == "completed" and runs["exp2"]["status"] == "interrupted"
        assert runs["exp1"]["last_step"] == 40
        assert runs["exp1"]["loss"] == pytest.approx(3.6) and runs["exp1"]["tokens"] == 40 * 512
        run = s.get_run(ids["exp2"])
        assert run["config"]["train"]["lr"] == 1e-3
        assert run["summary"]["loss"] == {"last": pytest.approx(3.6), "step": 40, "min": pytest.approx(3.6),
                                          "max": pytest.approx(4.0), "count": 5}
        assert [(e["step"], e["kind"]) for e in run["events"]] == [(30, "spike"), (40, "checkpoint_saved")]
        assert run["events"][0]["data"] == {"loss": 9.5, "z": 12.0}
        # recorded as saved; its run directory does not exist here, so readers show it as missing
        assert [(c["step"], c["stored_status"], c["status"], c["on_disk"]) for c in run["checkpoints"]] == \
            [(40, "saved", "missing", False)]
        assert s.metrics(ids["exp1"], ["loss"])["loss"]["step"] == [0, 10, 20, 30, 40]
        assert run["versions"]["lmforge"] and run["host"] == socket.gethostname()


def test_nan_and_inf_read_back_and_a_replayed_step_keeps_the_newest_value(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db") as s:
        rid = s.start_run("r", str(tmp_path / "r"), CFG)
        s.log_metrics(rid, 1, {"loss": 3.0})
        s.log_metrics(rid, 2, {"loss": float("nan")})
        s.log_metrics(rid, 3, {"loss": float("inf")})
        s.log_metrics(rid, 4, {"loss": float("nan")})  # stored as NULL (SQLite has no NaN), read back as NaN
        s.log_event(rid, "rollback", 3, {"to_step": 1})
        s.log_metrics(rid, 2, {"loss": 2.5})  # the rollback replays step 2
        s.flush()
        curve = s.metrics(rid, ["loss"])["loss"]
        assert curve["step"] == [1, 2, 3, 4] and curve["value"][:3] == [3.0, 2.5, math.inf]
        assert math.isnan(curve["value"][3]) and math.isnan(s.list_runs()[0]["loss"])
        summary = s.summary(rid)["loss"]
        assert math.isnan(summary["last"]) and (summary["min"], summary["max"]) == (2.5, math.inf)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.floats(-1e6, 1e6)), min_size=1, max_size=40))
def test_metrics_property_last_write_per_step_wins(tmp_path_factory, writes) -> None:
    with Store.open(tmp_path_factory.mktemp("p") / "s.db") as s:
        rid = s.start_run("p", "p-run", {})
        for step, value in writes:
            s.log_metrics(rid, step, {"x": value})
        s.flush()
        expected = dict(writes)  # later writes of a step overwrite earlier ones
        got = s.metrics(rid, ["x"])["x"]
        assert got["step"] == sorted(expected)
        assert got["value"] == [expected[k] for k in sorted(expected)]
        assert s.list_runs()[0]["last_step"] == max(expected)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 300), st.integers(0, 40))
def test_thinned_curves_keep_first_last_and_at_most_max_points(tmp_path_factory, n: int, max_points: int) -> None:
    with Store.open(tmp_path_factory.mktemp("t") / "s.db") as s:
        rid = s.start_run("t", "t-run", {})
        for step in range(n):
            s.log_metrics(rid, 3 * step, {"x": float(step)})  # steps need not be consecutive
        s.flush()
        got = s.metrics(rid, ["x"], max_points=max_points)["x"]
    if max_points == 0 or n <= max_points:
        assert got["step"] == [3 * i for i in range(n)]
    elif max_points == 1:
        assert got["step"] == [3 * (n - 1)]  # one point: the newest
    else:
        assert got["step"][0] == 0 and got["step"][-1] == 3 * (n - 1)
        assert len(got["step"]) <= max_points and got["step"] == sorted(set(got["step"]))  # an upper bound
        assert got["value"] == [s / 3 for s in got["step"]]  # values stay paired with their steps


def test_thinning_reaches_max_points_exactly_on_an_even_curve(tmp_path: Path) -> None:
    with Store.open(tmp_path / "s.db") as s:
        rid = s.start_run("t", "t-run", {})
        for step in range(0, 200, 10):
            s.log_metrics(rid, step, {"x": float(step)})
        s.flush()
        assert s.metrics(rid, ["x"], max_points=3)["x"]["step"] == [0, 100, 190]
        assert s.metrics(rid, ["x"], max_points=5)["x"]["step"] == [0, 50, 100, 150, 190]
        with pytest.raises(ValueError, match="max_points must be >= 0"):
            s.metrics(rid, ["x"], max_points=-1)


def test_config_diff_table() -> None:
    a = {"train": {"lr": 1, "steps": 5}, "model": {"d": 64}}
    b = {"train": {"lr": 2, "steps": 5}, "data": {"path": "x"}}
    assert config_diff(a, b) == {"data.path": (None, "x"), "model.d": (64, None), "train.lr": (1, 2)}


# ---- resume / restart --------------------------------------------------------------------------


def test_resume_reuses_the_row_and_records_resume_and_config_change(tmp_path: Path) -> None:
    db, run_dir = tmp_path / "s.db", str(tmp_path / "runs" / "a")
    with Store.open(db) as s:
        rid = s.start_run("a", run_dir, CFG)
        s.log_metrics(rid, 7, {"loss": 2.0})
        s.finish_run(rid, "interrupted", 7)
    new_cfg = {**CFG, "train": {**CFG["train"], "lr": 1e-4}}
    with Store.open(db) as s:
        assert s.start_run("a", run_dir, new_cfg, resumed=True) == rid
        s.log_metrics(rid, 8, {"loss": 1.9})
        s.flush()
        run = s.get_run(rid)
        assert len(s.list_runs()) == 1 and run["status"] == "running" and run["resumes"] == 1
        assert [(e["kind"], e["step"]) for e in run["events"]] == [("resume", 7), ("config_change", 7)]
        assert run["events"][0]["data"] == {"previous_status": "interrupted"}
        assert run["events"][1]["data"]["changed"] == {"train.lr": [3e-4, 1e-4]}
        assert run["config"]["train"]["lr"] == 1e-4
        assert s.metrics(rid, ["loss"])["loss"]["step"] == [7, 8]
        # Started over in the same directory: the old history no longer describes it.
        assert s.start_run("a", run_dir, CFG, resumed=False) == rid
        run = s.get_run(rid)
        assert run["events"] == [] and s.metric_keys(rid) == [] and run["last_step"] == 0


# ---- crash status ------------------------------------------------------------------------------

KILLED_TRAINER = textwrap.dedent("""
    import os, signal, sys
    from lmforge.track.store import Store
    s = Store.open(sys.argv[1])
    rid = s.start_run("killed", sys.argv[2], {"train": {"lr": 0.1}})
    for step in range(1, 13):
        s.log_metrics(rid, step, {"loss": 1.0 / step})
        s.heartbeat(rid, step)
    s.flush()
    os.kill(os.getpid(), signal.SIGKILL)   # no finish_run, no close
""")


def test_sigkilled_run_shows_as_crashed_with_its_last_step(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    p = subprocess.run([sys.executable, "-c", KILLED_TRAINER, str(db), str(tmp_path / "k")], timeout=60)
    assert p.returncode == -signal.SIGKILL
    with Store.open(db, readonly=True) as s:
        (run,) = s.list_runs()
        assert run["stored_status"] == "running"  # nobody wrote an end...
        assert run["status"] == "crashed" and run["last_step"] == 12  # ...readers still know
    out = run_cli("runs", "--json", db=db)
    assert out.returncode == 0, out.stderr
    assert [(r["name"], r["status"], r["last_step"]) for r in json.loads(out.stdout)] == [("killed", "crashed", 12)]


def test_a_sidecar_writing_into_a_dead_run_does_not_revive_it(tmp_path: Path, monkeypatch) -> None:
    db, run_dir = tmp_path / "s.db", str(tmp_path / "k")
    subprocess.run([sys.executable, "-c", KILLED_TRAINER, str(db), run_dir], timeout=60)
    monkeypatch.setattr(store_mod, "HEARTBEAT_S", 0.0)  # the writer refreshes its own runs every tick
    with Store.open(db) as sidecar:
        rid = sidecar.run_id(run_dir)
        before = sidecar.get_run(rid)
        sidecar.log_metrics(rid, 12, {"eval/loss": 0.5})
        sidecar.log_event(rid, "eval", 12, {"loss": 0.5})
        sidecar.flush()
        sidecar.flush()
        after = sidecar.get_run(rid)
    assert after["heartbeat_at"] == before["heartbeat_at"] and after["status"] == "crashed"
    assert after["summary"]["eval/loss"]["last"] == 0.5 and after["last_step"] == 12


@pytest.mark.parametrize("host_is_ours, pid_alive, age_s, shown", [
    (True, True, 1.0, "running"),
    (True, False, 1.0, "crashed"),            # our host, pid gone: killed
    (False, False, 1.0, "running"),           # other host: cannot see its pids; heartbeat fresh
    (False, False, 10_000.0, "crashed"),      # other host, heartbeat stale
    (True, True, 10_000.0, "crashed"),        # alive pid but no heartbeat for ages: hung or reused pid
])
def test_derived_status_table(host_is_ours: bool, pid_alive: bool, age_s: float, shown: str) -> None:
    now = time.time()
    pid = os.getpid() if pid_alive else _dead_pid()
    row = {"status": "running", "host": socket.gethostname() if host_is_ours else "elsewhere", "pid": pid,
           "heartbeat_at": now - age_s, "finished_at": None, "segment_at": now - age_s - 5, "active_s": 0.0}
    assert Store._derive(row, now)["status"] == shown


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---- a locked or failing database never stops training -----------------------------------------


def test_locked_database_does_not_raise_and_catches_up(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(store_mod, "BUSY_TIMEOUT_MS", 20)
    monkeypatch.setattr(store_mod, "FLUSH_S", 0.05)
    db = tmp_path / "s.db"
    s = Store.open(db)
    rid = s.start_run("r", str(tmp_path / "r"), {})
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # another process holding the write lock
    for step in range(100):
        s.log_metrics(rid, step, {"loss": 1.0})  # must neither raise nor wait for the lock
        s.heartbeat(rid, step)
    s.flush(timeout=5)
    assert s.failures >= 1 and "write failed" in s.warnings[0]
    # start_run itself cannot queue: it gives up with id 0 and every later call is a no-op.
    assert s.start_run("other", str(tmp_path / "other"), {}) == 0
    s.log_metrics(0, 1, {"loss": 1.0})
    blocker.execute("ROLLBACK")
    blocker.close()
    s.flush(timeout=10)
    assert len(s.metrics(rid, ["loss"])["loss"]["step"]) == 100
    assert [r["name"] for r in s.list_runs()] == ["r"]
    s.close()


# ---- concurrency: trainer + eval sidecar writing, a reader reading -----------------------------

WRITER = textwrap.dedent("""
    import sys
    from lmforge.track.store import Store
    db, role, run_dir, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    s = Store.open(db)
    if role == "trainer":
        rid = s.start_run("shared", run_dir, {"train": {"lr": 0.1}})
        for step in range(n):
            s.log_metrics(rid, step, {"loss": 1.0 + step, "lr": 0.1})
            s.heartbeat(rid, step)
        s.finish_run(rid, "completed", n - 1)
    else:  # eval sidecar: waits for the trainer's row, writes eval metrics and events into it
        import time
        while (rid := s.run_id(run_dir)) is None:
            time.sleep(0.01)
        for step in range(0, n, 10):
            s.log_metrics(rid, step, {"eval/loss": 2.0 + step})
            s.log_event(rid, "eval", step, {"loss": 2.0 + step})
    s.close()
""")

READER = textwrap.dedent("""
    import sys, time
    from lmforge.track.store import Store
    seen = 0
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            s = Store.open(sys.argv[1], readonly=True)
        except Exception:
            time.sleep(0.01); continue
        runs = s.list_runs()
        for r in runs:
            s.get_run(r["id"]); s.metrics(r["id"], max_points=100)
        s.close()
        seen += 1
        if runs and runs[0]["status"] == "completed" and seen > 3:
            break
    print(seen)
""")


def test_two_writer_processes_and_a_reader(tmp_path: Path) -> None:
    db, run_dir, n = tmp_path / "s.db", str(tmp_path / "runs" / "shared"), 400
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), role, run_dir, str(n)],
                              stderr=subprocess.PIPE, text=True) for role in ("trainer", "sidecar")]
    reader = subprocess.Popen([sys.executable, "-c", READER, str(db)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            assert "warning" not in err, err
        out, err = reader.communicate(timeout=120)
        assert reader.returncode == 0 and int(out) > 0, err
    finally:  # a failed writer must not leave the others waiting for it after the test
        for p in (*procs, reader):
            p.kill()
            p.wait()
    with Store.open(db, readonly=True) as s:
        (run,) = s.list_runs()
        m = s.metrics(run["id"])
        assert m["loss"]["step"] == list(range(n)) and m["loss"]["value"][-1] == float(n)
        assert m["eval/loss"]["step"] == list(range(0, n, 10))
        assert sum(e["kind"] == "eval" for e in s.events(run["id"])) == n // 10
        assert run["status"] == "completed" and run["last_step"] == n - 1


# ---- schema versions ---------------------------------------------------------------------------


def test_schema_version_and_newer_file_refused(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    Store.open(db).close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == store_mod.schema_version() == 1
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.execute(f"PRAGMA user_version = {store_mod.schema_version() + 1}")
    conn.commit()
    conn.close()
    for readonly in (False, True):
        with pytest.raises(LmforgeError, match="newer than this lmforge"):
            Store.open(db, readonly=readonly)


def test_migration_upgrades_an_old_file_and_keeps_its_data(tmp_path: Path, monkeypatch) -> None:
    db = tmp_path / "s.db"
    ids = fill(db, tmp_path)

    def v2(conn: sqlite3.Connection) -> None:  # a future migration: a new column with a default
        conn.execute("ALTER TABLE runs ADD COLUMN notes TEXT NOT NULL DEFAULT ''")

    monkeypatch.setattr(store_mod, "MIGRATIONS", [*store_mod.MIGRATIONS, v2])
    with Store.open(db, readonly=True) as s:  # a viewer upgrades the file too
        assert s._query("PRAGMA user_version")[0][0] == 2
        assert s.get_run(ids["exp1"])["notes"] == ""
        assert s.summary(ids["exp1"])["loss"]["count"] == 5
    conn = sqlite3.connect(db, isolation_level=None)
    assert migrate(conn) == 2  # already current: nothing to do
    conn.close()


def test_readonly_open_of_a_missing_store_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(LmforgeError, match="no experiment store at .*nope.db"):
        Store.open(tmp_path / "nope.db", readonly=True)


def test_resolve_by_id_name_dir_and_clear_errors(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    ids = fill(db, tmp_path)
    with Store.open(db) as s:
        assert s.resolve("exp1") == s.resolve(str(ids["exp1"])) == s.resolve(str(tmp_path / "runs" / "exp1"))
        with pytest.raises(LmforgeError, match="no run named 'exp3'.*known runs: exp2, exp1"):
            s.resolve("exp3")
        s.start_run("exp1", str(tmp_path / "elsewhere"), {})
        with pytest.raises(LmforgeError, match="several runs are named 'exp1'"):
            s.resolve("exp1")


# ---- CLI ---------------------------------------------------------------------------------------


def test_cli_list_show_compare(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    fill(db, tmp_path)
    with Store.open(db) as s:  # a name that would be rich markup if it were not escaped
        s.finish_run(s.start_run("[bold]odd[/bold]", str(tmp_path / "odd"), {}), "failed", 0)

    out = run_cli("runs", db=db)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["id", "name", "status", "step", "loss", "tokens", "elapsed", "started"]
    assert lines[1].split()[1:5] == ["[bold]odd[/bold]", "failed", "0", "-"]
    assert lines[2].split()[1:6] == ["exp2", "interrupted", "40", "3.6", "20.5K"]

    out = run_cli("runs", "show", "exp2", "--json", db=db)
    show = json.loads(out.stdout)
    assert show["name"] == "exp2" and [e["kind"] for e in show["events"]] == ["spike", "checkpoint_saved"]
    human = run_cli("runs", "show", "exp2", db=db).stdout
    assert "train.lr" in human and "spike" in human and "0.001" in human

    cmp = json.loads(run_cli("runs", "compare", "exp1", "exp2", "--json", db=db).stdout)
    assert cmp["config_diff"] == {"train.lr": [3e-4, 1e-3]}
    assert cmp["final_metrics"]["loss"] == [pytest.approx(3.6), pytest.approx(3.6)]
    human = run_cli("runs", "compare", "exp1", "exp2", db=db).stdout
    assert "train.lr" in human and "0.0003" in human

    bad = run_cli("runs", "show", "nope", db=db)
    assert bad.returncode == 2 and "no run named 'nope'" in bad.stderr
    assert run_cli("runs", "compare", "exp1", db=db).returncode == 2


def test_runs_show_lists_checkpoints_and_marks_those_retention_deleted(tiny_dataset: Path, tmp_path: Path) -> None:
    from test_train import run_train

    run_dir = tmp_path / "runs" / "kept2"  # checkpoints at 0, 10, 20, 30; keep_last 2 deletes 0 and 10
    run_train(tiny_dataset, run_dir, "train.max_steps=30", "train.keep_last=2", "train.ckpt_every_steps=10")
    db = Path(os.environ["LMFORGE_DB"])  # where the trainer recorded it (conftest's isolated store)
    on_disk = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert on_disk == ["step-000020", "step-000030"]

    show = run_cli("runs", "show", str(run_dir), "--json", db=db)
    assert show.returncode == 0, show.stderr
    ckpts = [(c["step"], c["status"], c["stored_status"], c["on_disk"]) for c in json.loads(show.stdout)["checkpoints"]]
    assert ckpts == [(0, "deleted", "saved", False), (10, "deleted", "saved", False),
                     (20, "saved", "saved", True), (30, "saved", "saved", True)]

    human = run_cli("runs", "show", str(run_dir), db=db)
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip() == "checkpoints")  # its own section, after events
    assert at > next(i for i, line in enumerate(lines) if line.strip().startswith("events"))
    rows = [line.split() for line in lines[at + 2:at + 6]]
    assert [(r[0], r[1]) for r in rows] == [("0", "deleted"), ("10", "deleted"), ("20", "saved"), ("30", "saved")]
    assert rows[3][-1].endswith("checkpoints/step-000030")


def test_cli_delete_asks_or_needs_yes(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    fill(db, tmp_path)
    refused = run_cli("runs", "delete", "exp1", db=db, stdin="y\n")  # stdin is not a terminal
    assert refused.returncode == 2 and "--yes" in refused.stderr
    done = run_cli("runs", "delete", "exp1", "--yes", db=db)
    assert done.returncode == 0 and "deleted exp1" in done.stdout
    with Store.open(db, readonly=True) as s:
        assert [r["name"] for r in s.list_runs()] == ["exp2"]
        assert s._query("SELECT COUNT(*) FROM metrics WHERE run_id NOT IN (SELECT id FROM runs)")[0][0] == 0


# ---- exporters (optional extras: skipped when the library is absent) ---------------------------


def test_export_to_mlflow_file_store(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("mlflow", reason="mlflow not installed (pip install 'lmforge[mlflow]')")
    from mlflow.tracking import MlflowClient

    db = tmp_path / "s.db"
    fill(db, tmp_path)
    out = subprocess.run([sys.executable, "-m", "lmforge", "runs", "export", "exp2", "--to", "mlflow",
                          "--uri", str(tmp_path / "mlruns"), "--db", str(db)],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores behind this
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("lmforge").experiment_id])
    assert run.info.run_name == "exp2" and run.info.status == "KILLED"  # interrupted
    assert run.data.params["train.lr"] == "0.001" and run.data.tags["lmforge.status"] == "interrupted"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [
        (s, pytest.approx(4.0 - s / 100)) for s in range(0, 50, 10)]
    events = json.loads((Path(run.info.artifact_uri.removeprefix("file://")) / "lmforge" / "events.json").read_text())
    assert [e["kind"] for e in events] == ["spike", "checkpoint_saved"]


def _wandb_records(path: Path):
    """Records of a W&B offline .wandb file (LevelDB log format: 32 KiB blocks of chunks)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    buf, block, pos, parts = path.read_bytes(), 32768, 7, b""  # 7: the ":W&B" file header
    while pos + 7 <= len(buf):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", buf[pos : pos + 7])
        data, pos = buf[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            pos += block - pos % block if pos % block else 0
            continue
        parts = data if kind in (1, 2) else parts + data
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            rec = pb.Record()
            rec.ParseFromString(parts)
            yield rec


def test_export_to_wandb_offline(tmp_path: Path) -> None:
    pytest.importorskip("wandb", reason="wandb not installed (pip install 'lmforge[wandb]')")
    db = tmp_path / "s.db"
    fill(db, tmp_path)
    out = subprocess.run([sys.executable, "-m", "lmforge", "runs", "export", "exp1", "--to", "wandb",
                          "--uri", str(tmp_path / "wb"), "--db", str(db)],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "WANDB_SILENT": "true"})
    assert out.returncode == 0, out.stderr
    (wfile,) = (tmp_path / "wb").glob("wandb/offline-run-*/run-*.wandb")
    assert "wandb sync" in " ".join(out.stdout.split())  # the line may wrap
    losses, name, exit_code = {}, None, None
    for rec in _wandb_records(wfile):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in rec.history.item}
            if "loss" in items:
                losses[int(items["_step"])] = float(items["loss"])
        elif kind == "run":
            name = rec.run.display_name
        elif kind == "exit":
            exit_code = rec.exit.exit_code
    assert name == "exp1" and exit_code == 0
    assert losses == {s: pytest.approx(4.0 - s / 100) for s in range(0, 50, 10)}


def test_export_without_the_library_is_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    fill(db, tmp_path)
    # Hide the library: a module set to None in sys.modules makes `import` raise ImportError.
    code = ("import sys; sys.modules['mlflow'] = None; sys.modules['mlflow.tracking'] = None; "
            "sys.modules['mlflow.entities'] = None; from lmforge.cli import main; "
            f"sys.exit(main(['runs', 'export', 'exp1', '--to', 'mlflow', '--uri', {str(tmp_path / 'm')!r}, "
            f"'--db', {str(db)!r}]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "pip install 'lmforge[mlflow]'" in out.stderr
