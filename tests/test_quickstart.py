"""The quickstart end to end through the CLI on a small source tree (the first run is the installed
package's, see conftest.installed_quickstart), and its reuse on a second run."""

from __future__ import annotations

import sysconfig

import pytest
from conftest import lmforge_in_process

from lmforge.quickstart import source_name


def test_quickstart_runs_and_reuses(installed_quickstart, tmp_path):
    # the first run: the installed package's, from outside the checkout (conftest.installed_quickstart)
    work, src, first = installed_quickstart.work, installed_quickstart.src, installed_quickstart.proc
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout  # the report (results) goes to stdout; stages and training logs to stderr
    assert "validation loss before training" in out and "validation loss after" in out
    assert "sample 3" in out and "lmforge sample" in out
    # it closes with a search over a few of the files, indexed with the model it trained
    assert "files for:" in out and "1. " in out and ".py:" in out and "lmforge search" in out
    assert (work / "idx" / source_name(str(src)) / "MANIFEST.json").is_file()
    before = float(out.split("validation loss before training: ")[1].split()[0])
    after = float(out.split("validation loss after ")[1].split(": ")[1].split()[0])
    assert after < before  # it learned something
    # a custom source gets its own dataset and run, named after it (never the stdlib's)
    name = source_name(str(src))
    assert name.startswith("src-") and name != "stdlib"
    assert (work / "runs" / name / "checkpoints" / "latest").is_file()
    assert (work / "data" / name / "manifest.json").is_file()
    assert not (work / "runs" / "stdlib").exists() and not (work / "data" / "stdlib").exists()

    # the same source again (this checkout's lmforge, in this process), with a larger budget: everything is reused, and it
    # says --minutes does not apply
    second = lmforge_in_process(["quickstart", "--workdir", str(work), "--minutes", "0.1", "--source", str(src)])
    assert second.returncode == 0, second.stderr[-3000:]
    err = " ".join(second.stderr.split())  # rich may wrap long lines
    assert f"reusing the verified dataset in {work / 'data' / name}" in err
    assert "planned for 0.05 min" in err
    assert "--minutes 0.1 does not resize it" in err and f"delete {work / 'runs' / name}" in err
    assert "is already complete" in err

    # another source in the same workdir never reuses this one's dataset or run: here it does not exist,
    # so it fails at the prepare step (exit 2, one line) instead of silently reporting the old run
    third = lmforge_in_process(["quickstart", "--workdir", str(work), "--minutes", "0.05", "--source", str(tmp_path / "nope")])
    assert third.returncode == 2, third.stderr[-3000:]
    assert "reusing" not in third.stderr and "input not found" in third.stderr


def test_source_name_is_unique_per_resolved_path(tmp_path):
    assert source_name(None) == "stdlib"
    a, b = tmp_path / "a" / "my code", tmp_path / "b" / "my code"
    assert source_name(str(a)) != source_name(str(b))
    assert source_name(str(a)).startswith("my-code-")
    assert source_name(str(a)) == source_name(str(tmp_path / "a" / "." / "my code"))  # same directory, same name
    # an explicit --source of the stdlib directory is not the default corpus (no exclusions): its own name
    assert source_name(sysconfig.get_paths()["stdlib"]) != "stdlib"


def test_help_shows_defaults(capsys):
    from lmforge.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["quickstart", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: lmforge-quickstart)" in text and "(default: 3)" in text
