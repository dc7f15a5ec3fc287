// The dashboard's entry point: who the token is, the list of steppers, the live event
// stream, and the stepper view (detail.js) of the stepper chosen in the URL's fragment.

import { Api, ApiError, EventStream, num } from "./api.js";
import { fmt } from "./charts.js";
import { Compare } from "./compare.js";
import { StepperView } from "./detail.js";
import { DataTable } from "./table.js";

const $ = (id) => document.getElementById(id);
const api = new Api(new URL(".", location.href));
const RANK = { read: 1, write: 2, admin: 3 };
/** How often the list of steppers is refreshed (new steppers, memory, active alerts). */
const LIST_EVERY_MS = 5000;

const state = {
  identity: null,
  steppers: new Map(), // name -> row for the table
  view: null,
  listTimer: null,
};

// ------------------------------------------------------------------ messages

let bannerTimer = null;

/** Shows an error (or, with info, a notice) for a while. */
export function notify(message, { info = false, ms = 8000 } = {}) {
  const b = $("banner");
  b.textContent = message;
  b.classList.toggle("info", info);
  b.hidden = false;
  clearTimeout(bannerTimer);
  bannerTimer = setTimeout(() => { b.hidden = true; }, ms);
}

function failed(what, error) {
  if (error && error.name === "AbortError") return;
  if (error instanceof ApiError && error.status === 401) {
    needToken();
    return;
  }
  notify(`${what}: ${error && error.message ? error.message : error}`);
}

// ------------------------------------------------------------------ identity and token

function needToken() {
  state.identity = null;
  $("auth-needed").hidden = false;
  $("identity").textContent = "not signed in";
  stream.stop();
  setStatus("denied");
  $("token-input").focus();
}

/** Allows `level` ("write", "admin") for the current token? */
export function allows(level) {
  return !!state.identity && RANK[state.identity.scope] >= RANK[level];
}

async function identify() {
  try {
    state.identity = await api.get("v1/whoami");
  } catch (e) {
    failed("who am I", e);
    return false;
  }
  const id = state.identity;
  $("auth-needed").hidden = true;
  $("identity").textContent = id.tokens
    ? `${id.name} · ${id.scope}${id.prefix ? ` · namespace ${id.prefix}` : ""}`
    : "no tokens configured · admin";
  $("identity").title = id.reaches ? `reaches ${id.reaches}` : "";
  document.body.dataset.scope = id.scope;
  return true;
}

$("token-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const input = $("token-input");
  api.token = input.value.trim();
  input.value = "";
  await start();
});

$("token-forget").addEventListener("click", async () => {
  api.token = "";
  await start();
});

// ------------------------------------------------------------------ the steppers list

