// The controls a debugging user needs, each shown only to tokens whose scope allows it:
// change the learning rate (write), take a snapshot and roll back to one (admin). For a
// watched run each is a command to its trainer (POST v1/watch/{name}/commands), followed
// until the trainer applied it at a step boundary.

import { fmt } from "./charts.js";

const $ = (id) => document.getElementById(id);
/** How long a "Roll back" button waits for the confirming second click. */
const CONFIRM_MS = 6000;
/** How long a watched run's command is followed before "sent to the trainer" is shown. */
const COMMAND_WAIT_MS = 15000;

export class Controls {
  /** @param view the StepperView (its name, api, ctx, and what to reload after a change) */
  constructor(view) {
    this.view = view;
    this.api = view.api;
    this.base = view.base;
    this.armed = null;
    this.listeners = [];
    const canWrite = view.ctx.allows("write");
    const canAdmin = view.ctx.allows("admin");
    $("lr-form").hidden = !canWrite;
    $("snapshot-form").hidden = !canAdmin;
    $("rollback-form").hidden = !canAdmin;
    $("controls-readonly").hidden = canWrite;
    $("controls-result").textContent = "";
    $("lr-input").value = ""; // filled with this stepper's lr by summary()
    for (const b of document.querySelectorAll("#lr-form button, #snapshot-form button, #rollback-form button")) {
      b.disabled = false;
    }
    this._on($("lr-form"), "submit", (e) => { e.preventDefault(); this.setLr(); });
    this._on($("snapshot-form"), "submit", (e) => { e.preventDefault(); this.snapshot(); });
    this._on($("rollback-form"), "submit", (e) => { e.preventDefault(); this.rollback(); });
    this._on($("rollback-select"), "change", () => this._disarm());
    this.canAdmin = canAdmin;
  }

  _on(target, type, fn) {
    target.addEventListener(type, fn);
    this.listeners.push([target, type, fn]);
  }

  destroy() {
    for (const [t, type, fn] of this.listeners) t.removeEventListener(type, fn);
    this._disarm();
  }

  async load() {
    if (this.canAdmin) await this.loadSnapshots();
  }

  /** The stepper's summary arrived: show each group's lr. */
  summary(s) {
    const select = $("lr-group");
    const keep = select.value;
    const options = [["", "all groups"], ...s.groups.map((g) => [String(g.index), `group ${g.index}`])];
    select.replaceChildren(...options.map(([v, l]) => new Option(l, v)));
    select.value = options.some(([v]) => v === keep) ? keep : "";
    select.hidden = s.groups.length < 2;
    $("lr-current").textContent = "now " + s.groups.map((g) => fmt(g.lr)).join(", ");
    $("lr-current").dataset.lr = s.groups.map((g) => g.lr).join(",");
    const input = $("lr-input");
    if (!input.value && s.groups.length) input.value = String(s.groups[0].lr);
  }

  _result(text) {
    $("controls-result").textContent = text;
  }

  async _busy(form, work) {
    const buttons = form.querySelectorAll("button");
    for (const b of buttons) b.disabled = true;
    try {
      await work();
    } catch (e) {
      this.view.ctx.failed(form.dataset.what || "the change", e);
    } finally {
      for (const b of buttons) b.disabled = false;
    }
  }

  /** A watched run: send ``body`` to its trainer and follow it until it applied (or the
   * wait is over); throws if the trainer refused it. */
  async _command(body) {
    const base = `v1/watch/${encodeURIComponent(this.view.name)}`;
    let c = await this.api.request("POST", `${base}/commands`, { json: body });
    const until = Date.now() + COMMAND_WAIT_MS;
    while (c.status === "pending" && Date.now() < until && !this.view.destroyed) {
      await new Promise((resolve) => setTimeout(resolve, 200));
      c = await this.api.request("GET", `${base}/commands/${encodeURIComponent(c.id)}`,
                                 { signal: this.view.abort.signal });
    }
    if (c.status === "failed") throw new Error(`the trainer could not apply it: ${c.detail}`);
    return c;
  }

