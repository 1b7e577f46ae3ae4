"""Progress modes for non-interactive use: JSON lines that a machine can follow, and quiet. Through
the CLI's `main` in this process, stdout and stderr captured apart (conftest.lmforge_in_process)."""

from __future__ import annotations

import json

from conftest import TINY_CONFIG, lmforge_in_process, shakespeare_path


def test_json_progress_lines_for_prepare_and_train(tiny_dataset, tmp_path):
    proc = lmforge_in_process(["--progress", "json", "train", str(TINY_CONFIG), "--run-dir", str(tmp_path / "r"),
                               "--set", f"data.path={tiny_dataset}", "--set", "train.max_steps=10"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stderr.splitlines()]  # every line is JSON: no bars, no log text
    train = [r for r in lines if r["progress"] == "train"]
    assert train[-1]["completed"] == train[-1]["total"] == 10
    assert isinstance(train[-1]["loss_value"], float) and train[-1]["tokens_per_s"] > 0

    corpus = tmp_path / "c.txt"
    corpus.write_bytes(shakespeare_path().read_bytes()[:150_000])  # 3 documents: a val split to validate on
    proc = lmforge_in_process(["--progress", "json", "prepare", str(corpus), "--out", str(tmp_path / "d"), "--vocab-size", "300"])
    assert proc.returncode == 0, proc.stderr
    tasks = {json.loads(line)["progress"] for line in proc.stderr.splitlines()}
    assert {"train tokenizer", "tokenize"} <= tasks


def test_quiet_prints_nothing_but_errors(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(shakespeare_path().read_bytes()[:150_000])  # 3 documents: a val split to validate on
    cmd = ["--progress", "quiet", "prepare", str(corpus), "--out", str(tmp_path / "d"), "--vocab-size", "300"]
    ok = lmforge_in_process(cmd)
    assert ok.returncode == 0 and ok.stderr == "" and ok.stdout == ""
    again = lmforge_in_process(cmd)
    assert again.returncode == 2 and "output already exists" in again.stderr
