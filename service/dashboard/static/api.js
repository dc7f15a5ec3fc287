// The dashboard's only way to the service: its public REST API and its event stream.
//
// The bearer token lives in sessionStorage (this tab only, gone when it closes); it is sent
// in the Authorization header and never put in a URL, so it cannot land in access logs or
// the browser history. EventSource cannot send headers, so the event stream is read with
// fetch() and parsed here (the WHATWG server-sent events format).

const TOKEN_KEY = "adamscope.token";

/** A problem+json reply (RFC 9457) or a transport failure, as an Error. */
export class ApiError extends Error {
  constructor(status, problem, fallback) {
    const detail = (problem && problem.detail) || fallback || `HTTP ${status}`;
    super(detail);
    this.name = "ApiError";
    this.status = status;
    this.code = (problem && problem.code) || null;
    this.problem = problem || null;
  }
}

/** JSON numbers of the service, where NaN and infinities travel as strings. */
export function num(v) {
  if (typeof v === "number") return v;
  if (v === "NaN" || v === null || v === undefined) return NaN;
  if (v === "Infinity") return Infinity;
  if (v === "-Infinity") return -Infinity;
  return Number(v);
}

export class Api {
  /** @param {URL|string} root the service's base URL (the dashboard lives at root/dashboard) */
  constructor(root) {
    this.root = new URL(root);
  }

  get token() {
    try {
      return sessionStorage.getItem(TOKEN_KEY) || "";
    } catch {
      return "";
    }
  }

  set token(value) {
    try {
      if (value) sessionStorage.setItem(TOKEN_KEY, value);
      else sessionStorage.removeItem(TOKEN_KEY);
    } catch {
      // storage disabled: the token lasts as long as the page
    }
    this._memoryToken = value;
  }

  headers(extra = {}) {
    const h = { ...extra };
    const token = this.token || this._memoryToken || "";
    if (token) h.Authorization = `Bearer ${token}`;
    return h;
  }

  url(path, query = {}) {
    const u = new URL(path, this.root);
    for (const [k, v] of Object.entries(query)) {
      if (v === undefined || v === null) continue;
      for (const item of Array.isArray(v) ? v : [v]) u.searchParams.append(k, String(item));
    }
    return u;
  }

  /** A JSON request; resolves to the parsed body (null for 204), rejects with ApiError. */
  async request(method, path, { query, json, signal } = {}) {
    const headers = this.headers({ Accept: "application/json" });
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    }
    let r;
    try {
      r = await fetch(this.url(path, query), { method, headers, body, signal, cache: "no-store" });
    } catch (e) {
      if (e && e.name === "AbortError") throw e;
      throw new ApiError(0, null, "the service cannot be reached");
    }
    if (r.status === 204) return null;
    const text = await r.text();
    let data = null;
    if (text) {
      try {
        data = JSON.parse(text);
      } catch {
        data = null;
      }
    }
    if (!r.ok) throw new ApiError(r.status, data, text.slice(0, 200));
    return data;
  }

  get(path, query) {
    return this.request("GET", path, { query });
  }
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    if (signal) signal.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
  });

/**
 * A server-sent event stream read with fetch(), so it can carry the Authorization header.
 *
 * It reconnects after a drop with exponential backoff (0.5 s doubling to 15 s, with jitter;
 * the server's `retry:` field sets the base), resuming with Last-Event-ID, and reports its
 * state through onStatus: "connecting", "live", "reconnecting" (with the next delay),
 * "denied" (401/403: it waits for restart() with a new token) or "stopped".
 * If nothing, not even a keep-alive comment, arrives for `idleMs`, the connection is taken
 * for dead and replaced.
 */
export class EventStream {
  constructor(api, path, { onEvent, onStatus, query = {}, idleMs = 45000 } = {}) {
    this.api = api;
    this.path = path;
    this.query = query;
    this.onEvent = onEvent || (() => {});
    this.onStatus = onStatus || (() => {});
    this.idleMs = idleMs;
    this.lastEventId = null;
    this.baseDelay = 500;
    this.maxDelay = 15000;
    this.attempt = 0;
    this.run = null;
  }

