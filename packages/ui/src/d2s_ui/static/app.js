// d2s ui: the three pages. Plain DOM and inline SVG charts: no framework, nothing fetched from
// outside the app. Every text from the data goes through textContent or esc().
"use strict";

const $ = (sel) => document.querySelector(sel);
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const qs = (o) => new URLSearchParams(Object.entries(o).filter(([, v]) => v !== "" && v !== null && v !== undefined)).toString();

function showError(msg) {
  const e = $("#error");
  if (!msg) { e.style.display = "none"; e.textContent = ""; return; }
  e.textContent = msg;
  e.style.display = "block";
}

async function api(path, params) {
  const r = await fetch(`/api/${path}?${qs(params || {})}`);
  let doc;
  try { doc = await r.json(); } catch (_) { throw new Error(`${path}: HTTP ${r.status} (not JSON)`); }
  if (!r.ok) throw new Error(doc.error || `${path}: HTTP ${r.status}`);
  return doc;
}

function imageUrl(ds, split, key) { return `/api/image?${qs({ ds, split, key })}`; }

function fillSelect(sel, values, keep) {
  const old = keep ? sel.value : "";
  const fixed = [...sel.querySelectorAll("option[data-fixed]")];
  sel.innerHTML = "";
  fixed.forEach((o) => sel.appendChild(o));
  values.forEach((v) => { const o = document.createElement("option"); o.value = v; o.textContent = v; sel.appendChild(o); });
  if (keep && values.includes(old)) sel.value = old;
}

function datasetControls(cfg, onChange, kinds) {
  const ds = $("#ds"), split = $("#split");
  const usable = cfg.datasets.filter((d) => Object.keys(d.splits).length && (!kinds || kinds.includes(d.kind)));
  cfg.datasets.filter((d) => d.problem).forEach((d) => showError(d.problem));
  // the dataset with dense texts (the captions stage) first when a run has several
  fillSelect(ds, usable.map((d) => d.name));
  const params = new URLSearchParams(location.search);
  if (params.get("ds")) ds.value = params.get("ds");
  const setSplits = () => {
    const d = usable.find((x) => x.name === ds.value);
    const splits = d ? Object.keys(d.splits) : [];
    fillSelect(split, splits);
    const pref = params.get("split") || (splits.includes("test") ? "test" : splits[0]);
    if (pref && splits.includes(pref)) split.value = pref;
  };
  setSplits();
  ds.addEventListener("change", () => { setSplits(); onChange(); });
  split.addEventListener("change", onChange);
}

// ------------------------------------------------------------------ charts (inline SVG)
const SVGNS = "http://www.w3.org/2000/svg";
function svg(w, h) { const s = document.createElementNS(SVGNS, "svg"); s.setAttribute("width", w); s.setAttribute("height", h); return s; }
function add(parent, tag, attrs, text) {
  const e = document.createElementNS(SVGNS, tag);
  Object.entries(attrs).forEach(([k, v]) => e.setAttribute(k, v));
  if (text !== undefined) e.textContent = text;
  parent.appendChild(e);
  return e;
}
function chartBox(title) {
  const d = document.createElement("div"); d.className = "chart";
  const h = document.createElement("h4"); h.textContent = title; d.appendChild(h);
  return d;
}
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

function barChart(title, labels, values) {
  const box = chartBox(title), W = 360, H = 200, L = 40, B = 50;
  const s = svg(W, H); box.appendChild(s);
  const max = Math.max(1, ...values), bw = (W - L - 10) / Math.max(1, labels.length);
  labels.forEach((lab, i) => {
    const h = (H - B - 10) * values[i] / max, x = L + i * bw;
    add(s, "rect", { x: x + 2, y: H - B - h, width: Math.max(1, bw - 4), height: h, fill: lab === "keep" ? "#2ca02c" : "#d62728" });
    add(s, "text", { x: x + bw / 2, y: H - B - h - 2, "font-size": 10, "text-anchor": "middle" }, values[i]);
    add(s, "text", { x: x + bw / 2, y: H - B + 12, "font-size": 10, "text-anchor": "end", transform: `rotate(-30 ${x + bw / 2} ${H - B + 12})` }, lab);
  });
  add(s, "line", { x1: L, y1: H - B, x2: W - 5, y2: H - B, stroke: "#888" });
  return box;
}

