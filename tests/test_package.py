"""lmforge installs like a package: the wheel built from this checkout, installed into a fresh virtual
environment (conftest.installed), works from a directory outside the checkout, with the recipes and
tasks it bundles and its documented defaults.

Cost: the wheel and the venv take a few seconds (offline: no build isolation, no dependencies
installed; the venv sees this environment's packages). The quickstart run is shared with
tests/test_quickstart.py (conftest.installed_quickstart), so it is paid for once per session.
"""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

from conftest import REPO, Installed, QuickstartRun


def run(installed: Installed, args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=installed.env, cwd=cwd, timeout=timeout)


def test_wheel_carries_the_package_data(installed: Installed) -> None:
    (wheel,) = (installed.venv.parent / "dist").glob("lmforge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for p in sorted((REPO / "lmforge" / "configs").glob("*.yaml")) + sorted((REPO / "lmforge" / "tasks").glob("*.jsonl")) + \
            sorted((REPO / "lmforge" / "datasets").glob("*.jsonl")):
        assert f"lmforge/{p.parent.name}/{p.name}" in names
    assert {"lmforge/py.typed", "lmforge/track/static/dashboard.js", "lmforge/cli.py",
            "lmforge/understand/static/topics_report.html", "lmforge/understand/static/topics_report.js"} <= names
    assert not any(n.startswith(("tests/", "configs/", "tasks/", "docs/")) for n in names)


def test_installed_package_runs_outside_the_checkout(installed: Installed, installed_quickstart: QuickstartRun,
                                                     tmp_path: Path) -> None:
    # the venv imports its own copy: not the checkout, not an editable install of it
    probe = run(installed, installed.python("-c", "import lmforge, lmforge.bundled as b; "
                                            "print(lmforge.__file__); print(b.bundled_dir('config'))"), tmp_path)
    assert probe.returncode == 0, probe.stderr
    module, configs = (Path(line) for line in probe.stdout.split())
    assert module.is_relative_to(installed.venv) and configs.is_relative_to(installed.venv), probe.stdout
    assert not module.is_relative_to(REPO)

    help_ = run(installed, installed.cmd("--help"), tmp_path)
    assert help_.returncode == 0 and "quickstart" in help_.stdout, help_.stderr

    # quickstart (its bundled small-cpu recipe) ran to its report, and names the recipe as one to reuse
    qs = installed_quickstart.proc
    assert qs.returncode == 0, qs.stderr[-3000:]
    assert "validation loss after" in qs.stdout and "lmforge train small-cpu --set data.path=" in qs.stdout

    # eval of that run with a bundled task, by name, from a directory that has no tasks/
    run_dir = next((installed_quickstart.work / "runs").iterdir())
    ev = run(installed, installed.cmd("eval", str(run_dir), "--json", "--tasks", "python-mc", "--max-batches", "2"), tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    metrics = json.loads(ev.stdout)["metrics"]
    assert 0 <= metrics["python-mc/acc"] <= 1 and metrics["loss"] > 0

    # a name that is neither a path nor bundled: one line that lists the bundled recipes, exit 2
    bad = run(installed, installed.cmd("train", "smal-cpu", "--run-dir", str(tmp_path / "r")), tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: config file not found: smal-cpu"), bad.stderr
    assert "small-cpu" in bad.stderr and "tiny-cpu" in bad.stderr and "Traceback" not in bad.stderr
