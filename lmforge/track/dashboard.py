"""`lmforge dashboard`: a small read-only web server over the experiment store.

Design: the standard library's `ThreadingHTTPServer` serves one static page, its script, the
plotly.js bundled inside the installed `plotly` Python package (no CDN: works offline and on
prem), and four JSON endpoints:

    GET /api/runs                    {"db": path, "runs": [...]}          runs table
    GET /api/runs/<id>               config, metrics summary, events, checkpoints
    GET /api/runs/<id>/metrics       {key: {"step": [...], "value": [...]}}  ?keys=a,b&max_points=N
                                     (N >= 0: at most N points per curve; 0 or absent: all; else 400)
    GET /api/runs/<id>/data          the hygiene report of the run's dataset (data.hygiene.report):
                                     {"path", "report"} or {"path", "error"} when it cannot be read;
                                     a data.mix run: {"mix": [{"path", "weight", "report" | "error"}, ...]}
    GET /api/health                  {"ok": true}

Every JSON answer follows lmforge/jsonl.py's rule: a NaN or infinite value is the string "nan",
"inf" or "-inf" (a value of an unfinished curve, a diverged loss); the page shows the string in
tables and a gap in curves.

The page polls /api/runs every few seconds and redraws the charts while a selected run trains.
Why not FastAPI + uvicorn: the dashboard answers a handful of GETs for one person; the stdlib
server adds no dependency, starts instantly and is easy to reason about. Each request uses the
store's read-only SQLite connection (WAL: it never blocks the trainer's writes).

Safety: read-only (only GET/HEAD; the store is opened with mode=ro); binds 127.0.0.1 unless told
otherwise; a strict Content-Security-Policy (scripts only from this origin, no inline script) and
a page that inserts user strings only as text, so a run named `<script>...` is shown, not run;
on loopback the Host header must name loopback, which defeats DNS-rebinding reads.
"""

from __future__ import annotations

import re
import sys
from functools import lru_cache
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ..errors import LmforgeError
from ..jsonl import dumps_record
from ..util import check_port
from .store import Store

STATIC = Path(__file__).with_name("static")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


@lru_cache(maxsize=1)
def plotly_js() -> bytes:
    """plotly.min.js from the installed `plotly` package (a declared dependency)."""
    try:
        import plotly
    except ImportError as e:  # pragma: no cover - plotly is a dependency
        raise LmforgeError("the dashboard needs the plotly package: pip install plotly") from e
    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.exists():
        raise LmforgeError(f"{path} is missing: reinstall plotly (pip install --force-reinstall plotly)")
    return path.read_bytes()


def _max_points(query: dict[str, list[str]]) -> int:
    """?max_points=N: a whole number >= 0 (0 or absent: every point); anything else is a 400."""
    raw = query.get("max_points", ["0"])[0].strip() or "0"
    if not (raw.isascii() and raw.isdigit()):
        raise ValueError(f"max_points must be a whole number >= 0 (0: every point), got {raw!r}")
    return int(raw)