function histChart(title, hist, mark) {
  const box = chartBox(`${title} (n=${hist.n})`), W = 360, H = 180, L = 40, B = 30;
  const s = svg(W, H); box.appendChild(s);
  const n = hist.counts.length, max = Math.max(1, ...hist.counts), bw = (W - L - 10) / Math.max(1, n);
  const lo = hist.edges[0], hi = hist.edges[n];
  hist.counts.forEach((c, i) => {
    const h = (H - B - 10) * c / max;
    const mid = (hist.edges[i] + hist.edges[i + 1]) / 2;
    const fill = mark !== undefined ? (mid < mark ? "#d62728" : "#2ca02c") : "#1f77b4";
    add(s, "rect", { x: L + i * bw, y: H - B - h, width: Math.max(1, bw - 1), height: h, fill }).appendChild(
      Object.assign(document.createElementNS(SVGNS, "title"), { textContent: `${hist.edges[i]} .. ${hist.edges[i + 1]}: ${c}` }));
  });
  add(s, "line", { x1: L, y1: H - B, x2: W - 5, y2: H - B, stroke: "#888" });
  add(s, "text", { x: L, y: H - B + 14, "font-size": 10 }, lo);
  add(s, "text", { x: W - 10, y: H - B + 14, "font-size": 10, "text-anchor": "end" }, hi);
  add(s, "text", { x: 4, y: 12, "font-size": 10 }, max);
  return box;
}

function lineChart(title, series, ylabel) {
  const box = chartBox(title), W = 420, H = 240, L = 44, B = 34, R = 10;
  const s = svg(W, H); box.appendChild(s);
  const ks = series.flatMap((x) => x.k), kmin = Math.max(1, Math.min(...ks)), kmax = Math.max(...ks, kmin + 1);
  const X = (k) => L + (W - L - R) * (Math.log(k) - Math.log(kmin)) / (Math.log(kmax) - Math.log(kmin));
  const Y = (v) => H - B - (H - B - 16) * v / 100;
  [0, 25, 50, 75, 100].forEach((v) => {
    add(s, "line", { x1: L, y1: Y(v), x2: W - R, y2: Y(v), stroke: "#eee" });
    add(s, "text", { x: L - 4, y: Y(v) + 3, "font-size": 10, "text-anchor": "end" }, v);
  });
  [...new Set(ks)].sort((a, b) => a - b).forEach((k) => add(s, "text", { x: X(k), y: H - B + 12, "font-size": 10, "text-anchor": "middle" }, k));
  add(s, "text", { x: W / 2, y: H - 4, "font-size": 10, "text-anchor": "middle" }, "K (log scale)");
  add(s, "text", { x: L + 6, y: 9, "font-size": 10 }, ylabel);
  const legend = document.createElement("div"); legend.className = "legend";
  series.forEach((ser, i) => {
    const c = COLORS[i % COLORS.length];
    add(s, "polyline", { points: ser.k.map((k, j) => `${X(k)},${Y(ser.recall[j])}`).join(" "), fill: "none", stroke: c, "stroke-width": 2 });
    ser.k.forEach((k, j) => add(s, "circle", { cx: X(k), cy: Y(ser.recall[j]), r: 2.5, fill: c }));
    const sp = document.createElement("span"); sp.style.color = c; sp.textContent = `\u25A0 ${ser.run}`; legend.appendChild(sp);
  });
  box.appendChild(legend);
  return box;
}

