"""report.html of a topics directory: the page, from the data `topics.report_data` gathers.

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
import re
from pathlib import Path
from typing import Any

from ..jsonl import dumps_record

STATIC = Path(__file__).with_name("static")


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


__all__ = ["render_report"]
