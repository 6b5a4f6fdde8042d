// Agent Forge dashboard page: one status fetch, then the server-sent event stream keeps everything current.
// No build step; charts are uPlot (vendored, static/vendor/). Text from the server is set with textContent; the
// model card is HTML rendered server-side by markdown-it with raw HTML disabled.
"use strict";

const token = new URLSearchParams(location.hash.slice(1)).get("token");
const phases = {};            // number -> {info, status, el}
const points = {};            // "phase:chart" -> label -> Map(step -> value)
window.forgeCharts = {};      // "phase:chart" -> uPlot instance (the browser test reads its data)
const dirty = new Set();

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else if (key === "onclick") node.addEventListener("click", value);
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

async function api(path, options = {}) {
  const headers = {"Content-Type": "application/json"};
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(path, {...options, headers});
  const body = await response.json();
  if (!response.ok) throw Object.assign(new Error(body.error || response.statusText), {body});
  return body;
}

function fmt(value) {
  if (typeof value !== "number") return String(value);
  return Math.abs(value) >= 1000 || Number.isInteger(value) ? String(value) : value.toPrecision(4);
}

function table(rows, columns) {
  const head = el("tr", {}, ...columns.map((c) => el("th", {text: c})));
  const body = rows.map((row) => el("tr", {}, ...columns.map((c) => el("td", {text: fmt(row[c] ?? "")}))));
  return el("table", {}, el("thead", {}, head), el("tbody", {}, ...body));
}

// ---- timeline and phase sections
function buildPhase(number, info) {
  const section = el("section", {class: "phase", id: `phase-${number}`, "data-phase": number});
  const badge = el("span", {class: "badge status", "data-testid": `status-${number}`, text: "…"});
  const buttons = ["start", "pause", "resume", "stop"].map((action) =>
    el("button", {"data-action": action, onclick: () => control(number, action), text: action}));
  const progress = el("span", {class: "progress-text"});
  section.append(el("div", {class: "phase-head"}, el("h2", {text: `Phase ${number}: ${info.name}`}), badge,
    ...buttons, progress));
  const charts = el("div", {class: "charts"});
  info.charts.forEach(([title], index) => {
    const holder = el("div", {class: "chart", id: `chart-${number}-${index}`},
      el("h3", {text: title}), el("div", {class: "empty", text: "no data yet"}));
    charts.append(holder);
  });
  const view = el("div", {class: "view"});
  const models = el("div", {class: "models"});
  const textarea = el("textarea", {rows: 2, placeholder: '{"max_steps": 40}'});
  const error = el("div", {class: "error"});
  const configure = el("details", {class: "configure"}, el("summary", {text: "configure"}), textarea,
    el("button", {text: "apply", onclick: async () => {
      error.textContent = "";
      try {
        const result = await api(`/api/phases/${number}/configure`, {method: "POST", body: textarea.value || "{}"});
        error.className = "error";
        error.textContent = `kept: ${JSON.stringify(result.overrides)}`;
      } catch (e) { error.className = "error refused"; error.textContent = e.message; }
    }}), error);
  section.append(charts, view, models, configure);
  document.getElementById("phases").append(section);
  const step = el("div", {class: "step", id: `timeline-${number}`},
    el("div", {class: "title", text: `${number}. ${info.name}`}), el("span", {class: "badge status", text: "…"}),
    el("div", {class: "bar"}, el("div")));
  document.getElementById("timeline").append(step);
  phases[number] = {info, status: null, section, badge, progress, view, models, step};
}

async function control(number, action) {
  try { await api(`/api/phases/${number}/${action}`, {method: "POST", body: "{}"}); }
  catch (e) { addAlert({phase: number, data: {title: `${action} refused`, text: e.message, level: "error"}}); }
}

function setStatus(number, status, progress) {
  const phase = phases[number];
  phase.status = status;
  for (const badge of [phase.badge, phase.step.querySelector(".badge")]) {
    badge.textContent = status;
    badge.className = `badge status ${status}`;
  }
  const buttons = phase.section.querySelectorAll("button[data-action]");
  const allowed = {start: ["pending"], pause: ["running"], resume: ["paused", "stopped", "failed"],
                   stop: ["running", "pausing"]};
  buttons.forEach((b) => { b.disabled = !allowed[b.dataset.action].includes(status); });
  if (progress) setProgress(number, progress);
  if (status === "finished") phase.step.querySelector(".bar > div").style.width = "100%";
}

