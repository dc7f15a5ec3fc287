// One stepper in detail: its signals over steps (history, then live step events), its
// parameter tensors, a histogram of one tensor's moments or effective LR, the
// bias-correction curves, its alerts, and the controls its token allows (controls.js).

import { num } from "./api.js";
import { Histogram, LineChart, PALETTE, fmt } from "./charts.js";
import { Controls } from "./controls.js";
import { AlertFocus, alertHref } from "./focus.js";
import { HeatCard } from "./heatmap.js";
import { DataTable } from "./table.js";

const $ = (id) => document.getElementById(id);

/** The charts offered; `signals` are history signal names ("loss": the reported loss). */
const CHARTS = [
  { id: "lr_eff", title: "Effective LR", signals: ["lr_eff_p1", "lr_eff_p50", "lr_eff_p99"], logY: true, on: true },
  { id: "update_ratio", title: "Update / parameter norm", signals: ["update_ratio"], logY: true, on: true },
  { id: "shock", title: "Second-moment shock p99", signals: ["shock_p99"], logY: true, on: true },
  { id: "grad_norm", title: "Gradient norm", signals: ["grad_norm"], logY: true, on: true },
  { id: "loss", title: "Loss", signals: ["loss"], logY: false, on: true },
  { id: "custom", title: "Signal", signals: [], logY: false, on: false, custom: true },
];

/** Signals estimated from a sample for tensors not taken whole: marked "~" in the table. */
const ESTIMATE_NOTE = " (~: estimated from a sample of the tensor; its rank error bound is in /signals, estimates)";
function estimated(v, row) {
  const text = fmt(v);
  return row && row.rank_error > 0 && text ? `~${text}` : text;
}

/** Points kept per series in the page (the service keeps its own bounded history). */
const MAX_POINTS = 20000;
/** Least time between two refreshes of the table, and of the histogram, while stepping. */
const TABLE_EVERY_MS = 1500;
const HIST_EVERY_MS = 2000;
const HIST_BINS = 64;

/** Series over steps: steps[] and, per signal, values[] of the same length. */
class Series {
  constructor() { this.steps = []; this.values = new Map(); }

  static from(block) {
    const s = new Series();
    if (!block) return s;
    s.steps = block.steps.slice();
    for (const [k, vs] of Object.entries(block.values || {})) s.values.set(k, vs.map(num));
    return s;
  }

  get last() { return this.steps.length ? this.steps[this.steps.length - 1] : -Infinity; }

  /** Appends a step's values; a step at or before the last one means the stepper went back
   *  in time (a restored snapshot): the later points go first. */
  append(step, values) {
    if (step <= this.last) this.truncate(step);
    const n = this.steps.length;
    this.steps.push(step);
    for (const [k, v] of Object.entries(values || {})) {
      if (!this.values.has(k)) this.values.set(k, new Array(n).fill(NaN));
    }
    for (const [k, arr] of this.values) arr.push(values && k in values ? num(values[k]) : NaN);
    if (this.steps.length > MAX_POINTS) {
      const cut = this.steps.length - MAX_POINTS + Math.floor(MAX_POINTS / 10);
      this.steps.splice(0, cut);
      for (const arr of this.values.values()) arr.splice(0, cut);
    }
  }

  truncate(step) {
    let keep = this.steps.length;
    while (keep > 0 && this.steps[keep - 1] >= step) keep--;
    this.steps.length = keep;
    for (const arr of this.values.values()) arr.length = keep;
  }

  get(signal) { return this.values.get(signal) || []; }

  /** This series, then the points of `live` after its last step (events that arrived
   *  while this was being fetched). */
  merged(live) {
    for (let i = 0; i < live.steps.length; i++) {
      if (live.steps[i] <= this.last) continue;
      const values = {};
      for (const [k, arr] of live.values) values[k] = arr[i];
      this.append(live.steps[i], values);
    }
    return this;
  }
}

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  Object.assign(e, props);
  e.append(...children);
  return e;
}

function throttle(fn, ms) {
  let last = 0;
  let timer = null;
  const run = () => { timer = null; last = Date.now(); fn(); };
  const call = () => {
    if (timer) return;
    const wait = Math.max(0, last + ms - Date.now());
    timer = setTimeout(run, wait);
  };
  call.cancel = () => { clearTimeout(timer); timer = null; };
  return call;
}

