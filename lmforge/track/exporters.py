"""Copy a run from the experiment store into MLflow or Weights & Biases, offline.

The store is the record; these are one-way exports for teams that already look at runs in MLflow
or W&B. Both libraries are heavy, so they are optional extras (`pip install lmforge[mlflow]`,
`lmforge[wandb]`), imported only here, and a missing one is a clear error.

- MLflow: a local file store (`--uri ./mlruns`, the layout `mlflow ui --backend-store-uri` reads)
  or any tracking URI with a scheme (`sqlite:///mlflow.db`, `http://...`). One MLflow run per
  export, in the experiment "lmforge": the flattened config as params, every metric point with its
  step and time, tags for status / host / run directory, the events and config as JSON artifacts,
  and the terminal status (completed -> FINISHED, failed -> FAILED, interrupted / crashed ->
  KILLED). MLflow 3 keeps the file store in maintenance mode and refuses it unless
  MLFLOW_ALLOW_FILE_STORE is set; an export to a directory sets it, since a directory is what was
  asked for.
- W&B: `wandb.init(mode="offline")` under `--uri`; nothing is sent. `wandb sync <dir>` uploads it
  later, from a machine allowed to. Metrics are logged step by step (W&B steps must increase), the
  events go in as a table, the config as the run config.

Exporting twice makes two runs in the target: the store does not track what was exported where.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..errors import LmforgeError
from ..jsonl import dumps_record, to_record
from .store import Store, flatten

MLFLOW_STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED", "crashed": "KILLED"}
DEFAULT_URI = {"mlflow": "mlruns", "wandb": "wandb-offline"}


def export_run(db: str | None, ref: str, to: str, uri: str | None = None) -> str:
    """Export one run; return where it went (for the user to open)."""
    if to not in DEFAULT_URI:
        raise LmforgeError(f"unknown export target {to!r}: choose mlflow or wandb")
    with Store.open(db, readonly=True) as store:
        run = store.get_run(store.resolve(ref))
        metrics = store.metrics(run["id"])
        times = _metric_times(store, run["id"])
    uri = uri or DEFAULT_URI[to]
    return (_to_mlflow if to == "mlflow" else _to_wandb)(run, metrics, times, uri)


def _metric_times(store: Store, run_id: int) -> dict[tuple[str, int], float]:
    rows = store._query("SELECT key, step, time FROM metrics WHERE run_id=?", (run_id,))
    return {(r["key"], r["step"]): r["time"] for r in rows}


def _tags(run: dict[str, Any]) -> dict[str, str]:
    return {"lmforge.run_id": str(run["id"]), "lmforge.run_dir": run["run_dir"],
            "lmforge.status": run["status"], "lmforge.host": run["host"],
            "lmforge.last_step": str(run["last_step"]),
            **{f"lmforge.version.{k}": str(v) for k, v in run["versions"].items()}}


def _to_mlflow(run: dict[str, Any], metrics: dict[str, dict[str, list]], times: dict, uri: str) -> str:
    has_scheme = "://" in uri or uri.startswith("file:")
    if not has_scheme:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        path = Path(uri).resolve()
        path.mkdir(parents=True, exist_ok=True)
        uri = path.as_uri()
    try:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient
    except ImportError as e:
        raise LmforgeError("exporting to MLflow needs mlflow: pip install 'lmforge[mlflow]' "
                           "(or mlflow-skinny)") from e
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("lmforge")
    exp_id = exp.experiment_id if exp else client.create_experiment("lmforge")
    created = client.create_run(exp_id, run_name=run["name"], start_time=int(run["created_at"] * 1000),
                                tags=_tags(run))
    rid = created.info.run_id
    # MLflow params are strings of at most a few thousand characters; configs are far below that.
    params = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in flatten(run["config"]).items()]
    points = [Metric(key, float(v), int(times[(key, s)] * 1000), int(s))
              for key, m in metrics.items() for s, v in zip(m["step"], m["value"]) if math.isfinite(v)]
    for i in range(0, len(params), 100):  # log_batch limits: 100 params, 1000 metrics per call
        client.log_batch(rid, params=params[i : i + 100])
    for i in range(0, len(points), 1000):
        client.log_batch(rid, metrics=points[i : i + 1000])
    client.log_dict(rid, to_record(run["events"]), "lmforge/events.json")
    client.log_dict(rid, run["config"], "lmforge/config.json")
    client.log_batch(rid, tags=[RunTag("lmforge.events", str(len(run["events"])))])
    if run["status"] in MLFLOW_STATUS:
        end = run["finished_at"] or run["heartbeat_at"]
        client.set_terminated(rid, MLFLOW_STATUS[run["status"]], int(end * 1000))
    return f"{uri} (experiment lmforge, run {rid})"


def _to_wandb(run: dict[str, Any], metrics: dict[str, dict[str, list]], times: dict, uri: str) -> str:
    try:
        import wandb
    except ImportError as e:
        raise LmforgeError("exporting to W&B needs wandb: pip install 'lmforge[wandb]'") from e
    out = Path(uri).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Offline: written to disk only. No stats sampling or console capture: this is a copy, not a
    # live run, and the exporting process's CPU or stdout would be noise in it.
    settings = wandb.Settings(silent=True, x_disable_stats=True, console="off")
    wrun = wandb.init(mode="offline", dir=str(out), project="lmforge", name=run["name"],
                      config=run["config"], tags=[run["status"]], settings=settings,
                      notes=f"exported from lmforge run {run['id']} ({run['run_dir']})")
    try:
        by_step: dict[int, dict[str, float]] = {}
        for key, m in metrics.items():
            for s, v in zip(m["step"], m["value"]):
                if math.isfinite(v):  # NaN/inf are gaps in the copy, as on the dashboard
                    by_step.setdefault(int(s), {})[key] = float(v)
        for s in sorted(by_step):
            wrun.log(by_step[s], step=s)
        table = wandb.Table(columns=["step", "kind", "data"],
                            data=[[e["step"], e["kind"], dumps_record(e["data"])] for e in run["events"]])
        last = max(by_step, default=0)
        wrun.log({"lmforge/events": table}, step=last)
        wrun.summary.update({"lmforge/status": run["status"], "lmforge/last_step": run["last_step"],
                             "lmforge/run_dir": run["run_dir"]})
        run_dir = Path(wrun.dir).parent  # .../wandb/offline-run-<time>-<id>/files -> the run folder
    finally:
        wrun.finish(exit_code=0 if run["status"] == "completed" else 1)
    return f"{run_dir} (upload later with: wandb sync {run_dir})"
