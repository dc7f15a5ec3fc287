// Canvas charts: line charts over steps and histograms, drawn without any library.
//
// A line chart draws at most one point per horizontal pixel of its plot, whatever the
// length of the series: each 2-pixel column keeps the minimum and the maximum of the
// values that fall in it (in their order), so spikes stay visible while 10,000 points
// cost the same to draw as 300. Non-finite values are gaps, marked in red on the top edge
// once the series has had a finite value (before, the signal is not defined yet).
// Each chart records what it drew in its canvas's data attributes (data-points: the most
// points drawn for one series; data-width: the canvas's CSS width), which the browser
// tests read.

export const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2",
                        "#ca8a04", "#db2777"];
const GRID = "#e5e7eb";
const AXIS = "#6b7280";
const FONT = "11px system-ui, sans-serif";

/** A short label for a number: 3 significant digits, exponents for very large/small. */
export function fmt(v) {
  if (typeof v !== "number") return String(v);
  if (Number.isNaN(v)) return "NaN";
  if (!Number.isFinite(v)) return v > 0 ? "+Inf" : "-Inf";
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e5 || a < 1e-3) {
    const [mantissa, exponent] = v.toExponential(2).split("e");
    return `${Number(mantissa)}e${Number(exponent)}`;
  }
  if (Number.isInteger(v)) return String(v);
  return String(Number(v.toPrecision(3)));
}

function niceStep(span, count) {
  const raw = span / Math.max(1, count);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const r = raw / mag;
  return (r < 1.5 ? 1 : r < 3 ? 2 : r < 7 ? 5 : 10) * mag;
}

function linearTicks(lo, hi, count, integer = false) {
  if (!(hi > lo)) return [lo];
  let step = niceStep(hi - lo, count);
  if (integer) step = Math.max(1, Math.round(step));
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) {
    out.push(Math.abs(t) < step * 1e-9 ? 0 : t);
    if (out.length > 50) break;
  }
  return out;
}

function logTicks(lo, hi) {
  // lo, hi are log10 values: ticks at whole decades (thinned to about 6), and at 2 and 5
  // times them when the range spans less than two decades
  const out = [];
  if (hi - lo < 2) {
    for (let d = Math.floor(lo); d <= Math.ceil(hi); d++) {
      for (const m of [1, 2, 5]) {
        const t = d + Math.log10(m);
        if (t >= lo && t <= hi) out.push(t);
      }
    }
    return out.length ? out : [lo, hi];
  }
  const every = Math.max(1, Math.ceil((Math.floor(hi) - Math.ceil(lo) + 1) / 6));
  for (let d = Math.ceil(lo); d <= Math.floor(hi); d += every) out.push(d);
  return out;
}

/** Sizes the canvas's backing store to its CSS box and the device pixel ratio. */
export function prepare(canvas) {
  const dpr = window.devicePixelRatio || 1;
  const w = Math.max(1, Math.floor(canvas.clientWidth));
  const h = Math.max(1, Math.floor(canvas.clientHeight));
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.font = FONT;
  return { ctx, w, h };
}

/**
 * The points of one series to draw: per 2-pixel column the min and the max (in their
 * order), a gap (NaN) after a column that held a non-finite or unplottable value, and a
 * mark for each column with a non-finite value after the first finite one.
 * `toX` maps a data x to a pixel; `valid(y)` says whether y can be plotted.
 * Returns {xs, ys, count (points, gaps excluded), bad (pixel x of non-finite values)}.
 */