export class StepperView {
  /**
   * @param {string} name the stepper
   * @param {object} ctx {api, allows(level), notify(msg), failed(what, error),
   *                      streamTensor(name), onChanged()}
   */
  constructor(name, ctx) {
    this.name = name;
    this.ctx = ctx;
    this.api = ctx.api;
    this.base = `v1/steppers/${encodeURIComponent(name)}`;
    this.abort = new AbortController();
    this.listeners = [];
    this.summary = null;
    this.aggregate = new Series();
    this.tensorSeries = new Series();
    this.loss = { steps: [], values: [] };
    this.alertEvents = [];
    this.chartTensor = "";
    this.charts = [];
    this.custom = "";
    this.destroyed = false;
    this.refreshTable = throttle(() => this.loadTable(), TABLE_EVERY_MS);
    this.refreshHist = throttle(() => this.loadHistogram(), HIST_EVERY_MS);
    this.refreshBias = throttle(() => this.loadBias(), HIST_EVERY_MS);
    this.controls = new Controls(this);
    this.focus = new AlertFocus(this);
    this.heat = new HeatCard(this);
    this.refreshHeat = throttle(() => this.heat.load(), HIST_EVERY_MS);
    this.loaded = false;
    this.focusParams = null;
    this.table = new DataTable($("params"), {
      key: "name",
      label: "parameter tensors",
      pageSize: 50,
      onSelect: (tensor) => this.pickTensor(tensor),
      columns: [
        { key: "name", label: "name" },
        { key: "shape", label: "shape", sortValue: (r) => r.numel },
        { key: "dtype", label: "dtype" },
        { key: "group", label: "group", numeric: true },
        { key: "param_norm", label: "‖p‖", numeric: true, format: fmt, title: "parameter L2 norm" },
        { key: "grad_norm", label: "‖g‖", numeric: true, format: fmt, title: "gradient L2 norm (last step)" },
        { key: "exp_avg_norm", label: "‖m‖", numeric: true, format: fmt, title: "exp_avg L2 norm" },
        { key: "lr_eff_p50", label: "eff. LR p50", numeric: true, format: estimated, title: `median effective learning rate${ESTIMATE_NOTE}` },
        { key: "update_ratio", label: "update ratio", numeric: true, format: estimated, title: `‖Δp‖ / ‖p‖ of the last step${ESTIMATE_NOTE}` },
        { key: "shock_p99", label: "shock p99", numeric: true, format: estimated, title: `p99 of g² / v̂(t-1)${ESTIMATE_NOTE}` },
        {
          key: "nonfinite", label: "NaN/Inf", numeric: true,
          title: "NaN and Inf values in the gradient and moments",
          cell(td, v) {
            if (v > 0) td.append(el("span", { className: "flag", textContent: `NaN ${v}` }));
            else td.textContent = v === 0 ? "0" : "";
          },
        },
      ],
    });
    this.histogram = new Histogram($("hist-canvas"), { readout: $("hist-readout") });
    this.bias = new LineChart($("bias-canvas"), { logX: true, readout: $("bias-readout") });
    this._wire();
  }

  // ---------------------------------------------------------------- lifecycle

  _on(target, type, fn) {
    target.addEventListener(type, fn);
    this.listeners.push([target, type, fn]);
  }

  _wire() {
    this._on($("param-filter"), "input", (e) => { this.table.filter = e.target.value; });
    this._on($("chart-tensor"), "change", (e) => this.setChartTensor(e.target.value));
    this._on($("hist-tensor"), "change", () => this.loadHistogram());
    this._on($("hist-key"), "change", () => this.loadHistogram());
    this._on($("hist-log"), "change", () => this.loadHistogram());
    this._on($("hist-logcount"), "change", (e) => {
      this.histogram.logCounts = e.target.checked;
      this.histogram.render();
    });
    this._on($("bias-group"), "change", () => this.drawBias());
    this._on($("heat-tensor"), "change", () => this.heat.load());
    this._on($("heat-key"), "change", () => this.heat.load());
    this._on(window, "resize", () => this.redraw());
  }

  destroy() {
    this.destroyed = true;
    this.abort.abort();
    for (const [t, type, fn] of this.listeners) t.removeEventListener(type, fn);
    this.refreshTable.cancel();
    this.refreshHist.cancel();
    this.refreshBias.cancel();
    this.refreshHeat.cancel();
    this.controls.destroy();
    this.focus.destroy();
    $("charts").replaceChildren();
    $("chart-choices").replaceChildren();
    $("param-filter").value = "";
  }

