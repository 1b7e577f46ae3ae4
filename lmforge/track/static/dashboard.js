// lmforge dashboard: fetches JSON from the read-only server and draws it.
//
// Safety rule: user strings (run names, config values, event data) only ever reach the page via
// textContent, and reach Plotly (which renders a little HTML in names and hover text) only through
// plotlyText(), which turns < > & " into entities. No innerHTML with data anywhere.
"use strict";

const REFRESH_MS = 5000;  // poll period; charts are redrawn only while a selected run is running
const MAX_POINTS = 2000;  // per curve; the server thins longer curves evenly over their steps
const CURVES = [
  ["loss", "loss"], ["lr", "learning rate"], ["grad_norm", "gradient norm"],
  ["tokens_per_s", "throughput (tokens/s)"],
];
const EVENT_COLORS = {
  resume: "#1f77b4", config_change: "#9467bd", spike: "#ff7f0e", rollback: "#d62728",
  checkpoint_saved: "#2ca02c", checkpoint_corrupt: "#8c564b", crash: "#000000",
  interrupted: "#bcbd22", eval: "#17becf", completed: "#7f7f7f",
};
// One colour per run, the same on every chart (Plotly's own default palette).
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                 "#7f7f7f", "#bcbd22", "#17becf"];
const MARKED = new Set(["resume", "config_change", "spike", "rollback", "checkpoint_saved",
                        "checkpoint_corrupt", "crash", "interrupted"]);

