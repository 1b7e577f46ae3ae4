"""`lmforge classify eval` and `lmforge classify predict`: metrics, routing, reports, streamed predictions.

eval
----
`evaluate(clf, examples)` scores a labelled test file and returns one dict (what `--json` prints):
accuracy and macro-F1 (multi-label: subset accuracy, micro/macro-F1, Hamming loss), per-class
precision/recall/F1/support, the confusion matrix (rows gold, columns predicted), NLL and ECE
(15 bins) with the calibrated temperature and without it (T = 1), the reliability bins, the
coverage table (accuracy on the items kept at each threshold, evaluate/classification.py) and the
whole coverage curve, and the routing at the threshold in force. The text report prints the same;
`--report out.html` writes a self-contained page (plotly.js inlined from the installed `plotly`
package, as the dashboard serves it: it opens offline, from a file, with no server).

A test label the classifier does not know is refused, naming its first FILE:LINE (a typo in a
label name is the usual cause); with `allow_unknown` such items are kept and counted as wrong
(their own rows in the confusion matrix; never-predicted columns in multi-label).

predict
-------
Records are streamed (labelled.stream_records) in chunks of `chunk` texts: each chunk is embedded,
scored and written before the next is read, so memory is bounded by one chunk (the chunk's texts,
tokens and (chunk, dim) vectors) whatever the input's size; benchmarks/classify.py measures the
peak. Output: JSONL, one record per input record in input order ({"id", "label", "predicted",
"confidence", "routed", "scores"}), written to a temporary file beside --out and renamed when
complete, so a failed or interrupted run leaves no half file. An existing --out is refused
unless --overwrite.

Trade-off: eval holds every test text and its probabilities (a test set fits); predict holds one chunk.
"""

from __future__ import annotations

import contextlib
import html
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .. import ranges as R
from ..errors import ConfigError, DataError
from ..evaluate import classification as M
from ..jsonl import dumps_record
from ..threads import choose
from ..util import FILE_MODE, atomic_write_text, console, fsync_dir, writes_to
from ..util import out as results_out
from . import calibrate
from .classify import Classifier, check_threshold
from .labelled import Examples, read_examples, stream_records

DEFAULT_CHUNK = 1024


# ---- eval ------------------------------------------------------------------------------------------


def gold_of(clf: Classifier, ex: Examples, allow_unknown: bool) -> tuple[np.ndarray, list[str]]:
    """Gold indices (N,) or a 0/1 matrix (N, L + unknown), and the labels unknown to the classifier."""
    known = {lab: j for j, lab in enumerate(clf.labels)}
    unknown: dict[str, int] = {}
    for where, labs in zip(ex.wheres, ex.labels):
        for lab in labs:
            if lab not in known and lab not in unknown:
                if not allow_unknown:
                    count = sum(lab in ls for ls in ex.labels)
                    raise DataError(f"{where}: label {lab!r} is not one of the classifier's {len(clf.labels)} labels "
                                    f"({count} test item(s) carry it); fix the label, or pass --allow-unknown-labels "
                                    "to count such items as wrong")
                unknown[lab] = len(clf.labels) + len(unknown)
    index = {**known, **unknown}
    if ex.multi_label:
        g = np.zeros((len(ex), len(index)), dtype=np.int64)
        for i, labs in enumerate(ex.labels):
            for lab in labs:
                g[i, index[lab]] = 1
        return g, list(unknown)
    return np.array([index[labs[0]] for labs in ex.labels], dtype=np.int64), list(unknown)


