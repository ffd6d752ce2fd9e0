// The UGRO dashboard: one page, plain DOM, uPlot for curves.
//
// Everything shown that came from the cluster (job names, log lines, metric names,
// reasons) is put into the page as text (textContent / text nodes), never as HTML.
// Data arrives from ugrod through `ugroctl dashboard` (same origin, /api/...):
// events live over server-sent events; GPU samples and training metrics, which
// are not events, are polled no faster than every 5 s while the page is visible.

const POLL_MS = 5000;
const REFRESH_MIN_MS = 700;     // coalesce bursts of events into one refetch
const MAX_EVENTS = 500;
const MAX_LOG_LINES = 5000;
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const WAITING = new Set(["queued", "retrying"]);

const S = {
  seq: 0, loadedSeq: 0, nodes: [], jobs: new Map(), queue: [], events: [], sweeps: new Map(),
  view: "cluster", jobId: null, filters: { user: "", state: "", sweep: "", text: "" },
  compare: new Set(), live: false,
};

// ---- DOM helpers ------------------------------------------------------------------------

/** h("tag#id.cls", {attr}, children...): an element; strings become text nodes, never HTML. */
function h(spec, attrs, ...kids) {
  const [head, ...classes] = spec.split(".");
  const [tag, id] = head.split("#");
  const el = document.createElement(tag || "div");
  if (id) el.id = id;
  if (classes.length) el.className = classes.join(" ");
  if (attrs) {
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else if (k === "dataset") Object.assign(el.dataset, v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}
const $ = (sel) => document.querySelector(sel);
const jobHref = (id) => "#/job/" + encodeURIComponent(id);
const seg = (s) => encodeURIComponent(s);

function fmtBytes(b) {
  if (b === null || b === undefined) return "–";
  const gib = b / 2 ** 30;
  return gib >= 1 ? `${gib.toFixed(gib >= 10 ? 0 : 1)} GiB` : `${Math.round(b / 2 ** 20)} MiB`;
}
function fmtNum(v, digits = 4) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return String(v);
  return Math.abs(v) >= 1000 ? v.toFixed(0) : Number(v.toPrecision(digits)).toString();
}
function fmtDur(s) {
  if (s === null || s === undefined || s < 0) return "–";
  s = Math.round(s);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  const hh = Math.floor(s / 3600);
  return hh < 48 ? `${hh}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`
    : `${Math.floor(hh / 24)}d${hh % 24}h`;
}
const ts = (iso) => (iso ? Date.parse(iso) / 1000 : null);
const now = () => Date.now() / 1000;
function fmtTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return d.toLocaleTimeString([], { hour12: false }) +
    (Date.now() - d > 86400e3 ? " " + d.toLocaleDateString() : "");
}
function elapsed(j) {
  const start = ts(j.running_at || j.started_at);
  if (!start) return null;
  return (ts(j.ended_at) || now()) - start;
}
/** A word as a POSIX shell would need it (Python's shlex.quote), for copying. */
const shellQuote = (a) => (/^[\w@%+=:,./-]+$/.test(a) ? a : "'" + String(a).replace(/'/g, "'\"'\"'") + "'");
const sweepOf = (j) => j.sweep ?? (j.spec || {}).sweep ?? null;
const badge = (state, extra) => h("span.badge.s-" + String(state).replace(/[^a-z]/g, ""),
  null, extra || state);