// ------------------------------------------------------------------ search page
async function initSearch(cfg) {
  const box = $("#models");
  cfg.models.forEach((m) => {
    const l = document.createElement("label"); l.style.flexDirection = "row"; l.style.display = "inline";
    l.innerHTML = `<input type="checkbox" class="model" value="${esc(m.name)}" checked> ${esc(m.name)} `;
    box.appendChild(l);
  });
  if (!cfg.models.length) showError("no model to search with: give a run dir with bundles, or --bundle / --hf");
  datasetControls(cfg, () => {});
  const chosen = () => [...document.querySelectorAll("input.model:checked")].map((x) => x.value);
  const common = () => ({ ds: $("#ds").value, split: $("#split").value, k: $("#k").value });

  async function run(kind) {
    showError("");
    const out = $("#results"); out.innerHTML = ""; $("#query-image").innerHTML = "";
    const c = common(), models = chosen();
    if (!models.length) { showError("choose at least one model"); return; }
    if (kind === "image") {
      const key = $("#image-key").value.trim();
      if (!key) { showError("image key: click an image in the results, or type a key"); return; }
      $("#query-image").innerHTML = `<div class="result"><img src="${imageUrl(c.ds, c.split, key)}" alt="${esc(key)}"><div>query image <b>${esc(key)}</b></div></div>`;
    }
    $("#status").textContent = "searching (the first search of a split under a model embeds it, then it is cached)...";
    const errors = [];
    for (const model of models) {
      const col = document.createElement("div"); col.className = "column"; col.dataset.model = model;
      col.innerHTML = `<h3>${esc(model)}</h3>`; out.appendChild(col);
      try {
        const r = kind === "text"
          ? await api("search", { ...c, model, q: $("#query").value })
          : await api("search_image", { ...c, model, key: $("#image-key").value.trim() });
        const info = document.createElement("div"); info.className = "meta";
        info.textContent = kind === "text" ? `${r.images} images, ${r.engine}, ${r.cached ? "cached embeddings" : "embedded now"}, ${r.seconds}s` : `${r.seconds}s`;
        col.appendChild(info);
        r.results.forEach((x) => col.appendChild(kind === "text" ? imageRow(c, x) : textRow(c, x)));
      } catch (e) { errors.push(`${model}: ${e.message}`); }
    }
    $("#status").textContent = "";
    if (errors.length) showError(errors.join("\n"));
  }

  function imageRow(c, x) {
    const d = document.createElement("div"); d.className = "result" + (x.own ? " own" : ""); d.dataset.key = x.key; d.dataset.rank = x.rank;
    d.innerHTML = `<img src="${imageUrl(c.ds, c.split, x.key)}" alt="${esc(x.key)}" title="search texts for this image"><div><b>#${x.rank}</b> ${esc(x.key)} <span class="score">${x.score}</span>${x.own ? " (its caption)" : ""}<div class="text">${x.captions.map(esc).join("<br>")}</div></div>`;
    d.querySelector("img").addEventListener("click", () => { $("#image-key").value = x.key; run("image"); });
    return d;
  }
  function textRow(c, x) {
    const d = document.createElement("div"); d.className = "result" + (x.own ? " own" : ""); d.dataset.key = x.key; d.dataset.rank = x.rank;
    d.innerHTML = `<img src="${imageUrl(c.ds, c.split, x.key)}" alt="${esc(x.key)}"><div><b>#${x.rank}</b> [${esc(x.kind)}] <span class="score">${x.score}</span><div class="text">${esc(x.text)}</div><span class="meta">${esc(x.key)}</span></div>`;
    return d;
  }
  $("#go").addEventListener("click", () => run("text"));
  $("#query").addEventListener("keydown", (e) => { if (e.key === "Enter") run("text"); });
  $("#go-image").addEventListener("click", () => run("image"));
  const p = new URLSearchParams(location.search);
  if (p.get("q")) { $("#query").value = p.get("q"); run("text"); }
}

// ------------------------------------------------------------------ corpus page
const THRESHOLD = 1.0; // docs/grounding.md: a sentence scoring below it is unsupported
function sentenceColor(score) {
  const t = Math.max(-1, Math.min(1, (score - THRESHOLD) / 2));
  return t >= 0 ? `rgba(44,160,44,${0.15 + 0.45 * t})` : `rgba(214,39,40,${0.15 + 0.45 * -t})`;
}

