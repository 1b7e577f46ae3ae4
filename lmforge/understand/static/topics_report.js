// lmforge topics report: draws the JSON block #topics-data (lmforge/understand/topics_report.py).
//
// Safety rule (as the dashboard's): user strings (document texts, ids, topic names, keywords)
// reach the page only through textContent, and reach Plotly (which renders a little HTML in names
// and hover text) only through plotlyText(), which turns & < > into entities. No innerHTML.
"use strict";

const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#bcbd22",
                 "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2",
                 "#dbdb8d", "#9edae5", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd",
                 "#e6550d", "#31a354", "#756bb1", "#636363", "#6baed6", "#fd8d3c"];
const CONFIG = { displaylogo: false, responsive: true };

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function plotlyText(s) {
  return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

// Hover text: escaped, then broken into lines of about `width` characters with Plotly's <br>
// (inserted after escaping, between whole words, so no entity is cut).
function hoverLines(s, width) {
  const lines = [];
  let line = "";
  for (const word of String(s).split(/\s+/)) {
    if (line && line.length + word.length + 1 > width) { lines.push(line); line = ""; }
    line = line ? line + " " + word : word;
  }
  if (line) lines.push(line);
  return lines.map(plotlyText).join("<br>");
}

function fmt(v, digits) {
  if (v === null || v === undefined) return "-";
  if (typeof v === "string") return v;  // "nan" and friends, as lmforge writes non-finite numbers
  if (Number.isInteger(v)) return v.toLocaleString("en");
  return v.toFixed(digits === undefined ? 3 : digits);
}

// A ratio or score (JSON writes 1.0 as 1: always show its decimals).
function num(v) { return typeof v === "number" ? v.toFixed(3) : fmt(v); }

function pct(v) { return typeof v === "number" ? (100 * v).toFixed(1) + " %" : fmt(v); }

function topicName(topics, id) {
  const t = topics.find((x) => x.id === id);
  return t ? t.name : (id === -1 ? "outliers" : "topic " + id);
}

function summary(data) {
  const q = data.quality;
  const rows = [
    ["documents", fmt(q.documents)],
    ["topics", fmt(q.topics)],
    ["outlier share (clustering)", pct(q.outlier_share_before)],
    ["outlier share (final)", pct(q.outlier_share) + (data.settings.outliers.reassign ? "" : " (reassignment off)")],
    ["outliers reassigned", fmt(q.reassigned)],
    ["topic diversity (top keywords)", num(q.diversity)],
  ];
  if (q.labels) {
    const b = q.labels.before_reassignment, f = q.labels.final;
    rows.push(["labelled documents", fmt(f.labelled)]);
    rows.push(["NMI (before -> after reassignment)", num(b.nmi) + " -> " + num(f.nmi)]);
    rows.push(["ARI (before -> after reassignment)", num(b.ari) + " -> " + num(f.ari)]);
  }
  const s = data.settings;
  rows.push(["model", data.model]);
  rows.push(["inputs", data.input.inputs.join(", ") + " (" + fmt(data.input.files) + " files" +
    (data.input.not_utf8 ? ", " + data.input.not_utf8 + " not UTF-8 skipped" : "") + ")"]);
  rows.push(["pipeline", "reduce " + s.reduce.method + ", cluster " + s.cluster.method +
    (s.cluster.min_cluster_size ? " (min_cluster_size " + s.cluster.min_cluster_size + ")" : "") +
    ", keywords c-TF-IDF, outliers " + (s.outliers.reassign ? "reassigned (max distance " + s.outliers.max_distance + ")" : "kept") +
    ", seed " + s.seed]);
  const body = document.querySelector("#summary tbody");
  for (const [k, v] of rows) {
    const tr = el("tr");
    tr.append(el("td", k), el("td", v));
    body.append(tr);
  }
}

function colourOf(rank) { return PALETTE[rank % PALETTE.length]; }

function drawMap(data) {
  const m = data.map, topics = data.topics;
  document.getElementById("map-note").textContent = m.x.length < data.map_total
    ? "(" + m.x.length.toLocaleString("en") + " of " + data.map_total.toLocaleString("en") + " documents, a seeded sample)"
    : "(" + m.x.length.toLocaleString("en") + " documents)";
  if (!m.x.length) return;
  const own = topics.filter((t) => t.id >= 0).slice(0, data.map_traces).map((t) => t.id);
  const groups = new Map();
  const key = (id) => (id === -1 ? "outliers" : own.includes(id) ? "t" + id : "other");
  for (let i = 0; i < m.x.length; i++) {
    const k = key(m.topic[i]);
    if (!groups.has(k)) groups.set(k, { x: [], y: [], text: [] });
    const g = groups.get(k);
    g.x.push(m.x[i]);
    g.y.push(m.y[i]);
    g.text.push(plotlyText(topicName(topics, m.topic[i])) + "<br>" + plotlyText(m.id[i]) + "<br>" + hoverLines(m.text[i], 80));
  }
  const traces = [];
  const add = (k, name, colour, size) => {
    if (!groups.has(k)) return;
    const g = groups.get(k);
    traces.push({ type: "scatter", mode: "markers", x: g.x, y: g.y, text: g.text, hoverinfo: "text",
                  name: plotlyText(name), marker: { size: size, color: colour, opacity: 0.75 } });
  };
  add("outliers", "outliers", "#c8c8c8", 4);
  add("other", "other topics", "#888888", 5);
  own.forEach((id, rank) => add("t" + id, topicName(topics, id), colourOf(rank), 5));
  Plotly.newPlot("map", traces, {
    margin: { t: 10, r: 10, b: 30, l: 30 }, hovermode: "closest", legend: { itemsizing: "constant" },
    xaxis: { showticklabels: false, zeroline: false }, yaxis: { showticklabels: false, zeroline: false },
  }, CONFIG);
}

function drawSizes(data) {
  const ts = data.topics.filter((t) => t.id >= 0).slice(0, 60).reverse();
  Plotly.newPlot("sizes", [{
    type: "bar", orientation: "h", x: ts.map((t) => t.size), y: ts.map((t) => plotlyText(t.name)),
    marker: { color: ts.map((t, i) => colourOf(ts.length - 1 - i)) }, hoverinfo: "x+y",
  }], { margin: { t: 10, r: 10, b: 30, l: 260 }, yaxis: { automargin: true } }, CONFIG);
}

function topicTable(data) {
  const body = document.querySelector("#topics tbody");
  for (const t of data.topics) {
    const tr = el("tr");
    const kw = el("td");
    for (const [w, s] of t.keywords) {
      const span = el("span", w, "kw");
      span.title = "c-TF-IDF " + s;
      kw.append(span);
    }
    const docs = el("td");
    if (t.docs.length) {
      const d = el("details");
      d.append(el("summary", t.docs.length + " documents"));
      for (const doc of t.docs) {
        const p = el("div", null, "doc");
        p.append(el("span", doc.id, "id"), document.createTextNode(doc.text));
        d.append(p);
      }
      docs.append(d);
    }
    tr.append(el("td", t.id, "num"), el("td", t.name, "name"), el("td", fmt(t.size), "num"), kw, docs);
    body.append(tr);
  }
}

function drawSimilarity(data) {
  const s = data.similarity;
  if (!s.ids.length) return;
  const labels = s.names.map((n) => plotlyText(n));
  Plotly.newPlot("similarity", [{
    type: "heatmap", z: s.z, x: labels, y: labels, zmin: Math.min(0, ...s.z.flat()), zmax: 1, colorscale: "Blues", reversescale: true,
    hovertemplate: "%{y}<br>%{x}<br>cosine %{z:.3f}<extra></extra>",
  }], { margin: { t: 10, r: 10, b: 160, l: 260 }, yaxis: { autorange: "reversed", automargin: true },
        xaxis: { automargin: true } }, CONFIG);
}

function drawTime(data) {
  const t = data.time;
  if (!t) return;
  document.getElementById("time-section").hidden = false;
  document.getElementById("time-note").textContent =
    "(" + t.with_time.toLocaleString("en") + " documents with a " + data.input.time_field + ", the " +
    Object.keys(t.counts).length + " largest topics)";
  const mids = t.edges.slice(0, -1);  // each bin drawn at its start
  const traces = Object.entries(t.counts).map(([id, counts], rank) => ({
    type: "scatter", mode: "lines+markers", x: mids, y: counts, name: plotlyText(topicName(data.topics, +id)),
    line: { color: colourOf(rank) },
  }));
  Plotly.newPlot("time", traces, { margin: { t: 10, r: 10, b: 40, l: 50 }, yaxis: { title: { text: "documents" } } }, CONFIG);
}

function stagesTable(data) {
  const body = document.querySelector("#stages tbody");
  for (const [name, s] of Object.entries(data.stages)) {
    const tr = el("tr");
    tr.append(el("td", name), el("td", s.seconds.toFixed(1), "num"), el("td", s.peak_rss_mb.toFixed(0), "num"));
    body.append(tr);
  }
}

function main() {
  const data = JSON.parse(document.getElementById("topics-data").textContent);
  document.getElementById("title").textContent = data.title;
  document.getElementById("subtitle").textContent = "lmforge topics, " + data.created;
  summary(data);
  drawMap(data);
  drawSizes(data);
  topicTable(data);
  drawSimilarity(data);
  drawTime(data);
  stagesTable(data);
  document.body.dataset.ready = "1";
}

main();