function fmtBytes(n) {
  if (!Number.isFinite(n)) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function fmtAge(t) {
  if (!t) return "never";
  const s = Math.max(0, Date.now() / 1000 - t);
  if (s < 2) return "just now";
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return new Date(t * 1000).toLocaleString();
}

const list = new DataTable($("steppers"), {
  key: "name",
  label: "steppers",
  pageSize: 25,
  onSelect: (name) => { location.hash = `#/${encodeURIComponent(name)}`; },
  columns: [
    { key: "name", label: "name" },
    { key: "kind", label: "kind",
      title: "hosted: stepped here · watched: a training job's own optimizer, reported · frozen: an imported checkpoint" },
    { key: "optimizer", label: "optimizer" },
    { key: "step", label: "step", numeric: true },
    { key: "device", label: "device" },
    { key: "state_bytes", label: "memory", numeric: true, format: fmtBytes,
      title: "parameters and Adam state held by the stepper" },
    { key: "last_step", label: "last step", numeric: true, format: fmtAge,
      title: "when it last stepped (or changed)" },
    {
      key: "alerts_active", label: "alerts", numeric: true,
      title: "active alerts (events raised since the service started)",
      cell(td, v, row) {
        const b = document.createElement("span");
        b.className = v > 0 ? "badge bad" : "badge";
        b.textContent = String(v || 0);
        td.append(b);
        if (row.alerts_count) td.append(` / ${row.alerts_count}`);
        if (row.alerts_latest) td.title = row.alerts_latest;
      },
    },
  ],
});

/** Distributed mode: where the stepper lives, e.g. " · slot 1" or " · 2 shards". */
export function placementTag(placement) {
  if (!placement || !placement.shards) return "";
  const shards = placement.shards;
  return placement.sharded ? ` · ${shards.length} shards` : ` · slot ${shards[0].slot}`;
}

function rowOf(summary, previous) {
  const alerts = summary.alerts || {};
  const latest = alerts.latest;
  return {
    name: summary.name,
    kind: summary.kind,
    optimizer: summary.optimizer,
    step: summary.step,
    // a watched run's tensors are in its training job (here: shapes on the meta device)
    device: summary.kind === "watched" ? "training job" : summary.device + placementTag(summary.placement),
    state_bytes: summary.state_bytes,
    last_step: Math.max(num(summary.updated_at) || 0, previous ? previous.last_step || 0 : 0),
    alerts_active: alerts.active || 0,
    alerts_count: alerts.count || 0,
    alerts_latest: latest ? `latest: ${latest.rule} on ${latest.tensor ?? "aggregate"} at step ${latest.step}` : "",
  };
}

function renderList() {
  list.setRows([...state.steppers.values()]);
  list.select(state.view ? state.view.name : null);
}

async function refreshList() {
  try {
    const { steppers } = await api.get("v1/steppers");
    const next = new Map();
    for (const s of steppers) next.set(s.name, rowOf(s, state.steppers.get(s.name)));
    state.steppers = next;
    compare.setSteppers([...next.keys()].sort());
    renderList();
    if (state.view && !next.has(state.view.name)) {
      notify(`stepper ${state.view.name} is gone`, { info: true });
      history.replaceState(null, "", location.pathname + location.search);
      select(null);
    }
  } catch (e) {
    failed("listing steppers", e);
  }
}

function scheduleList() {
  clearInterval(state.listTimer);
  state.listTimer = setInterval(() => {
    if (state.identity) refreshList();
  }, LIST_EVERY_MS);
}

// The "last step" column ages by itself.
setInterval(() => { if (state.steppers.size) list.render(); }, 1000);

// ------------------------------------------------------------------ the live stream

function setStatus(kind, info = {}) {
  const el = $("stream-status");
  el.dataset.state = kind;
  el.textContent = {
    connecting: "connecting…",
    live: "live",
    reconnecting: "reconnecting…",
    denied: "not authorized",
    stopped: "stopped",
  }[kind] || kind;
  if (kind === "reconnecting" && info.delay) el.title = `next try in ${Math.round(info.delay / 100) / 10} s`;
  else el.removeAttribute("title");
}

let listSoon = null;

function onEvent(message) {
  if (message.type === "open") return;
  if (message.type === "dropped") {
    notify("the dashboard fell behind: some step events were dropped", { info: true });
    return;
  }
  const event = JSON.parse(message.data);
  if (message.type === "step") {
    const row = state.steppers.get(event.stepper);
    if (row) {
      row.step = event.step;
      row.last_step = num(event.time);
      if (event.alerts && event.alerts.length) {
        row.alerts_count += event.alerts.length;
        row.alerts_active += event.alerts.length;
        clearTimeout(listSoon);
        listSoon = setTimeout(refreshList, 300); // the server's count of active alerts
      }
    } else {
      clearTimeout(listSoon);
      listSoon = setTimeout(refreshList, 100); // a stepper this page has not seen yet
    }
    if (state.view && state.view.name === event.stepper) state.view.onStep(event);
  } else if (message.type === "loss") {
    if (state.view && state.view.name === event.stepper) state.view.onLoss(event);
  }
}

const stream = new EventStream(api, "v1/events", {
  onEvent,
  onStatus: setStatus,
  query: { heartbeat: 10 },
  idleMs: 30000,
});

/** The stream's tensor filter follows the tensor the charts show (or none). */
export function streamTensor(name) {
  const wanted = name ? { heartbeat: 10, tensor: name } : { heartbeat: 10 };
  if (JSON.stringify(wanted) === JSON.stringify(stream.query)) return;
  stream.query = wanted;
  if (state.identity) stream.restart();
}

// ------------------------------------------------------------------ selection

function select(name) {
  if (state.view && state.view.name === name) return;
  if (state.view) state.view.destroy();
  state.view = null;
  $("detail").hidden = !name;
  if (name) {
    state.view = new StepperView(name, {
      api,
      allows,
      notify,
      failed,
      streamTensor,
      onChanged: refreshList,
    });
    state.view.load();
  } else {
    streamTensor(null);
  }
  renderList();
}

const compare = new Compare({ api, failed });

/** #/<stepper>[?tensor=&step=&signal=] (an alert in focus: focus.js), or
 *  #compare?signal=&tensor=&stepper=... (steppers compared: compare.js). */
function fromHash() {
  const c = location.hash.match(/^#compare\?(.*)$/);
  if (c) {
    select(null);
    compare.show(new URLSearchParams(c[1]));
    return;
  }
  const m = location.hash.match(/^#\/([^?]+)(?:\?(.*))?$/);
  let name = null;
  if (m) {
    try { name = decodeURIComponent(m[1]); } catch { name = null; }
  }
  select(name);
  if (state.view) state.view.focusOn(new URLSearchParams(m ? m[2] || "" : ""));
}

window.addEventListener("hashchange", fromHash);

// ------------------------------------------------------------------ start

async function start() {
  stream.stop();
  if (state.view) { state.view.destroy(); state.view = null; }
  if (!(await identify())) return;
  await refreshList();
  scheduleList();
  stream.restart();
  fromHash();
}

start();
window.adamscope = { state, fmt }; // for the curious, in the browser's console
