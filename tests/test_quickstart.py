"""The quickstart end to end through the CLI on a small source tree, and its reuse on a second run."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

from conftest import lmforge_cmd, subprocess_env


def test_quickstart_runs_and_reuses(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("argparse.py", "json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py", "csv.py"):
        shutil.copy(stdlib / name, src / Path(name).name)
    work = tmp_path / "qs"
    cmd = lmforge_cmd("quickstart", "--workdir", str(work), "--minutes", "0.05", "--source", str(src))
    first = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout  # the report (results) goes to stdout; stages and training logs to stderr
    assert "validation loss before training" in out and "validation loss after" in out
    assert "sample 3" in out and "lmforge sample" in out
    before = float(out.split("validation loss before training: ")[1].split()[0])
    after = float(out.split("validation loss after ")[1].split(": ")[1].split()[0])
    assert after < before  # it learned something
    assert (work / "runs" / "stdlib" / "checkpoints" / "latest").is_file()

    second = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reusing the verified dataset" in second.stderr
    assert "the run is already complete" in second.stderr