export function downsample(xs, ys, toX, left, right, valid) {
  const px = [];
  const py = [];
  const bad = [];
  let count = 0;
  let col = null;
  let minI = -1;
  let maxI = -1;
  let gap = false;
  const flush = () => {
    if (col === null) return;
    if (minI >= 0) {
      const first = Math.min(minI, maxI);
      const second = Math.max(minI, maxI);
      px.push(toX(xs[first])); py.push(ys[first]); count++;
      if (second !== first) { px.push(toX(xs[second])); py.push(ys[second]); count++; }
    }
    if (gap && (py.length === 0 || !Number.isNaN(py[py.length - 1]))) {
      px.push(NaN); py.push(NaN);
    }
    minI = maxI = -1;
    gap = false;
  };
  for (let i = 0; i < xs.length; i++) {
    const X = toX(xs[i]);
    if (!(X >= left - 0.5 && X <= right + 0.5)) continue;
    const c = Math.floor((X - left) / 2);
    if (c !== col) { flush(); col = c; }
    const y = ys[i];
    if (!valid(y)) {
      gap = true;
      // leading NaNs are signals not defined yet (e.g. the shock at step 1): no mark
      if (!Number.isFinite(y) && count + (minI >= 0 ? 1 : 0) > 0 &&
          (bad.length === 0 || bad[bad.length - 1] !== c * 2 + left)) {
        bad.push(c * 2 + left);
      }
      continue;
    }
    if (minI < 0 || y < ys[minI]) minI = i;
    if (maxI < 0 || y > ys[maxI]) maxI = i;
  }
  flush();
  return { xs: px, ys: py, count, bad };
}

/** A centred axis label, moved inwards where it would overflow the canvas's edge. */
function label(ctx, text, x, y, w) {
  const half = ctx.measureText(text).width / 2;
  ctx.fillText(text, Math.min(Math.max(x, half + 1), w - half - 1), y);
}

/** Index of the element of sorted `xs` nearest to x. */
function nearest(xs, x) {
  let lo = 0;
  let hi = xs.length - 1;
  if (hi < 0) return -1;
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    if (xs[mid] < x) lo = mid; else hi = mid;
  }
  return Math.abs(xs[lo] - x) <= Math.abs(xs[hi] - x) ? lo : hi;
}

/**
 * A line chart of series over steps.
 *   chart.series = [{label, color, xs, ys}]   (xs increasing)
 *   chart.marks = [{x, color, label}]          (vertical lines: alerts, the current step)
 *   chart.draw()                               (coalesced to one render per frame)
 */
export class LineChart {
  constructor(canvas, { logX = false, logY = false, readout = null, xLabel = "step" } = {}) {
    this.canvas = canvas;
    this.logX = logX;
    this.logY = logY;
    this.readout = readout;
    this.xLabel = xLabel;
    this.series = [];
    this.marks = [];
    this.hoverX = null;
    this.pending = false;
    this.layout = null;
    canvas.addEventListener("mousemove", (e) => this._hover(e));
    canvas.addEventListener("mouseleave", () => { this.hoverX = null; this._readout(); this.draw(); });
  }