const state = { runs: [], selected: new Set(), details: {}, metrics: {}, data: {}, firstLoad: true };

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function plotlyText(s) {
  // Plotly parses a few tags (<b>, <a href>, <br>) in names and hover text; with < and > as
  // entities it sees none. (Quotes need no escaping there: it builds the SVG with DOM calls.)
  return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

function fmt(v) {
  if (v === null || v === undefined) return "-";
  if (typeof v === "string") return v;  // "nan", "inf", "-inf": how the API writes non-finite numbers
  return Math.abs(v) >= 1e5 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(3) : (+v.toPrecision(4)).toString();
}

// A curve's values for plotly: a non-finite value (a string, see fmt) becomes a gap.
function numbers(values) { return values.map((v) => (typeof v === "number" ? v : null)); }

function duration(s) {
  s = Math.floor(s || 0);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return h ? `${h}h${String(m).padStart(2, "0")}m` : `${m}m${String(sec).padStart(2, "0")}s`;
}

function when(t) { return t ? new Date(t * 1000).toLocaleString() : "-"; }

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store" });
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

function showError(err) { document.getElementById("errors").textContent = String(err); }

// ---- runs table -------------------------------------------------------------------------------

function renderRuns() {
  const body = document.querySelector("#runs tbody");
  body.replaceChildren();
  for (const run of state.runs) {
    const tr = el("tr");
    tr.dataset.runId = run.id;
    const box = el("input");
    box.type = "checkbox";
    box.checked = state.selected.has(run.id);
    box.addEventListener("change", () => {
      if (box.checked) state.selected.add(run.id); else state.selected.delete(run.id);
      refreshCharts();
    });
    const c0 = el("td"); c0.append(box); tr.append(c0);
    tr.append(el("td", run.id, "num"), el("td", run.name, "name"),
              el("td", run.status, `status-${run.status}`), el("td", run.last_step, "num"),
              el("td", fmt(run.loss), "num"), el("td", fmt(run.tokens), "num"),
              el("td", duration(run.elapsed_s), "num"), el("td", when(run.created_at)));
    tr.cells[2].title = run.run_dir;
    body.append(tr);
  }
}

// ---- charts -----------------------------------------------------------------------------------

function runName(id) {
  const r = state.runs.find((x) => x.id === id);
  return r ? `${r.name} (${r.id})` : String(id);
}

function runColor(id, ids) { return PALETTE[ids.indexOf(id) % PALETTE.length]; }

function eventShapes(ids) {
  const shapes = [];
  for (const id of ids) {
    for (const ev of (state.details[id] || {}).events || []) {
      if (!MARKED.has(ev.kind)) continue;
      shapes.push({ type: "line", xref: "x", yref: "paper", x0: ev.step, x1: ev.step, y0: 0, y1: 1,
                    line: { color: EVENT_COLORS[ev.kind] || "#999", width: 1, dash: "dot" } });
    }
  }
  return shapes;
}

function eventMarkers(ids) {
  // One marker trace per event kind along the top of the loss chart, for the hover text.
  const byKind = {};
  for (const id of ids) {
    for (const ev of (state.details[id] || {}).events || []) {
      if (!MARKED.has(ev.kind)) continue;
      (byKind[ev.kind] ||= { x: [], text: [] });
      byKind[ev.kind].x.push(ev.step);
      byKind[ev.kind].text.push(plotlyText(`${runName(id)}: ${ev.kind} @ ${ev.step} ${JSON.stringify(ev.data)}`));
    }
  }
  return Object.entries(byKind).map(([kind, d]) => ({
    x: d.x, y: d.x.map(() => 1), yaxis: "y2", type: "scatter", mode: "markers", name: kind,
    text: d.text, hoverinfo: "text", marker: { symbol: "triangle-down", size: 9, color: EVENT_COLORS[kind] },
  }));
}

function layout(title, extra) {
  return Object.assign({
    title: { text: title, font: { size: 14 } }, margin: { l: 55, r: 15, t: 35, b: 25 },
    legend: { orientation: "h", yanchor: "top", y: -0.12 }, hovermode: "closest",
  }, extra || {});
}

function drawCurves(ids) {
  for (const [key, title] of CURVES) {
    const traces = [];
    for (const id of ids) {
      const m = (state.metrics[id] || {})[key];
      if (m) traces.push({ x: m.step, y: numbers(m.value), type: "scatter", mode: "lines", name: plotlyText(runName(id)),
                           line: { color: runColor(id, ids) } });
    }
    let extra = { shapes: eventShapes(ids) };
    if (key === "loss") {
      traces.push(...eventMarkers(ids));
      extra.yaxis2 = { overlaying: "y", range: [0, 1.05], visible: false, fixedrange: true };
    }
    if (key === "lr" || key === "grad_norm") extra.yaxis = { exponentformat: "e" };
    Plotly.react(`chart-${key}`, traces, layout(title, extra), { responsive: true, displaylogo: false });
  }
  // Evaluation metrics by step: every metric key under "eval/" plus the numbers of `eval` events.
  const traces = [];
  for (const id of ids) {
    for (const [key, m] of Object.entries(state.metrics[id] || {})) {
      if (!key.startsWith("eval/")) continue;
      traces.push({ x: m.step, y: numbers(m.value), type: "scatter", mode: "lines+markers",
                    name: plotlyText(`${runName(id)} ${key}`) });
    }
    const series = {};
    for (const ev of (state.details[id] || {}).events || []) {
      if (ev.kind !== "eval") continue;
      for (const [k, v] of Object.entries(ev.data || {})) {
        if (typeof v !== "number") continue;
        (series[k] ||= { x: [], y: [] });
        series[k].x.push(ev.step); series[k].y.push(v);
      }
    }
    for (const [k, d] of Object.entries(series)) {
      if ((state.metrics[id] || {})[`eval/${k}`]) continue;  // already drawn from the metrics
      traces.push({ x: d.x, y: d.y, type: "scatter", mode: "lines+markers", name: plotlyText(`${runName(id)} eval ${k}`) });
    }
  }
  Plotly.react("chart-eval", traces, layout("evaluation by checkpoint step"), { responsive: true, displaylogo: false });
}

// ---- comparison and events tables -------------------------------------------------------------

function flatten(obj, prefix, out) {
  for (const [k, v] of Object.entries(obj || {})) {
    if (v && typeof v === "object" && !Array.isArray(v)) flatten(v, `${prefix}${k}.`, out);
    else out[`${prefix}${k}`] = JSON.stringify(v);
  }
  return out;
}

function renderCompare(ids) {
  const head = document.querySelector("#compare thead"), body = document.querySelector("#compare tbody");
  head.replaceChildren(); body.replaceChildren();
  const note = (text) => { const tr = el("tr"); tr.append(el("td", text, "muted")); body.append(tr); };
  if (ids.length < 2) { note("select two or more runs to compare their configs"); return; }
  const flat = ids.map((id) => flatten((state.details[id] || {}).config, "", {}));
  const hr = el("tr"); hr.append(el("th", "key"), ...ids.map((id) => el("th", runName(id)))); head.append(hr);
  const keys = [...new Set(flat.flatMap(Object.keys))].sort();
  let n = 0;
  for (const k of keys) {
    const vals = flat.map((f) => f[k]);
    if (new Set(vals).size < 2) continue;
    const tr = el("tr"); tr.append(el("td", k), ...vals.map((v) => el("td", v === undefined ? "-" : v))); body.append(tr); n++;
  }
  if (!n) note("identical configs");
}

function renderEvents(ids) {
  const body = document.querySelector("#events tbody");
  body.replaceChildren();
  const rows = ids.flatMap((id) => ((state.details[id] || {}).events || []).map((ev) => [id, ev]));
  rows.sort((a, b) => b[1].time - a[1].time);
  for (const [id, ev] of rows.slice(0, 200)) {
    const tr = el("tr");
    tr.append(el("td", runName(id)), el("td", ev.step, "num"), el("td", ev.kind), el("td", when(ev.time)),
              el("td", JSON.stringify(ev.data)));
    body.append(tr);
  }
}

// ---- data hygiene report ----------------------------------------------------------------------

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function table(cls, header, rows) {
  const t = el("table"); t.className = cls;
  const hr = el("tr"); hr.append(...header.map((h) => el("th", h))); t.append(hr);
  for (const row of rows) {
    const tr = el("tr");
    tr.append(...row.map((v) => el("td", v, typeof v === "number" ? "num" : undefined)));
    t.append(tr);
  }
  return t;
}

function renderData(ids) {
  const box = document.getElementById("data");
  box.replaceChildren();
  if (!ids.length) { box.append(el("p", "select a run to see its dataset's report", "muted")); return; }
  for (const id of ids) {
    const d = state.data[id] || {};
    // a data.mix run: one section per dataset, its weight in the title
    for (const one of d.mix || [d]) box.append(renderDataset(id, one));
  }
}

// One dataset's hygiene report (settings, inputs, removed, redacted, examples, prepare-time mix).
function renderDataset(id, d) {
  const sec = el("section");
  sec.dataset.runId = id;
  sec.append(el("h3", `${runName(id)}: ${d.path || "no dataset"}` + ("weight" in d ? ` (data.mix weight ${d.weight})` : "")));
  if (d.error) { sec.append(el("p", d.error, "muted")); return sec; }
  const h = d.report && d.report.hygiene;
  if (!h) {
    sec.append(el("p", "prepared without hygiene (an older lmforge)", "muted"));
  } else {
    const s = h.settings;
    sec.append(el("p", `dedup ${!s.dedup ? "off" : s.near_dup_threshold === null ? "on (exact only)" : `on (near-dup threshold ${s.near_dup_threshold})`}, quality ` +
      `${s.quality ? "on" : "off"}${(s.skip_rules || []).length ? ` (skipping ${s.skip_rules.join(", ")})` : ""}, ` +
      `pii ${s.pii}; kept ${h.total.kept_documents} of ${h.total.documents} documents ` +
      `(${bytes(h.total.kept_bytes)} of ${bytes(h.total.bytes)}); cross-split copies removed: ` +
      `${h.cross_split.val_dropped_as_copy_of_train} val, ${h.cross_split.train_dropped_as_copy_of_val} train`));
    const names = Object.keys(h.inputs);
    sec.append(table("inputs", ["input", "documents", "kept", "bytes", "kept bytes"],
      names.map((n) => [n, h.inputs[n].documents, h.inputs[n].kept_documents, bytes(h.inputs[n].bytes),
                        bytes(h.inputs[n].kept_bytes)])));
    if (h.removed.length) {
      sec.append(table("removed", ["removed by", "stage", "documents", "bytes", ...names, "what"],
        h.removed.map((r) => [r.rule, r.stage, r.documents, bytes(r.bytes),
                              ...names.map((n) => (r.by_input[n] || { documents: 0 }).documents), r.what])));
    } else {
      sec.append(el("p", "removed: nothing", "muted"));
    }
    if (h.redacted.length) {
      sec.append(table("redacted", ["redacted", "documents", "items", ...names],
        h.redacted.map((r) => [r.kind, r.documents, r.items, ...names.map((n) => (r.by_input[n] || { items: 0 }).items)])));
    }
    const ex = Object.entries(h.examples || {}).flatMap(([rule, items]) =>
      items.map((e) => [rule, `${e.source} @ ${e.byte_offset}` +
                             (e.copy_of ? ` (copy of ${e.copy_of.source} @ ${e.copy_of.byte_offset})` : ""), e.text]));
    if (ex.length) {
      const t = table("examples", ["example of", "where", "text (redacted)"], ex);
      for (const tr of t.querySelectorAll("tr")) if (tr.cells[2]) tr.cells[2].className = "example";
      sec.append(t);
    }
  }
  const mix = d.report && d.report.mix;
  if (mix) {
    sec.append(table("mix", ["mixed input", "weight", "repeat", "token share"],
      Object.entries(mix.inputs).map(([n, r]) => [n, r.weight.toFixed(3), r.repeat.toFixed(3), r.token_share.toFixed(3)])));
  }
  return sec;
}

// ---- refresh loop -----------------------------------------------------------------------------

async function refreshCharts() {
  const ids = [...state.selected].filter((id) => state.runs.some((r) => r.id === id));
  await Promise.all(ids.map(async (id) => {
    const [detail, metrics] = await Promise.all([
      getJSON(`api/runs/${id}`), getJSON(`api/runs/${id}/metrics?max_points=${MAX_POINTS}`)]);
    state.details[id] = detail; state.metrics[id] = metrics;
    if (!(id in state.data)) state.data[id] = await getJSON(`api/runs/${id}/data`);  // a dataset does not change
  }));
  drawCurves(ids);
  renderData(ids);
  renderCompare(ids);
  renderEvents(ids);
}

async function refresh() {
  try {
    const info = await getJSON("api/runs");
    state.runs = info.runs;
    document.getElementById("db").textContent = info.db;
    if (state.firstLoad) {  // start with the three newest runs overlaid
      state.runs.slice(0, 3).forEach((r) => state.selected.add(r.id));
    }
    renderRuns();
    const live = state.runs.some((r) => r.status === "running" && state.selected.has(r.id));
    if (state.firstLoad || live) await refreshCharts();
    state.firstLoad = false;
    const st = document.getElementById("state");
    st.className = live ? "live" : "";
    st.textContent = live ? "live" : `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.ready = "1";
    showError("");
  } catch (err) {
    showError(err);
  }
}

refresh();
setInterval(refresh, REFRESH_MS);
