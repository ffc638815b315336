// batchd dashboard: polls /v1/dashboard/state every second and draws it. No build step, no
// dependencies. Rates (lines/s) are computed here from the progress deltas of successive polls.
// The API key, when the server needs one, lives in sessionStorage and is sent only as an
// Authorization header; it is never put in a URL.
"use strict";

(() => {
  const KEY_STORE = "batchd.dashboard.key";
  const POLL_MS = 1000;
  const RATE_WINDOW_S = 5;
  const CHART_S = 300;
  const REQUEST_TIMEOUT_MS = 5000;
  const ACTIVE = new Set(["validating", "in_progress", "finalizing", "cancelling"]);
  const CANCELLABLE = new Set(["validating", "in_progress"]);
  const SVG = "http://www.w3.org/2000/svg";

  const $ = (id) => document.getElementById(id);
  let key = sessionStorage.getItem(KEY_STORE) || "";
  let principal = null;
  let timer = null;
  let generation = 0; // bumped on login/logout so a late answer of an old poll is dropped

  const samples = new Map(); // batch id -> [{t, done}] within the rate window
  const rows = new Map(); // batch id -> row elements
  const rateSeries = []; // [{t, rate}] for the chart

  // ------------------------------------------------------------------ helpers

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function svg(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function fmtNum(n) {
    if (n === null || n === undefined) return "–";
    return Number(n).toLocaleString("en-US");
  }

  function fmtRate(r) {
    if (r === null || r === undefined) return "–";
    if (r >= 100) return r.toFixed(0);
    if (r >= 10) return r.toFixed(1);
    return r.toFixed(2);
  }

  function fmtDuration(s) {
    if (!isFinite(s) || s < 0) return "–";
    if (s < 60) return Math.ceil(s) + "s";
    if (s < 3600) return Math.floor(s / 60) + "m" + String(Math.floor(s % 60)).padStart(2, "0") + "s";
    return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
  }

  function fmtTime(unix) {
    if (!unix) return "–";
    const d = new Date(unix * 1000);
    return d.toLocaleTimeString("en-GB", { hour12: false });
  }

  function fmtLimit(paced, limit) {
    if (!limit) return "unlimited";
    return fmtNum(Math.round(paced || 0)) + " (" + fmtNum(Math.round(limit)) + ")";
  }

  function setConn(state, text) {
    const c = $("conn");
    c.dataset.state = state;
    c.textContent = text;
  }

  function notice(text) {
    const n = $("notice");
    n.textContent = text || "";
    n.hidden = !text;
  }

  function errorMessage(res, fallback) {
    const e = res && res.body && res.body.error;
    return (e && e.message) || fallback;
  }

  async function api(method, path) {
    const ctrl = new AbortController();
    const t = setTimeout(() => ctrl.abort(), REQUEST_TIMEOUT_MS);
    const headers = { Accept: "application/json" };
    if (key) headers.Authorization = "Bearer " + key;
    try {
      const r = await fetch(path, {
        method, headers, signal: ctrl.signal, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer",
      });
      let body = null;
      try { body = await r.json(); } catch (_) { body = null; }
      return { status: r.status, body };
    } finally {
      clearTimeout(t);
    }
  }

  // ------------------------------------------------------------------ login

  function showLogin(message) {
    generation += 1;
    clearTimeout(timer);
    $("content").hidden = true;
    $("forget").hidden = true;
    $("login").hidden = false;
    if (message) $("login-message").textContent = message;
    setConn("idle", "key needed");
    $("key-input").focus();
  }

  function showContent() {
    $("login").hidden = true;
    $("content").hidden = false;
    $("forget").hidden = !key;
  }

  function forget() {
    key = "";
    sessionStorage.removeItem(KEY_STORE);
    showLogin("Key forgotten. Enter an API key to open the dashboard.");
  }

  // ------------------------------------------------------------------ polling

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(poll, POLL_MS);
  }

  async function poll() {
    const mine = generation;
    let res;
    try {
      res = await api("GET", "/v1/dashboard/state?recent=30");
    } catch (_) {
      if (mine !== generation) return;
      setConn("down", "server unreachable, retrying");
      schedule();
      return;
    }
    if (mine !== generation) return;
    if (res.status === 401 || res.status === 403) {
      if (key) { key = ""; sessionStorage.removeItem(KEY_STORE); }
      showLogin(errorMessage(res, "This key was refused."));
      return;
    }
    if (res.status !== 200 || !res.body) {
      setConn("down", "error " + res.status + ": " + errorMessage(res, "unexpected answer"));
      schedule();
      return;
    }
    showContent();
    render(res.body);
    setConn("live", "live · " + fmtTime(res.body.now));
    schedule();
  }

  // ------------------------------------------------------------------ rates

  // Each batch's rate is its progress over the last RATE_WINDOW_S seconds of polls; the total is
  // their sum, so the card, the chart and the table agree.
  function updateRates(state) {
    const t = state.now;
    const seen = new Set();
    for (const b of state.batches) {
      const done = b.request_counts.completed + b.request_counts.failed;
      seen.add(b.id);
      const list = samples.get(b.id) || [];
      list.push({ t, done });
      while (list.length > 2 && t - list[1].t >= RATE_WINDOW_S) list.shift();
      samples.set(b.id, list);
    }
    for (const id of [...samples.keys()]) {
      if (!seen.has(id)) samples.delete(id);
    }
    let total = null;
    for (const id of seen) {
      const r = batchRate(id);
      if (r !== null) total = (total || 0) + r;
    }
    if (total === null && seen.size === 0) total = 0;
    if (total !== null) rateSeries.push({ t, rate: total });
    while (rateSeries.length && t - rateSeries[0].t > CHART_S) rateSeries.shift();
    return total;
  }

  function batchRate(id) {
    const list = samples.get(id);
    if (!list || list.length < 2) return null;
    const a = list[0];
    const b = list[list.length - 1];
    return b.t - a.t > 0.5 ? Math.max(0, (b.done - a.done) / (b.t - a.t)) : null;
  }

  // ------------------------------------------------------------------ batches

  function makeRow(b) {
    const tr = el("tr");
    tr.dataset.batchId = b.id;
    const r = {
      tr,
      id: el("td", "id", b.id),
      project: el("td", "col-project", b.project),
      status: el("span", "status"),
      progress: el("progress"),
      done: el("span", "done"),
      completed: el("td", "num completed"),
      failed: el("td", "num failed"),
      rate: el("td", "num rate"),
      eta: el("td", "num eta"),
      created: el("td", "created"),
      button: el("button", "cancel", "Cancel"),
      disarm: null,
    };
    r.button.type = "button";
    r.button.addEventListener("click", () => onCancel(b.id, r));
    const statusTd = el("td");
    statusTd.append(r.status);
    const progTd = el("td");
    const wrap = el("div", "progress");
    wrap.append(r.progress, r.done);
    progTd.append(wrap);
    const btnTd = el("td");
    btnTd.append(r.button);
    tr.append(r.id, r.project, statusTd, progTd, r.completed, r.failed, r.rate, r.eta, r.created, btnTd);
    return r;
  }

  function updateRow(r, b) {
    const c = b.request_counts;
    const done = c.completed + c.failed;
    r.status.textContent = b.status;
    r.status.className = "status status-" + b.status;
    r.tr.dataset.status = b.status;
    if (c.total > 0) {
      r.progress.max = c.total;
      r.progress.value = done;
    } else {
      r.progress.removeAttribute("value"); // indeterminate while validating
    }
    r.progress.classList.toggle("has-failed", c.failed > 0);
    const pct = c.total > 0 ? " (" + Math.floor((100 * done) / c.total) + "%)" : "";
    r.done.textContent = fmtNum(done) + " / " + fmtNum(c.total) + pct;
    r.done.dataset.done = String(done);
    r.completed.textContent = fmtNum(c.completed);
    r.failed.textContent = fmtNum(c.failed);
    const rate = ACTIVE.has(b.status) ? batchRate(b.id) : null;
    r.rate.textContent = fmtRate(rate);
    r.eta.textContent = rate && rate > 0 && c.total > done ? fmtDuration((c.total - done) / rate) : "–";
    r.created.textContent = fmtTime(b.created_at);
    const cancellable = CANCELLABLE.has(b.status);
    r.button.hidden = !cancellable && r.button.dataset.armed !== "busy";
    if (!cancellable && r.button.dataset.armed !== "busy") r.button.disabled = true;
    if (cancellable && r.button.dataset.armed !== "busy") r.button.disabled = false;
  }

  function renderBatches(state) {
    const tbody = $("batches").querySelector("tbody");
    const ids = new Set(state.batches.map((b) => b.id));
    for (const [id, r] of rows) {
      if (!ids.has(id)) { r.tr.remove(); rows.delete(id); }
    }
    let prev = null;
    for (const b of state.batches) {
      let r = rows.get(b.id);
      if (!r) { r = makeRow(b); rows.set(b.id, r); }
      updateRow(r, b);
      const want = prev ? prev.nextSibling : tbody.firstChild;
      if (want !== r.tr) tbody.insertBefore(r.tr, want);
      prev = r.tr;
    }
    $("no-batches").hidden = state.batches.length > 0;
    $("batches").hidden = state.batches.length === 0;
    $("batches").classList.toggle("hide-project", !state.principal.is_admin);
  }

  async function onCancel(id, r) {
    const btn = r.button;
    if (btn.dataset.armed !== "1") {
      btn.dataset.armed = "1";
      btn.textContent = "Confirm cancel";
      clearTimeout(r.disarm);
      r.disarm = setTimeout(() => {
        if (btn.dataset.armed === "1") { btn.dataset.armed = ""; btn.textContent = "Cancel"; }
      }, 4000);
      return;
    }
    clearTimeout(r.disarm);
    btn.dataset.armed = "busy";
    btn.disabled = true;
    btn.textContent = "Cancelling…";
    const project = r.project.textContent;
    const own = !principal || !principal.is_admin || project === principal.project;
    const path = own
      ? "/v1/batches/" + encodeURIComponent(id) + "/cancel"
      : "/v1/dashboard/batches/" + encodeURIComponent(id) + "/cancel";
    let res = null;
    try {
      res = await api("POST", path);
    } catch (_) {
      res = null;
    }
    btn.dataset.armed = "";
    btn.textContent = "Cancel";
    if (res && res.status === 200 && res.body) {
      r.status.textContent = res.body.status;
      r.status.className = "status status-" + res.body.status;
      r.tr.dataset.status = res.body.status;
      btn.hidden = true;
      notice("");
    } else {
      btn.disabled = false;
      notice("Could not cancel " + id + ": " + errorMessage(res, "the server did not answer"));
    }
  }

  // ------------------------------------------------------------------ cards and chart

  function renderCards(state, total) {
    const active = state.batches.filter((b) => ACTIVE.has(b.status)).length;
    $("card-active").textContent = fmtNum(active);
    $("card-rate").textContent = fmtRate(total);
    const parts = Object.entries(state.status_counts)
      .sort((a, b) => b[1] - a[1])
      .map(([s, n]) => s + " " + fmtNum(n));
    $("card-statuses").textContent = parts.length ? parts.join(" · ") : "no batches";
    const p = state.principal;
    $("scope").textContent = p.is_admin
      ? "admin key · every project"
      : p.open_mode ? "open mode · project " + p.project : "project " + p.project;
  }

  function niceCeil(v) {
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function renderChart(now) {
    const chart = $("chart");
    const w = Math.max(200, Math.round(chart.clientWidth || 600));
    const h = 140;
    const pad = { l: 44, r: 8, t: 10, b: 18 };
    chart.setAttribute("viewBox", "0 0 " + w + " " + h);
    chart.replaceChildren();
    const max = niceCeil(Math.max(1, ...rateSeries.map((p) => p.rate)));
    const x = (t) => pad.l + ((t - (now - CHART_S)) / CHART_S) * (w - pad.l - pad.r);
    const y = (v) => h - pad.b - (v / max) * (h - pad.t - pad.b);
    for (const f of [0, 0.5, 1]) {
      chart.append(svg("line", { class: "grid", x1: pad.l, x2: w - pad.r, y1: y(max * f), y2: y(max * f) }));
      chart.append(svg("text", { x: pad.l - 4, y: y(max * f) + 4, "text-anchor": "end" }, fmtNum(max * f)));
    }
    chart.append(svg("text", { x: pad.l, y: h - 4 }, "−5 min"));
    chart.append(svg("text", { x: w - pad.r, y: h - 4, "text-anchor": "end" }, "now"));
    if (rateSeries.length < 2) return;
    const pts = rateSeries.map((p) => x(p.t).toFixed(1) + "," + y(p.rate).toFixed(1));
    const first = rateSeries[0];
    const last = rateSeries[rateSeries.length - 1];
    const area = [x(first.t).toFixed(1) + "," + y(0), ...pts, x(last.t).toFixed(1) + "," + y(0)];
    chart.append(svg("polygon", { class: "area", points: area.join(" ") }));
    chart.append(svg("polyline", { class: "line", points: pts.join(" ") }));
  }

  // ------------------------------------------------------------------ errors and lanes

  function fillTable(id, rowsData) {
    const tbody = $(id).querySelector("tbody");
    tbody.replaceChildren(
      ...rowsData.map((cells) => {
        const tr = el("tr");
        for (const [cls, text] of cells) tr.append(el("td", cls, text));
        return tr;
      }),
    );
  }

  function renderErrors(state) {
    const codes = Object.entries(state.errors.by_code);
    fillTable("codes", codes.map(([code, n]) => [["id", code], ["num", fmtNum(n)]]));
    $("no-codes").hidden = codes.length > 0;
    $("codes").hidden = codes.length === 0;
    $("codes-partial").hidden = !state.errors.partial;
    const byBatch = state.errors.by_batch;
    fillTable(
      "errors",
      byBatch.map((e) => [
        ["id", e.id],
        ["num", fmtNum(e.failed)],
        ["small", Object.entries(e.codes).map(([c, n]) => c + " × " + fmtNum(n)).join(", ") || "–"],
      ]),
    );
    $("no-errors").hidden = byBatch.length > 0;
    $("errors").hidden = byBatch.length === 0;
  }

  function renderLanes(state) {
    const lanes = state.lanes;
    const note = $("lanes-note");
    note.hidden = lanes.available;
    note.textContent = lanes.available ? "" : lanes.reason;
    $("lanes").hidden = !lanes.available;
    $("share").textContent = lanes.available && lanes.share < 1
      ? "this worker spends " + Math.round(lanes.share * 100) + "% of each limit"
      : "";
    const data = [];
    for (const u of lanes.upstreams || []) {
      const health = u.health.up
        ? ["health-up", "up"]
        : ["health-down", "down (" + u.health.failures + " failures, probe in " + fmtDuration(u.health.next_probe_in) + ")"];
      if (!u.lanes.length) {
        data.push([["", u.name], ["muted", "no traffic yet (" + u.models.join(", ") + ")"], health,
          ["num", "0 / " + u.max_concurrency], ["num", "–"], ["num", "–"], ["num", "–"], ["num", "0"]]);
      }
      for (const l of u.lanes) {
        data.push([
          ["", u.name], ["", l.model], health,
          ["num", l.in_flight + " / " + l.window + " (" + l.window_max + ")" + (l.slow_start ? " slow start" : "")],
          ["num", fmtLimit(l.rpm_paced, l.rpm_limit)],
          ["num", fmtLimit(l.tpm_paced, l.tpm_limit)],
          ["num", l.paused_for > 0 ? fmtDuration(l.paused_for) : "–"],
          ["num", fmtNum(l.sent)],
        ]);
      }
    }
    fillTable("lanes", data);
  }

  function render(state) {
    principal = state.principal;
    const total = updateRates(state);
    renderCards(state, total);
    renderBatches(state);
    renderChart(state.now);
    renderErrors(state);
    renderLanes(state);
  }

  // ------------------------------------------------------------------ start

  async function start() {
    $("key-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const input = $("key-input");
      key = input.value.trim();
      input.value = "";
      if (!key) return;
      sessionStorage.setItem(KEY_STORE, key);
      generation += 1;
      setConn("idle", "connecting…");
      poll();
    });
    $("forget").addEventListener("click", forget);
    if (!key) {
      let mode = null;
      try {
        mode = await api("GET", "/dashboard/auth-mode");
      } catch (_) {
        mode = null;
      }
      const m = mode && mode.body && mode.body.mode;
      if (m === "key") {
        showLogin();
        return;
      }
      if (m === "locked") {
        showLogin("This server has no API keys and is not bound to a loopback address: nothing is served " +
          "until an operator creates a key with `batchd keys create`.");
        return;
      }
    }
    poll();
  }

  start();
})();
