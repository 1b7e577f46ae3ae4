"""The dashboard: JSON endpoints in-process, and the real page in a headless Chromium."""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lmforge.track.dashboard import make_server, plotly_js
from lmforge.track.store import Store

REPO = Path(__file__).resolve().parents[1]
SCRIPT_NAME = "<script>alert(1)</script>"
# If this name were ever parsed as HTML, its handler would mark <body data-pwned="1">.
IMG_NAME = '<img src=x onerror="document.body.dataset.pwned=1">'
CHROMIUM = os.environ.get("LMFORGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def write_dataset(root: Path) -> Path:
    """A dataset's manifest with a hygiene record (the fields data.hygiene.report reads), a hostile
    input name and a hostile example text: the page must show them as text."""
    root.mkdir(parents=True)
    count = lambda d, b: {"documents": d, "bytes": b}  # noqa: E731
    manifest = {
        "format_version": 1, "fingerprint": "0123456789abcdef",
        "hygiene": {
            "settings": {"dedup": True, "near_dup_threshold": 0.8, "quality": True, "skip_rules": [], "pii": "redact"},
            "versions": {"datasketch": "2.0.0"},
            "rules": {"bullet_lines": {"what": "more than 90% of lines start with a bullet"}},
            "inputs": {"wiki": {"documents": 10, "bytes": 1000, "kept_documents": 7, "kept_bytes": 700},
                       IMG_NAME: {"documents": 5, "bytes": 500, "kept_documents": 5, "kept_bytes": 500}},
            "removed": {"near_dup": {"wiki": count(2, 200)}, "bullet_lines": {"wiki": count(1, 100)}},
            "redacted": {"email": {IMG_NAME: {"documents": 2, "items": 3}}},
            "cross_split": {"val_dropped_as_copy_of_train": 1, "train_dropped_as_copy_of_val": 0},
            "examples": {"near_dup": [{"input": "wiki", "source": "/c/wiki/a.md", "byte_offset": 0,
                                       "text": SCRIPT_NAME + " mail <EMAIL>"}]},
        },
        "mix": None,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture()
def db(tmp_path: Path) -> Path:
    """Three finished runs (two with hostile names) with curves and events, and one still running;
    the newest finished run's dataset has a hygiene report (its data.path is relative, resolved
    against the working directory of its start event)."""
    path = tmp_path / "lmforge.db"
    write_dataset(tmp_path / "work" / "data" / "corp")
    s = Store.open(path)
    for i, name in enumerate(["exp1", SCRIPT_NAME, IMG_NAME]):
        config = {"train": {"lr": 1e-3 * (i + 1)}} | ({"data": {"path": "data/corp"}} if name == IMG_NAME else {})
        rid = s.start_run(name, str(tmp_path / "runs" / f"r{i}"), config)
        if name == IMG_NAME:
            s.log_event(rid, "start", 0, {"world": 1, "cwd": str(tmp_path / "work")})
        for step in range(0, 200, 10):
            s.log_metrics(rid, step, {"loss": 5 * math.exp(-step / 100) + i, "lr": 1e-3 * (i + 1),
                                      "grad_norm": 1.0 / (1 + step), "tokens_per_s": 1e4, "tokens": step * 1024})
        s.log_event(rid, "checkpoint_saved", 100, {"path": "checkpoints/step-000100"})
        s.log_event(rid, "spike", 150, {"loss": 9.0})
        s.log_event(rid, "eval", 100, {"loss": 3.1})
        s.log_metrics(rid, 100, {"eval/loss": 3.1})
        s.finish_run(rid, "completed", 190)
    live = s.start_run("live", str(tmp_path / "runs" / "live"), {"train": {"lr": 5e-4}})  # this pid: alive
    s.log_metrics(live, 0, {"loss": 6.0})
    s.log_metrics(live, 10, {"loss": float("nan"), "grad_norm": float("inf")})  # diverging: JSON says "nan", "inf"
    s.flush()
    s.close()
    return path


@pytest.fixture()
def server(db: Path):
    srv = make_server(str(db), "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    srv.store.close()


def get(srv, path: str, method: str = "GET", host: str | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=30)
    conn.putrequest(method, path, skip_host=host is not None)
    if host is not None:
        conn.putheader("Host", host)
    conn.endheaders()
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), body


# ---- endpoints (in-process) --------------------------------------------------------------------


def test_a_mixed_run_reports_each_of_its_datasets_with_its_weight(tmp_path: Path) -> None:
    """A data.mix run: one report per dataset, in the config's order, each with its weight; a
    relative path resolves against the run's start directory, and one that cannot be read says why
    without hiding the others."""
    from lmforge.track.dashboard import data_report

    write_dataset(tmp_path / "work" / "data" / "corp")
    s = Store.open(tmp_path / "lmforge.db")
    rid = s.start_run("mixed", str(tmp_path / "runs" / "m"), {"data": {"path": "", "mix": {"data/corp": 0.75,
                                                                                             "data/gone": 0.25}}})
    s.log_event(rid, "start", 0, {"world": 1, "cwd": str(tmp_path / "work")})
    s.flush()
    rep = data_report(s, rid)
    s.close()
    assert [(d["path"], d["weight"]) for d in rep["mix"]] == [(str(tmp_path / "work/data/corp"), 0.75),
                                                              (str(tmp_path / "work/data/gone"), 0.25)]
    assert rep["mix"][0]["report"]["hygiene"]["total"]["kept_documents"] == 12
    assert "report" not in rep["mix"][1] and "data/gone" in rep["mix"][1]["error"]


def test_api_runs_detail_and_metrics(server) -> None:
    status, headers, body = get(server, "/api/runs")
    assert status == 200 and headers["Content-Type"] == "application/json"
    runs = json.loads(body)["runs"]
    assert [r["name"] for r in runs] == ["live", IMG_NAME, SCRIPT_NAME, "exp1"]
    assert [r["status"] for r in runs] == ["running", "completed", "completed", "completed"]
    exp1 = runs[-1]["id"]
    detail = json.loads(get(server, f"/api/runs/{exp1}")[2])
    assert detail["config"] == {"train": {"lr": 1e-3}}
    assert json.loads(get(server, f"/api/runs/{exp1}/data")[2]) == {"path": None, "error": "the run's config names no data.path"}
    data = json.loads(get(server, f"/api/runs/{runs[1]['id']}/data")[2])
    assert data["path"].endswith("work/data/corp")  # resolved against the start event's cwd
    h = data["report"]["hygiene"]
    assert [r["rule"] for r in h["removed"]] == ["near_dup", "bullet_lines"] and h["total"]["kept_documents"] == 12
    assert h["removed"][0]["stage"] == "dedup" and h["redacted"][0]["items"] == 3
    assert [e["kind"] for e in detail["events"]] == ["checkpoint_saved", "eval", "spike"]  # exp1: no start event
    m = json.loads(get(server, f"/api/runs/{exp1}/metrics?keys=loss,lr&max_points=5")[2])
    assert sorted(m) == ["loss", "lr"]
    assert m["loss"]["step"] == [0, 50, 100, 150, 190]  # thinned to at most 5 points, first and last kept
    assert m["loss"]["value"][0] == 5.0
    # Non-finite values follow lmforge/jsonl.py's rule in every answer: strings, never bare NaN or null.
    live = runs[0]["id"]
    assert runs[0]["loss"] == "nan" and "NaN" not in body.decode()
    curves = json.loads(get(server, f"/api/runs/{live}/metrics?keys=loss,grad_norm")[2])
    assert curves == {"loss": {"step": [0, 10], "value": [6.0, "nan"]}, "grad_norm": {"step": [10], "value": ["inf"]}}
    summary = json.loads(get(server, f"/api/runs/{live}")[2])["summary"]
    assert summary["loss"]["last"] == "nan" and summary["grad_norm"]["max"] == "inf"


@pytest.mark.parametrize("max_points", [1, 2, 3, 4, 7, 19, 20, 21])
def test_max_points_is_an_upper_bound(server, max_points: int) -> None:
    exp1 = json.loads(get(server, "/api/runs")[2])["runs"][-1]["id"]  # 20 points per curve
    status, _, body = get(server, f"/api/runs/{exp1}/metrics?keys=loss,lr&max_points={max_points}")
    assert status == 200, body
    for curve in json.loads(body).values():
        assert 1 <= len(curve["step"]) <= max_points and curve["step"][-1] == 190


@pytest.mark.parametrize("value", ["zz", "-1", "2.5", "1e3"])
def test_bad_max_points_is_a_400_naming_the_parameter(server, value: str) -> None:
    exp1 = json.loads(get(server, "/api/runs")[2])["runs"][-1]["id"]
    status, _, body = get(server, f"/api/runs/{exp1}/metrics?keys=loss&max_points={value}")
    assert status == 400
    error = json.loads(body)["error"]
    assert "max_points must be a whole number >= 0" in error and repr(value) in error and "int()" not in error


@pytest.mark.parametrize("path, method, host, code", [
    ("/api/runs/999", "GET", None, 404),
    ("/api/runs/999/metrics", "GET", None, 404),
    ("/nope", "GET", None, 404),
    ("/api/runs", "POST", None, 501),              # read-only: no write verbs at all
    ("/api/runs", "DELETE", None, 501),
    ("/api/runs", "GET", "evil.example:8765", 403),  # DNS rebinding onto loopback
    ("/api/runs", "GET", "localhost:1", 200),
])
def test_read_only_and_host_checks(server, path: str, method: str, host: str | None, code: int) -> None:
    assert get(server, path, method, host)[0] == code


def test_page_headers_and_bundled_plotly(server) -> None:
    status, headers, body = get(server, "/")
    assert status == 200 and b'<script src="static/plotly.min.js">' in body
    assert "script-src 'self';" in headers["Content-Security-Policy"]  # no inline script can run
    status, headers, js = get(server, "/static/plotly.min.js")
    assert status == 200 and js == plotly_js() and len(js) > 1_000_000
    assert b"cdn" not in (REPO / "lmforge" / "track" / "static" / "dashboard.html").read_bytes().lower()


def test_default_bind_is_loopback() -> None:
    from lmforge.cli import build_parser

    args = build_parser().parse_args(["dashboard"])
    assert (args.host, args.port) == ("127.0.0.1", 8765)


# ---- the real page in headless Chromium --------------------------------------------------------


def chromium_dom(url: str, profile: Path, budget_ms: int = 8000) -> tuple[str, list[str]]:
    """The DOM after the page ran for budget_ms of virtual time, and every console message."""
    assert CHROMIUM
    p = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}",
         "--enable-logging=stderr", "--v=0", f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
        capture_output=True, text=True, timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    # Chromium logs every console message (log, warn, error, uncaught exception, CSP violation)
    # as one INFO:CONSOLE line on stderr.
    console = [line for line in p.stderr.splitlines() if ":CONSOLE" in line]
    return p.stdout, console


class _Cells(HTMLParser):
    """Text of the runs table's name cells, attributes of <body> and every <script> src."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.scripts: list[str | None] = []
        self.body: dict[str, str | None] = {}
        self._in_name = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "td" and a.get("class") == "name":
            self._in_name = True
            self.names.append("")
        elif tag == "body":
            self.body = a
        elif tag == "script":
            self.scripts.append(a.get("src"))
        elif self._in_name:  # an element inside a name cell means a name was parsed as HTML
            self.names[-1] += f"<<element {tag}>>"

    def handle_endtag(self, tag):
        if tag == "td":
            self._in_name = False

    def handle_data(self, data):
        if self._in_name:
            self.names[-1] += data


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_console_capture_sees_errors(tmp_path: Path) -> None:
    """The no-console-errors assertion below can fail: a broken page is caught."""
    _, console = chromium_dom("data:text/html,<script>console.error('boom');undefinedFn()</script>",
                              tmp_path / "profile", budget_ms=1000)
    assert any("boom" in line for line in console) and any("undefinedFn" in line for line in console)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_dashboard_in_headless_chromium(db: Path, tmp_path: Path) -> None:
    # The real command, on a free loopback port it picks and prints.
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "dashboard", "--db", str(db), "--port", "0"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert m, line + proc.stderr.read() if proc.poll() is not None else line
        dom, console = chromium_dom(m.group(0), tmp_path / "profile")
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    assert console == [], "\n".join(console)
    page = _Cells()
    page.feed(dom)
    assert page.body.get("data-ready") == "1", dom[-3000:]  # the script ran to the end
    assert "data-pwned" not in page.body  # the <img onerror> name did not run
    # Every run is listed, and the hostile names are shown as the exact text typed.
    assert page.names == ["live", IMG_NAME, SCRIPT_NAME, "exp1"]
    assert '<td class="num">nan</td>' in dom  # the live run's last loss, as the API's string says
    assert page.scripts == ["static/plotly.min.js", "static/dashboard.js"]  # no injected <script>
    assert '<span id="state" class="live">' in dom  # a selected run is training: live refresh on
    # Charts drawn: each chart div holds a Plotly SVG with scatter traces; the loss chart has the
    # three newest runs' curves plus event markers, and event lines as shapes.
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "eval"):
        chart = dom.split(f'id="chart-{key}"', 1)[1].split('class="chart"', 1)[0]
        assert "main-svg" in chart, key
        assert chart.count("trace scatter") >= 2, key
    loss_chart = dom.split('id="chart-loss"', 1)[1].split('class="chart"', 1)[0]
    # Event lines: checkpoint + spike of the two selected finished runs (Plotly draws each shape in
    # several layers, so count distinct shape indices).
    assert len(set(re.findall(r'class="shape-group" data-index="(\d+)"', loss_chart))) == 4
    assert "checkpoint_saved" in loss_chart and "spike" in loss_chart  # legend of event markers
    # The data section: the IMG_NAME run's dataset report, with its hostile input name and example as text.
    data = dom.split('id="data"', 1)[1].split("<h2>", 1)[0]
    assert "near_dup" in data and "bullet_lines" in data and "more than 90% of lines start with a bullet" in data
    assert "kept 12 of 15 documents" in data and "cross-split copies removed: 1 val, 0 train" in data
    assert "&lt;img src=x onerror" in data and "&lt;script&gt;alert(1)&lt;/script&gt; mail &lt;EMAIL&gt;" in data
    assert "the run's config names no data.path" in data  # the other selected runs say why there is nothing


def test_clear_errors_for_a_missing_store_and_a_busy_port(db: Path, tmp_path: Path) -> None:
    from lmforge.errors import LmforgeError

    out = subprocess.run([sys.executable, "-m", "lmforge", "dashboard", "--db", str(tmp_path / "none.db")],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no experiment store at" in out.stderr and "none.db" in out.stderr
    first = make_server(str(db), "127.0.0.1", 0)
    try:
        with pytest.raises(LmforgeError, match="pick another --port"):
            make_server(str(db), "127.0.0.1", first.server_address[1])
    finally:
        first.server_close()
        first.store.close()


@pytest.mark.parametrize("port", [99999, 65536, -1])
def test_out_of_range_port_is_a_clear_error(db: Path, port: int) -> None:
    from lmforge.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"--port must be a port number from 0 to 65535 .*got {port}"):
        make_server(str(db), "127.0.0.1", port)
    if port == 99999:  # once through the real command: one line, status 2, no OverflowError traceback
        out = subprocess.run([sys.executable, "-m", "lmforge", "dashboard", "--db", str(db), "--port", str(port)],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert "--port: must be within 0..65535" in out.stderr and "99999" in out.stderr  # the flag's range (ranges.py)


def test_check_port_accepts_the_whole_range() -> None:
    from lmforge.errors import ConfigError
    from lmforge.util import check_port

    assert [check_port(p) for p in (0, 1, 8765, 65535)] == [0, 1, 8765, 65535]
    for bad in (65536, -1, True, "80"):
        with pytest.raises(ConfigError, match="--listen must be"):
            check_port(bad, "--listen")