function setProgress(number, progress) {
  const phase = phases[number];
  const share = progress.max_steps ? progress.step / progress.max_steps : 0;
  phase.step.querySelector(".bar > div").style.width = `${Math.round(100 * share)}%`;
  phase.progress.textContent = `${progress.run_name ?? ""} step ${progress.step} / ${progress.max_steps}` +
    (progress.paused_at ? ` (paused: ${progress.paused_at})` : "");
}

// ---- charts
function addPoint(number, run, step, metrics) {
  phases[number].info.charts.forEach(([, names], index) => {
    for (const name of names) {
      if (!(name in metrics)) continue;
      const key = `${number}:${index}`;
      const label = names.length > 1 ? `${run} ${name}` : run;
      points[key] ??= {};
      points[key][label] ??= new Map();
      points[key][label].set(step, metrics[name]);
      dirty.add(key);
    }
  });
}

function drawCharts() {
  for (const key of dirty) {
    const [number, index] = key.split(":");
    const labels = Object.keys(points[key]).sort();
    const steps = [...new Set(labels.flatMap((l) => [...points[key][l].keys()]))].sort((a, b) => a - b);
    const data = [steps, ...labels.map((l) => steps.map((s) => points[key][l].get(s) ?? null))];
    const holder = document.getElementById(`chart-${number}-${index}`);
    let chart = window.forgeCharts[key];
    if (chart && chart.series.length - 1 === labels.length) { chart.setData(data); continue; }
    if (chart) chart.destroy();
    holder.querySelector(".empty")?.remove();
    const colors = ["#2f7de1", "#e1572f", "#2fa86b", "#8e44ad", "#c28e0e", "#555"];
    chart = new uPlot({width: 380, height: 200, scales: {x: {time: false}},
      series: [{label: "step"}, ...labels.map((l, i) => ({label: l, stroke: colors[i % colors.length],
        spanGaps: true, points: {show: steps.length < 40}}))]}, data, holder);
    window.forgeCharts[key] = chart;
  }
  dirty.clear();
}
setInterval(drawCharts, 400);

// ---- phase views (reports, models, cards)
function renderView(number, status) {
  const view = phases[number].view;
  view.replaceChildren();
  const reports = status.reports || {};
  const diversity = reports["phase1/diversity_report.json"];
  if (diversity && diversity.pairs) {
    view.append(el("h3", {text: `Diversity check (diverged: ${diversity.diverged})`}));
    const rows = Object.entries(diversity.pairs).map(([pair, v]) => ({pair, ...flatten(v)}));
    if (rows.length) view.append(table(rows, Object.keys(rows[0]).slice(0, 8)));
  }
  const evolution = reports["phase2/evolution.jsonl"];
  if (Array.isArray(evolution) && evolution.length) {
    const last = Math.max(...evolution.map((r) => r.generation));
    const rows = evolution.filter((r) => r.generation === last).sort((a, b) => b.fitness - a.fitness);
    view.append(el("h3", {text: `Population of generation ${last}`}),
      table(rows.map((r) => ({origin: r.origin, fitness: r.fitness, cached: r.cached})), ["origin", "fitness", "cached"]));
  }
  const theater = reports["phase3/anti_theater.json"];
  if (theater) view.append(el("h3", {text: "Anti-theater checks"}), el("pre", {text: JSON.stringify(theater, null, 1).slice(0, 2000)}));
  const curriculum = reports["phase5/curriculum_report.json"];
  if (curriculum && curriculum.success) {
    const rows = Object.entries(curriculum.success).map(([level, v]) => ({level, "pass@1 before": v.before,
      "pass@1 after": v.after ?? ""}));
    view.append(el("h3", {text: "Per-level success"}), table(rows, ["level", "pass@1 before", "pass@1 after"]));
  }
  const history = reports["phase6/ab_history.json"];
  const cycles = Array.isArray(history) ? history : history && (history.cycles || history.history);
  if (Array.isArray(cycles) && cycles.length) {
    const rows = cycles.map(flatten);
    view.append(el("h3", {text: "A/B history"}), table(rows, Object.keys(rows[0]).slice(0, 8)));
  }
  const bitnet = reports["phase4/bitnet_report.json"];
  if (bitnet && bitnet.layers) {
    view.append(el("h3", {text: "Layer-by-layer quantization"}),
      table(bitnet.layers.map(flatten), Object.keys(flatten(bitnet.layers[0])).slice(0, 7)));
  }
  const models = phases[number].models;
  models.replaceChildren();
  for (const model of status.models || []) {
    const card = el("div", {class: "card"});
    const details = el("details", {}, el("summary", {text: `model card: ${model.folder}`}), card);
    details.addEventListener("toggle", async () => {
      if (!details.open || card.childElementCount) return;
      const result = await api(`/api/phases/${number}/card?folder=${encodeURIComponent(model.folder)}`);
      card.innerHTML = result.html;  // rendered server-side with raw HTML disabled
    }, {once: false});
    const plots = el("div", {class: "plots"}, ...model.plots.map((src) => el("img", {src, alt: src, loading: "lazy"})));
    models.append(el("div", {class: "model", "data-folder": model.folder},
      el("h3", {text: `${model.folder}${model.wall_time_s ? ` (${model.wall_time_s.toFixed(0)} s)` : ""}`}), plots, details));
  }
}

