"""A command's result prints on stdout in every progress mode; `--progress json|quiet` silence only
progress and log lines (stderr). Each verb runs through the CLI's `main` with stdout and stderr
captured apart (conftest.lmforge_in_process: what a script or CI job reading the two streams sees,
without a Python start per call); auto mode, which asks whether stderr is a terminal, runs the
real CLI in a subprocess with its stderr in a pipe."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import TINY_CONFIG, lmforge_cmd, lmforge_in_process, subprocess_env

MODES = ("quiet", "json")
RUN_NAME = "results-probe"
STEPS = 10
TABLE_CHARS = set("┏┃┡│┌└━─")  # rich table borders: a table never belongs on stderr in json mode


def cli(mode: str, *args: str) -> subprocess.CompletedProcess:
    if mode == "auto":  # a real process: its stderr is a pipe, not a terminal
        return subprocess.run(lmforge_cmd("--progress", mode, *map(str, args)), capture_output=True, text=True,
                              env=subprocess_env(COLUMNS="160"), timeout=120)
    return lmforge_in_process(["--progress", mode, *map(str, args)], env={"COLUMNS": "160"})


def check_stderr(mode: str, proc: subprocess.CompletedProcess) -> None:
    """quiet: nothing on success. json: JSON progress objects or warnings, never a table or a result."""
    if mode == "quiet":
        assert proc.stderr == "", proc.stderr
        return
    assert not TABLE_CHARS & set(proc.stderr), proc.stderr
    for line in proc.stderr.splitlines():
        if not line.strip() or "warning" in line.lower():
            continue
        record = json.loads(line)  # anything else must be a progress line
        assert isinstance(record, dict) and "progress" in record, line


@pytest.fixture(scope="module")
def run(tiny_dataset: Path, tmp_path_factory) -> Path:
    """A 10-step tiny run (two checkpoints), recorded in the test store."""
    run_dir = tmp_path_factory.mktemp("results") / RUN_NAME
    proc = cli("quiet", "train", TINY_CONFIG, "--run-dir", run_dir, "--set", f"data.path={tiny_dataset}",
               "--set", f"train.max_steps={STEPS}", "--set", "train.ckpt_every_steps=5",
               "--set", "train.eval_every=0", "--set", "train.warmup_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "" and proc.stderr == ""  # train prints only logs, which quiet silences
    return run_dir


@pytest.mark.parametrize("mode", MODES)
def test_data_results_print_on_stdout(mode: str, tiny_dataset: Path) -> None:
    info = cli(mode, "data", "info", tiny_dataset)
    assert info.returncode == 0, info.stderr
    assert "vocab_size" in info.stdout and "512" in info.stdout and str(tiny_dataset) in info.stdout
    check_stderr(mode, info)

    verify = cli(mode, "data", "verify", tiny_dataset)
    assert verify.returncode == 0, verify.stderr
    assert "ok" in verify.stdout and "match the manifest" in verify.stdout
    check_stderr(mode, verify)

    inspect = cli(mode, "data", "inspect", tiny_dataset, "--step", 1, "--seq-len", 16, "--global-batch", 2)
    assert inspect.returncode == 0, inspect.stderr
    assert "source @ byte offset" in inspect.stdout and "corpus.txt" in inspect.stdout
    check_stderr(mode, inspect)

    as_json = cli(mode, "data", "info", tiny_dataset, "--json")  # --json: stdout is exactly the JSON, as before
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["vocab_size"] == 512
    check_stderr(mode, as_json)


@pytest.mark.parametrize("mode", MODES)
def test_model_results_print_on_stdout(mode: str, run: Path) -> None:
    ev = cli(mode, "eval", run, "--max-batches", 2, "--threads", 1)
    assert ev.returncode == 0, ev.stderr
    assert f"(step {STEPS})" in ev.stdout
    assert "loss" in ev.stdout and "perplexity" in ev.stdout and "bits_per_byte" in ev.stdout
    check_stderr(mode, ev)

    ck = cli(mode, "ckpt", "verify", run)
    assert ck.returncode == 0, ck.stderr
    assert "step-000005" in ck.stdout and "step-000010" in ck.stdout and "2 ok, 0 damaged" in ck.stdout
    check_stderr(mode, ck)

    sample = cli(mode, "sample", run, "--prompt", "ROMEO:", "--max-tokens", 8, "--temperature", 0)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith(f"# {run} (step {STEPS})\nROMEO:")
    check_stderr(mode, sample)


def test_damaged_checkpoint_verdict_prints_in_quiet_mode(run: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "step-000005" / "MANIFEST.json").unlink()
    bad = cli("quiet", "ckpt", "verify", copy)
    assert bad.returncode == 1 and bad.stderr == ""
    assert "incomplete" in bad.stdout and "1 ok, 1 damaged" in bad.stdout


@pytest.mark.parametrize("mode", MODES)
def test_runs_and_plan_results_print_on_stdout(mode: str, run: Path) -> None:
    listing = cli(mode, "runs", "list")
    assert listing.returncode == 0, listing.stderr
    assert RUN_NAME in listing.stdout and "completed" in listing.stdout
    check_stderr(mode, listing)

    show = cli(mode, "runs", "show", run)
    assert show.returncode == 0, show.stderr
    assert RUN_NAME in show.stdout
    check_stderr(mode, show)

    plan = cli(mode, "plan", "--quality-of", "13B", "--inference-tokens", "2e12", "--law", "sardana", "--objective", "flops")
    assert plan.returncode == 0, plan.stderr
    assert "Recommended: 6.97B parameters" in " ".join(plan.stdout.split())
    check_stderr(mode, plan)


def test_export_summary_prints_in_json_mode(run: Path, tmp_path: Path) -> None:
    exp = cli("json", "export", run, "--format", "hf", "--out", tmp_path / "hf")
    assert exp.returncode == 0, exp.stderr
    assert f"exported {run} -> {tmp_path / 'hf'}" in " ".join(exp.stdout.split())
    check_stderr("json", exp)


def test_errors_still_go_to_stderr(tmp_path: Path) -> None:
    for mode in MODES:
        proc = cli(mode, "data", "info", tmp_path / "nope")
        assert proc.returncode == 2 and proc.stdout == "" and "error:" in proc.stderr


# ---- auto mode with stderr in a file or pipe (docs/tracking.md): log lines, never bars ---------------------

BAR_CHARS = set("━╸╺")  # rich progress bar glyphs


def check_plain_stderr(proc: subprocess.CompletedProcess) -> None:
    """No bar, no terminal control sequence, no empty line: what a log file should hold."""
    assert not BAR_CHARS & set(proc.stderr), proc.stderr
    assert "\x1b" not in proc.stderr and "\r" not in proc.stderr, repr(proc.stderr)
    assert all(line.strip() for line in proc.stderr.splitlines()), repr(proc.stderr)


def test_auto_mode_writes_plain_lines_when_stderr_is_not_a_terminal(run: Path, tmp_path: Path) -> None:
    from conftest import shakespeare_path

    corpus = tmp_path / "c.txt"
    corpus.write_bytes(shakespeare_path().read_bytes()[:50_000])
    prep = cli("auto", "prepare", corpus, "--out", tmp_path / "d", "--vocab-size", 300)
    assert prep.returncode == 0, prep.stderr
    check_plain_stderr(prep)
    assert "train tokenizer" not in prep.stderr and f"prepared {tmp_path / 'd'}" in " ".join(prep.stderr.split())

    train = cli("auto", "train", TINY_CONFIG, "--run-dir", tmp_path / "r", "--set", f"data.path={tmp_path / 'd'}",
                "--set", "train.max_steps=5", "--set", "train.eval_every=0")
    assert train.returncode == 0, train.stderr
    check_plain_stderr(train)
    assert "step 5: loss" in train.stderr  # the plain log line stands in for the bar

    ev = cli("auto", "eval", run, "--max-batches", 2, "--threads", 1)
    assert ev.returncode == 0, ev.stderr
    assert ev.stderr == ""  # was a lone blank line: the transient bar's last frame
    assert "perplexity" in ev.stdout


def test_auto_mode_import_leaves_stderr_empty_when_it_is_not_a_terminal(run: Path, tmp_path: Path) -> None:
    from lmforge import convert
    from lmforge.artifacts import read_bundle

    gguf = convert.write_gguf(read_bundle(run), tmp_path / "tiny.gguf")  # the run, as a GGUF to import
    imp = cli("auto", "import", gguf, "--out", tmp_path / "tiny")
    assert imp.returncode == 0, imp.stderr
    assert imp.stderr == "", repr(imp.stderr)
    assert "imported" in imp.stdout