function denseBlock(d) {
  const v = d.error ? "error" : d.verdict;
  const div = document.createElement("div"); div.className = "dense" + (v === "keep" ? "" : " dropped"); div.dataset.verdict = v;
  let text;
  if (d.sentences.length) {
    text = d.sentences.map((s) => `<span class="sent${s.removed ? " removed" : ""}" style="background:${sentenceColor(s.score)}" title="grounding score ${s.score.toFixed(2)}, cosine ${s.similarity.toFixed(3)}${s.removed ? ", removed by repair" : ""}">${esc(s.text)}</span>`).join(" ");
  } else {
    text = esc(d.text || "");
  }
  const scores = Object.entries(d.scores).map(([k, x]) => `${esc(k)}=${Number(x).toFixed(3)}`).join(", ");
  div.innerHTML = `<div><span class="verdict">${v === "keep" ? "kept" : "dropped: " + esc(v)}</span> <span class="meta">source ${esc(d.source)}${d.model ? ", model " + esc(d.model) : ""}${d.prompt ? ", prompt \u201c" + esc(d.prompt) + "\u201d" : ""}${d.scorer ? ", scored by " + esc(d.scorer) : ""}</span></div>
    ${d.error ? `<div class="problem">error: ${esc(d.error)}</div>` : ""}
    <div class="text">${text}</div>
    <div class="scores">${scores}</div>`;
  return div;
}

async function initCorpus(cfg) {
  let page = 0;
  datasetControls(cfg, () => { page = 0; loadStats().then(load); }, ["shards"]);
  const filters = () => ({ ds: $("#ds").value, split: $("#split").value, verdict: $("#verdict").value, source: $("#source").value, score: $("#score").value, lo: $("#lo").value, hi: $("#hi").value, key: $("#key").value.trim() });

  async function load() {
    showError("");
    const out = $("#samples"); out.innerHTML = "";
    if (!$("#ds").value) { showError("no shard directory to browse"); return; }
    try {
      const f = filters();
      const r = await api("corpus", { ...f, page, size: 8 });
      $("#page-info").textContent = `${r.total} images match; page ${r.page + 1} of ${r.pages}`;
      r.samples.forEach((s) => out.appendChild(sampleCard(f, s)));
    } catch (e) { showError(e.message); }
  }

  function sampleCard(f, s) {
    const card = document.createElement("div"); card.className = "sample"; card.dataset.key = s.key;
    if (s.problem) { card.innerHTML = `<div class="problem">${esc(s.problem)}</div>`; return card; }
    card.innerHTML = `<img src="${imageUrl(f.ds, f.split, s.key)}" alt="${esc(s.key)}"><div class="body">
      <div><b>${esc(s.key)}</b> <span class="meta">id ${esc(s.id)}, ${esc(s.dataset)} / ${esc(s.split)}, shard ${esc(s.shard)}${s.path ? ", " + esc(s.path) : ""}</span></div>
      <div class="meta">sparse captions:</div><ul>${s.sparse.map((c) => `<li>${esc(c)}</li>`).join("")}</ul></div>`;
    const body = card.querySelector(".body");
    s.dense.forEach((d) => body.appendChild(denseBlock(d)));
    return card;
  }

  async function loadStats() {
    const charts = $("#charts"); charts.innerHTML = "";
    if (!$("#ds").value) return;
    try {
      const st = await api("corpus_stats", { ds: $("#ds").value, split: $("#split").value });
      const reasons = new Set(), sources = Object.keys(st.verdicts);
      sources.forEach((src) => {
        const v = st.verdicts[src]; Object.keys(v).forEach((r) => reasons.add(r));
        charts.appendChild(barChart(`captions by verdict: ${src}`, Object.keys(v), Object.values(v)));
      });
      const verdict = $("#verdict"), keepV = verdict.value;
      verdict.querySelectorAll("option.reason").forEach((o) => o.remove());
      [...reasons].filter((r) => r !== "keep").sort().forEach((r) => { const o = document.createElement("option"); o.value = r; o.textContent = r; o.className = "reason"; verdict.appendChild(o); });
      if (keepV) verdict.value = keepV;
      const src = $("#source"), keepS = src.value;
      src.querySelectorAll("option.src").forEach((o) => o.remove());
      sources.forEach((x) => { const o = document.createElement("option"); o.value = x; o.textContent = x; o.className = "src"; src.appendChild(o); });
      if (keepS) src.value = keepS;
      const sc = $("#score"), keepSc = sc.value;
      sc.querySelectorAll("option.sc").forEach((o) => o.remove());
      Object.keys(st.scores).forEach((x) => { const o = document.createElement("option"); o.value = x; o.textContent = x; o.className = "sc"; sc.appendChild(o); });
      if (keepSc) sc.value = keepSc;
      Object.entries(st.scores).forEach(([name, h]) => charts.appendChild(histChart(`score: ${name}`, h)));
      if (st.sentences) charts.appendChild(histChart("sentence grounding scores (red: below the threshold 1.0)", st.sentences, THRESHOLD));
      if (st.problems.length) showError(st.problems.map((x) => x.problem).join("\n"));
    } catch (e) { showError(e.message); }
  }

  const figs = $("#figures");
  cfg.reports.forEach((r) => r.figures.forEach((f) => {
    const b = chartBox(`${r.name}: ${f}`); const img = document.createElement("img");
    img.src = `/api/file?${qs({ root: r.root, path: f })}`; img.style.maxWidth = "460px"; b.appendChild(img); figs.appendChild(b);
  }));
  $("#apply").addEventListener("click", () => { page = 0; load(); });
  $("#key").addEventListener("keydown", (e) => { if (e.key === "Enter") { page = 0; load(); } });
  $("#prev").addEventListener("click", () => { if (page > 0) { page--; load(); } });
  $("#next").addEventListener("click", () => { page++; load(); });
  await loadStats();
  // filters from the address (after loadStats: the reasons, sources and scores are options by then)
  const p = new URLSearchParams(location.search);
  ["key", "verdict", "source", "score", "lo", "hi"].forEach((k) => { if (p.get(k)) $("#" + k).value = p.get(k); });
  await load();
}

