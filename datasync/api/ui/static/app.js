// datasync dashboard: polls /ui/data and redraws. No library, no network beyond this server.
// Every text from the server goes through textContent (error messages may hold anything).
"use strict";

const params = new URLSearchParams(location.search);
const REFRESH_MS = Math.max(200, Number(params.get("refresh")) || 2000);
const HISTORY_MS = 5 * 60 * 1000;
const COLORS = ["#2563eb", "#16a34a", "#d97706", "#9333ea", "#dc2626", "#0891b2", "#4b5563"];
const state = { placements: new Map(), history: [], explainId: null };

// The API token (ops or admin) lives in this tab's sessionStorage only: never in the URL.
const TOKEN_KEY = "datasync.token";

function authHeaders(extra = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { ...extra, authorization: `Bearer ${token}` } : extra;
}

function askForToken(message) {
  const form = document.getElementById("signin");
  document.getElementById("signin-note").textContent = message;
  form.hidden = false;
  document.querySelector("main").hidden = true;
}

document.getElementById("signin").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const input = document.getElementById("token");
  sessionStorage.setItem(TOKEN_KEY, input.value.trim());
  input.value = "";
  document.getElementById("signin").hidden = true;
  document.querySelector("main").hidden = false;
});

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  }
  return node;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  n = Number(n) || 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  const s = Math.round(Math.abs(seconds));
  const text = s >= 3600 ? `${Math.floor(s / 3600)}h${String(Math.floor(s % 3600 / 60)).padStart(2, "0")}m`
    : s >= 60 ? `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s` : `${s}s`;
  return seconds < 0 ? `-${text}` : text;
}

function when(iso) {
  if (!iso) return "-";
  const d = new Date(iso);
  return isNaN(d) ? String(iso) : d.toLocaleString();
}

// -- placements ---------------------------------------------------------------------------

function progress(p) {
  const planning = p.state === "PLANNING" && !p.bytes_total;
  const pct = planning ? 0 : p.bytes_total ? Math.min(100, 100 * p.bytes_done / p.bytes_total) : 100;
  const label = planning ? "planning…"
    : `${pct.toFixed(0)}%  ${p.files_done.toLocaleString()}/${p.files_total.toLocaleString()} files, ${bytes(p.bytes_done)}/${bytes(p.bytes_total)}`;
  const fill = el("div");
  fill.style.width = `${pct}%`;
  return el("div", { class: `bar ${p.state}`, "data-pct": pct.toFixed(2), title: label }, fill, el("span", {}, label));
}

function deadline(p) {
  if (!p.deadline) return el("span", { class: "muted" }, "-");
  const left = (new Date(p.deadline) - Date.now()) / 1000;
  const text = `${when(p.deadline)} (${left >= 0 ? "in " + duration(left) : duration(-left) + " ago"})`;
  return el("span", { class: p.at_risk ? "risk" : "" }, p.at_risk ? `AT RISK: ${text}` : text);
}

function note(p) {
  if (p.error) return el("div", { class: "error", "data-role": "reason" }, p.error);
  const parts = [el("div", { class: "note" }, p.phase)];
  if (p.last_errors && p.last_errors.length) {
    const e = p.last_errors[0];
    parts.push(el("div", { class: "error small" }, `last error: ${e.class}: ${e.message}`));
  }
  return el("div", {}, ...parts);
}

function renderPlacements(rows) {
  const body = document.querySelector("#placements tbody");
  body.replaceChildren(...rows.map((p) => {
    const tr = el("tr", { class: "placement", "data-placement-id": p.id, "data-state": p.state },
      el("td", {}, p.id),
      el("td", {}, `${p.dataset}@${p.version_id.slice(0, 12)}`),
      el("td", {}, p.site),
      el("td", {}, el("span", { class: `state ${p.state}` }, p.state)),
      el("td", {}, progress(p)),
      el("td", {}, p.state === "READY" || p.state === "FAILED" ? "-" : `${bytes(p.throughput_bytes_per_second)}/s`),
      el("td", {}, duration(p.eta_seconds)),
      el("td", {}, deadline(p)),
      el("td", {}, note(p)));
    tr.addEventListener("click", () => openExplain(p.id));
    return tr;
  }));
  document.getElementById("no-placements").hidden = rows.length > 0;
}

