// An alert in focus: the tensor, the step and the elements an alert is about.
//
// Each alert event in the stepper view links here (#/<stepper>?tensor=<t>&step=<s>&signal=<x>,
// a URL that can be shared). The card shows the alert's signal over the steps around it
// (the whole-run history API, from/to/max_points) with the step marked, and the top
// elements that the localized signals recorded at that step and the service kept with the
// event (`top` in GET .../alerts): flat indices, as row and column for a 2-D tensor, and
// values. The stepper view also switches its charts and histogram to the tensor.

import { num } from "./api.js";
import { LineChart, fmt } from "./charts.js";

const $ = (id) => document.getElementById(id);

/** Steps shown either side of the alert's step. */
export const AROUND = 50;
/** Alert events fetched to find an older one than the view holds. */
const MANY = 10000;
/** What each list of top elements is ranked by, and what its value is. */
const KINDS = {
  lr_change: "change of effective LR (new / old, net of the schedule)",
  shock: "shock g² / v̂(t-1)",
};

/** The link (a URL fragment) that puts alert event `e` of `stepper` in focus. */
export function alertHref(stepper, e) {
  const q = new URLSearchParams({ step: String(e.step) });
  if (e.tensor !== null && e.tensor !== undefined) q.set("tensor", e.tensor);
  if (e.signal) q.set("signal", e.signal);
  return `#/${encodeURIComponent(stepper)}?${q}`;
}

/** Where flat index `i` lies in a tensor of `shape`: [row, col] for a 2-D one, else null. */
export function rowCol(i, shape) {
  if (!shape || shape.length !== 2 || !shape[1]) return null;
  return [Math.floor(i / shape[1]), i % shape[1]];
}

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  Object.assign(e, props);
  e.append(...children);
  return e;
}

export class AlertFocus {
  /** @param {object} view the StepperView (its api, base path, summary and alert events) */
  constructor(view) {
    this.view = view;
    this.chart = new LineChart($("focus-canvas"), { readout: $("focus-readout") });
    this.wanted = null;
    this.onClose = () => {
      history.replaceState(null, "", `#/${encodeURIComponent(view.name)}`);
      this.hide();
    };
    $("focus-close").addEventListener("click", this.onClose);
  }

  destroy() {
    $("focus-close").removeEventListener("click", this.onClose);
    this.hide();
  }

  hide() {
    $("focus").hidden = true;
    this.wanted = null;
  }

  /** Focus on what the URL's query names ({tensor, step, signal}); nothing if no step. */
  async show(params) {
    const step = Number(params.get("step"));
    if (!params.has("step") || !Number.isInteger(step)) { this.hide(); return; }
    const tensor = params.get("tensor");
    const signal = params.get("signal") || "nan_count";
    const wanted = { tensor, step, signal };
    this.wanted = wanted;
    const box = $("focus");
    box.hidden = false;
    box.dataset.step = String(step);
    box.dataset.tensor = tensor ?? "";
    $("focus-title").textContent = `${signal} of ${tensor ?? "the aggregate"} around step ${step}`;
    if (tensor) this.view.pickTensor(tensor);
    const [event] = await Promise.all([this._event(wanted), this._history(wanted)]);
    if (this.wanted !== wanted) return;
    this._tops(wanted, event);
    box.scrollIntoView({ block: "start" });
  }

  async _history({ tensor, step, signal }) {
    const query = { from: Math.max(0, step - AROUND), to: step + AROUND, max_points: 2 * AROUND + 1, signal };
    if (tensor) query.tensor = tensor;
    let h;
    try {
      h = await this.view._get(`${this.view.base}/history`, query);
    } catch (e) {
      this.view.ctx.failed("loading the alert's history", e);
      return;
    }
    const block = tensor ? h.tensors[tensor] : h.aggregate;
    const ys = block && block.values[signal] ? block.values[signal].map(num) : [];
    this.chart.series = [{ label: signal, color: "#2563eb", xs: block ? block.steps : [], ys }];
    this.chart.marks = [{ x: step, color: "#dc2626" }];
    this.chart.draw();
    $("focus-canvas").dataset.values = String(ys.length);
  }

  /** The alert event at that step (the view's latest events first, then the whole list). */
  async _event({ tensor, step, signal }) {
    const match = (e) => e.step === step && (e.tensor ?? null) === tensor &&
      (!e.signal || e.signal === signal);
    let found = this.view.alertEvents.find(match);
    if (found) return found;
    try {
      const report = await this.view._get(`${this.view.base}/alerts`, { limit: MANY });
      found = report.events.find(match);
    } catch (e) {
      this.view.ctx.failed("loading the alert", e);
    }
    return found || null;
  }

  _tops({ tensor, step }, event) {
    const facts = $("focus-facts");
    const body = $("focus-top").tBodies[0];
    body.replaceChildren();
    if (!event) {
      facts.textContent = `no alert event at step ${step} is kept any more (the service keeps the latest ones)`;
      return;
    }
    const what = `${event.rule}: ${fmt(num(event.value))}` +
      (event.previous !== null && event.previous !== undefined ? ` from ${fmt(num(event.previous))}` : "");
    if (!event.top) {
      facts.textContent = `${what}. No top elements were recorded at this step: the localized ` +
        "signals rank elements only at a step where some element's effective LR moved by " +
        "more than 2×, and only for the tensors within their budget.";
      return;
    }
    const param = this.view.summary ? this.view.summary.params.find((p) => p.name === tensor) : null;
    const shape = param ? param.shape : null;
    facts.textContent = `${what}. Top elements of ${tensor}${shape ? ` (${shape.join("×")})` : ""} at step ${step}:`;
    for (const [kind, label] of Object.entries(KINDS)) {
      const top = event.top[kind];
      if (!top) continue;
      top.index.forEach((i, k) => {
        const rc = rowCol(i, shape);
        const row = el("tr", {},
          el("td", { textContent: k === 0 ? label : "" }),
          el("td", { className: "num", textContent: String(i) }),
          el("td", { className: "num", textContent: rc ? String(rc[0]) : "" }),
          el("td", { className: "num", textContent: rc ? String(rc[1]) : "" }),
          el("td", { className: "num", textContent: fmt(num(top.value[k])) }));
        row.dataset.kind = kind;
        body.append(row);
      });
    }
  }
}