// ---- API ---------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, { method = "GET", body, signal } = {}) {
  const resp = await fetch("/api" + path, {
    method, signal, credentials: "same-origin", cache: "no-store",
    headers: { "X-Ugro-Dashboard": "1", ...(body ? { "Content-Type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  let doc = null;
  try { doc = await resp.json(); } catch { doc = null; }
  if (!resp.ok) {
    throw new ApiError(resp.status, (doc && doc.error) || `HTTP ${resp.status}`);
  }
  return doc;
}

// ---- loading and live updates --------------------------------------------------------------

async function loadAll() {
  const [ping, nodes, overview] = await Promise.all([
    api("/v1/ping"), api("/v1/nodes"), api("/v1/overview")]);
  S.seq = Math.max(S.seq, ping.seq);
  S.loadedSeq = ping.seq;
  S.nodes = nodes.nodes;
  setJobs(overview.jobs);
  S.queue = overview.queue;
  return ping;
}

function setJobs(list) {
  const fresh = new Map();
  for (const j of list) fresh.set(j.id, j);
  // jobs seen live but older than the server's "recent" window stay known
  for (const [id, j] of S.jobs) if (!fresh.has(id) && S.compare.has(id)) fresh.set(id, j);
  S.jobs = fresh;
}

let refreshTimer = null, lastRefresh = 0, refreshing = false, refreshAgain = false;
const dirty = new Set();

/** Refetch what events changed: at once, or coalesced when events come in bursts. */
function scheduleRefresh(what) {
  for (const w of what) dirty.add(w);
  if (refreshTimer) return;
  const wait = Math.max(0, lastRefresh + REFRESH_MIN_MS - performance.now());
  refreshTimer = setTimeout(runRefresh, wait);
}

async function runRefresh() {
  refreshTimer = null;
  if (refreshing) { refreshAgain = true; return; }
  refreshing = true;
  lastRefresh = performance.now();
  const what = new Set(dirty);
  dirty.clear();
  // queue-only changes (priority, hold, release) matter to the lists, not the map
  if (what.has("queue") && S.view !== "cluster" && S.view !== "events") what.add("jobs");
  if (what.has("queue") && !what.has("jobs")) S.queueStale = true;
  if (what.has("jobs")) S.queueStale = false;
  try {
    // the lists in their short form and the queue, in one answer (/v1/overview)
    const overview = what.has("jobs") ? api("/v1/overview") : null;
    const nodes = what.has("nodes") ? api("/v1/nodes") : null;
    if (overview) { const o = await overview; setJobs(o.jobs); S.queue = o.queue; }
    if (nodes) S.nodes = (await nodes).nodes;
    renderCurrent(what);
  } catch (e) {
    showLive(false, e.message);
  } finally {
    refreshing = false;
    if (refreshAgain) { refreshAgain = false; scheduleRefresh([]); }
  }
}

let source = null;
function connectEvents() {
  // the last 200 events before the page loaded, then live (EventSource resumes from
  // the last id it saw after a reconnect)
  source = new EventSource("/api/stream?after=" + Math.max(0, S.seq - 200));
  source.onopen = () => showLive(true);
  source.onerror = () => showLive(false, "reconnecting…");
  source.onmessage = (m) => {
    let rec;
    try { rec = JSON.parse(m.data); } catch { return; }
    onEvent(rec);
  };
}

function onEvent(rec) {
  if (S.events.length && rec.seq <= S.events[0].seq) return;  // seen (a reconnect)
  S.seq = Math.max(S.seq, rec.seq);
  S.events.unshift(rec);
  if (S.events.length > MAX_EVENTS) S.events.length = MAX_EVENTS;
  if (rec.seq <= S.loadedSeq) {  // history from before the page loaded: listed only
    if (S.view === "events") scheduleEventsRender();
    return;
  }
  const d = rec.data || {};
  const type = String(rec.type || "");
  if (type === "job_submitted" && d.job && !S.jobs.has(d.job)) {
    // shown at once; the refetch below fills in the rest
    S.jobs.set(d.job, {
      id: d.job, name: d.job, state: d.held ? "queued" : "queued", owner: rec.actor?.user,
      held: !!d.held, nodes: [], gpus: [], metrics: {}, submitted_at: rec.ts,
      sweep: (d.spec || {}).sweep || null, priority: d.priority || 0,
    });
  }
  const what = [];
  if (type.startsWith("node_")) what.push("nodes");
  if (/^job_(priority_set|held|released|waiting)$/.test(type)) what.push("queue");
  else if (type.startsWith("job_") || type.startsWith("rank_") || type.startsWith("checkpoint")
      || type.startsWith("sweep_")) what.push("jobs");
  if (/^job_(placed|running|ended|stopping)|^rank_/.test(type)) what.push("nodes");
  if (S.view === "job" && (d.job === J.id || (d.jobs || []).includes(J.id))) what.push("job");
  if (S.view === "events") prependEvent(rec);
  if (type === "job_submitted") renderCurrent(new Set(["jobs"]));
  else renderTotals();
  if (what.length) scheduleRefresh(what);
}

/** One new row at the top of the event list (the list is not redrawn per event). */
function prependEvent(rec) {
  const body = $("table.events tbody");
  if (!body) { scheduleEventsRender(); return; }
  if (body.firstElementChild && !body.firstElementChild.dataset.seq) body.replaceChildren();
  body.prepend(eventRow(rec));
  while (body.childElementCount > MAX_EVENTS) body.lastElementChild.remove();
}

let eventsRenderTimer = null;
function scheduleEventsRender() {
  if (!eventsRenderTimer) eventsRenderTimer = setTimeout(() => { eventsRenderTimer = null; renderCurrent(new Set(["events"])); }, 50);
}

function showLive(ok, why) {
  S.live = ok;
  const el = $("#live");
  el.textContent = ok ? "live" : (why || "offline");
  el.className = "live " + (ok ? "ok" : "bad");
}

// polling of what is not an event (GPU samples, training progress), only while visible
function poll() {
  if (document.visibilityState !== "visible") return;
  const what = ["nodes"];
  if (S.view === "jobs" && [...S.jobs.values()].some((j) => j.state === "running")) {
    what.push("jobs");
  }
  scheduleRefresh(what);
  if (S.view === "job") pollJob();
}

// ---- rendering --------------------------------------------------------------------------

function renderCurrent(what) {
  renderTotals();
  const v = S.view;
  if (v === "cluster" && (what.has("nodes") || what.has("jobs"))) renderCluster();
  else if (v === "jobs" && what.has("jobs")) {
    // the filters stay as they are (a refresh must not take the focus from them)
    if ($("#job-tables")) renderJobsTables(); else renderJobs();
  }
  else if (v === "job" && (what.has("job") || what.has("jobs"))) renderJob(what.has("job"));
  else if (v === "sweeps" && what.has("jobs")) renderSweeps();
  else if (v === "events" && (what.has("events") || what.has("nodes") || what.has("jobs"))) {
    renderEvents(what.has("events"));
  }
}

function renderTotals() {
  let total = 0, busy = 0;
  for (const n of S.nodes) {
    const usable = !n.drained && (n.state === "healthy" || n.state === "degraded");
    for (const g of n.gpus) {
      if (usable) total += 1;
    }
  }
  const used = new Set();
  for (const j of S.jobs.values()) {
    if (j.state === "running" || j.state === "starting") {
      for (const p of j.gpus || []) for (const g of p.gpus) used.add(`${p.node}/${g}`);
    }
  }
  busy = used.size;
  const all = S.nodes.reduce((a, n) => a + n.gpus.length, 0);
  const running = [...S.jobs.values()].filter((j) => j.state === "running").length;
  const waiting = [...S.jobs.values()].filter((j) => WAITING.has(j.state));
  const oldest = waiting.reduce((m, j) => Math.min(m, ts(j.submitted_at) || Infinity), Infinity);
  const up = S.nodes.filter((n) => n.state !== "unreachable").length;
  const t = $("#totals");
  t.replaceChildren(
    h("span", { id: "total-gpus" }, h("b", null, `${Math.max(0, total - busy)}/${all}`), " GPUs free"),
    h("span", null, h("b", null, `${up}/${S.nodes.length}`), " nodes up"),
    h("span", null, h("b", null, String(running)), " running"),
    h("span", { id: "total-queue" }, h("b", null, String(waiting.length)), " queued"),
    h("span", null, "oldest wait ", h("b", null, Number.isFinite(oldest) ? fmtDur(now() - oldest) : "–")),
  );
}

/** Which job and rank hold each GPU: "node/index" -> [{job, rank}]. */
function gpuOwners() {
  const out = new Map();
  for (const j of S.jobs.values()) {
    if (TERMINAL.has(j.state) || WAITING.has(j.state)) continue;
    for (const p of j.gpus || []) {
      for (const g of p.gpus) {
        const k = `${p.node}/${g}`;
        if (!out.has(k)) out.set(k, []);
        out.get(k).push({ job: j.id, rank: p.rank });
      }
    }
  }
  return out;
}

function bar(pct, label) {
  const v = Math.max(0, Math.min(100, pct || 0));
  const el = h("div.bar", { title: label }, h("div.fill"), h("span", null, label));
  el.firstChild.style.width = v + "%";
  el.firstChild.classList.toggle("hot", v >= 90);
  return el;
}

function renderCluster() {
  const owners = gpuOwners();
  const root = $("#view-cluster");
  const cards = S.nodes.map((n) => {
    const sample = n.sample || {};
    const readings = new Map((sample.gpus || []).map((g) => [g.index, g]));
    const marks = [];
    if (n.drained) marks.push(h("div.mark.warn", null, "drained: ", n.drain_reason || "no reason given"));
    if (n.state === "unreachable" || n.health === "unreachable") {
      marks.push(h("div.mark.bad", null, "unreachable: ", n.health_reason || ""));
    } else if (n.health !== "healthy" && n.health_reason) {
      marks.push(h("div.mark.warn", null, n.health_reason));
    }
    if (n.inventory_mismatch) marks.push(h("div.mark.warn", null, "inventory: ", n.inventory_mismatch));
    for (const a of n.alerts || []) marks.push(h("div.mark." + (a.severity === "critical" ? "bad" : "warn"), null, a.alert, ": ", a.message));
    const gpus = n.gpus.map((g) => {
      const r = readings.get(g.index) || {};
      const who = owners.get(`${n.name}/${g.index}`) || [];
      const memPct = r.memory_total_bytes ? (100 * r.memory_used_bytes) / r.memory_total_bytes : 0;
      return h("div.gpu", { dataset: { gpu: `${n.name}/${g.index}` } },
        h("div.gpu-head", null, h("b", null, `GPU ${g.index}`), " ", g.model, " · ", fmtBytes(g.vram_bytes)),
        h("div.gpu-stats", null,
          bar(r.util_percent, `util ${r.util_percent ?? "–"}%`),
          bar(memPct, `mem ${fmtBytes(r.memory_used_bytes)}/${fmtBytes(r.memory_total_bytes ?? g.vram_bytes)}`),
          h("span.temp" + ((r.temperature_c || 0) >= 85 ? ".hot" : ""), null,
            r.temperature_c !== undefined && r.temperature_c !== null ? `${Math.round(r.temperature_c)}°C` : "–°C")),
        h("div.gpu-job", null, who.length
          ? who.map((w) => h("a.job-chip", { href: jobHref(w.job) }, w.job, ` · rank ${w.rank}`))
          : h("span.idle", null, "idle")));
    });
    return h("article.node.n-" + n.state, { dataset: { node: n.name } },
      h("div.node-head", null, h("b.node-name", null, n.name), " ", h("span.muted", null, n.host),
        " ", badge(n.drained ? "drained" : n.state),
        h("span.score", { title: "health score" }, n.score === null ? "" : `score ${Math.round(n.score)}`)),
      marks, gpus.length ? gpus : h("div.muted", null, "no GPUs (CPU jobs only)"));
  });
  root.replaceChildren(h("h2", null, "Cluster"), h("div.nodes", null, cards));
}

function jobMatches(j) {
  const f = S.filters;
  if (f.user && j.owner !== f.user) return false;
  if (f.state && j.state !== f.state) return false;
  if (f.sweep && sweepOf(j) !== f.sweep) return false;
  if (f.text && !j.id.toLowerCase().includes(f.text.toLowerCase())) return false;
  return true;
}

function select(id, label, options, value, onchange) {
  return h("label", null, label + " ",
    h("select", { id, onchange: (e) => onchange(e.target.value) },
      h("option", { value: "" }, "all"),
      options.map((o) => h("option", { value: o, selected: o === value }, o))));
}

function jobRow(j, extra) {
  const m = j.metrics || {};
  const gpus = (j.gpus || []).reduce((a, p) => a + p.gpus.length, 0);
  return h("tr", { dataset: { job: j.id } },
    h("td", null, h("input", {
      type: "checkbox", title: "compare curves", checked: S.compare.has(j.id),
      onchange: (e) => { e.target.checked ? S.compare.add(j.id) : S.compare.delete(j.id); renderCompareBar(); },
    })),
    h("td", null, h("a", { href: jobHref(j.id) }, j.id)),
    h("td", null, badge(j.state, j.held ? `${j.state} (held)` : j.state)),
    h("td", null, j.owner || ""),
    h("td", null, (j.nodes || []).join(", ") || "–", gpus ? ` · ${gpus} GPU` : ""),
    h("td.num", null, fmtNum(m.step)),
    h("td.num", null, fmtNum(m.loss)),
    h("td.num", null, fmtDur(elapsed(j))),
    extra);
}

function table(cls, head, rows, empty) {
  return h("table." + cls, null, h("thead", null, h("tr", null, head.map((c) => h("th", null, c)))),
    h("tbody", null, rows.length ? rows : h("tr", null, h("td.muted", { colspan: head.length }, empty))));
}

function renderCompareBar() {
  const bar = $("#compare-bar");
  if (!bar) return;
  const ids = [...S.compare];
  bar.replaceChildren(ids.length
    ? h("span", null, `compare ${ids.length}: `, h("a", { href: jobHref(ids[0]) + "?compare=" + ids.map(seg).join(",") }, "open curves"),
      " ", h("button", { type: "button", onclick: () => { S.compare.clear(); renderJobs(); } }, "clear"))
    : h("span.muted", null, "tick jobs to overlay their curves"));
}

function renderJobs() {
  const root = $("#view-jobs");
  const jobs = [...S.jobs.values()];
  const users = [...new Set(jobs.map((j) => j.owner).filter(Boolean))].sort();
  const sweeps = [...new Set(jobs.map(sweepOf).filter(Boolean))].sort();
  const states = ["queued", "retrying", "starting", "running", "succeeded", "failed", "cancelled"];
  const f = S.filters;
  const set = (k) => (v) => { f[k] = v; renderJobs(); };
  const text = h("input", { id: "filter-text", type: "search", placeholder: "name contains", value: f.text });
  text.addEventListener("input", (e) => { f.text = e.target.value; renderJobsTables(); });
  root.replaceChildren(
    h("h2", null, "Jobs"),
    h("div.filters", null, select("filter-user", "user", users, f.user, set("user")),
      select("filter-state", "state", states, f.state, set("state")),
      select("filter-sweep", "sweep", sweeps, f.sweep, set("sweep")), text),
    h("div#compare-bar.compare"),
    h("div#job-tables"));
  renderCompareBar();
  renderJobsTables();
}

const ROWS_SHOWN = 200;  // per table until "show all": a long queue stays quick to draw
const showAll = new Set();

/** The first ROWS_SHOWN items as rows (built only for those), then a "show all" row. */
function limitedRows(key, items, toRow, width) {
  const rows = (showAll.has(key) ? items : items.slice(0, ROWS_SHOWN)).map(toRow);
  if (items.length > rows.length) {
    rows.push(h("tr.more", null, h("td", { colspan: width }, h("button", {
      type: "button", onclick: () => { showAll.add(key); renderJobsTables(); },
    }, `show all ${items.length}`))));
  }
  return rows;
}

function renderJobsTables() {
  const head = ["", "job", "state", "user", "nodes", "step", "loss", "elapsed"];
  const jobs = [...S.jobs.values()];
  const run = jobs.filter((j) => !TERMINAL.has(j.state) && !WAITING.has(j.state) && jobMatches(j));
  const rec = jobs.filter((j) => TERMINAL.has(j.state) && jobMatches(j))
    .sort((a, b) => (ts(b.ended_at) || 0) - (ts(a.ended_at) || 0));
  const queuedIds = new Set(S.queue.map((q) => q.job.id));
  const queued = S.queue.filter((q) => {
    const j = S.jobs.get(q.job.id) || q.job;
    return WAITING.has(j.state) && jobMatches(j);
  });
  // jobs seen live that the last queue answer did not have yet
  const pending = jobs.filter((j) => WAITING.has(j.state) && !queuedIds.has(j.id) && jobMatches(j))
    .map((j) => ({ position: "…", job: j, reason: j.waiting_reason || "just submitted", estimated_start: null }));
  const queueRow = (q) => jobRow(S.jobs.get(q.job.id) || q.job, [h("td.num", null, String(q.position)),
    h("td.reason", null, q.reason), h("td", null, q.estimated_start ? fmtTime(q.estimated_start) : "–")]);
  const all = queued.concat(pending);
  $("#job-tables").replaceChildren(
    h("h3", null, `Running (${run.length})`),
    h("div.scroll", null, table("jobs.running", head,
      limitedRows("running", run, (j) => jobRow(j), head.length), "nothing running")),
    h("h3", null, `Queued (${all.length})`),
    h("div.scroll", null, table("jobs.queued", [...head, "#", "waiting because", "est. start"],
      limitedRows("queued", all, queueRow, head.length + 3), "queue empty")),
    h("h3", null, `Recent (${rec.length})`),
    h("div.scroll", null, table("jobs.recent", [...head, "reason"],
      limitedRows("recent", rec, (j) => jobRow(j, h("td.reason", null, j.reason || "")), head.length + 1),
      "none yet")));
}

// ---- one job ----------------------------------------------------------------------------

const J = { id: null, detail: null, why: [], results: null, series: new Map(), logAbort: null,
  rank: 0, follow: true, metricSel: null, compare: [], chart: null, tchart: null, lastPoll: 0 };

function openJob(id, compare) {
  if (J.id !== id || String(J.compare) !== String(compare)) {
    stopLogs();
    Object.assign(J, { id, detail: S.jobs.get(id) || null, why: [], results: null,
      series: new Map(), rank: 0, follow: true, metricSel: null, compare, lastPoll: 0 });
    destroyCharts();
    buildJobView();
    loadJob(true);
  } else {
    renderJob(true);
  }
}

async function loadJob(first) {
  const id = J.id;
  try {
    // curves and logs do not wait for the rest; results (which reads every metric
    // line to sum it up) waits for the curves, so that the two do not compete
    const curves = first ? (startLogs(), loadSeries()) : null;
    const [job, why] = await Promise.all([api(`/v1/jobs/${seg(id)}`), api(`/v1/jobs/${seg(id)}/why`)]);
    if (J.id !== id) return;
    J.detail = job.job;
    J.why = why.history;
    renderJobDetail();
    if (curves) { await curves; loadResults(); }
  } catch (e) {
    if (J.id === id) $("#job-head").replaceChildren(h("h2", null, id), h("p.error", null, e.message));
  }
}

async function loadResults() {
  const id = J.id;
  try {
    const r = await api(`/v1/jobs/${seg(id)}/results`);
    if (J.id !== id) return;
    J.results = r;
    renderJobDetail();
  } catch (e) {
    J.results = { error: e.message };
  }
}

/** Metrics of the job and those compared with it; incremental after the first read. */
async function loadSeries() {
  const id = J.id;
  const ids = [id, ...J.compare.filter((c) => c !== id)];
  await Promise.all(ids.map(async (jid) => {
    const have = J.series.get(jid);
    const after = have ? have.offset : 0;
    try {
      const keys = J.metricSel ? `&keys=${J.metricSel.map(seg).join(",")}` : "";
      const r = await api(`/v1/jobs/${seg(jid)}/metrics?after=${after}&max_points=2000${keys}`);
      if (J.id !== id) return;
      if (!have) {
        J.series.set(jid, { offset: r.offset, x: r.x, cols: r.series, points: r.points, downsampled: r.downsampled });
      } else if (r.points) {
        const n = have.x.length;
        have.x = have.x.concat(r.x);
        for (const k of new Set([...Object.keys(have.cols), ...Object.keys(r.series)])) {
          const old = have.cols[k] || new Array(n).fill(null);
          have.cols[k] = old.concat(r.series[k] || new Array(r.x.length).fill(null));
        }
        have.offset = r.offset;
        have.points += r.points;
      } else {
        have.offset = r.offset;
      }
    } catch (e) {
      J.series.set(jid, { error: e.message, offset: 0, x: [], cols: {}, points: 0 });
    }
  }));
  if (J.id === id) drawCharts();
}

function pollJob() {
  if (!J.id || performance.now() - J.lastPoll < POLL_MS - 100) return;
  J.lastPoll = performance.now();
  const j = S.jobs.get(J.id) || J.detail;
  if (j && !TERMINAL.has(j.state)) {
    loadSeries();
    api(`/v1/jobs/${seg(J.id)}`).then((r) => { J.detail = r.job; renderJobDetail(); }).catch(() => {});
  }
}

function buildJobView() {
  const root = $("#view-job");
  const ranks = h("select#log-rank", { onchange: (e) => { J.rank = Number(e.target.value); startLogs(); } });
  const follow = h("input#log-follow", { type: "checkbox", checked: true, onchange: (e) => {
    J.follow = e.target.checked;
    if (J.follow) { startLogs(); } else { stopLogs(); }
  } });
  root.replaceChildren(
    h("div#job-head"),
    h("div#job-actions.actions"),
    h("div.grid", null,
      h("section.panel.wide", null, h("h3", null, "Training curves"),
        h("div#metric-picker.picker"), h("div#chart-main.chart"),
        h("h4", null, "Throughput"), h("div#chart-tput.chart"), h("div#chart-note.muted")),
      h("section.panel.wide", null, h("h3", null, "Logs ", ranks, " ",
        h("label.follow", null, follow, " follow")), h("pre#logs.logs", { tabindex: 0 })),
      h("section.panel", null, h("h3", null, "Why (timeline)"), h("ol#why.why")),
      h("section.panel", null, h("h3", null, "Checkpoints"), h("div#checkpoints")),
      h("section.panel", null, h("h3", null, "GPU use per rank"), h("div#resources")),
      h("section.panel", null, h("h3", null, "Command and parameters"), h("div#command"))));
}

function renderJob(full) {
  const j = S.jobs.get(J.id);
  if (j && J.detail && j.state !== J.detail.state) J.detail = { ...J.detail, ...j };
  if (full) loadJob(false);
  else renderJobDetail();
}

function renderJobDetail() {
  const j = J.detail;
  if (!j || !$("#job-head")) return;
  const m = j.metrics || {};
  $("#job-head").replaceChildren(
    h("h2", null, h("span#job-title", null, j.id), " ", badge(j.state, j.held ? `${j.state} (held)` : j.state)),
    h("p.meta", null, `owner ${j.owner} · priority ${j.priority} · attempt ${j.attempt}`,
      j.nodes && j.nodes.length ? ` · on ${j.nodes.join(", ")}` : "",
      ` · step ${fmtNum(m.step)} · loss ${fmtNum(m.loss)} · elapsed ${fmtDur(elapsed(j))}`),
    (j.reason || j.waiting_reason)
      ? h(j.state === "succeeded" ? "p.muted" : "p.reason", null, j.reason || j.waiting_reason) : null);
  renderActions(j);
  const rankSel = $("#log-rank");
  const ranks = (j.gpus && j.gpus.length ? j.gpus.map((p) => p.rank) : [0]);
  if (rankSel.options.length !== ranks.length) {
    rankSel.replaceChildren(...ranks.map((r) => h("option", { value: r, selected: r === J.rank }, `rank ${r}`)));
  }
  $("#why").replaceChildren(...J.why.map((w) => h("li", null, h("time", null, fmtTime(w.ts)), " ",
    h("span.wtype", null, w.type), " ", w.text)));
  const ckptSizes = new Map(((J.results || {}).checkpoints || []).filter((c) => c.path).map((c) => [c.path, c]));
  const ckpts = [...new Set([...(j.checkpoints || []), ...ckptSizes.keys()])];
  $("#checkpoints").replaceChildren(ckpts.length
    ? h("ul.ckpts", null, ckpts.map((p) => h("li", null, h("code", null, p),
      ckptSizes.has(p) ? ` · ${fmtBytes(ckptSizes.get(p).size_bytes)} · ${fmtTime(ckptSizes.get(p).mtime)}` : "",
      p === j.resume_from ? " (resumed from)" : "")))
    : h("span.muted", null, "none yet"));
  const res = ((J.results || {}).resources || {}).ranks || [];
  $("#resources").replaceChildren(res.length
    ? table("res", ["rank", "node", "GPU", "util avg", "util peak", "mem avg", "mem peak"],
      res.map((r) => h("tr", null, h("td", null, String(r.rank)), h("td", null, r.node), h("td", null, String(r.gpu)),
        h("td.num", null, fmtNum(r.util_avg) + "%"), h("td.num", null, fmtNum(r.util_peak) + "%"),
        h("td.num", null, fmtBytes(r.mem_avg_bytes)), h("td.num", null, fmtBytes(r.mem_peak_bytes)))), "")
    : h("span.muted", null, J.results ? "no GPU samples for this attempt" : "loading…"));
  const spec = j.spec || {};
  const params = Object.entries(spec.params || {});
  $("#command").replaceChildren(
    h("pre.cmd", null, (j.argv || []).map(shellQuote).join(" ")),
    h("dl.spec", null,
      [["nodes", spec.nodes], ["GPUs per node", spec.gpus_per_node], ["torchrun", spec.torchrun],
        ["max retries", spec.max_retries], ["sweep", spec.sweep], ["submitted", fmtTime(j.submitted_at)],
        ["rendezvous", j.rendezvous]]
        .filter(([, v]) => v !== undefined && v !== null && v !== "")
        .map(([k, v]) => [h("dt", null, k), h("dd", null, String(v))]),
      params.map(([k, v]) => [h("dt", null, `param ${k}`), h("dd", null, String(v))])));
}

function renderActions(j) {
  const acts = [];
  const add = (label, path, confirmText, field) => acts.push(h("button", {
    type: "button", dataset: { action: label }, onclick: () => act(j.id, label, path, confirmText, field),
  }, label));
  if (!TERMINAL.has(j.state)) add("cancel", "cancel", `Cancel job ${j.id}?`);
  if (WAITING.has(j.state) && !j.held) add("hold", "hold", `Hold job ${j.id} (it will not start until released)?`);
  if (j.held) add("release", "release", `Release job ${j.id}?`);
  if (!TERMINAL.has(j.state)) add("priority", "priority", `New priority for ${j.id} (-1000 to 1000):`, { label: "priority", value: String(j.priority) });
  if (j.state === "running") add("checkpoint", "checkpoint", `Ask job ${j.id} to save a checkpoint now?`);
  if (j.state === "failed" || j.state === "cancelled") {
    add("resume", "resume", `Resume job ${j.id}? Optional changes, as key=value separated by spaces (e.g. lr=1e-4):`, { label: "--set", value: "" });
  }
  $("#job-actions").replaceChildren(...acts);
}

function ask(text, field) {
  const dlg = $("#confirm");
  $("#confirm-text").textContent = text;
  const f = $("#confirm-field");
  f.hidden = !field;
  if (field) { $("#confirm-label").textContent = field.label; $("#confirm-input").value = field.value; }
  dlg.returnValue = "";
  dlg.showModal();
  return new Promise((resolve) => {
    dlg.addEventListener("close", () => resolve(dlg.returnValue === "ok" ? (field ? $("#confirm-input").value : true) : null), { once: true });
  });
}

async function act(id, label, path, confirmText, field) {
  const answer = await ask(confirmText, field);
  if (answer === null) return;
  let body;
  if (label === "priority") body = { priority: Number.parseInt(answer, 10) };
  if (label === "resume") {
    const set = {};
    for (const kv of String(answer).split(/\s+/).filter(Boolean)) {
      const i = kv.indexOf("=");
      if (i <= 0) { toast(`--set ${kv}: expected key=value`, true); return; }
      set[kv.slice(0, i)] = kv.slice(i + 1);
    }
    body = { set };
  }
  try {
    const r = await api(`/v1/jobs/${seg(id)}/${path}`, { method: "POST", body: body || {} });
    const j = r.job || {};
    toast(`${label}: job ${j.id || id} is ${j.state || "updated"}${j.held ? " (held)" : ""}${j.stopping ? ` (stopping: ${j.stopping})` : ""}`);
    if (r.job) { S.jobs.set(r.job.id, r.job); J.detail = r.job; renderJobDetail(); }
  } catch (e) {
    toast(`${label} refused: ${e.message}`, true);
  }
}

let toastTimer = null;
function toast(text, bad) {
  const t = $("#toast");
  t.textContent = text;
  t.className = bad ? "bad" : "ok";
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, 8000);
}

// ---- logs ------------------------------------------------------------------------------

// SGR colours become classes; every other escape sequence and control character is dropped.
const ANSI = /\x1b\[([0-9;]*)m|\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-_]|[\x00-\x08\x0b-\x1f\x7f]/g;

function ansiLine(text) {
  const line = h("div.l");
  let cls = [], last = 0, m;
  const push = (s) => {
    if (!s) return;
    if (cls.length) line.append(h("span." + cls.join("."), null, s));
    else line.append(document.createTextNode(s));
  };
  ANSI.lastIndex = 0;
  while ((m = ANSI.exec(text))) {
    push(text.slice(last, m.index));
    last = ANSI.lastIndex;
    if (m[1] !== undefined) {
      for (const c of (m[1] || "0").split(";").map(Number)) {
        if (c === 0) cls = [];
        else if (c === 1) cls.push("a-b");
        else if ((c >= 30 && c <= 37) || (c >= 90 && c <= 97)) cls = cls.filter((x) => !x.startsWith("a-f")).concat(`a-f${c}`);
        else if (c === 39) cls = cls.filter((x) => !x.startsWith("a-f"));
      }
    }
  }
  push(text.slice(last));
  return line;
}

function stopLogs() {
  if (J.logAbort) { J.logAbort.abort(); J.logAbort = null; }
}

async function startLogs() {
  stopLogs();
  const pre = $("#logs");
  if (!pre) return;
  pre.replaceChildren();
  const ctrl = new AbortController();
  J.logAbort = ctrl;
  const id = J.id;
  const url = `/api/v1/jobs/${seg(id)}/logs?rank=${J.rank}&tail=500${J.follow ? "&follow=1" : ""}`;
  try {
    const resp = await fetch(url, { signal: ctrl.signal, credentials: "same-origin", headers: { "X-Ugro-Dashboard": "1" } });
    if (!resp.ok) {
      let msg = `HTTP ${resp.status}`;
      try { msg = (await resp.json()).error || msg; } catch { /* not JSON */ }
      pre.append(h("div.l.error", null, msg));
      return;
    }
    const reader = resp.body.getReader();
    const dec = new TextDecoder();
    let rest = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      rest += dec.decode(value, { stream: true });
      const lines = rest.split("\n");
      rest = lines.pop();
      appendLog(pre, lines);
    }
    if (rest) appendLog(pre, [rest]);
  } catch (e) {
    if (e.name !== "AbortError") pre.append(h("div.l.error", null, `log stream: ${e.message}`));
  }
}

function appendLog(pre, lines) {
  if (!lines.length) return;
  const atEnd = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 40;
  const frag = document.createDocumentFragment();
  for (const l of lines) frag.append(ansiLine(l));
  pre.append(frag);
  while (pre.childElementCount > MAX_LOG_LINES) pre.firstElementChild.remove();
  if (J.follow && atEnd) pre.scrollTop = pre.scrollHeight;
}

// ---- charts ------------------------------------------------------------------------------

const PALETTE = ["#4e9af1", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f", "#bab0ac"];

function destroyCharts() {
  for (const k of ["chart", "tchart"]) if (J[k]) { J[k].destroy(); J[k] = null; }
}

function metricKeys() {
  const keys = new Set();
  for (const s of J.series.values()) for (const k of Object.keys(s.cols || {})) keys.add(k);
  keys.delete("ts");
  return [...keys].sort((a, b) => (a === "loss" ? -1 : b === "loss" ? 1 : a.localeCompare(b)));
}

/** steps/s from ts and step, as a column aligned with x (null where unknown). */
function stepsPerSecond(s) {
  const t = (s.cols || {}).ts;
  if (!t) return null;
  const out = new Array(s.x.length).fill(null);
  let pi = -1;
  for (let i = 0; i < s.x.length; i++) {
    if (s.x[i] === null || t[i] === null) continue;
    if (pi >= 0 && t[i] > t[pi] && s.x[i] > s.x[pi]) out[i] = (s.x[i] - s.x[pi]) / (t[i] - t[pi]);
    pi = i;
  }
  return out;
}

/** One aligned table for uPlot from several (x, y) series. */
function aligned(list) {
  const xs = new Set();
  for (const { x, y } of list) x.forEach((v, i) => { if (v !== null && y[i] !== null && y[i] !== undefined) xs.add(v); });
  const X = Float64Array.from(xs).sort();
  const idx = new Map();
  X.forEach((v, i) => idx.set(v, i));
  const ys = list.map(({ x, y }) => {
    const col = new Array(X.length).fill(null);
    x.forEach((v, i) => { if (v !== null && y[i] !== null && y[i] !== undefined) col[idx.get(v)] = y[i]; });
    return col;
  });
  return [Array.from(X), ...ys];
}

function chartOpts(el, series, yLabel) {
  const dark = document.documentElement.dataset.theme === "dark";
  const axis = { stroke: dark ? "#aab" : "#445", grid: { stroke: dark ? "#2a2f3a" : "#e3e6ea" }, ticks: { stroke: dark ? "#2a2f3a" : "#ccd" } };
  return {
    width: Math.max(280, el.clientWidth || 600), height: 260,
    scales: { x: { time: false } },
    axes: [{ ...axis, label: "step" }, { ...axis, label: yLabel, size: 60 }],
    series: [{ label: "step" }, ...series.map((s, i) => ({
      label: s, stroke: PALETTE[i % PALETTE.length], width: 1.5, spanGaps: true, points: { show: false },
    }))],
    legend: { live: true },
  };
}

function drawCharts() {
  if (!window.uPlot) { $("#chart-note").textContent = "charts unavailable (uPlot not loaded)"; return; }
  const keys = metricKeys();
  if (!J.metricSel) J.metricSel = keys.includes("loss") ? ["loss"] : keys.slice(0, 1);
  const picker = $("#metric-picker");
  picker.replaceChildren(...keys.map((k) => h("label.pick", null, h("input", {
    type: "checkbox", value: k, checked: J.metricSel.includes(k),
    onchange: (e) => {
      J.metricSel = e.target.checked ? [...J.metricSel, k] : J.metricSel.filter((x) => x !== k);
      destroyCharts(); drawCharts();
    },
  }), " ", k)));
  const ids = [J.id, ...J.compare.filter((c) => c !== J.id)];
  const multi = ids.length > 1;
  const main = [], names = [];
  for (const jid of ids) {
    const s = J.series.get(jid);
    if (!s || !s.x) continue;
    for (const k of J.metricSel) {
      if (!s.cols[k]) continue;
      main.push({ x: s.x, y: s.cols[k] });
      names.push(multi ? `${jid}: ${k}` : k);
    }
  }
  const tput = [], tnames = [];
  for (const jid of ids) {
    const s = J.series.get(jid);
    if (!s || !s.x) continue;
    const sps = stepsPerSecond(s);
    if (sps) { tput.push({ x: s.x, y: sps }); tnames.push(multi ? `${jid}: steps/s` : "steps/s"); }
    for (const k of Object.keys(s.cols)) {
      if (/per_s(ec)?$|throughput/i.test(k)) { tput.push({ x: s.x, y: s.cols[k] }); tnames.push(multi ? `${jid}: ${k}` : k); }
    }
  }
  const el = $("#chart-main"), tel = $("#chart-tput");
  const note = [];
  for (const jid of ids) {
    const s = J.series.get(jid);
    if (s && s.error) note.push(`${jid}: ${s.error}`);
    else if (s && s.downsampled) note.push(`${jid}: ${s.points} points, drawn as ${s.x.length} (every peak and dip kept)`);
  }
  $("#chart-note").textContent = note.join(" · ");
  const errors = ids.map((jid) => (J.series.get(jid) || {}).error).filter(Boolean);
  const yLabel = J.metricSel.length === 1 && J.metricSel[0].length <= 24 ? J.metricSel[0] : "value";
  draw("chart", el, main, names, yLabel, errors[0]);
  draw("tchart", tel, tput, tnames, "per second", errors[0]);
}

function draw(which, el, list, names, yLabel, error) {
  const data = list.length ? aligned(list) : [[]];
  if (!list.length) {
    if (J[which]) { J[which].destroy(); J[which] = null; }
    el.replaceChildren(h("div.muted.empty", null, error || "no metrics reported yet"));
    return;
  }
  if (J[which] && J[which].series.length === names.length + 1) {
    J[which].setData(data);
  } else {
    if (J[which]) J[which].destroy();
    el.replaceChildren();
    J[which] = new window.uPlot(chartOpts(el, names, yLabel), data, el);
  }
  el.uplot = J[which];  // for tests and the console: the chart's own data
  if (which === "chart" && !performance.getEntriesByName("ugro-chart").length) performance.mark("ugro-chart");
}

// ---- sweeps --------------------------------------------------------------------------------

async function renderSweeps() {
  const root = $("#view-sweeps");
  const names = [...new Set([...S.jobs.values()].map(sweepOf).filter(Boolean))].sort();
  if (!root.firstChild) root.append(h("h2", null, "Sweeps"), h("div#sweeps"));
  if (!names.length) { $("#sweeps").replaceChildren(h("p.muted", null, "no sweeps among the current and recent jobs (ugroctl sweep …)")); return; }
  const docs = await Promise.all(names.map((n) => api(`/v1/sweeps/${seg(n)}`).catch((e) => ({ error: e.message, name: n }))));
  if (S.view !== "sweeps") return;
  $("#sweeps").replaceChildren(...docs.map((d, i) => {
    if (d.error) return h("section.panel", null, h("h3", null, names[i]), h("p.error", null, d.error));
    const sw = d.sweep;
    const keys = Object.keys(sw.params);
    const ids = d.trials.map((t) => t.job);
    return h("section.panel.sweep", { dataset: { sweep: sw.name } },
      h("h3", null, sw.name, " ", h("span.muted", null, `${sw.done}/${sw.total} done · owner ${sw.owner}`), " ",
        ids.length ? h("a.button", { href: jobHref(ids[0]) + "?compare=" + ids.map(seg).join(",") }, "overlay trials") : null),
      h("div.scroll", null, table("trials", ["#", "trial", "state", ...keys, "loss", "final", "duration"],
        d.trials.map((t, k) => h("tr", null, h("td.num", null, String(k + 1)), h("td", null, h("a", { href: jobHref(t.job) }, t.job)),
          h("td", null, badge(t.state)), keys.map((p) => h("td", null, String(t.params[p] ?? ""))),
          h("td.num", null, fmtNum(t.latest_loss)), h("td.num", null, fmtNum(t.final_loss)), h("td.num", null, fmtDur(t.duration_s)))), "")));
  }));
}

// ---- alerts and events ------------------------------------------------------------------------

function eventSummary(rec) {
  const d = rec.data || {};
  const parts = [];
  for (const k of ["job", "node", "sweep"]) if (typeof d[k] === "string") parts.push(`${k} ${d[k]}`);
  if (d.node && typeof d.node === "object" && d.node.name) parts.push(`node ${d.node.name}`);
  for (const k of ["rank", "attempt", "outcome", "exit_code", "health", "priority", "step"]) {
    if (d[k] !== undefined && d[k] !== null) parts.push(`${k} ${d[k]}`);
  }
  for (const k of ["reason", "path", "message"]) if (typeof d[k] === "string" && d[k]) parts.push(d[k]);
  return parts.join(" · ");
}

function renderEvents(full = true) {
  const root = $("#view-events");
  const alerts = [];
  for (const n of S.nodes) {
    for (const a of n.alerts || []) alerts.push({ sev: a.severity, what: `${n.name}: ${a.alert}`, msg: a.message, since: a.since });
    if (n.state === "unreachable") alerts.push({ sev: "critical", what: `${n.name}: unreachable`, msg: n.health_reason || "", since: n.last_check });
    if (n.drained) alerts.push({ sev: "info", what: `${n.name}: drained`, msg: n.drain_reason || "", since: null });
  }
  for (const j of S.jobs.values()) if (j.stalled && !TERMINAL.has(j.state)) alerts.push({ sev: "warning", what: `${j.id}: stalled`, msg: "no training progress reported", since: null, job: j.id });
  const list = alerts.length ? h("ul.alerts", null, alerts.map((a) => h("li.sev-" + String(a.sev).replace(/[^a-z]/g, ""), null,
    badge(a.sev), " ", a.job ? h("a", { href: jobHref(a.job) }, a.what) : h("b", null, a.what), " ", a.msg, a.since ? ` (since ${fmtTime(a.since)})` : "")))
    : h("p.muted", null, "no active alerts");
  if (!full && $("#alerts")) { $("#alerts").replaceChildren(list); return; }
  root.replaceChildren(
    h("h2", null, "Alerts"), h("div#alerts", null, list),
    h("h2", null, "Events ", h("span.muted", null, "(live, newest first)")),
    h("div.scroll", null, table("events", ["seq", "time", "type", "by", "what"], S.events.map(eventRow), "no events yet")));
}

function eventRow(e) {
  const d = e.data || {};
  return h("tr", { dataset: { seq: e.seq } },
    h("td.num", null, String(e.seq)), h("td", null, fmtTime(e.ts)), h("td", null, h("code", null, e.type)),
    h("td", null, (e.actor || {}).user || ""), h("td", null, typeof d.job === "string"
      ? [h("a", { href: jobHref(d.job) }, d.job), " ", eventSummary({ ...e, data: { ...d, job: undefined } })]
      : eventSummary(e)));
}

// ---- routing, theme, start ------------------------------------------------------------------

function route() {
  const hash = location.hash || "#/cluster";
  const m = /^#\/job\/([^?]+)(?:\?compare=(.*))?$/.exec(hash);
  const view = m ? "job" : (hash.slice(2) || "cluster");
  const known = ["cluster", "jobs", "sweeps", "events", "job"];
  S.view = known.includes(view) ? view : "cluster";
  for (const v of known) $("#view-" + v).hidden = v !== S.view;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("on", a.dataset.view === S.view);
  if (S.view !== "job") { stopLogs(); J.id = null; destroyCharts(); }
  if (S.view === "job") {
    const id = decodeURIComponent(m[1]);
    const compare = m[2] ? m[2].split(",").filter(Boolean).map(decodeURIComponent) : [];
    openJob(id, compare);
  } else {
    if (S.queueStale) scheduleRefresh(["jobs"]);
    if (S.view === "jobs") renderJobs();
    renderCurrent(new Set(["nodes", "jobs", "events"]));
  }
}

function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
  if (J.id && J.series.size) { destroyCharts(); drawCharts(); }
}

async function start() {
  const saved = localStorage.getItem("ugro-theme");
  applyTheme(saved || (matchMedia("(prefers-color-scheme: light)").matches ? "light" : "dark"));
  $("#theme").addEventListener("click", () => {
    const t = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
    localStorage.setItem("ugro-theme", t);
    applyTheme(t);
  });
  window.addEventListener("hashchange", route);
  // a job's page needs none of the lists: it starts at once, beside them
  const jobFirst = (location.hash || "").startsWith("#/job/");
  if (jobFirst) route();
  try {
    await loadAll();
  } catch (e) {
    showLive(false, e.message);
    $("#view-cluster").replaceChildren(h("p.error", null, `cannot load: ${e.message}`));
  }
  if (jobFirst) renderTotals(); else route();
  connectEvents();
  setInterval(poll, POLL_MS);
  document.addEventListener("visibilitychange", () => { if (document.visibilityState === "visible") poll(); });
  document.body.dataset.ready = "1";
  performance.mark("ugro-ready");  // loaded: data fetched, the view drawn (bench_dashboard)
}

start();