  draw() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this.render(); });
  }

  _fx(x) { return this.logX ? Math.log10(x) : x; }
  _fy(y) { return this.logY ? Math.log10(y) : y; }
  _valid(y) { return Number.isFinite(y) && (!this.logY || y > 0); }

  render() {
    const { ctx, w, h } = prepare(this.canvas);
    const L = 58;
    const R = w - 10;
    const T = 8;
    const B = h - 22;
    // x range over every series' finite xs (and the marks)
    let x0 = Infinity;
    let x1 = -Infinity;
    for (const s of this.series) {
      for (const x of [s.xs[0], s.xs[s.xs.length - 1]]) {
        if (x === undefined || !Number.isFinite(this._fx(x))) continue;
        x0 = Math.min(x0, this._fx(x));
        x1 = Math.max(x1, this._fx(x));
      }
    }
    for (const m of this.marks) {
      if (Number.isFinite(this._fx(m.x))) {
        x0 = Math.min(x0, this._fx(m.x));
        x1 = Math.max(x1, this._fx(m.x));
      }
    }
    const empty = !(x1 >= x0);
    if (empty) { x0 = 0; x1 = 1; }
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    const toX = (x) => L + ((this._fx(x) - x0) / (x1 - x0)) * (R - L);
    const valid = (y) => this._valid(y);
    const drawn = this.series.map((s) => downsample(s.xs, s.ys, toX, L, R, valid));
    let y0 = Infinity;
    let y1 = -Infinity;
    for (const d of drawn) {
      for (const y of d.ys) {
        if (Number.isNaN(y)) continue;
        const v = this._fy(y);
        if (v < y0) y0 = v;
        if (v > y1) y1 = v;
      }
    }
    if (!(y1 >= y0)) { y0 = 0; y1 = 1; }
    if (y1 === y0) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
    const pad = (y1 - y0) * 0.06;
    y0 -= pad; y1 += pad;
    const toY = (y) => B - ((this._fy(y) - y0) / (y1 - y0)) * (B - T);
    this.layout = { L, R, T, B, x0, x1, toX };

    // grid and axes
    ctx.strokeStyle = GRID;
    ctx.fillStyle = AXIS;
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    const yt = this.logY ? logTicks(y0, y1) : linearTicks(y0, y1, 4);
    for (const t of yt) {
      const Y = B - ((t - y0) / (y1 - y0)) * (B - T);
      if (Y < T - 1 || Y > B + 1) continue;
      ctx.beginPath(); ctx.moveTo(L, Y); ctx.lineTo(R, Y); ctx.stroke();
      ctx.fillText(fmt(this.logY ? 10 ** t : t), L - 4, Y);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    const xt = this.logX ? logTicks(x0, x1) : linearTicks(x0, x1, Math.max(2, (R - L) / 90), true);
    for (const t of xt) {
      const X = L + ((t - x0) / (x1 - x0)) * (R - L);
      if (X < L - 1 || X > R + 1) continue;
      ctx.beginPath(); ctx.moveTo(X, B); ctx.lineTo(X, B + 4); ctx.stroke();
      label(ctx, fmt(this.logX ? 10 ** t : t), X, B + 6, w);
    }
    ctx.strokeStyle = AXIS;
    ctx.beginPath(); ctx.moveTo(L, T); ctx.lineTo(L, B); ctx.lineTo(R, B); ctx.stroke();
    if (empty) {
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText("no data yet", (L + R) / 2, (T + B) / 2);
    }

    // vertical marks
    for (const m of this.marks) {
      const X = toX(m.x);
      if (!(X >= L && X <= R)) continue;
      ctx.strokeStyle = m.color || "#dc2626";
      ctx.setLineDash(m.dash || [4, 3]);
      ctx.beginPath(); ctx.moveTo(X, T); ctx.lineTo(X, B); ctx.stroke();
      ctx.setLineDash([]);
    }

    // the series
    ctx.save();
    ctx.beginPath(); ctx.rect(L, T - 1, R - L, B - T + 2); ctx.clip();
    let most = 0;
    let total = 0;
    drawn.forEach((d, k) => {
      const s = this.series[k];
      most = Math.max(most, d.count);
      total += d.count;
      ctx.strokeStyle = s.color || PALETTE[k % PALETTE.length];
      ctx.fillStyle = ctx.strokeStyle;
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      let pen = false;
      let run = 0;
      let lastX = 0;
      let lastY = 0;
      for (let i = 0; i < d.xs.length; i++) {
        const y = d.ys[i];
        if (Number.isNaN(y)) {
          if (run === 1) ctx.fillRect(lastX - 1.5, lastY - 1.5, 3, 3);
          pen = false; run = 0;
          continue;
        }
        lastX = d.xs[i];
        lastY = toY(y);
        if (pen) ctx.lineTo(lastX, lastY); else ctx.moveTo(lastX, lastY);
        pen = true; run++;
      }
      ctx.stroke();
      if (run === 1) ctx.fillRect(lastX - 1.5, lastY - 1.5, 3, 3);
    });
    ctx.restore();
    // non-finite values: red ticks on the top edge
    ctx.fillStyle = "#dc2626";
    for (const d of drawn) for (const X of d.bad) ctx.fillRect(X, T, 2, 5);

    if (this.hoverX !== null && this.hoverX >= L && this.hoverX <= R) {
      ctx.strokeStyle = "#9ca3af";
      ctx.beginPath(); ctx.moveTo(this.hoverX, T); ctx.lineTo(this.hoverX, B); ctx.stroke();
    }
    this.canvas.dataset.points = String(most);
    this.canvas.dataset.total = String(total);
    this.canvas.dataset.width = String(w);
    this.canvas.dataset.series = String(this.series.length);
    this.canvas.dataset.drawn = String(Number(this.canvas.dataset.drawn || 0) + 1);
  }

  _hover(e) {
    if (!this.layout) return;
    const rect = this.canvas.getBoundingClientRect();
    this.hoverX = e.clientX - rect.left;
    this._readout();
    this.draw();
  }

  _readout() {
    if (!this.readout) return;
    if (this.hoverX === null || !this.layout) { this.readout.textContent = ""; return; }
    const { L, R, x0, x1 } = this.layout;
    const fx = x0 + ((this.hoverX - L) / (R - L)) * (x1 - x0);
    const x = this.logX ? 10 ** fx : fx;
    const parts = [];
    let at = null;
    for (const s of this.series) {
      const i = nearest(s.xs, x);
      if (i < 0) continue;
      at = at === null ? s.xs[i] : at;
      parts.push(`${s.label} ${fmt(s.ys[i])}`);
    }
    this.readout.textContent = at === null ? "" : `${this.xLabel} ${fmt(at)}: ${parts.join(" · ")}`;
  }
}

