// Keelson's dashboard: polls this gateway's /cluster and /metrics about once a
// second and renders them (servers, job counts, leases, schedules and dead letters
// from /cluster, per-handler figures from /metrics). Everything is written with textContent:
// names that come from heartbeats are never parsed as HTML. The pure parts
// (Prometheus text parsing, rates, histogram quantiles) are exposed as
// window.KeelsonDashboard for tests.
"use strict";

(function (root) {
  const POLL_MS = 1000;
  // Rates and p99 are taken over the samples of this last span.
  const WINDOW_MS = 10000;
  const REQUESTS = "keelson_gateway_requests_total";
  const DURATION = "keelson_gateway_request_duration_seconds";

  // ---- Prometheus text format ----

  function parseNumber(text) {
    if (text === "+Inf" || text === "Inf") return Infinity;
    if (text === "-Inf") return -Infinity;
    if (text === "NaN") return NaN;
    if (text === undefined || text === "" || !/^[-+0-9.eE]+$/.test(text)) return undefined;
    const n = Number(text);
    return Number.isNaN(n) ? undefined : n;
  }

  // One sample line: {name, labels, value}, or null for comments, blanks and
  // lines that do not parse.
  function parseLine(line) {
    line = line.trim();
    if (line === "" || line[0] === "#") return null;
    let i = 0;
    while (i < line.length && /[A-Za-z0-9_:]/.test(line[i])) i++;
    const name = line.slice(0, i);
    if (name === "") return null;
    const labels = {};
    if (line[i] === "{") {
      i++;
      for (;;) {
        while (line[i] === " " || line[i] === ",") i++;
        if (i >= line.length) return null;
        if (line[i] === "}") { i++; break; }
        let j = i;
        while (j < line.length && /[A-Za-z0-9_]/.test(line[j])) j++;
        const key = line.slice(i, j);
        if (key === "" || line[j] !== "=" || line[j + 1] !== "\"") return null;
        i = j + 2;
        let value = "";
        while (i < line.length && line[i] !== "\"") {
          if (line[i] === "\\" && i + 1 < line.length) {
            const c = line[i + 1];
            value += c === "n" ? "\n" : c;
            i += 2;
          } else {
            value += line[i];
            i++;
          }
        }
        if (line[i] !== "\"") return null;
        i++;
        labels[key] = value;
      }
    }
    const value = parseNumber(line.slice(i).trim().split(/\s+/)[0]);
    if (value === undefined) return null;
    return { name: name, labels: labels, value: value };
  }

  function parseMetrics(text) {
    const series = [];
    for (const line of String(text).split("\n")) {
      const s = parseLine(line);
      if (s) series.push(s);
    }
    return series;
  }

  // Per handler: request counts by status code and the duration histogram.
  function snapshot(series) {
    const handlers = {};
    const of = (h) => handlers[h] || (handlers[h] = { codes: {}, buckets: {} });
    for (const s of series) {
      const h = s.labels.handler;
      if (h === undefined) continue;
      if (s.name === REQUESTS && s.labels.code !== undefined) {
        const codes = of(h).codes;
        codes[s.labels.code] = (codes[s.labels.code] || 0) + s.value;
      } else if (s.name === DURATION + "_bucket" && s.labels.le !== undefined) {
        const le = parseNumber(s.labels.le);
        if (le !== undefined && !Number.isNaN(le)) of(h).buckets[String(le)] = s.value;
      }
    }
    return handlers;
  }

  // Prometheus's histogram_quantile: q of the observations in cumulative `buckets`
  // ([{le, count}], any order), interpolated linearly inside the bucket; NaN when
  // there are none.
  function histogramQuantile(q, buckets) {
    const b = buckets.slice().sort((x, y) => x.le - y.le);
    if (b.length < 2 || b[b.length - 1].le !== Infinity) return NaN;
    // Cumulative counts never fall; a scrape taken mid-update may say otherwise.
    for (let i = 1; i < b.length; i++) b[i] = { le: b[i].le, count: Math.max(b[i].count, b[i - 1].count) };
    const total = b[b.length - 1].count;
    if (!(total > 0)) return NaN;
    if (q < 0) return -Infinity;
    if (q > 1) return Infinity;
    let rank = q * total;
    let i = b.findIndex((x) => x.count >= rank);
    if (i === b.length - 1) return b[b.length - 2].le;
    if (i === 0 && b[0].le <= 0) return b[0].le;
    let start = 0;
    let count = b[i].count;
    if (i > 0) {
      start = b[i - 1].le;
      count -= b[i - 1].count;
      rank -= b[i - 1].count;
    }
    return start + (b[i].le - start) * (rank / count);
  }

  function deltas(cur, prev) {
    // A counter that fell was reset (the gateway restarted): all of it is new.
    const reset = Object.keys(cur).some((k) => prev[k] !== undefined && cur[k] < prev[k]);
    const out = {};
    for (const k of Object.keys(cur)) out[k] = reset ? cur[k] : cur[k] - (prev[k] || 0);
    return out;
  }

  // Rows of the handler table from two snapshots `seconds` apart; `prev` null: no
  // rates yet, only totals.
  function handlerStats(prev, cur, seconds) {
    const rows = [];
    for (const handler of Object.keys(cur).sort()) {
      const c = cur[handler];
      const total = Object.values(c.codes).reduce((a, b) => a + b, 0);
      // Handlers this gateway knows of but never served: no row.
      if (total === 0) continue;
      const row = { handler: handler, total: total, rate: null, serverErrors: null, clientErrors: null, p99: null };
      if (prev && seconds > 0) {
        const p = prev[handler] || { codes: {}, buckets: {} };
        const codes = deltas(c.codes, p.codes);
        let all = 0, server = 0, client = 0;
        for (const [code, n] of Object.entries(codes)) {
          const status = Number(code);
          all += n;
          if (status >= 500) server += n;
          else if (status >= 400) client += n;
        }
        row.rate = all / seconds;
        if (all > 0) {
          row.serverErrors = server / all;
          row.clientErrors = client / all;
        }
        const buckets = Object.entries(deltas(c.buckets, p.buckets)).map(([le, count]) => ({ le: Number(le), count: count }));
        const p99 = histogramQuantile(0.99, buckets);
        row.p99 = Number.isFinite(p99) ? p99 : null;
      }
      rows.push(row);
    }
    return rows;
  }

  // ---- formatting ----

  function fixed(n, digits) {
    return n.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
  }
  function formatRate(r) {
    if (r === null) return "…";
    return fixed(r, r < 10 ? 2 : r < 100 ? 1 : 0) + "/s";
  }
  function formatShare(s) {
    if (s === null) return "–";
    return fixed(s * 100, s > 0 && s < 0.1 ? 1 : 0) + " %";
  }
  function formatSeconds(s) {
    if (s === null) return "–";
    const ms = s * 1000;
    if (ms < 10) return fixed(ms, 1) + " ms";
    if (ms < 1000) return fixed(ms, 0) + " ms";
    return fixed(s, 2) + " s";
  }
  function formatAge(ms) {
    return ms < 10000 ? fixed(ms / 1000, 1) + " s ago" : fixed(ms / 1000, 0) + " s ago";
  }
  // An RFC 3339 slot relative to now: "in 4 s", "12 s ago"; "" when unreadable.
  function formatWhen(text, now) {
    const at = Date.parse(String(text));
    if (Number.isNaN(at)) return "";
    const s = Math.round((at - now) / 1000);
    const span = (n) => (n < 120 ? n + " s" : n < 7200 ? Math.round(n / 60) + " min" : n < 172800 ? Math.round(n / 3600) + " h" : Math.round(n / 86400) + " d");
    return s >= 0 ? "in " + span(s) : span(-s) + " ago";
  }
  const STATE_LABELS = { up: "up", paused: "paused", not_ready: "not ready", left: "left", gone: "gone" };

  // ---- rendering ----

  function el(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function cell(row, text, className) {
    const td = el("td", className, text);
    row.appendChild(td);
    return td;
  }
  function setText(id, text) {
    document.getElementById(id).textContent = text;
  }
  function show(id, visible) {
    document.getElementById(id).hidden = !visible;
  }

  function loadBar(value, className) {
    const wrap = el("div", "bar " + className);
    const fill = el("div", "fill");
    const v = Math.max(0, Math.min(1, Number(value) || 0));
    fill.style.width = fixed(v * 100, 1) + "%";
    wrap.appendChild(fill);
    return wrap;
  }
  function level(v) {
    return v >= 0.8 ? "high" : v >= 0.5 ? "mid" : "low";
  }

  function renderCluster(report) {
    const nodes = (report.nodes || []).slice().sort((a, b) => String(a.node).localeCompare(String(b.node)));
    const count = (states) => nodes.filter((n) => states.includes(n.state)).length;
    setText("sum-up", String(count(["up"])));
    setText("sum-paused", String(count(["paused"])));
    setText("sum-not-ready", String(count(["not_ready"])));
    setText("sum-gone", String(count(["gone", "left"])));
    setText("sum-in-flight", String(nodes.reduce((a, n) => a + (Number(n.in_flight) || 0), 0)));
    const waiting = report.dead_letters ? report.dead_letters.waiting : null;
    setText("sum-dead-letters", waiting === null || waiting === undefined ? "unknown" : String(waiting));
    document.getElementById("card-dead-letters").dataset.alert = waiting > 0 ? "yes" : "no";

    const services = document.getElementById("services");
    services.replaceChildren();
    const stalled = new Set(report.stalled_services || []);
    const names = Object.keys(report.services || {}).sort();
    for (const name of names) {
      const c = report.services[name];
      const chip = el("div", "chip");
      chip.setAttribute("data-service", name);
      chip.setAttribute("data-stalled", stalled.has(name) ? "yes" : "no");
      chip.appendChild(el("span", "chip-name", name));
      const parts = [c.up + " up"];
      if (c.paused) parts.push(c.paused + " paused");
      if (c.not_ready) parts.push(c.not_ready + " not ready");
      if (c.gone || c.left) parts.push((c.gone + c.left) + " gone");
      chip.appendChild(el("span", "chip-detail", parts.join(" · ")));
      if (stalled.has(name)) chip.appendChild(el("span", "chip-flag", "stalled: no server takes requests"));
      services.appendChild(chip);
    }
    show("services-empty", names.length === 0);

    const body = document.getElementById("servers-body");
    body.replaceChildren();
    for (const n of nodes) {
      const tr = document.createElement("tr");
      tr.setAttribute("data-node", String(n.node));
      tr.setAttribute("data-state", String(n.state));
      cell(tr, String(n.node), "node");
      const stateCell = cell(tr, "");
      stateCell.appendChild(el("span", "badge badge-" + n.state, STATE_LABELS[n.state] || String(n.state)));
      cell(tr, (n.services || []).join(", "));
      cell(tr, String(n.version), "mono");
      const load = n.load || {};
      const factor = Number(load.factor) || 0;
      const loadBox = el("div", "load");
      loadBox.appendChild(loadBar(factor, level(factor)));
      loadBox.appendChild(el("span", "load-value", fixed(factor, 2)));
      cell(tr, "").appendChild(loadBox);
      cell(tr, formatShare(Number(load.busy) || 0), "num");
      cell(tr, formatShare(Number(load.process_cpu) || 0), "num");
      cell(tr, formatShare(Number(load.system_cpu) || 0), "num");
      cell(tr, (n.window || "–") + " / " + n.concurrency, "num");
      cell(tr, String(n.in_flight), "num");
      // Servers from before background jobs say nothing of them.
      cell(tr, n.jobs ? String(n.jobs.running_here) : "–", "num jobs-running");
      cell(tr, Number(n.contexts).toLocaleString("en-US"), "num");
      const age = cell(tr, formatAge(Number(n.age_ms) || 0), "num");
      if (Number(n.age_ms) > 2 * (Number(n.interval_ms) || 1000)) age.classList.add("late");
      body.appendChild(tr);
    }
    show("servers-wrap", nodes.length > 0);
    show("servers-empty", nodes.length === 0);
    renderJobs(report.jobs);
    const leases = report.leases || [];
    const schedules = report.schedules || [];
    renderLeases(leases);
    renderSchedules(schedules);
    // Neither: one line for the panel rather than two empty tables.
    const none = leases.length === 0 && schedules.length === 0;
    show("leased-pair", !none);
    show("leased-empty", none);
  }

  // The leases held (singletons, the scheduler), each with its holder and token.
  function renderLeases(leases) {
    const body = document.getElementById("leases-body");
    body.replaceChildren();
    for (const l of leases) {
      const tr = document.createElement("tr");
      tr.setAttribute("data-lease", String(l.name));
      cell(tr, String(l.name), "node");
      cell(tr, String(l.node), "lease-holder");
      cell(tr, String(l.token), "num mono");
      body.appendChild(tr);
    }
    show("leases-wrap", leases.length > 0);
    show("leases-empty", leases.length === 0);
  }

  // A slot and how far it is from now. A next slot already past (heartbeats are
  // up to a second old) is due, not "ago".
  function slotCell(tr, slot, className, next) {
    const td = cell(tr, slot === null || slot === undefined ? "–" : String(slot), "mono " + className);
    if (!slot) return td;
    const due = next && Date.parse(String(slot)) <= Date.now();
    const when = due ? "due" : formatWhen(slot, Date.now());
    if (when) td.appendChild(el("span", "sub", when));
    return td;
  }

  // The schedules: pattern and time zone, last and next slot (UTC), and the
  // leader that fires them; without one, nothing fires.
  function renderSchedules(schedules) {
    const body = document.getElementById("schedules-body");
    body.replaceChildren();
    for (const s of schedules) {
      const tr = document.createElement("tr");
      tr.setAttribute("data-schedule", String(s.name));
      const name = cell(tr, String(s.name), "node");
      name.appendChild(el("span", "sub schedule-handler", String(s.handler)));
      const cron = cell(tr, String(s.cron), "mono schedule-cron");
      cron.appendChild(el("span", "sub schedule-timezone", String(s.timezone)));
      slotCell(tr, s.last_slot, "schedule-last", false);
      slotCell(tr, s.next_slot, "schedule-next", true);
      if (s.leader === null || s.leader === undefined) {
        cell(tr, "none: not firing", "bad schedule-leader");
      } else {
        cell(tr, String(s.leader), "schedule-leader");
      }
      body.appendChild(tr);
    }
    show("schedules-wrap", schedules.length > 0);
    show("schedules-empty", schedules.length === 0);
  }

  const JOB_STATES = ["queued", "running", "succeeded", "failed", "cancelled"];

  // The cluster's job counts: every server holds every job's record, so the
  // gateway gives the counts of the server that counted last (never a sum).
  function renderJobs(jobs) {
    const known = jobs !== null && jobs !== undefined;
    for (const state of JOB_STATES) {
      setText("jobs-" + state, known ? Number(jobs[state] || 0).toLocaleString("en-US") : "–");
    }
    document.getElementById("card-jobs-failed").dataset.alert = known && jobs.failed > 0 ? "yes" : "no";
    setText(
      "jobs-hint",
      known
        ? "whole cluster, by state · counted by " + String(jobs.node) + " " + formatAge(Number(jobs.age_ms) || 0)
        : "background jobs of the whole cluster, by state"
    );
    show("jobs-empty", !known);
  }

  function renderHandlers(rows, why) {
    const body = document.getElementById("handlers-body");
    body.replaceChildren();
    for (const r of rows) {
      const tr = document.createElement("tr");
      tr.setAttribute("data-handler", r.handler);
      cell(tr, r.handler, "node");
      cell(tr, formatRate(r.rate), "num");
      cell(tr, formatShare(r.serverErrors), "num" + (r.serverErrors > 0 ? " bad" : ""));
      cell(tr, formatShare(r.clientErrors), "num" + (r.clientErrors > 0 ? " warn" : ""));
      cell(tr, formatSeconds(r.p99), "num");
      cell(tr, Number(r.total).toLocaleString("en-US"), "num");
      body.appendChild(tr);
    }
    show("handlers-wrap", rows.length > 0);
    setText("handlers-empty", why);
    show("handlers-empty", rows.length === 0);
  }

  function setStatus(state, text) {
    const status = document.getElementById("status");
    status.dataset.status = state;
    setText("status-text", text);
  }

  // ---- polling ----

  const samples = []; // {at, handlers}, oldest first, within WINDOW_MS

  async function pollCluster() {
    const response = await fetch("cluster", { cache: "no-store", credentials: "omit" });
    if (!response.ok) throw new Error("/cluster answered " + response.status);
    renderCluster(await response.json());
  }

  async function pollMetrics() {
    let response;
    try {
      response = await fetch("metrics", { cache: "no-store", credentials: "omit" });
    } catch (e) {
      renderHandlers([], "no data: /metrics cannot be read");
      return;
    }
    if (!response.ok) {
      renderHandlers([], "no data: this gateway has no /metrics");
      return;
    }
    const now = Date.now();
    const current = snapshot(parseMetrics(await response.text()));
    while (samples.length > 0 && now - samples[0].at > WINDOW_MS) samples.shift();
    const base = samples.length > 0 ? samples[0] : null;
    samples.push({ at: now, handlers: current });
    const rows = handlerStats(base && base.handlers, current, base ? (now - base.at) / 1000 : 0);
    renderHandlers(rows, "no data: no request has reached a handler through this gateway yet");
  }

  async function poll() {
    try {
      await Promise.all([pollCluster(), pollMetrics()]);
      setStatus("live", "live · updated " + new Date().toLocaleTimeString("en-GB"));
    } catch (e) {
      setStatus("down", "cannot reach this gateway's /cluster · retrying");
    }
  }

  // The next poll is scheduled when one ends: a slow gateway is never asked twice
  // at once.
  async function loop() {
    await poll();
    setTimeout(loop, POLL_MS);
  }

  root.KeelsonDashboard = {
    parseMetrics: parseMetrics,
    snapshot: snapshot,
    histogramQuantile: histogramQuantile,
    handlerStats: handlerStats,
  };
  if (document.getElementById("servers-body")) loop();
})(window);