function flatten(value, prefix = "", out = {}) {
  for (const [key, v] of Object.entries(value || {})) {
    if (v && typeof v === "object" && !Array.isArray(v)) flatten(v, `${prefix}${key}.`, out);
    else if (!Array.isArray(v)) out[`${prefix}${key}`] = v;
  }
  return out;
}

async function refreshPhase(number) {
  const status = await api(`/api/phases/${number}/status`);
  setStatus(number, status.status, status.progress);
  renderView(number, status);
}

function addAlert(event) {
  const list = document.getElementById("alerts");
  list.querySelector(".empty")?.remove();
  const d = event.data;
  list.prepend(el("li", {class: d.level || "warn"},
    `[phase ${event.phase ?? "-"}] ${d.run ? d.run + ": " : ""}${d.title}: ${d.text || ""}`));
}

// ---- start-up
async function main() {
  const status = await api("/api/pipeline/status");
  document.getElementById("run-dir").textContent = status.run_dir;
  for (const [number, info] of Object.entries(status.phases_info)) buildPhase(Number(number), info);
  if (status.pipeline_config) {
    const button = document.getElementById("run-pipeline");
    button.hidden = false;
    button.title = status.pipeline_config;
    button.addEventListener("click", async () => {
      try { await api("/api/pipeline/start", {method: "POST", body: "{}"}); }
      catch (e) { addAlert({phase: null, data: {title: "pipeline start refused", text: e.message, level: "error"}}); }
    });
  }
  if (status.report) {
    const link = document.getElementById("pipeline-report");
    Object.assign(link, {hidden: false, href: `/files/${status.report}`, target: "_blank"});
  }
  const stream = new EventSource(`/api/stream?since=${status.last_event_id}`);
  const connection = document.getElementById("connection");
  stream.onopen = () => { connection.textContent = "live"; connection.className = "badge live"; };
  stream.onerror = () => { connection.textContent = "reconnecting"; connection.className = "badge lost"; };
  stream.addEventListener("progress", (m) => { const e = JSON.parse(m.data); setProgress(e.phase, e.data); });
  stream.addEventListener("metric", (m) => {
    const e = JSON.parse(m.data);
    if (e.phase in phases) addPoint(e.phase, e.data.run, e.data.step, e.data.metrics);
  });
  stream.addEventListener("alert", (m) => addAlert(JSON.parse(m.data)));
  for (const kind of ["status", "complete"]) {
    stream.addEventListener(kind, (m) => { const e = JSON.parse(m.data); if (e.phase in phases) refreshPhase(e.phase); });
  }
  for (const number of Object.keys(phases)) {
    await refreshPhase(number);
    const history = await api(`/api/phases/${number}/metrics`);
    for (const [run, series] of Object.entries(history.runs)) {
      for (const [name, pairs] of Object.entries(series)) for (const [step, v] of pairs) addPoint(number, run, step, {[name]: v});
    }
  }
}

main();