// -- throughput chart ---------------------------------------------------------------------

// Rates over a sliding window: counters move when a task completes, so rates between two
// polls alone would be spikes and zeros.
const RATE_WINDOW_MS = 10_000;

function recordLinks(now, links) {
  const totals = new Map(links.map((l) => [`${l.src} → ${l.dst}`, l.bytes]));
  const base = state.history.find((h) => now - h.t <= RATE_WINDOW_MS) ?? state.history[state.history.length - 1];
  const rates = new Map();
  for (const [link, total] of totals) {
    const before = base ? base.totals.get(link) ?? 0 : total;
    const dt = base ? (now - base.t) / 1000 : 0;
    rates.set(link, dt > 0 ? Math.max(0, total - before) / dt : 0);
  }
  state.history.push({ t: now, totals, rates });
  while (state.history.length && now - state.history[0].t > HISTORY_MS) state.history.shift();
}

function renderChart() {
  const svg = document.getElementById("chart");
  const ns = "http://www.w3.org/2000/svg";
  const W = 600, H = 220, now = Date.now();
  // The time axis spans what the page has seen: at least a minute, at most HISTORY_MS.
  const span = Math.min(HISTORY_MS, Math.max(60_000, state.history.length ? now - state.history[0].t : 0));
  const links = [...new Set(state.history.flatMap((h) => [...h.rates.keys()]))].sort();
  const peak = Math.max(1024, ...state.history.flatMap((h) => [...h.rates.values()]));
  const nodes = [];
  for (let i = 1; i <= 3; i++) {
    const y = H - (H - 20) * i / 3;
    const line = document.createElementNS(ns, "line");
    Object.entries({ x1: 0, x2: W, y1: y, y2: y, stroke: "#e5e7eb" }).forEach(([k, v]) => line.setAttribute(k, v));
    const label = document.createElementNS(ns, "text");
    Object.entries({ x: 4, y: y - 3, "font-size": 10, fill: "#6b7280" }).forEach(([k, v]) => label.setAttribute(k, v));
    label.textContent = `${bytes(peak * i / 3)}/s`;
    nodes.push(line, label);
  }
  const legend = [];
  links.forEach((link, i) => {
    const color = COLORS[i % COLORS.length];
    const points = state.history.filter((h) => h.rates.has(link)).map((h) => {
      const x = W - (now - h.t) / span * W;
      const y = H - (H - 20) * h.rates.get(link) / peak;
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    });
    const path = document.createElementNS(ns, "polyline");
    Object.entries({ points: points.join(" "), fill: "none", stroke: color, "stroke-width": 2 })
      .forEach(([k, v]) => path.setAttribute(k, v));
    path.setAttribute("data-link", link);
    nodes.push(path);
    const last = state.history[state.history.length - 1].rates.get(link) || 0;
    const swatch = el("i");
    swatch.style.background = color;
    legend.push(el("li", { "data-link": link }, swatch, `${link}: ${bytes(last)}/s`));
  });
  svg.replaceChildren(...nodes);
  document.getElementById("legend").replaceChildren(...(legend.length ? legend : [el("li", { class: "muted" }, "nothing moved yet")]));
}

// -- queue, workers, errors ---------------------------------------------------------------

function renderQueue(queue, oldest) {
  const names = { waiting: "waiting for a worker", backoff: "backing off after errors", blocked: "waiting for other tasks",
    running: "running", orphaned: "held by a worker that stopped" };
  const rows = [];
  for (const [key, label] of Object.entries(names)) {
    rows.push(el("dt", {}, label), el("dd", { "data-queue": key }, queue[key] ?? 0));
  }
  document.getElementById("queue").replaceChildren(...rows);
  document.getElementById("oldest").textContent = oldest > 0 ? `oldest waiting task: ${duration(oldest)}` : "";
}

function renderWorkers(workers) {
  const chip = document.getElementById("workers");
  chip.textContent = `workers: ${workers.live} live` + (workers.stale ? `, ${workers.stale} stale` : "");
  chip.className = workers.live ? "chip" : "chip bad";
}