  async _get(path, query) {
    return this.api.request("GET", path, { query, signal: this.abort.signal });
  }

  async load() {
    $("detail-name").textContent = this.name;
    try {
      await this.loadSummary();
    } catch (e) {
      this.ctx.failed(`loading ${this.name}`, e);
      return;
    }
    this._buildCharts();
    await Promise.all([
      this.loadHistory().catch((e) => this.ctx.failed("loading the history", e)),
      this.loadTable(),
      this.loadAlerts(),
      this.loadBias(),
      this.controls.load(),
    ]);
    await Promise.all([this.loadHistogram(), this.heat.load()]);
    this.loaded = true;
    if (this.focusParams) await this.focus.show(this.focusParams);
  }

  /** The URL's query after the stepper's name: an alert to focus on (see focus.js). */
  focusOn(params) {
    this.focusParams = params;
    if (this.loaded) this.focus.show(params);
  }

  async loadSummary() {
    const s = await this._get(this.base);
    if (this.destroyed) return;
    this.summary = s;
    this.watched = s.kind === "watched";
    const total = s.params.reduce((a, p) => a + p.numel, 0);
    const where = this.watched ? "watched: its tensors are in the training job" : s.device;
    const kind = s.kind === "frozen" ? "frozen · " : "";
    $("detail-facts").textContent =
      `${kind}${s.optimizer} · ${where} · step ${s.step} · ${s.params.length} tensors · ${fmt(total)} elements`;
    const names = s.params.map((p) => p.name);
    fill($("chart-tensor"), [["", "all tensors (aggregate)"], ...names.map((n) => [n, n])], this.chartTensor);
    const histWas = $("hist-tensor").value;
    fill($("hist-tensor"), names.map((n) => [n, n]), names.includes(histWas) ? histWas : names[0]);
    const heatWas = $("heat-tensor").value;
    fill($("heat-tensor"), names.map((n) => [n, n]), names.includes(heatWas) ? heatWas : names[0]);
    fill($("bias-group"), s.groups.map((g) => [String(g.index), `group ${g.index}`]), $("bias-group").value || "0");
    this.controls.summary(s);
    this.showPlacement(s.placement);
  }

  /** Distributed mode: each shard's slot, node, process and state, and recoveries. */
  showPlacement(placement) {
    const box = $("detail-placement");
    if (!placement || !placement.shards) {
      box.hidden = true;
      box.replaceChildren();
      return;
    }
    const items = placement.shards.map((sh) => {
      const held = sh.params ? `${sh.params.length} tensors` : "all tensors";
      const node = sh.node_id ? `${sh.node} (node ${sh.node_id.slice(0, 8)})` : sh.node;
      return el("li", {
        textContent: `slot ${sh.slot}: ${held} on ${node} (pid ${sh.pid}, ${sh.device}) · ${sh.state}`,
      });
    });
    const recoveries = placement.recoveries || [];
    const last = recoveries[recoveries.length - 1];
    const title = el("span", {
      textContent: placement.sharded ? `sharded over ${placement.shards.length} slots` : "placement",
    });
    const note = el("span", {
      className: "muted",
      textContent: last
        ? ` · recovered ${recoveries.length}× (last: slot ${last.slot}, ${last.seconds} s, at ${new Date(last.time * 1000).toLocaleTimeString()})`
        : "",
    });
    box.replaceChildren(title, note, el("ul", {}, ...items));
    box.hidden = false;
  }

  // ---------------------------------------------------------------- charts

  _buildCharts() {
    const grid = $("charts");
    const choices = $("chart-choices");
    grid.replaceChildren();
    choices.replaceChildren();
    this.charts = CHARTS.map((def, k) => {
      const canvas = el("canvas", { className: "chart" });
      canvas.dataset.chart = def.id;
      const legend = el("span", { className: "legend" });
      const log = el("input", { type: "checkbox", checked: def.logY });
      const caption = el("figcaption", {}, def.custom ? "" : def.title, legend,
                         el("label", { className: "muted" }, log, " log"));
      const figure = el("figure", { className: "chart-card" }, caption, canvas,
                        el("div", { className: "readout" }));
      figure.dataset.chart = def.id;
      const chart = new LineChart(canvas, { logY: def.logY, readout: figure.lastChild });
      const item = { def, figure, chart, legend, select: null, color: PALETTE[k % PALETTE.length] };
      if (def.custom) {
        item.select = el("select", { ariaLabel: "signal" });
        caption.prepend(item.select);
        item.select.addEventListener("change", () => { this.custom = item.select.value; this.drawCharts(); });
      }
      log.addEventListener("change", () => { chart.logY = log.checked; chart.draw(); });
      const toggle = el("input", { type: "checkbox", checked: def.on });
      toggle.dataset.chart = def.id;
      toggle.addEventListener("change", () => { figure.hidden = !toggle.checked; this.drawCharts(); });
      choices.append(el("label", {}, toggle, ` ${def.custom ? "custom" : def.id.replace("_", " ")}`));
      figure.hidden = !def.on;
      grid.append(figure);
      return item;
    });
  }