/**
 * A histogram: `setData({edges, counts})` with n+1 edges and n counts. Bins are drawn with
 * equal widths (log bins are equal in log space); edge labels are their values.
 */
export class Histogram {
  constructor(canvas, { readout = null } = {}) {
    this.canvas = canvas;
    this.readout = readout;
    this.edges = [];
    this.counts = [];
    this.logCounts = false;
    this.color = PALETTE[0];
    canvas.addEventListener("mousemove", (e) => this._hover(e));
    canvas.addEventListener("mouseleave", () => { if (this.readout) this.readout.textContent = ""; });
  }

  setData(edges, counts) {
    this.edges = edges;
    this.counts = counts;
    this.render();
  }

  render() {
    const { ctx, w, h } = prepare(this.canvas);
    const L = 58;
    const R = w - 10;
    const T = 8;
    const B = h - 22;
    const n = this.counts.length;
    const scale = (c) => (this.logCounts ? Math.log10(1 + c) : c);
    let top = 0;
    let total = 0;
    for (const c of this.counts) { top = Math.max(top, scale(c)); total += c; }
    if (top === 0) top = 1;
    ctx.fillStyle = AXIS;
    ctx.strokeStyle = GRID;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    const ticks = this.logCounts ? logTicks(0, top) : linearTicks(0, top, 4, true);
    for (const t of ticks) {
      const Y = B - (t / top) * (B - T);
      ctx.beginPath(); ctx.moveTo(L, Y); ctx.lineTo(R, Y); ctx.stroke();
      ctx.fillText(fmt(this.logCounts ? Math.round(10 ** t - 1) : t), L - 4, Y);
    }
    const bw = n ? (R - L) / n : 0;
    ctx.fillStyle = this.color;
    for (let i = 0; i < n; i++) {
      const v = scale(this.counts[i]);
      if (v <= 0) continue;
      const Y = B - (v / top) * (B - T);
      ctx.fillRect(L + i * bw + (bw > 3 ? 0.5 : 0), Y, Math.max(1, bw - (bw > 3 ? 1 : 0)), B - Y);
    }
    ctx.strokeStyle = AXIS;
    ctx.beginPath(); ctx.moveTo(L, T); ctx.lineTo(L, B); ctx.lineTo(R, B); ctx.stroke();
    ctx.fillStyle = AXIS;
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    if (n) {
      const labels = Math.max(2, Math.min(6, Math.floor((R - L) / 80)));
      for (let k = 0; k <= labels; k++) {
        const i = Math.round((k / labels) * n);
        label(ctx, fmt(this.edges[i]), L + i * bw, B + 6, w);
      }
    } else {
      ctx.textBaseline = "middle";
      ctx.fillText("no histogram yet", (L + R) / 2, (T + B) / 2);
    }
    this.layout = { L, R, bw };
    this.canvas.dataset.bins = String(n);
    this.canvas.dataset.total = String(total);
    this.canvas.dataset.width = String(w);
  }

  _hover(e) {
    if (!this.readout || !this.layout || !this.counts.length) return;
    const rect = this.canvas.getBoundingClientRect();
    const i = Math.floor((e.clientX - rect.left - this.layout.L) / this.layout.bw);
    if (i < 0 || i >= this.counts.length) { this.readout.textContent = ""; return; }
    this.readout.textContent =
      `[${fmt(this.edges[i])}, ${fmt(this.edges[i + 1])}): ${this.counts[i]}`;
  }
}