  start() {
    this._halt();
    const run = { controller: null, stopped: false, wake: new AbortController() };
    this.run = run;
    this._loop(run);
  }

  stop() {
    if (this._halt()) this.onStatus("stopped");
  }

  _halt() {
    const run = this.run;
    if (!run) return false;
    run.stopped = true;
    if (run.controller) run.controller.abort();
    run.wake.abort();
    this.run = null;
    return true;
  }

  restart() {
    this.attempt = 0;
    this.start();
  }

  async _loop(run) {
    while (!run.stopped) {
      this.onStatus(this.attempt ? "reconnecting" : "connecting", { attempt: this.attempt });
      const controller = (run.controller = new AbortController());
      let failure = null;
      try {
        const headers = this.api.headers({ Accept: "text/event-stream" });
        if (this.lastEventId !== null) headers["Last-Event-ID"] = this.lastEventId;
        const r = await fetch(this.api.url(this.path, this.query), {
          headers, signal: controller.signal, cache: "no-store",
        });
        if (!r.ok) {
          let problem = null;
          try { problem = await r.json(); } catch { problem = null; }
          throw new ApiError(r.status, problem);
        }
        if (!(r.headers.get("content-type") || "").startsWith("text/event-stream")) {
          throw new ApiError(r.status, null, "the event stream answered with something else");
        }
        this.attempt = 0;
        this.onStatus("live");
        await this._consume(r.body, run, controller);
      } catch (e) {
        failure = e;
      }
      if (run.stopped) return;
      if (failure instanceof ApiError && (failure.status === 401 || failure.status === 403)) {
        this.onStatus("denied", { error: failure });
        return;
      }
      this.attempt += 1;
      const delay = Math.min(this.maxDelay, this.baseDelay * 2 ** (this.attempt - 1));
      const wait = delay / 2 + Math.random() * delay / 2;
      this.onStatus("reconnecting", { attempt: this.attempt, delay: wait, error: failure });
      await sleep(wait, run.wake.signal);
    }
  }

  async _consume(body, run, controller) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let idle = null;
    const arm = () => {
      clearTimeout(idle);
      idle = setTimeout(() => controller.abort(), this.idleMs);
    };
    arm();
    let buffer = "";
    let event = { type: "", data: [], id: null };
    const line = (text) => {
      if (text === "") {
        if (event.id !== null) this.lastEventId = event.id;
        if (event.data.length) {
          const message = { type: event.type || "message", data: event.data.join("\n"),
                            id: this.lastEventId };
          try {
            this.onEvent(message);
          } catch (e) {
            queueMicrotask(() => { throw e; }); // surfaces as a page error; the stream goes on
          }
        }
        event = { type: "", data: [], id: null };
        return;
      }
      if (text[0] === ":") return; // a comment: keep-alive
      const colon = text.indexOf(":");
      const field = colon < 0 ? text : text.slice(0, colon);
      let value = colon < 0 ? "" : text.slice(colon + 1);
      if (value[0] === " ") value = value.slice(1);
      if (field === "data") event.data.push(value);
      else if (field === "event") event.type = value;
      else if (field === "id" && !value.includes("\0")) event.id = value;
      else if (field === "retry" && /^\d+$/.test(value)) this.baseDelay = Math.max(100, Number(value));
    };
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done || run.stopped) break;
        arm();
        buffer += value;
        let start = 0;
        for (let i = 0; i < buffer.length; i++) {
          const c = buffer.charCodeAt(i);
          if (c !== 10 && c !== 13) continue;
          if (c === 13 && i + 1 === buffer.length) break; // a CR whose LF may come next
          line(buffer.slice(start, i));
          if (c === 13 && buffer.charCodeAt(i + 1) === 10) i++;
          start = i + 1;
        }
        buffer = buffer.slice(start);
      }
    } finally {
      clearTimeout(idle);
      reader.cancel().catch(() => {});
    }
  }
}