  _signalsKnown() {
    const known = new Set([...this.aggregate.values.keys(), ...this.tensorSeries.values.keys()]);
    return [...known].sort();
  }

  drawCharts() {
    const source = this.chartTensor ? this.tensorSeries : this.aggregate;
    const alertSteps = this.alertEvents
      .filter((e) => !this.chartTensor || e.tensor === this.chartTensor || e.tensor === null)
      .map((e) => e.step);
    const marks = [...new Set(alertSteps)].map((x) => ({ x, color: "#dc2626" }));
    for (const item of this.charts) {
      if (item.figure.hidden) continue;
      let signals = item.def.signals;
      if (item.def.custom) {
        const known = this._signalsKnown();
        const current = item.select.value || this.custom || known.find((s) => s.startsWith("exp_avg")) || known[0] || "";
        fill(item.select, known.map((s) => [s, s]), current);
        signals = current ? [current] : [];
      }
      item.chart.series = signals.map((sig, i) => {
        const color = signals.length > 1 ? PALETTE[i % PALETTE.length] : item.color;
        if (sig === "loss") return { label: "loss", color, xs: this.loss.steps, ys: this.loss.values };
        return { label: sig, color, xs: source.steps, ys: source.get(sig) };
      });
      item.chart.marks = item.def.id === "loss" ? [] : marks;
      item.legend.replaceChildren(...item.chart.series.map((s) => {
        const swatch = el("i");
        swatch.style.background = s.color;
        return el("span", {}, swatch, s.label);
      }));
      item.chart.draw();
    }
  }

  redraw() {
    this.drawCharts();
    this.histogram.render();
    this.heat.map.render();
    this.drawBias();
  }

  async loadHistory() {
    const h = await this._get(`${this.base}/history`);
    if (this.destroyed) return;
    this.aggregate = Series.from(h.aggregate).merged(this.aggregate);
    const live = this.loss;
    this.loss = { steps: h.loss.steps.slice(), values: h.loss.values.map(num) };
    live.steps.forEach((step, i) => {
      if (!(step <= this.loss.steps.at(-1))) this._addLoss(step, live.values[i]);
    });
    if (this.chartTensor) await this.loadTensorHistory();
    this.drawCharts();
  }

  async loadTensorHistory() {
    const tensor = this.chartTensor;
    const h = await this._get(`${this.base}/history`, { tensor });
    if (this.destroyed || tensor !== this.chartTensor) return;
    this.tensorSeries = Series.from(h.tensors[tensor]).merged(this.tensorSeries);
  }

  async setChartTensor(tensor) {
    this.chartTensor = tensor;
    $("chart-tensor").value = tensor;
    this.tensorSeries = new Series();
    this.ctx.streamTensor(tensor || null);
    try {
      if (tensor) await this.loadTensorHistory();
    } catch (e) {
      this.ctx.failed("loading the tensor's history", e);
    }
    this.drawCharts();
  }

  /** A click on a table row: show that tensor in the charts and the histogram. */
  pickTensor(tensor) {
    $("hist-tensor").value = tensor;
    $("heat-tensor").value = tensor;
    this.setChartTensor(tensor);
    this.loadHistogram();
    this.heat.load();
  }

  // ---------------------------------------------------------------- live events

