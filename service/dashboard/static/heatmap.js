// Histograms over time as a heat map (TensorBoard-style): one column per recorded step
// (GET .../histograms, every few steps), one row per log10|x| bin, darker where more of the
// tensor's elements fall. Only the bins some column uses are drawn; zeros, values outside
// the bins and NaN/Inf are counted in the readout. A column of a large tensor is an
// estimate from a uniform sample: its rank error (at 99%) is in the readout.

import { num } from "./api.js";
import { fmt, prepare } from "./charts.js";

const $ = (id) => document.getElementById(id);
const AXIS = "#6b7280";


export class HeatMap {
  constructor(canvas, { readout = null } = {}) {
    this.canvas = canvas;
    this.readout = readout;
    this.data = null;
    this.layout = null;
    canvas.addEventListener("mousemove", (e) => this._hover(e));
    canvas.addEventListener("mouseleave", () => { if (this.readout) this.readout.textContent = ""; });
  }

  /** A GET .../histograms reply (or null). */
  setData(data) {
    this.data = data;
    this.render();
  }

  render() {
    const { ctx, w, h } = prepare(this.canvas);
    const d = this.data;
    const cols = d ? d.steps.length : 0;
    const used = [];
    if (d) {
      for (let b = 0; b < d.edges.length - 1; b++) {
        if (d.counts.some((c) => num(c[b]) > 0)) used.push(b);
      }
    }
    const L = 58, R = w - 10, T = 8, B = h - 22;
    ctx.fillStyle = AXIS;
    ctx.strokeStyle = AXIS;
    ctx.beginPath(); ctx.moveTo(L, T); ctx.lineTo(L, B); ctx.lineTo(R, B); ctx.stroke();
    let cells = 0;
    if (!cols || !used.length) {
      ctx.textAlign = "center";
      ctx.fillText("no histograms recorded yet", (L + R) / 2, (T + B) / 2);
    } else {
      const lo = used[0], hi = used[used.length - 1];
      const rows = hi - lo + 1;
      const cw = (R - L) / cols, rh = (B - T) / rows;
      for (let i = 0; i < cols; i++) {
        const column = d.counts[i].map(num);
        const total = column.reduce((a, c) => a + c, 0);
        if (!(total > 0)) continue;
        for (let b = lo; b <= hi; b++) {
          const share = column[b] / total;
          if (!(share > 0)) continue;
          ctx.fillStyle = `rgba(37, 99, 235, ${Math.min(1, 0.12 + Math.sqrt(share))})`;
          ctx.fillRect(L + i * cw, B - (b - lo + 1) * rh, Math.ceil(cw), Math.ceil(rh));
          cells++;
        }
      }
      ctx.fillStyle = AXIS;
      ctx.textAlign = "right";
      ctx.textBaseline = "middle";
      const every = Math.max(1, Math.ceil(rows / Math.max(1, (B - T) / 22)));
      for (let b = lo; b <= hi + 1; b += every) {
        ctx.fillText(fmt(10 ** num(d.edges[b])), L - 4, B - (b - lo) * rh);
      }
      ctx.textAlign = "center";
      ctx.textBaseline = "top";
      const xEvery = Math.max(1, Math.ceil(cols / Math.max(1, (R - L) / 70)));
      for (let i = 0; i < cols; i += xEvery) ctx.fillText(String(d.steps[i]), L + (i + 0.5) * cw, B + 6);
      this.layout = { L, R, T, B, cw, rh, lo, hi };
    }
    Object.assign(this.canvas.dataset, { columns: String(cols), bins: String(used.length), cells: String(cells) });
  }

  _hover(e) {
    const d = this.data;
    const g = this.layout;
    if (!d || !g || !this.readout) return;
    const rect = this.canvas.getBoundingClientRect();
    const i = Math.floor((e.clientX - rect.left - g.L) / g.cw);
    const b = g.lo + Math.floor((g.B - (e.clientY - rect.top)) / g.rh);
    if (i < 0 || i >= d.steps.length || b < g.lo || b > g.hi) { this.readout.textContent = ""; return; }
    const column = d.counts[i].map(num);
    const total = column.reduce((a, c) => a + c, 0);
    const err = num(d.rank_error[i]);
    this.readout.textContent = `step ${d.steps[i]}: |x| in [${fmt(10 ** d.edges[b])}, ${fmt(10 ** d.edges[b + 1])}): ` +
      `${fmt(column[b])} (${fmt((100 * column[b]) / (total || 1))}% of the binned)` +
      ` · zeros ${fmt(num(d.zeros[i]))} · below ${fmt(num(d.under[i]))} · above ${fmt(num(d.over[i]))}` +
      ` · NaN/Inf ${fmt(num(d.nonfinite[i]))}` +
      (err > 0 ? ` · estimated: rank error ≤ ${fmt(err)} (99%)` : " · exact");
  }
}

/** The heat map card of a stepper view: loads its tensor's and quantity's columns. */
export class HeatCard {
  constructor(view) {
    this.view = view;
    this.map = new HeatMap($("heat-canvas"), { readout: $("heat-readout") });
    this.last = null;
  }

  async load() {
    const tensor = $("heat-tensor").value;
    const key = $("heat-key").value;
    if (!tensor) return;
    if (this.view.watched) {
      Object.assign($("heat-canvas").dataset, { tensor, key });
      this.map.setData(null);
      $("heat-facts").textContent =
        "no histograms over time for a watched run: its trainer reports signals, not histograms";
      return;
    }
    let d;
    try {
      d = await this.view._get(`${this.view.base}/histograms`, { tensor, key });
    } catch (e) {
      this.view.ctx.failed("loading the histograms over time", e);
      return;
    }
    if (this.view.destroyed || tensor !== $("heat-tensor").value || key !== $("heat-key").value) return;
    Object.assign($("heat-canvas").dataset, { tensor, key });
    this.map.setData(d);
    const n = d.steps.length;
    const sampled = d.rank_error.some((x) => num(x) > 0);
    $("heat-facts").textContent = n
      ? `${tensor} ${key}: log10|x| of each element, ${n} columns (steps ${d.steps[0]}–${d.steps[n - 1]}, ` +
        `recorded every ${d.every} steps, thinned when old)` +
        (sampled ? ` · estimated from ${d.sample} sampled elements per column (rank error in the readout)` : " · exact counts")
      : `no histograms yet: they are recorded every ${d.every} steps`;
  }
}