def evaluate(clf: Classifier, ex: Examples, *, min_confidence: float | None = None, allow_unknown: bool = False,
             progress: bool = False) -> dict[str, Any]:
    """The eval result (module docstring) of a classifier on labelled examples."""
    if ex.multi_label != clf.spec.multi_label:
        kind = "multi-label (labels: [...])" if clf.spec.multi_label else "single-label (label: ...)"
        raise DataError(f"{ex.path}: {clf.path} is a {kind} classifier; the test file is "
                        f"{'multi' if ex.multi_label else 'single'}-label")
    gold, unknown = gold_of(clf, ex, allow_unknown)
    threshold = clf.threshold(min_confidence)
    start = time.perf_counter()
    logits = clf.logits(ex.texts, progress=progress)
    seconds = time.perf_counter() - start
    probs = clf.probabilities(logits)
    raw = clf.probabilities(logits, 1.0)
    conf = calibrate.confidence(probs, clf.spec.multi_label)
    L = len(clf.labels)
    result: dict[str, Any] = {
        "classifier": str(clf.path), "test": ex.path, "items": len(ex), "labels": clf.labels,
        "multi_label": clf.spec.multi_label, "method": clf.spec.method, "temperature": clf.spec.temperature,
        "calibration": clf.spec.calibration, "calibration_note": clf.spec.calibration_note(),
        "unknown_labels": {lab: int(sum(lab in ls for ls in ex.labels)) for lab in unknown},
        "seconds": round(seconds, 3), "texts_per_s": round(len(ex) / max(seconds, 1e-9), 1),
        "ece_bins": M.ECE_BINS,
    }
    if clf.spec.multi_label:
        thr = np.asarray(clf.spec.label_thresholds, dtype=np.float64)
        pred = np.zeros_like(gold)
        pred[:, :L] = probs >= thr
        all_labels = clf.labels + unknown
        result.update(M.multi_label_metrics(gold, pred, all_labels))
        correct = (gold == pred).all(axis=1)
        g_known = gold[:, :L].reshape(-1).astype(bool)
        result["ece"] = M.ece(probs.reshape(-1), g_known)
        result["ece_uncalibrated"] = M.ece(raw.reshape(-1), g_known)
        result["reliability"] = M.reliability(probs.reshape(-1), g_known)
        result["nll"] = calibrate.nll_at(logits, gold[:, :L], clf.spec.temperature, True)
        result["nll_uncalibrated"] = calibrate.nll_at(logits, gold[:, :L], 1.0, True)
        result["accuracy"] = result["subset_accuracy"]
    else:
        pred = probs.argmax(axis=1)
        correct = pred == gold
        result.update(M.single_label_metrics(gold, pred, clf.labels))
        result["confusion_rows"] = clf.labels + unknown
        result["ece"] = M.ece(conf, correct)
        result["ece_uncalibrated"] = M.ece(raw.max(axis=1), correct)
        result["reliability"] = M.reliability(conf, correct)
        result["nll"] = M.nll(probs, gold)
        result["nll_uncalibrated"] = M.nll(raw, gold)
    kept = conf >= threshold
    result["routing"] = {"threshold": threshold, "fallback": clf.spec.fallback, "routed": int((~kept).sum()),
                         "coverage": float(kept.mean()),
                         "accuracy_kept": float(correct[kept].mean()) if kept.any() else math.nan}
    result["coverage"] = M.coverage_curve(conf, correct)
    result["coverage_points"] = [list(p) for p in M.coverage_points(conf, correct)]
    return result


