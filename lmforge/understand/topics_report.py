"""A topics directory on disk: topics.jsonl, assignments.jsonl, report.html and MANIFEST.json.

The directory is written into a temporary sibling and renamed into place (`util.atomic_dir`), so a
reader never sees half of one; `--overwrite` replaces only a topics directory (topics.check_out).

report.html is one self-contained file that opens offline from disk: plotly.js is inlined from the
installed `plotly` package (the dashboard's bundled copy, track/dashboard.plotly_js), then the
report's script (static/topics_report.js), and the data as a JSON block
(`<script type="application/json">`, never executed). Safety, as in the dashboard:
- every user string (document text, ids, topic names, keywords, file paths) reaches the page only
  as data: the script inserts it with textContent, and hands it to Plotly (which renders a little
  HTML in names and hover text) only with < > & turned into entities;
- in the JSON block, < > & and the two JavaScript line separators are written as \\u escapes, so no
  text can close the block (`</script>`) or open a comment;
- a Content-Security-Policy meta tag allows exactly the two inline scripts, by their sha256, and
  nothing else: an injected script or handler would not run even if escaping failed.
The map is a sample (topics.Settings.map_points) drawn as SVG: WebGL is not available everywhere
(a headless or remote browser), and SVG with 10,000 points still draws in about a second.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..jsonl import dumps_record, to_record

if TYPE_CHECKING:
    from .topics import Corpus, Result, Settings, Stages

STATIC = Path(__file__).with_name("static")
MAP_TRACES = 30  # topics with their own colour on the map; the rest share one trace
HEATMAP_TOPICS = 40
TIME_TOPICS = 10


def _json_for_html(obj: Any) -> str:
    """JSON that cannot end a <script> block or open an HTML comment inside it."""
    text = dumps_record(obj, ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def _sha256_source(script: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode() + "'"


def render_report(data: dict[str, Any], title: str) -> str:
    """The report page: the template with plotly.js, the report script and the data filled in."""
    from ..track.dashboard import plotly_js

    plotly = plotly_js().decode("utf-8")
    script = (STATIC / "topics_report.js").read_text(encoding="utf-8")
    for js in (plotly, script):  # a script's text must not end its own element
        if re.search(r"</script", js, re.IGNORECASE):
            raise AssertionError("an inlined script contains '</script'")
    csp = (f"default-src 'none'; script-src {_sha256_source(plotly)} {_sha256_source(script)}; "
           "style-src 'unsafe-inline'; img-src data:; font-src data:; base-uri 'none'; form-action 'none'")
    parts = {"CSP": html.escape(csp), "TITLE": html.escape(title), "PLOTLY": plotly, "SCRIPT": script,
             "DATA": _json_for_html(data)}
    template = (STATIC / "topics_report.html").read_text(encoding="utf-8")
    return re.sub(r"\{\{([A-Z]+)\}\}", lambda m: parts[m.group(1)], template)  # inserted text is not rescanned


def report_data(result: Result, corpus: Corpus, settings: Settings, *, model: str, title: str,
                stages: dict[str, dict[str, float]]) -> dict[str, Any]:
    """What the report's script draws (document arrays for the sampled map points only)."""
    from .topics import over_time

    ids = corpus.ids
    named = [t for t in result.topics if t.id >= 0]
    topics = [{"id": t.id, "name": t.name, "size": t.size, "keywords": [[w, round(s, 5)] for w, s in t.keywords],
               "docs": [{"id": ids[i], "text": result.texts.get(i, "")} for i in t.representative]}
              for t in result.topics]
    idx = result.map_index
    doc_map = {"x": np.round(result.map_xy[:, 0], 4).tolist() if len(idx) else [],
               "y": np.round(result.map_xy[:, 1], 4).tolist() if len(idx) else [],
               "topic": result.labels[idx].tolist(), "id": [ids[i] for i in idx],
               "text": [result.texts.get(int(i), "") for i in idx]}
    k = min(HEATMAP_TOPICS, len(named))
    time_data = None
    if corpus.times is not None:
        time_data = over_time(corpus.times, result.labels, [t.id for t in named[:TIME_TOPICS]], settings.time_bins)
    return {
        "title": title, "model": model, "created": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
        "quality": result.quality, "settings": settings.record(), "stages": stages,
        "input": {"inputs": corpus.inputs, "files": corpus.files, "not_utf8": len(corpus.not_utf8),
                  "empty": corpus.empty, "time_field": corpus.time_field, "without_time": corpus.without_time},
        "topics": topics, "map": doc_map, "map_total": len(ids), "map_traces": MAP_TRACES,
        "similarity": {"ids": [t.id for t in named[:k]], "names": [t.name for t in named[:k]],
                       "z": np.round(result.centroid_similarity[:k, :k], 4).tolist()},
        "time": time_data,
    }


def write_topics(out: Path, result: Result, corpus: Corpus, settings: Settings, *, fingerprint: dict[str, Any],
                 model: str, namer: dict[str, Any] | None, truncated: int, overwrite: bool, stages: Stages) -> None:
    """The topics directory, atomically (see the module docstring)."""
    from ..artifacts import write_manifest
    from ..util import atomic_dir
    from .topics import ASSIGNMENTS_FILE, KIND, REPORT_FILE, TOPICS_FILE

    ids = corpus.ids
    with atomic_dir(out, overwrite=overwrite) as tmp:
        with open(tmp / TOPICS_FILE, "w", encoding="utf-8") as f:
            for t in result.topics:
                f.write(json.dumps({"id": t.id, "size": t.size, "name": t.name,
                                    "keywords": [{"term": w, "score": round(s, 6)} for w, s in t.keywords],
                                    "representative_docs": [{"id": ids[i], "text": result.texts.get(i, "")}
                                                            for i in t.representative]}, ensure_ascii=False) + "\n")
        with open(tmp / ASSIGNMENTS_FILE, "w", encoding="utf-8") as f:
            lab, prob, sim, re_ = result.labels, result.probability, result.similarity, result.reassigned
            for i, ident in enumerate(ids):
                t = int(lab[i])
                f.write(json.dumps({"id": ident, "topic": t, "probability": round(float(prob[i]), 4) if t >= 0 else None,
                                    "similarity": round(float(sim[i]), 4) if t >= 0 else None,
                                    "reassigned": bool(re_[i])}, ensure_ascii=False) + "\n")
        title = f"Topics: {out.name}"
        (tmp / REPORT_FILE).write_text(render_report(report_data(result, corpus, settings, model=model, title=title,
                                                                 stages=stages.record), title), encoding="utf-8")
        stages.done("write", f"{out}")
        write_manifest(tmp, kind=KIND, extra=to_record({  # NaN as "nan" (lmforge/jsonl.py's rule)
            "model": {"path": model, **fingerprint},
            "input": {"inputs": corpus.inputs, "documents": len(ids), "files": corpus.files,
                      "not_utf8_skipped": len(corpus.not_utf8), "empty_skipped": corpus.empty,
                      "text_field": corpus.text_field, "id_field": corpus.id_field, "time_field": corpus.time_field,
                      "without_time": corpus.without_time, "truncated": truncated},
            "pipeline": {"embed": {"method": "lmforge", "kind": "document", "pooling": fingerprint.get("pooling")},
                         **settings.record(), "names": {"method": "chat model", **namer} if namer else
                         {"method": "top keywords"}},
            "resolved": result.notes, "quality": result.quality, "stages": stages.record,
        }))


__all__ = ["render_report", "report_data", "write_topics"]
