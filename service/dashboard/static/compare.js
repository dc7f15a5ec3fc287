// Compare runs: one signal of several steppers on one chart, a line per stepper over step.
//
// Each stepper's series is its whole-run history (GET .../history?from=0&max_points=N&signal=S,
// with tensor=T for a tensor's own series): recent steps at full resolution, older ones as
// the means of the downsampled tiers. The choice lives in the URL's fragment,
// #compare?signal=S&tensor=T&stepper=A&stepper=B, so a comparison can be shared.

import { num } from "./api.js";
import { LineChart, PALETTE } from "./charts.js";

const $ = (id) => document.getElementById(id);

/** Points per stepper's series (the chart draws at most one per pixel column anyway). */
export const COMPARE_POINTS = 2000;
/** Signals offered (any other one can be typed); "loss" is the loss the clients report. */
const OFFERED = [
  "grad_norm", "param_norm", "update_ratio", "update_norm", "exp_avg_norm", "exp_avg_sq_mean",
  "lr_eff_p1", "lr_eff_p50", "lr_eff_p99", "shock_p99", "lr_fell_frac", "nan_count", "loss",
];

function el(tag, props = {}, ...children) {
  const e = document.createElement(tag);
  Object.assign(e, props);
  e.append(...children);
  return e;
}

/** The fragment that shows this comparison. */
export function compareHash(signal, tensor, steppers) {
  const q = new URLSearchParams({ signal });
  if (tensor) q.set("tensor", tensor);
  for (const s of steppers) q.append("stepper", s);
  return `#compare?${q}`;
}

export class Compare {
  /** @param {object} ctx {api, failed(what, error)} */
  constructor(ctx) {
    this.ctx = ctx;
    this.chart = new LineChart($("compare-canvas"), { logY: true, readout: $("compare-readout") });
    this.token = 0;
    $("compare-signals").replaceChildren(...OFFERED.map((s) => el("option", { value: s })));
    $("compare-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const chosen = [...$("compare-steppers").selectedOptions].map((o) => o.value);
      location.hash = compareHash($("compare-signal").value.trim(), $("compare-tensor").value.trim(), chosen);
    });
    $("compare-log").addEventListener("change", (e) => { this.chart.logY = e.target.checked; this.chart.draw(); });
  }

  /** The steppers one may pick (keeps the current choice). */
  setSteppers(names) {
    const box = $("compare-steppers");
    const chosen = new Set([...box.selectedOptions].map((o) => o.value));
    const same = box.options.length === names.length && names.every((n, i) => box.options[i].value === n);
    if (!same) box.replaceChildren(...names.map((n) => el("option", { value: n, textContent: n })));
    for (const o of box.options) o.selected = chosen.has(o.value);
  }

  /** Draws the comparison the fragment's query names. */
  async show(params) {
    const signal = params.get("signal") || "grad_norm";
    const tensor = params.get("tensor") || "";
    const steppers = params.getAll("stepper");
    $("compare-signal").value = signal;
    $("compare-tensor").value = tensor;
    const box = $("compare-steppers");
    for (const o of box.options) o.selected = steppers.includes(o.value);
    $("compare").open = true;
    const token = ++this.token;
    const notes = [];
    const series = await Promise.all(steppers.map(async (name, k) => {
      const color = PALETTE[k % PALETTE.length];
      try {
        const h = await this.ctx.api.get(`v1/steppers/${encodeURIComponent(name)}/history`, {
          from: 0, max_points: COMPARE_POINTS, signal: signal === "loss" ? undefined : signal,
          tensor: tensor || undefined,
        });
        if (signal === "loss") return { label: name, color, xs: h.loss.steps, ys: h.loss.values.map(num) };
        const block = tensor ? h.tensors[tensor] : h.aggregate;
        return { label: name, color, xs: block.steps, ys: block.values[signal].map(num) };
      } catch (e) {
        notes.push(`${name}: ${e && e.message ? e.message : e}`);
        return { label: name, color, xs: [], ys: [] };
      }
    }));
    if (token !== this.token) return;
    this.chart.series = series;
    this.chart.marks = [];
    this.chart.draw();
    const canvas = $("compare-canvas");
    canvas.dataset.steppers = steppers.join(",");
    canvas.dataset.lengths = series.map((s) => s.xs.length).join(",");
    $("compare-legend").replaceChildren(...series.map((s) => {
      const swatch = el("i");
      swatch.style.background = s.color;
      return el("span", {}, swatch, s.label);
    }));
    $("compare-facts").textContent = (steppers.length
      ? `${signal} of ${tensor || "the aggregate"} · whole run, up to ${COMPARE_POINTS} points per stepper (older steps: tier means)`
      : "pick steppers to compare") + (notes.length ? ` · not shown: ${notes.join("; ")}` : "");
  }
}