  onStep(event) {
    this.aggregate.append(event.step, event.aggregate);
    const t = this.chartTensor && event.tensors ? event.tensors[this.chartTensor] : null;
    if (t) this.tensorSeries.append(event.step, t);
    if (event.loss !== undefined) this._addLoss(event.step, num(event.loss));
    if (event.alerts && event.alerts.length) {
      this.alertEvents.push(...event.alerts);
      this.loadAlerts();
    }
    if (this.summary) {
      this.summary.step = event.step;
      const facts = $("detail-facts");
      facts.textContent = facts.textContent.replace(/step \d+/, `step ${event.step}`);
    }
    this.drawCharts();
    this.refreshTable();
    this.refreshBias();
    if ($("hist-follow").checked) this.refreshHist();
    this.refreshHeat();
  }

  onLoss(event) {
    this._addLoss(event.step, num(event.loss));
    this.drawCharts();
  }

  _addLoss(step, value) {
    const { steps, values } = this.loss;
    while (steps.length && steps[steps.length - 1] >= step) { steps.pop(); values.pop(); }
    steps.push(step);
    values.push(value);
  }

  // ---------------------------------------------------------------- table

  async loadTable() {
    if (!this.summary) return;
    let latest = {};
    let rankError = {};
    try {
      const h = await this._get(`${this.base}/history`, { tensor: "*", limit: 1 });
      latest = h.tensors || {};
      const signals = await this._get(`${this.base}/signals`);
      rankError = (signals.estimates && signals.estimates.rank_error) || {};
    } catch (e) {
      this.ctx.failed("loading the tensors' signals", e);
    }
    if (this.destroyed) return;
    let step = null;
    const rows = this.summary.params.map((p) => {
      const block = latest[p.name];
      const v = {};
      if (block && block.steps.length) {
        step = Math.max(step ?? -Infinity, block.steps[block.steps.length - 1]);
        for (const [k, arr] of Object.entries(block.values)) v[k] = num(arr[arr.length - 1]);
      }
      const nonfinite = "nan_count" in v || "inf_count" in v
        ? (v.nan_count || 0) + (v.inf_count || 0) : null;
      return {
        name: p.name, shape: p.shape.length ? p.shape.join("×") : "scalar", numel: p.numel,
        dtype: p.dtype, group: p.group, param_norm: v.param_norm, grad_norm: v.grad_norm,
        exp_avg_norm: v.exp_avg_norm, lr_eff_p50: v.lr_eff_p50, update_ratio: v.update_ratio,
        shock_p99: v.shock_p99, nonfinite, rank_error: rankError[p.name],
      };
    });
    this.table.setRows(rows);
    this.table.select($("hist-tensor").value || null);
    $("params-step").textContent = step === null ? "not stepped yet" : `signals of step ${step}`;
  }

  // ---------------------------------------------------------------- histogram

  async loadHistogram() {
    const tensor = $("hist-tensor").value;
    const key = $("hist-key").value;
    const log = $("hist-log").checked;
    if (!tensor) return;
    this.table.select(tensor);
    if (this.watched) {
      // The service holds none of a watched run's tensors: its stats answer 409.
      Object.assign($("hist-canvas").dataset, { tensor, key });
      this.histogram.setData([], []);
      $("hist-facts").textContent = `no statistics of ${tensor} here: a watched run's tensors ` +
        `stay in its training job, which reports only their signals (read its state with ` +
        `GET /v1/watch/${this.name}/state: the trainer answers at its next step)`;
      return;
    }
    let stats;
    try {
      stats = await this._get(`${this.base}/stats`, {
        name: tensor, key, bins: HIST_BINS, log: log || undefined, aggregate: false,
      });
    } catch (e) {
      this.ctx.failed("loading the histogram", e);
      return;
    }
    if (this.destroyed || tensor !== $("hist-tensor").value || key !== $("hist-key").value) return;
    const s = stats.tensors && stats.tensors[tensor] ? stats.tensors[tensor][key] : null;
    const h = s ? (log ? s.log_hist : s.hist) : null;
    const canvas = $("hist-canvas");
    canvas.dataset.tensor = tensor;
    canvas.dataset.key = key;
    if (!h) {
      const why = (stats.missing || []).find((m) => m.name === tensor && m.key === key);
      this.histogram.setData([], []);
      $("hist-facts").textContent = `no ${key} for ${tensor}${why ? `: ${why.reason}` : ""}`;
      return;
    }
    // a log histogram bins log10|x|: its edges are shown as the magnitudes they stand for
    const edges = h.edges.map((e) => (log ? 10 ** num(e) : num(e)));
    this.histogram.setData(edges, h.counts.map(num));
    const facts = ["mean", "std", "min", "max", "norm"].map((k) => `${k} ${fmt(num(s[k]))}`);
    for (const [q, v] of Object.entries(s.quantiles || {})) facts.push(`p${Math.round(Number(q) * 1000) / 10} ${fmt(num(v))}`);
    for (const k of ["nan", "inf", "zeros"]) if (s[k]) facts.push(`${k} ${s[k]}`);
    if (log && h.negative) facts.push(`negative ${h.negative}`);
    if (h.below || h.above) facts.push(`outside the bins: ${h.below} below, ${h.above} above`);
    if (s.sampled) facts.push(`sampled: ${s.sample_size} of ${s.numel}`);
    $("hist-facts").textContent = `${tensor} ${key} at step ${stats.step}: ${facts.join(" · ")}`;
  }