  /** What a watched run's command came to, for the result line. */
  _applied(c, done) {
    return c.status === "applied" ? `${done} by the trainer at its step ${c.step}`
                                  : `${done}: sent to the trainer, for its next step`;
  }

  setLr() {
    const lr = Number($("lr-input").value);
    if (!(lr >= 0) || !Number.isFinite(lr)) {
      this.view.ctx.notify("the learning rate must be a finite number ≥ 0");
      return Promise.resolve();
    }
    const group = $("lr-group").value;
    const body = group === "" ? { lr } : { lr, group: Number(group) };
    return this._busy($("lr-form"), async () => {
      if (this.view.watched) {
        const { lr: _, ...where } = body;
        const c = await this._command({ op: "options", options: { lr }, ...where });
        this._result(this._applied(c, `lr set to ${fmt(lr)}${group === "" ? "" : ` in group ${group}`}`));
        await this.view.loadSummary();
        this.view.loadBias();
        return;
      }
      const s = await this.api.request("PATCH", `${this.base}/hyperparameters`, { json: body });
      this._result(`lr set to ${fmt(lr)}${group === "" ? "" : ` in group ${group}`}`);
      this.view.summary = s;
      this.summary(s);
      this.view.loadBias();
    });
  }

  snapshot() {
    const name = $("snapshot-name").value.trim();
    return this._busy($("snapshot-form"), async () => {
      if (this.view.watched) {
        const c = await this._command({ op: "snapshot", ...(name ? { snapshot: name } : {}) });
        $("snapshot-name").value = "";
        this._result(this._applied(c, `snapshot ${c.args.snapshot} taken`));
        await this.loadSnapshots(c.args.snapshot);
        return;
      }
      const info = await this.api.request("POST", `${this.base}/snapshots`,
                                          { json: name ? { name } : undefined });
      $("snapshot-name").value = "";
      this._result(`snapshot ${info.name} taken at step ${info.step}`);
      await this.loadSnapshots(info.name);
    });
  }

  async loadSnapshots(select) {
    let list;
    try {
      list = await this.api.request("GET", `${this.base}/snapshots`,
                                    { signal: this.view.abort.signal });
    } catch (e) {
      this.view.ctx.failed("listing snapshots", e);
      return;
    }
    const s = $("rollback-select");
    const keep = select || s.value;
    const usable = list.snapshots.filter((x) => !x.error);
    s.replaceChildren(...usable.reverse().map((x) =>
      new Option(`${x.name} (step ${x.step})`, x.name)));
    if (!usable.length) s.append(new Option("no snapshots yet", ""));
    if (usable.some((x) => x.name === keep)) s.value = keep;
    $("rollback-button").disabled = !usable.length;
  }

  _disarm() {
    clearTimeout(this.armed);
    this.armed = null;
    const b = $("rollback-button");
    b.textContent = "Roll back";
    b.classList.remove("danger");
  }

  /** First click arms the button, the second (within CONFIRM_MS) rolls back. */
  rollback() {
    const snap = $("rollback-select").value;
    if (!snap) return Promise.resolve();
    const b = $("rollback-button");
    if (this.armed === null) {
      b.textContent = `Confirm: roll back to ${snap}`;
      b.classList.add("danger");
      this.armed = setTimeout(() => this._disarm(), CONFIRM_MS);
      return Promise.resolve();
    }
    this._disarm();
    return this._busy($("rollback-form"), async () => {
      if (this.view.watched) {
        // The trainer copies the snapshot's state and parameters back; its step goes on.
        const c = await this._command({ op: "restore", snapshot: snap });
        this._result(this._applied(c, `rolled back to ${snap}`));
        this.view.ctx.onChanged();
        return;
      }
      const s = await this.api.request(
        "POST", `${this.base}/snapshots/${encodeURIComponent(snap)}/restore`);
      this._result(`rolled back to ${snap} (step ${s.step})`);
      this.view.aggregate.truncate(s.step + 1);
      this.view.tensorSeries.truncate(s.step + 1);
      await this.view.loadSummary();
      this.view.drawCharts();
      this.view.loadTable();
      this.view.loadBias();
      this.view.loadHistogram();
      this.view.ctx.onChanged();
    });
  }
}