// ------------------------------------------------------------------ runs page
// green where the reference does better: higher recall, lower (better) rank
const better = (key, d) => (d === 0 ? "" : (d > 0) !== /medr|meanr/.test(key) ? "pos" : "neg");
async function initRuns(cfg) {
  const ref = $("#reference");
  async function load() {
    showError("");
    const out = $("#benchmarks"); out.innerHTML = "";
    let r;
    try { r = await api("runs", { reference: ref.value }); } catch (e) { showError(e.message); return; }
    if (!ref.options.length) { fillSelect(ref, r.runs); ref.value = r.reference; }
    if (r.problems.length) showError(r.problems.join("\n"));
    if (!r.runs.length) { out.textContent = "no bench results: give a run dir with bench stages, or --results"; return; }
    Object.entries(r.benchmarks).forEach(([name, b]) => {
      const sec = document.createElement("section"); sec.dataset.benchmark = name;
      sec.innerHTML = `<h2>${esc(name)}</h2>`;
      const cols = r.columns;
      const table = (rows, first, signed) => `<table><tr><th>${first}</th>${signed ? "" : "<th>images</th><th>texts</th>"}${cols.map((c) => `<th>${esc(c.label)}</th>`).join("")}</tr>${rows.map((row) =>
        `<tr><td>${esc(row.run)}</td>${signed ? "" : `<td>${row.images}</td><td>${row.texts}</td>`}${cols.map((c) => signed
          ? `<td class="${better(c.key, row[c.key])}">${row[c.key] > 0 ? "+" : ""}${row[c.key].toFixed(2)}</td>`
          : `<td>${row[c.key].toFixed(2)}</td>`).join("")}</tr>`).join("")}</table>`;
      sec.innerHTML += table(b.rows, "run", false);
      if (b.differences.length) sec.innerHTML += `<h4>Paired differences (${esc(r.reference)} minus each run; recalls in points, ranks in places)</h4>` + table(b.differences, "difference", true);
      const charts = document.createElement("div"); charts.className = "charts";
      Object.entries(b.curves).forEach(([dir, series]) => charts.appendChild(lineChart(`${name}: ${dir === "i2t" ? "image \u2192 text" : "text \u2192 image"}`, series, "recall@K (%)")));
      sec.appendChild(charts);
      out.appendChild(sec);
    });
  }
  ref.addEventListener("change", load);
  await load();
}

// ------------------------------------------------------------------ start
(async () => {
  const page = document.body.dataset.page;
  const nav = $(`#nav-${page}`); if (nav) nav.className = "here";
  let cfg;
  try { cfg = await api("config"); } catch (e) { showError(e.message); return; }
  try {
    if (page === "search") await initSearch(cfg);
    else if (page === "corpus") await initCorpus(cfg);
    else if (page === "runs") await initRuns(cfg);
  } catch (e) { showError(e.message); }
  document.body.dataset.ready = "1";
})();