  // ---------------------------------------------------------------- bias correction

  async loadBias() {
    try {
      this.biasReport = await this._get(`${this.base}/bias-correction`);
    } catch (e) {
      this.ctx.failed("loading the bias correction", e);
      return;
    }
    if (!this.destroyed) this.drawBias();
  }

  drawBias() {
    const r = this.biasReport;
    if (!r || !r.groups.length) return;
    const g = r.groups[Number($("bias-group").value) || 0] || r.groups[0];
    const b1 = num(g.beta1);
    const b2 = num(g.beta2);
    const t = num(g.step);
    // to well past where 1 - beta2^t is ~1, and past the current step
    const end = Math.max(10, t * 2, Math.min(1e7, 10 / Math.max(1e-9, 1 - b2)));
    const xs = [];
    const c1 = [];
    const c2 = [];
    const n = 400;
    for (let i = 0; i <= n; i++) {
      const x = end ** (i / n);
      xs.push(x);
      c1.push(1 - b1 ** x);
      c2.push(1 - b2 ** x);
    }
    this.bias.series = [
      { label: "1-β1^t", color: PALETTE[0], xs, ys: c1 },
      { label: "1-β2^t", color: PALETTE[1], xs, ys: c2 },
    ];
    this.bias.marks = t >= 1 ? [{ x: t, color: "#111827", dash: [2, 2] }] : [];
    this.bias.draw();
    $("bias-facts").textContent = t >= 1
      ? `step ${t}: 1-β1^t = ${fmt(num(g.bias_correction1))}, 1-β2^t = ${fmt(num(g.bias_correction2))}` +
        ` (β1 ${b1}, β2 ${b2}); step size lr/(1-β1^t) = ${fmt(num(g.step_size))}`
      : `not stepped yet (β1 ${b1}, β2 ${b2})`;
    $("bias-canvas").dataset.step = String(t);
  }

  // ---------------------------------------------------------------- alerts

  async loadAlerts() {
    let report;
    try {
      report = await this._get(`${this.base}/alerts`, { limit: 100 });
    } catch (e) {
      this.ctx.failed("loading the alerts", e);
      return;
    }
    if (this.destroyed) return;
    this.alertEvents = report.events;
    const active = $("alerts-active");
    active.replaceChildren(...report.active.map((a) => el("li", {
      className: "active",
      textContent: `${a.rule} — ${a.tensor ?? "aggregate"} since step ${a.since_step}`,
    })));
    if (!report.active.length) active.append(el("li", { className: "muted", textContent: "none active" }));
    $("alerts-count").textContent = String(report.active.length);
    $("alerts-count").className = report.active.length ? "badge bad" : "badge";
    $("alerts-events").replaceChildren(...report.events.slice().reverse().map((e) => el("li", {},
      el("a", {
        href: alertHref(this.name, e),
        className: "alert-link",
        title: "show the tensor, the signal around this step and the elements involved",
        textContent: `step ${e.step}: ${e.rule} on ${e.tensor ?? "aggregate"}`,
      }),
      ` (${fmt(num(e.value))}${e.previous !== null && e.previous !== undefined ? ` from ${fmt(num(e.previous))}` : ""})` +
        (e.top ? " · elements" : ""),
    )));
    this.drawCharts();
  }
}

/** Fills a <select> with [value, label] pairs, keeping `value` selected. */
export function fill(select, options, value) {
  const same = select.options.length === options.length &&
    options.every(([v, l], i) => select.options[i].value === v && select.options[i].text === l);
  if (!same) select.replaceChildren(...options.map(([v, l]) => el("option", { value: v, textContent: l })));
  if (value !== undefined && options.some(([v]) => v === value)) select.value = value;
}