function renderErrors(errors) {
  const body = document.querySelector("#errors tbody");
  body.replaceChildren(...errors.map((e) => el("tr", {},
    el("td", {}, when(e.at)),
    el("td", {}, `#${e.placement} ${e.ref} → ${e.site}`),
    el("td", {}, e.task ? `${e.kind} ${e.task}` : "-"),
    el("td", { class: "error" }, e.class ? `${e.class}: ${e.message}` : e.message))));
  document.getElementById("no-errors").hidden = errors.length > 0;
}

// -- explain ------------------------------------------------------------------------------

function valueNode(value) {
  if (value === null || value === undefined || value === "") return el("span", { class: "muted" }, "-");
  if (Array.isArray(value)) {
    if (!value.length) return el("span", { class: "muted" }, "none");
    if (value.every((v) => v && typeof v === "object" && !Array.isArray(v))) {
      const keys = [...new Set(value.flatMap(Object.keys))];
      return el("table", {}, el("thead", {}, el("tr", {}, ...keys.map((k) => el("th", {}, k)))),
        el("tbody", {}, ...value.map((row) => el("tr", {}, ...keys.map((k) => el("td", {}, valueNode(row[k])))))));
    }
    return el("ul", {}, ...value.map((v) => el("li", {}, valueNode(v))));
  }
  if (typeof value === "object") {
    return el("dl", {}, ...Object.entries(value).flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, valueNode(v))]));
  }
  return document.createTextNode(String(value));
}

async function openExplain(id) {
  state.explainId = id;
  const panel = document.getElementById("explain");
  panel.hidden = false;
  document.getElementById("explain-title").textContent = `Placement #${id}`;
  const body = document.getElementById("explain-body");
  const noteEl = document.getElementById("explain-note");
  let doc = null;
  try {
    const r = await fetch(`/api/v1/placements/${id}/explain`, { headers: authHeaders({ accept: "application/json" }) });
    if (r.ok) doc = await r.json();
  } catch (_) { /* offline: fall back below */ }
  if (state.explainId !== id) return;
  if (doc) {
    noteEl.textContent = "";
    const { summary, ...rest } = doc;
    body.replaceChildren(el("p", { class: "summary", "data-role": "summary" }, summary ?? ""), valueNode(rest));
    return;
  }
  const p = state.placements.get(id);
  noteEl.textContent = "This server has no explain endpoint for it; showing the placement's status.";
  if (!p) { body.replaceChildren(el("p", {}, "unknown placement")); return; }
  body.replaceChildren(
    el("p", { class: "summary", "data-role": "summary" }, p.error || p.phase),
    valueNode({ state: p.state, ref: `${p.dataset}@${p.version_id}`, site: p.site, priority: p.priority,
      deadline: p.deadline, at_risk: p.at_risk, tasks: p.tasks, bytes_moved: p.bytes_moved,
      error: p.error, last_errors: p.last_errors }));
}

document.getElementById("explain-close").addEventListener("click", () => {
  state.explainId = null;
  document.getElementById("explain").hidden = true;
});

// -- the loop -----------------------------------------------------------------------------

async function refresh() {
  const updated = document.getElementById("updated");
  try {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), Math.max(5000, REFRESH_MS * 2));
    const r = await fetch("/ui/data", { signal: ctl.signal, headers: authHeaders() });
    clearTimeout(timer);
    if (r.status === 401 || r.status === 403) {
      const why = (await r.json().catch(() => ({}))).error || `HTTP ${r.status}`;
      askForToken(`Sign in with an ops or admin API token (${why}).`);
      updated.textContent = "signed out";
      return;
    }
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const data = await r.json();
    state.placements = new Map(data.placements.map((p) => [p.id, p]));
    renderPlacements(data.placements);
    recordLinks(Date.now(), data.links);
    renderChart();
    renderQueue(data.queue, data.oldest_waiting_seconds);
    renderWorkers(data.workers);
    renderErrors(data.errors);
    updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.refreshes = String(Number(document.body.dataset.refreshes || 0) + 1);
  } catch (err) {
    updated.textContent = `server not answering (${err.message}); retrying`;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