def _f(x: Any, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def text_report(r: dict[str, Any]) -> str:
    """The eval result as plain text (what `classify eval` prints without --json)."""
    lines = [f"{r['classifier']} on {r['test']}: {r['items']} items, {len(r['labels'])} labels "
             f"({'multi' if r['multi_label'] else 'single'}-label, {r['method']}), {r['texts_per_s']:.1f} texts/s"]
    if r["multi_label"]:
        lines.append(f"subset accuracy {_f(r['subset_accuracy'])}  micro-F1 {_f(r['micro_f1'])}  macro-F1 "
                     f"{_f(r['macro_f1'])}  Hamming loss {_f(r['hamming_loss'])}")
    else:
        lines.append(f"accuracy {_f(r['accuracy'])}  macro-F1 {_f(r['macro_f1'])}")
    lines.append(f"NLL {_f(r['nll'])} (uncalibrated {_f(r['nll_uncalibrated'])})  ECE {_f(r['ece'])} "
                 f"(uncalibrated {_f(r['ece_uncalibrated'])}; {r['ece_bins']} bins; {r['calibration_note']})")
    ro = r["routing"]
    lines.append(f"routing at min-confidence {ro['threshold']:.2f}: {ro['coverage']:.1%} kept, accuracy "
                 f"{_f(ro['accuracy_kept'])} on them; {ro['routed']} routed to {ro['fallback']!r}")
    if r["unknown_labels"]:
        lines.append("labels the classifier does not know (counted as wrong): " +
                     ", ".join(f"{k} ({v})" for k, v in r["unknown_labels"].items()))
    width = max(len(lab) for lab in r["per_class"]) + 2
    lines += ["", f"{'label':<{width}}precision  recall  f1     support"]
    for lab, m in r["per_class"].items():
        lines.append(f"{lab:<{width}}{m['precision']:<11.3f}{m['recall']:<8.3f}{m['f1']:<7.3f}{m['support']}")
    if not r["multi_label"]:
        rows, n = r["confusion_rows"], len(r["labels"])
        lines += ["", "confusion (rows gold, columns predicted; columns numbered as the rows):"]
        cw = max(4, max(len(str(v)) for row in r["confusion"] for v in row) + 1)
        lines.append(" " * (width + 4) + "".join(f"{j:>{cw}}" for j in range(n)))
        for i, (lab, row) in enumerate(zip(rows, r["confusion"])):
            lines.append(f"{i:>3} {lab:<{width}}" + "".join(f"{v:>{cw}}" for v in row))
    lines += ["", "coverage (accuracy on the items kept at each --min-confidence):", "threshold  coverage  accuracy"]
    for row in r["coverage"]:
        lines.append(f"{row['threshold']:<11.2f}{row['coverage']:<10.1%}{_f(row['accuracy'])}")
    return "\n".join(lines)


def html_report(r: dict[str, Any]) -> str:
    """A self-contained HTML page of an eval result: tables, and plotly charts (confusion heatmap,
    coverage/accuracy curve, reliability diagram, per-class F1); label names are shown as text."""
    from ..track.dashboard import plotly_js

    e = html.escape
    data = dumps_record({k: r[k] for k in ("labels", "multi_label", "per_class", "coverage_points", "reliability",
                                          "routing") if k in r}
                        | {"confusion": r.get("confusion"), "rows": r.get("confusion_rows")})
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")  # inert inside <script>
    summary = e(text_report(r).split("\n\n")[0])
    per_class = "".join(f"<tr><td class='label'>{e(lab)}</td><td>{m['precision']:.3f}</td><td>{m['recall']:.3f}</td>"
                        f"<td>{m['f1']:.3f}</td><td>{m['support']}</td></tr>" for lab, m in r["per_class"].items())
    coverage = "".join(f"<tr><td>{row['threshold']:.2f}</td><td>{row['coverage']:.1%}</td><td>{_f(row['accuracy'])}</td>"
                       f"<td>{row['kept']}</td></tr>" for row in r["coverage"])
    plotly = plotly_js().decode("utf-8").replace("</script", "<\\/script")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lmforge classify eval: {e(Path(r['classifier']).name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
pre {{ background: #f6f6f6; padding: .8em; white-space: pre-wrap; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; }}
td {{ text-align: right; }} td.label {{ text-align: left; }}
.chart {{ width: 100%; max-width: 900px; height: 480px; }}
</style></head>
<body>
<h1>Classifier evaluation</h1>
<pre id="summary">{summary}</pre>
<h2>Coverage and accuracy</h2><p>Accuracy on the items kept at each minimum confidence; the rest go to
{e(r['routing']['fallback'])}.</p>
<div id="chart-coverage" class="chart"></div>
<table id="coverage"><tr><th>threshold</th><th>coverage</th><th>accuracy</th><th>kept</th></tr>{coverage}</table>
<h2>Confusion matrix</h2><div id="chart-confusion" class="chart"></div>
<h2>Per class</h2><div id="chart-f1" class="chart"></div>
<table id="per-class"><tr><th>label</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>{per_class}</table>
<h2>Calibration</h2><p>Reliability: accuracy against mean confidence per bin ({r['ece_bins']} bins);
ECE {_f(r['ece'])}, uncalibrated {_f(r['ece_uncalibrated'])}; {e(r['calibration_note'])}.</p>
<div id="chart-reliability" class="chart"></div>
<script id="data" type="application/json">{data}</script>
<script>{plotly}</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const cfg = {{displaylogo: false, responsive: true, staticPlot: false}};
const pts = D.coverage_points;
Plotly.newPlot("chart-coverage", [{{x: pts.map(p => p[1]), y: pts.map(p => p[2]), text: pts.map(p => "min-confidence " + p[0].toFixed(3)),
  mode: "lines+markers", type: "scatter", name: "accuracy on kept"}}],
  {{xaxis: {{title: {{text: "coverage (share kept)"}}, range: [0, 1.02]}}, yaxis: {{title: {{text: "accuracy on kept"}}}}, margin: {{t: 20}}}}, cfg);
if (D.confusion) {{
  Plotly.newPlot("chart-confusion", [{{z: D.confusion, x: D.labels, y: D.rows, type: "heatmap", colorscale: "Blues",
    hovertemplate: "gold %{{y}}<br>predicted %{{x}}<br>%{{z}} items<extra></extra>"}}],
    {{xaxis: {{title: {{text: "predicted"}}, type: "category"}}, yaxis: {{title: {{text: "gold"}}, type: "category", autorange: "reversed"}},
     margin: {{t: 20, l: 140, b: 140}}}}, cfg);
}} else {{
  document.getElementById("chart-confusion").textContent = "multi-label: see the per-label table";
}}
const names = Object.keys(D.per_class);
Plotly.newPlot("chart-f1", [{{x: names, y: names.map(n => D.per_class[n].f1), type: "bar", name: "F1"}}],
  {{yaxis: {{range: [0, 1], title: {{text: "F1"}}}}, xaxis: {{type: "category"}}, margin: {{t: 20, b: 140}}}}, cfg);
const rel = D.reliability;
Plotly.newPlot("chart-reliability", [
  {{x: rel.map(b => b.confidence), y: rel.map(b => b.accuracy), text: rel.map(b => b.items + " items"), mode: "markers+lines",
    type: "scatter", name: "bins"}},
  {{x: [0, 1], y: [0, 1], mode: "lines", type: "scatter", name: "perfect", line: {{dash: "dot"}}}}],
  {{xaxis: {{title: {{text: "mean confidence"}}, range: [0, 1]}}, yaxis: {{title: {{text: "accuracy"}}, range: [0, 1]}}, margin: {{t: 20}}}}, cfg);
document.body.dataset.ready = "1";
</script>
</body></html>
"""


def eval_command(clf_path: str, test: str, *, min_confidence: float | None = None, as_json: bool = False,
                 report: str | None = None, allow_unknown: bool = False, model: str | None = None,
                 text_field: str = "text", label_field: str = "label", batch_size: int = 32, threads: int = 0,
                 overwrite: bool = False) -> dict[str, Any]:
    """`lmforge classify eval CLF TEST`: prints the text report (or --json) and writes --report."""

    if min_confidence is not None:
        check_threshold(min_confidence)
    if report is not None and Path(report).exists() and not overwrite:
        raise ConfigError(f"{report} already exists; choose another --report or pass --overwrite")
    ex = read_examples(test, text_field=text_field, label_field=label_field)  # before a model loads
    choose(threads or None, exact=True)  # powers of two: the vectors do not depend on the count (lmforge/threads.py)
    clf = Classifier.load(clf_path, model=model, batch_size=batch_size)
    r = evaluate(clf, ex, min_confidence=min_confidence, allow_unknown=allow_unknown, progress=not as_json)
    if report is not None:
        atomic_write_text(report, html_report(r))
        console.print(f"wrote {report}", markup=False)
    if as_json:
        results_out.print(dumps_record(r), markup=False, highlight=False, soft_wrap=True)
    else:
        results_out.print(text_report(r), markup=False)
    return r


# ---- predict ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _streamed_file(path: Path) -> Iterator[Any]:
    """A text file written through a temporary sibling, fsynced and renamed into place on success;
    removed on any error, so `path` is never half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def predict_command(clf_path: str, inputs: str, out: str, *, min_confidence: float | None = None,
                    model: str | None = None, text_field: str = "text", id_field: str = "id", batch_size: int = 32,
                    chunk: int = DEFAULT_CHUNK, threads: int = 0, overwrite: bool = False) -> dict[str, Any]:
    """`lmforge classify predict CLF INPUT --out preds.jsonl` (module docstring); returns the summary."""

    if min_confidence is not None:
        check_threshold(min_confidence)
    R.positive_int().check("--chunk", chunk)
    target = Path(out)
    if target.exists() and not overwrite:
        raise ConfigError(f"{target} already exists; choose another --out or pass --overwrite")
    if not Path(inputs).is_file():
        raise DataError(f"input not found: {inputs}" if not Path(inputs).exists() else f"{inputs} is not a file")
    choose(threads or None, exact=True)  # powers of two: the vectors do not depend on the count (lmforge/threads.py)
    clf = Classifier.load(clf_path, model=model, batch_size=batch_size)
    counts: Counter[str] = Counter()
    n = routed = empty = 0
    start = time.perf_counter()
    records = stream_records(inputs, text_field=text_field, id_field=id_field, labelled=False)
    with writes_to(target), _streamed_file(target) as f:
        while True:
            batch = [r for _, r in zip(range(chunk), records)]
            if not batch:
                break
            preds = clf.predict([r.text for r in batch], min_confidence=min_confidence, ids=[r.id for r in batch])
            for p in preds:
                f.write(dumps_record({"id": p.pop("id"), **p}, ensure_ascii=False) + "\n")
                routed += p["routed"]
                empty += bool(p.get("empty"))
                for lab in (p["label"] if isinstance(p["label"], list) else [p["label"]]):
                    counts[lab] += 1
            n += len(batch)
            console.print(f"classified {n} texts ({n / max(time.perf_counter() - start, 1e-9):.1f} texts/s)",
                          markup=False)
        if n == 0:
            raise DataError(f"{inputs}: no records to classify (the file is empty or holds only blank lines)")
    seconds = time.perf_counter() - start
    summary = {"items": n, "routed": routed, "empty": empty, "seconds": round(seconds, 3),
               "texts_per_s": round(n / max(seconds, 1e-9), 1), "labels": dict(counts.most_common())}
    top = ", ".join(f"{k} {v}" for k, v in counts.most_common(5))
    results_out.print(f"classified {n} texts in {seconds:.1f}s ({summary['texts_per_s']:.1f} texts/s) -> {target}; "
                      f"{routed} routed to {clf.spec.fallback!r} (min-confidence {clf.threshold(min_confidence):.2f})"
                      + (f", {empty} empty" if empty else "") + f"; {top}", markup=False)
    return summary


__all__ = ["evaluate", "text_report", "html_report", "eval_command", "predict_command", "gold_of", "DEFAULT_CHUNK"]
