"""`lmforge runs`: the experiment store as terminal tables or JSON.

Each function here is what one `lmforge runs ...` subcommand calls: it opens the store, asks it one
question and prints the answer to stdout, a rich table for people or `--json` for scripts (the
JSON carries the same fields, unrounded, with NaN/inf as "nan"/"inf"/"-inf": lmforge/jsonl.py's rule). Every user string goes into a
`rich.text.Text`, never into markup, so a run named `[bold]x` prints as typed.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..errors import LmforgeError
from ..jsonl import dumps_record
from ..util import human_count
from .store import Store

STATUS_STYLE = {"running": "cyan", "completed": "green", "interrupted": "yellow",
                "failed": "red", "crashed": "bold red"}
CHECKPOINT_STYLE = {"saved": "green", "corrupt": "red", "deleted": "dim", "missing": "yellow"}


def _out() -> Console:
    # Tables go to stdout (data), warnings and errors to stderr (util.console). Wide enough that
    # a pipe or a test does not crop the columns.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _json(obj: Any) -> None:
    print(dumps_record(obj, indent=2, default=str))


def _num(v: float | None, fmt: str = "{:.4g}") -> str:
    return "-" if v is None else fmt.format(v)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _when(t: float | None) -> str:
    return "-" if t is None else dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


def _status(s: str) -> Text:
    return Text(s, style=STATUS_STYLE.get(s, ""))


def runs_list(db: str | None, as_json: bool = False) -> int:
    with Store.open(db, readonly=True) as store:
        runs = store.list_runs()
    if as_json:
        _json(runs)
        return 0
    if not runs:
        _out().print(f"no runs in {db or 'the store'} yet")
        return 0
    table = Table(box=None, header_style="bold")
    for col in ("id", "name", "status", "step", "loss", "tokens", "elapsed", "started"):
        table.add_column(col, justify="right" if col in ("id", "step", "loss", "tokens", "elapsed") else "left")
    for r in runs:
        table.add_row(str(r["id"]), Text(r["name"]), _status(r["status"]), str(r["last_step"]),
                      _num(r["loss"]), "-" if r["tokens"] is None else human_count(r["tokens"]),
                      _duration(r["elapsed_s"]), _when(r["created_at"]))
    _out().print(table)
    return 0


def runs_show(db: str | None, ref: str, as_json: bool = False) -> int:
    with Store.open(db, readonly=True) as store:
        run = store.get_run(store.resolve(ref))
    if as_json:
        _json(run)
        return 0
    out = _out()
    head = Text.assemble((run["name"], "bold"), f"  (id {run['id']})  ", _status(run["status"]),
                         f"  step {run['last_step']}  elapsed {_duration(run['elapsed_s'])}")
    out.print(head)
    out.print(Text(f"dir {run['run_dir']}   host {run['host']}   pid {run['pid']}   "
                   f"started {_when(run['created_at'])}   resumes {run['resumes']}   "
                   + " ".join(f"{k} {v}" for k, v in run["versions"].items())))
    cfg = Table(title="config", box=None, show_header=False, title_justify="left")
    for section, values in run["config"].items():
        if isinstance(values, dict):
            for k, v in values.items():
                cfg.add_row(Text(f"{section}.{k}"), Text(json.dumps(v, default=str)))
        else:
            cfg.add_row(Text(str(section)), Text(json.dumps(values, default=str)))
    out.print(cfg)
    summ = Table(title="metrics", box=None, title_justify="left", header_style="bold")
    for col in ("key", "last", "at step", "min", "max", "count"):
        summ.add_column(col, justify="left" if col == "key" else "right")
    for k, s in run["summary"].items():
        summ.add_row(Text(k), _num(s["last"]), str(s["step"]), _num(s["min"]), _num(s["max"]), str(s["count"]))
    out.print(summ)
    ev = Table(title="events", box=None, title_justify="left", header_style="bold")
    for col in ("step", "kind", "when", "data"):
        ev.add_column(col)
    for e in run["events"]:
        ev.add_row(str(e["step"]), Text(e["kind"]), _when(e["time"]), Text(dumps_record(e["data"], default=str)))
    out.print(ev if run["events"] else Text("events: none"))
    # status: as recorded (saved / corrupt), or deleted / missing when no longer on disk (store.checkpoint_state)
    ck = Table(title="checkpoints", box=None, title_justify="left", header_style="bold")
    for col in ("step", "status", "when", "path"):
        ck.add_column(col, justify="right" if col == "step" else "left")
    for c in run["checkpoints"]:
        ck.add_row(str(c["step"]), Text(c["status"], style=CHECKPOINT_STYLE.get(c["status"], "")),
                   _when(c["time"]), Text(str(c["path"])))
    out.print(ck if run["checkpoints"] else Text("checkpoints: none"))
    return 0


def runs_compare(db: str | None, refs: list[str], as_json: bool = False) -> int:
    if len(refs) < 2:
        raise LmforgeError("compare needs at least two runs")
    with Store.open(db, readonly=True) as store:
        cmp = store.compare([store.resolve(r) for r in refs])
    if as_json:
        _json(cmp)
        return 0
    out = _out()
    names = [Text(r["name"]) for r in cmp["runs"]]
    t = Table(title="config differences", box=None, title_justify="left", header_style="bold")
    t.add_column("key")
    for n in names:
        t.add_column(n)
    for k, values in cmp["config_diff"].items():
        t.add_row(Text(k), *[Text(json.dumps(v, default=str)) for v in values])
    out.print(t if cmp["config_diff"] else Text("config: identical"))
    m = Table(title="final metrics", box=None, title_justify="left", header_style="bold")
    m.add_column("key")
    for n in names:
        m.add_column(n, justify="right")
    m.add_row("status", *[_status(r["status"]) for r in cmp["runs"]])
    m.add_row("step", *[str(r["last_step"]) for r in cmp["runs"]])
    for k, values in cmp["final_metrics"].items():
        m.add_row(Text(k), *[_num(v) for v in values])
    out.print(m)
    return 0


def runs_delete(db: str | None, refs: list[str], yes: bool = False) -> int:
    """Delete runs from the store (their run directories stay on disk). Asks unless yes."""
    with Store.open(db) as store:
        ids = [store.resolve(r) for r in refs]
        runs = [store.get_run(i) for i in ids]
        listing = ", ".join(f"{r['name']} (id {r['id']}, {r['run_dir']})" for r in runs)
        if not yes:
            if not sys.stdin.isatty():
                raise LmforgeError(f"refusing to delete {listing} without confirmation: pass --yes")
            answer = input(f"delete {listing} from the store? run directories are kept [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                _out().print("nothing deleted")
                return 1
        for i in ids:
            store.delete_run(i)
    _out().print(Text(f"deleted {listing} from the store"))
    return 0


def runs_export(db: str | None, ref: str, to: str, uri: str | None = None) -> int:
    from .exporters import export_run

    where = export_run(db, ref, to, uri)
    _out().print(Text(f"exported {ref} to {to}: {where}"))
    return 0