class _Handler(BaseHTTPRequestHandler):
    server: "DashboardServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # quiet: one line per poll would bury the URL the user needs

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        if self.server.loopback and self.headers.get("Host", "").rsplit(":", 1)[0] not in LOOPBACK_HOSTS:
            return self._send(HTTPStatus.FORBIDDEN, b"forbidden host\n", "text/plain")
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        try:
            if url.path in ("/", "/index.html"):
                return self._file("dashboard.html", "text/html; charset=utf-8")
            if url.path == "/static/dashboard.js":
                return self._file("dashboard.js", "text/javascript; charset=utf-8")
            if url.path == "/static/plotly.min.js":
                return self._send(HTTPStatus.OK, plotly_js(), "text/javascript; charset=utf-8", cache=True)
            if url.path == "/api/health":
                return self._json({"ok": True})
            store = self.server.store
            if url.path == "/api/runs":
                return self._json({"db": str(store.path), "runs": store.list_runs()})
            m = re.fullmatch(r"/api/runs/(\d+)(/metrics|/data)?", url.path)
            if m:
                run_id = int(m.group(1))
                if m.group(2) == "/data":
                    return self._json(data_report(store, run_id))
                if m.group(2):
                    keys = query["keys"][0].split(",") if "keys" in query else None
                    max_points = _max_points(query)
                    store.get_run(run_id)  # 404 for an unknown id
                    return self._json(store.metrics(run_id, keys, max_points=max_points))
                return self._json(store.get_run(run_id))
            return self._json({"error": f"no such page: {url.path}"}, HTTPStatus.NOT_FOUND)
        except LmforgeError as e:
            return self._json({"error": str(e)}, HTTPStatus.NOT_FOUND)
        except ValueError as e:
            return self._json({"error": str(e)}, HTTPStatus.BAD_REQUEST)

    def _file(self, name: str, ctype: str) -> None:
        self._send(HTTPStatus.OK, (STATIC / name).read_bytes(), ctype)

    def _json(self, obj: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
        self._send(status, dumps_record(obj, default=str).encode(), "application/json")  # NaN -> "nan"

    def _send(self, status: HTTPStatus, body: bytes, ctype: str, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


EXAMPLES_SHOWN = 3  # per rule on the page (the manifest holds up to 10, all redacted)


def data_report(store: Store, run_id: int) -> dict[str, Any]:
    """The hygiene report of a run's dataset, or of each dataset of its data.mix ({"mix": [{path,
    weight, report | error}, ...]}, in the config's order). A relative path is resolved against
    the working directory the run last started in (its start/resume event), then the dashboard's."""
    run = store.get_run(run_id)
    data = run["config"].get("data") or {}
    cwds = [e["data"]["cwd"] for e in run["events"] if isinstance(e.get("data"), dict) and e["data"].get("cwd")]
    mix = data.get("mix") or {}
    if isinstance(mix, dict) and mix:
        return {"mix": [{"weight": weight, **_dataset_report(str(path), cwds)} for path, weight in mix.items()]}
    raw = str(data.get("path") or "")
    if not raw:
        return {"path": None, "error": "the run's config names no data.path"}
    return _dataset_report(raw, cwds)


def _dataset_report(raw: str, cwds: list[str]) -> dict[str, Any]:
    from ..data.hygiene import report
    from ..data.manifest import read_manifest
    from ..errors import DataError

    path = Path(raw)
    if not path.is_absolute():
        candidates = [Path(c) / path for c in reversed(cwds)] + [path]
        path = next((p for p in candidates if p.exists()), candidates[0])
    try:
        rep = report(read_manifest(path))
    except DataError as e:
        return {"path": str(path), "error": str(e)}
    if rep["hygiene"]:
        rep["hygiene"]["examples"] = {k: v[:EXAMPLES_SHOWN] for k, v in rep["hygiene"]["examples"].items()}
    return {"path": str(path), "report": rep}


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, store: Store, host: str, port: int) -> None:
        self.store = store
        self.loopback = host in LOOPBACK_HOSTS
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


def make_server(db: str | None, host: str = "127.0.0.1", port: int = 8765) -> DashboardServer:
    """A dashboard server over the store at db (port 0: any free port); call serve_forever()."""
    check_port(port)  # before anything opens: bind() would raise OverflowError past 65535
    store = Store.open(db, readonly=True)
    plotly_js()  # fail now, not on the first page load, if plotly is missing
    try:
        return DashboardServer(store, host, port)
    except OSError as e:
        store.close()
        raise LmforgeError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port") from e


def serve_dashboard(db: str | None, host: str = "127.0.0.1", port: int = 8765) -> int:
    server = make_server(db, host, port)
    # stdout, flushed: a script (or the test) can read the URL, also when port 0 chose it.
    print(f"lmforge dashboard on {server.url}  (store {server.store.path}; Ctrl-C stops)", flush=True)
    if not server.loopback:
        print("warning: listening beyond loopback; anyone who can reach this port can read the runs",
              file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.store.close()
    return 0
