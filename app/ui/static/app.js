// bgjobs dashboard: a small vanilla-JS page on the JSON API, served at /ui.
//
// Rules this file keeps:
// - Data reaches the page only as text (textContent, text nodes, attribute values), never
//   as HTML: payloads, exceptions and worker ids are whatever producers and workers sent.
// - No inline script, no eval, no string-built handlers: the server's CSP forbids them.
// - The token lives in sessionStorage and travels only in the Authorization header.
"use strict";

const STATES = ["available", "scheduled", "reserved", "succeeded", "failed"];
const PENDING = ["available", "scheduled", "reserved"];
const TOKEN_KEY = "bgjobs.token";
const NAME_PATTERN = "[A-Za-z0-9_.:\\-]{1,255}";
const PAGE_SIZE = 50;
const MAX_SEARCH = 200; // the longest q= the server takes
const POLL_MS = 2000; // without /events: how often /stats is read
const DEBOUNCE_MS = 300; // a burst of events makes one refresh
const SPARK_NAMES = 25; // per-name sparklines cost one /stats call each
const SPARK_EVERY_MS = 10000;

// ---------------------------------------------------------------------------------------
// DOM helpers: every child that is not a Node becomes a text node.

function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  setAttrs(node, attrs);
  put(node, children);
  return node;
}

function setAttrs(node, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (typeof value === "function") node.addEventListener(key.replace(/^on/, ""), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
}

function put(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  return node;
}

const byId = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------------------
// The API, with the token.

const auth = { token: sessionStorage.getItem(TOKEN_KEY), scopes: new Set(), open: false };

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

function authHeaders(extra) {
  const headers = { ...extra };
  if (auth.token) headers.Authorization = "Bearer " + auth.token;
  return headers;
}

async function api(method, path, body) {
  const init = { method, headers: authHeaders({ Accept: "application/json" }), cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (error) {
    throw new ApiError(0, "the server cannot be reached (" + error.message + ")");
  }
  const data = response.status === 204 ? null : await response.json().catch(() => null);
  const detail = data && typeof data.detail === "string" ? data.detail : response.statusText;
  if (response.status === 401) {
    askForToken(auth.token ? "That token was refused: " + detail : "");
  }
  if (!response.ok) throw new ApiError(response.status, detail);
  return data;
}

function query(params) {
  const found = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") found.set(key, String(value));
  }
  const text = found.toString();
  return text ? "?" + text : "";
}

const can = (scope) => auth.scopes.has(scope);

// ---------------------------------------------------------------------------------------
// Formatting.

function duration(ms) {
  const s = Math.abs(ms) / 1000;
  if (s < 1) return Math.round(Math.abs(ms)) + " ms";
  if (s < 60) return (s < 10 ? s.toFixed(1) : Math.round(s)) + " s";
  if (s < 3600) return Math.round(s / 60) + " min";
  if (s < 172800) return Math.round(s / 3600) + " h";
  return Math.round(s / 86400) + " d";
}

function relative(iso) {
  const ms = Date.parse(iso) - Date.now();
  if (Math.abs(ms) < 1000) return "just now";
  return ms < 0 ? duration(ms) + " ago" : "in " + duration(ms);
}

function exactUtc(iso) {
  return iso.replace("T", " ").replace("Z", " UTC");
}

function when(iso) {
  if (!iso) return h("span", { class: "muted" }, "—");
  return h("time", { datetime: iso, title: exactUtc(iso), "data-rel": iso }, relative(iso));
}

function tickTimes() {
  for (const node of document.querySelectorAll("time[data-rel]")) {
    node.textContent = relative(node.dataset.rel);
  }
}

function firstLine(text) {
  return (text || "").split("\n", 1)[0];
}

function clip(text, max) {
  return text.length > max ? text.slice(0, max - 1) + "…" : text;
}

function prettyPayload(payload) {
  try {
    return { json: true, text: JSON.stringify(JSON.parse(payload), null, 2) };
  } catch {
    return { json: false, text: payload };
  }
}

const stateLabel = (state) => state[0].toUpperCase() + state.slice(1);

// ---------------------------------------------------------------------------------------
// Routing: #/, #/jobs/<state>?name=&q=&cursor=, #/job/<id>, #/failures?name=, #/enqueue

function parseHash() {
  const raw = location.hash.replace(/^#\/?/, "");
  const at = raw.indexOf("?");
  const path = at < 0 ? raw : raw.slice(0, at);
  const params = new URLSearchParams(at < 0 ? "" : raw.slice(at + 1));
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  return { parts, params };
}

function link(path, params) {
  return "#/" + path + query(params || {});
}

function go(path, params) {
  location.hash = link(path, params);
}

const VIEWS = {
  "": overviewView,
  jobs: jobsView,
  job: jobView,
  failures: failuresView,
  enqueue: enqueueView,
};

let current = null; // the view on screen: { root, load, render, onStats?, lastKey }

function show(focus) {
  const { parts, params } = parseHash();
  const name = parts[0] || "";
  const make = VIEWS[name] || notFoundView;
  for (const a of byId("nav").querySelectorAll("a")) {
    if (a.dataset.view === name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const main = byId("main");
  main.replaceChildren();
  const needsRead = make !== enqueueView && make !== notFoundView;
  if (needsRead && !can("read")) {
    main.append(h("p", { class: "notice" }, "This token lacks the read scope: nothing to show."));
    current = null;
    return;
  }
  current = { root: main, lastKey: null, ...make(main, parts.slice(1), params) };
  if (focus) main.focus();
  refreshNow();
}

// ---------------------------------------------------------------------------------------
// Refreshing what is on screen: load, and render only when the data changed, keeping the
// keyboard focus on the element with the same data-key.

let refreshing = null;
let refreshAgain = false;
let refreshTimer = null;

function scheduleRefresh() {
  if (live.paused || refreshTimer !== null) return;
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    refreshNow();
  }, DEBOUNCE_MS);
}

async function refreshNow() {
  if (refreshing) {
    refreshAgain = true;
    return refreshing;
  }
  refreshing = refreshOnce();
  try {
    await refreshing;
  } finally {
    refreshing = null;
  }
  if (refreshAgain) {
    refreshAgain = false;
    await refreshNow();
  }
}

async function refreshOnce() {
  const view = current;
  if (!view || !view.load) return;
  let data;
  try {
    data = await view.load();
  } catch (error) {
    if (view === current) view.fail ? view.fail(error) : showError(view.root, error);
    return;
  }
  if (view !== current) return; // navigated away meanwhile
  const key = JSON.stringify(data);
  if (key === view.lastKey) return;
  view.lastKey = key;
  const focused = document.activeElement && document.activeElement.dataset
    ? document.activeElement.dataset.key
    : undefined;
  view.render(data);
  if (focused) {
    const again = view.root.querySelector(`[data-key="${CSS.escape(focused)}"]`);
    if (again) again.focus();
  }
}

function showError(root, error) {
  let box = root.querySelector(".load-error");
  if (!box) {
    box = h("p", { class: "error load-error", role: "alert" });
    root.prepend(box);
  }
  box.textContent = error.status === 401 ? "A token is needed." : "Could not load: " + error.message;
}

function clearError(root) {
  const box = root.querySelector(".load-error");
  if (box) box.remove();
}

// ---------------------------------------------------------------------------------------
// Overview: totals, server, and one row per job name.

const sparkCache = new Map(); // name -> { at, series }

async function nameSeries(names) {
  const now = Date.now();
  const wanted = names.slice(0, SPARK_NAMES).map((entry) => entry.name);
  await Promise.all(
    wanted
      .filter((name) => !sparkCache.has(name) || now - sparkCache.get(name).at > SPARK_EVERY_MS)
      .map(async (name) => {
        const stats = await api("GET", "/stats" + query({ name, series: "60m" }));
        sparkCache.set(name, { at: now, series: stats.series || [] });
      }),
  );
  return Object.fromEntries(wanted.map((name) => [name, sparkCache.get(name).series]));
}

function sparkline(series, what) {
  const total = (key) => series.reduce((sum, minute) => sum + minute[key], 0);
  const label = `${what}, last hour: ${total("succeeded")} succeeded, ${total("failed")} failed`;
  const chart = svg("svg", {
    class: "spark", viewBox: "0 0 60 20", preserveAspectRatio: "none", role: "img",
    "aria-label": label,
  });
  const title = svg("title");
  title.textContent = label;
  chart.append(title);
  const top = Math.max(1, ...series.map((m) => Math.max(m.succeeded, m.failed)));
  const step = 60 / Math.max(1, series.length - 1);
  for (const [key, cls] of [["succeeded", "ok"], ["failed", "bad"]]) {
    const points = series.map((m, i) => `${(i * step).toFixed(1)},${(19 - (m[key] * 18) / top).toFixed(1)}`);
    chart.append(svg("polyline", { class: cls, points: points.join(" ") }));
  }
  return chart;
}

function countLink(name, state, count) {
  if (!count) return h("span", { class: "zero" }, "0");
  return h("a", { href: link("jobs/" + state, { name }), "data-key": `count:${name}:${state}` }, count);
}

function overviewView(main) {
  const server = h("p", { class: "server" });
  const totals = h("dl", { class: "totals", "aria-label": "Totals" });
  const body = h("tbody");
  const table = h("table", { class: "names" },
    h("caption", {}, "Jobs by name"),
    h("thead", {}, h("tr", {},
      h("th", { scope: "col" }, "Name"),
      STATES.map((s) => h("th", { scope: "col", class: "num" }, stateLabel(s))),
      h("th", { scope: "col", class: "num" }, "Oldest available"),
      h("th", { scope: "col" }, "Last hour"))),
    body);
  main.append(h("h2", {}, "Overview"), server, totals, h("div", { class: "table-wrap" }, table));

  let lastSeries = null;

  function renderTotals(t, series) {
    if (series) lastSeries = series;
    else series = lastSeries;
    const items = STATES.map((s) => [stateLabel(s), t.counts[s], { "data-total": s }]);
    items.push(["Oldest available", t.oldest_available_age_ms === null ? "—" : duration(t.oldest_available_age_ms), { "data-total": "age" }]);
    items.push(["Last minute", `${t.last_minute.succeeded} ok · ${t.last_minute.failed} failed`, {}]);
    items.push(["Last hour", `${t.last_hour.succeeded} ok · ${t.last_hour.failed} failed`, {}]);
    totals.replaceChildren(...items.map(([label, value, attrs]) =>
      h("div", { class: "total" }, h("dt", {}, label), h("dd", attrs, value))));
    if (series) totals.append(h("div", { class: "total spark-total" }, h("dt", {}, "Throughput"), h("dd", {}, sparkline(series, "All jobs"))));
  }

  return {
    async load() {
      const stats = await api("GET", "/stats?series=60m");
      return { stats, sparks: await nameSeries(stats.names) };
    },
    render({ stats, sparks }) {
      clearError(main);
      const info = stats.server;
      server.textContent = info
        ? `bgjobs-server ${info.version} on ${info.backend === "postgresql" ? "PostgreSQL" : "SQLite"}`
        : "";
      renderTotals(stats.totals, stats.series);
      body.replaceChildren(...stats.names.map((entry) => h("tr", { "data-name": entry.name },
        h("th", { scope: "row" }, h("a", { href: link("jobs/available", { name: entry.name }), "data-key": "name:" + entry.name }, entry.name)),
        STATES.map((s) => h("td", { class: "num", "data-state": s }, countLink(entry.name, s, entry.counts[s]))),
        h("td", { class: "num", "data-state": "age" }, entry.oldest_available_age_ms === null ? "—" : duration(entry.oldest_available_age_ms)),
        h("td", {}, sparks[entry.name] ? sparkline(sparks[entry.name], entry.name) : ""))));
      if (!stats.names.length) {
        body.append(h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No jobs yet.")));
      }
    },
    onStats(totals) {
      renderTotals(totals, null);
    },
  };
}

// ---------------------------------------------------------------------------------------
// Jobs by state: tabs, filters, id search, paging, selection and bulk actions.

function listPath(state, params) {
  if (state === "succeeded" || state === "failed") return `/jobs/${state}` + query(params);
  return "/jobs" + query({ state, ...params });
}

function jobRow(job, state, selected, onSelect, selectable) {
  const cells = [];
  if (selectable) {
    cells.push(h("td", { class: "pick" }, h("input", {
      type: "checkbox", "aria-label": "Select job " + job.id, "data-key": "pick:" + job.id,
      checked: selected.has(job.id), onchange: (e) => onSelect(job.id, e.target.checked),
    })));
  }
  const at = { available: job.available_at, scheduled: job.available_at, reserved: job.reserved_at, succeeded: job.succeeded_at, failed: job.failed_at }[state];
  cells.push(
    h("td", { class: "mono" }, h("a", { href: link("job/" + encodeURIComponent(job.id)), "data-key": "job:" + job.id }, job.id)),
    h("td", {}, job.name),
    h("td", { class: "num" }, job.attempts),
    h("td", {}, when(at)),
    h("td", { class: "payload" }, h("code", {}, clip(job.payload, 120))),
  );
  if (state === "reserved") cells.push(h("td", { class: "worker" }, job.reserved_by || ""));
  if (state === "failed") cells.push(h("td", { class: "exception" }, clip(firstLine(job.exception), 160)));
  return h("tr", { "data-id": job.id }, cells);
}

function jobsView(main, parts, params) {
  const state = STATES.includes(parts[0]) ? parts[0] : "available";
  const name = params.get("name") || "";
  const q = params.get("q") || "";
  const cursor = params.get("cursor") || "";
  const selected = new Set();
  const admin = can("admin");
  const selectable = admin && state !== "reserved";

  const tabs = h("nav", { class: "tabs", "aria-label": "Job states" }, STATES.map((s) =>
    h("a", { href: link("jobs/" + s, { name, q }), "aria-current": s === state ? "page" : false }, stateLabel(s))));

  const nameInput = h("input", { id: "f-name", name: "name", value: name, pattern: NAME_PATTERN, autocomplete: "off", placeholder: "all names" });
  const qInput = h("input", { id: "f-q", name: "q", type: "search", value: q, maxlength: MAX_SEARCH, autocomplete: "off", placeholder: "text in payload or exception" });
  const filters = h("form", { class: "filters", role: "search", "aria-label": "Filter jobs", onsubmit: (e) => {
    e.preventDefault();
    go("jobs/" + state, { name: nameInput.value.trim(), q: qInput.value });
  } },
  h("label", { for: "f-name" }, "Name"), nameInput,
  h("label", { for: "f-q" }, "Payload search"), qInput,
  h("button", { type: "submit" }, "Search"));

  const idInput = h("input", { id: "f-id", name: "id", autocomplete: "off", placeholder: "job id" });
  const idForm = h("form", { class: "filters", role: "search", "aria-label": "Find a job by id", onsubmit: (e) => {
    e.preventDefault();
    const id = idInput.value.trim();
    if (id) go("job/" + encodeURIComponent(id));
  } }, h("label", { for: "f-id" }, "Job id"), idInput, h("button", { type: "submit" }, "Open job"));

  const note = h("p", { class: "notice", role: "status" });
  const confirmSlot = h("div", { class: "confirm-slot" });
  const tools = h("div", { class: "bulk", role: "group", "aria-label": "Bulk actions" });
  const pickAll = h("input", { type: "checkbox", id: "pick-all", "aria-label": "Select all jobs on this page" });
  const head = h("tr", {});
  const body = h("tbody");
  const pager = h("nav", { class: "pager", "aria-label": "Pages" });
  let items = [];

  function onSelect(id, on) {
    if (on) selected.add(id);
    else selected.delete(id);
    syncTools();
  }

  pickAll.addEventListener("change", () => {
    for (const job of items) onSelect(job.id, pickAll.checked);
    for (const box of body.querySelectorAll("input[type=checkbox]")) box.checked = pickAll.checked;
  });

  const retrySelected = h("button", { type: "button", onclick: () => bulkIds("retry") }, "Retry selected");
  const deleteSelected = h("button", { type: "button", class: "danger", onclick: () => bulkIds("delete") }, "Delete selected");
  const retryAll = h("button", { type: "button", onclick: () => bulkFilter("retry") }, "Retry all matching");
  const deleteAll = h("button", { type: "button", class: "danger", onclick: () => bulkFilter("delete") }, "Delete all matching");
  const scope = `every ${state} job${name ? " named " + name : ""}`;
  if (selectable) {
    if (state === "failed") tools.append(retrySelected);
    tools.append(deleteSelected);
    if (state === "failed") tools.append(retryAll);
    tools.append(deleteAll, h("span", { class: "muted" }, `“All matching”: ${scope}${q ? " (the payload search is not part of it)" : ""}.`));
  }

  function syncTools() {
    const none = selected.size === 0;
    retrySelected.disabled = none;
    deleteSelected.disabled = none;
    const label = none ? "" : ` (${selected.size})`;
    retrySelected.textContent = "Retry selected" + label;
    deleteSelected.textContent = "Delete selected" + label;
    pickAll.checked = items.length > 0 && items.every((job) => selected.has(job.id));
  }

  function bulkIds(action) {
    const ids = [...selected];
    const verb = action === "retry" ? "Retry" : "Delete";
    confirmThen(confirmSlot, `${verb} ${ids.length} selected job${ids.length === 1 ? "" : "s"}?`, async () => {
      const out = await api("POST", `/jobs/${action}`, { ids });
      const ok = out.results.filter((r) => r.status === 200).length;
      const refused = out.results.filter((r) => r.status !== 200).map((r) => `${r.id}: ${r.detail}`);
      note.textContent = `${action === "retry" ? "Retried" : "Deleted"} ${ok} of ${ids.length}.` + (refused.length ? " Refused: " + refused.join("; ") : "");
      selected.clear();
    });
  }

  function bulkFilter(action) {
    const verb = action === "retry" ? "Retry" : "Delete";
    confirmThen(confirmSlot, `${verb} ${scope}?`, async () => {
      const filter = { state: action === "retry" ? "failed" : state };
      if (name) filter.name = name;
      let done = 0;
      let skipped = 0;
      for (let more = true; more;) {
        const out = await api("POST", `/jobs/${action}`, { filter });
        done += out.done;
        skipped += out.skipped;
        more = out.more;
        note.textContent = `${action === "retry" ? "Retried" : "Deleted"} ${done} so far…`;
      }
      note.textContent = `${action === "retry" ? "Retried" : "Deleted"} ${done} (${skipped} skipped: changed meanwhile).`;
      selected.clear();
    });
  }

  function confirmThen(slot, question, action) {
    const yes = h("button", { type: "button", class: "danger" }, "Confirm");
    const no = h("button", { type: "button" }, "Cancel");
    const box = h("div", { class: "confirm", role: "alertdialog", "aria-label": question }, h("span", {}, question), yes, no);
    no.addEventListener("click", () => box.remove());
    yes.addEventListener("click", async () => {
      yes.disabled = no.disabled = true;
      try {
        await action();
      } catch (error) {
        note.textContent = "Failed: " + error.message;
      }
      box.remove();
      await refreshNow();
    });
    slot.replaceChildren(box);
    yes.focus();
  }

  head.append(
    selectable ? h("th", { scope: "col", class: "pick" }, pickAll) : "",
    h("th", { scope: "col" }, "Job"), h("th", { scope: "col" }, "Name"), h("th", { scope: "col", class: "num" }, "Attempts"),
    h("th", { scope: "col" }, { available: "Available since", scheduled: "Runs", reserved: "Leased", succeeded: "Succeeded", failed: "Failed" }[state]),
    h("th", { scope: "col" }, "Payload"),
    state === "reserved" ? h("th", { scope: "col" }, "Worker") : "",
    state === "failed" ? h("th", { scope: "col" }, "Exception") : "");
  const table = h("table", { class: "jobs" }, h("caption", {}, `${stateLabel(state)} jobs${name ? " named " + name : ""}${q ? ` matching “${q}”` : ""}`), h("thead", {}, head), body);

  main.append(h("h2", {}, "Jobs"), tabs, h("div", { class: "forms" }, filters, idForm), tools, confirmSlot, note,
    h("div", { class: "table-wrap" }, table), pager);
  syncTools();

  return {
    load: () => api("GET", listPath(state, { name, q, cursor, limit: PAGE_SIZE })),
    render(page) {
      clearError(main);
      items = page.items;
      const visible = new Set(items.map((job) => job.id));
      for (const id of selected) if (!visible.has(id)) selected.delete(id);
      body.replaceChildren(...items.map((job) => jobRow(job, state, selected, onSelect, selectable)));
      if (!items.length) body.append(h("tr", {}, h("td", { colspan: 8, class: "muted" }, q && page.next_cursor ? "Nothing in this stretch; the search goes on in the next page." : "No jobs here.")));
      pager.replaceChildren(
        cursor ? h("a", { href: link("jobs/" + state, { name, q }) }, "First page") : "",
        page.next_cursor ? h("a", { href: link("jobs/" + state, { name, q, cursor: page.next_cursor }), rel: "next" }, "Next page") : "");
      syncTools();
    },
  };
}

// ---------------------------------------------------------------------------------------
// One job: every field, the payload pretty-printed, the exception, and its actions.

function jobView(main, parts) {
  const id = parts[0] || "";
  const note = h("p", { class: "notice", role: "status" });
  const content = h("div", {});
  main.append(h("h2", {}, "Job ", h("span", { class: "mono" }, id)), note, content);

  async function act(label, method, path, done) {
    try {
      await api(method, path);
      note.textContent = done;
    } catch (error) {
      note.textContent = `${label} failed: ${error.message}`;
    }
    await refreshNow();
  }

  function actions(job) {
    if (!can("admin")) return [];
    const out = [];
    const enc = encodeURIComponent(job.id);
    if (job.state === "failed") {
      out.push(h("button", { type: "button", onclick: () => act("Retry", "POST", `/jobs/${enc}/retry`, "Retried: the job is available again.") }, "Retry"));
    }
    if (job.state === "available" || job.state === "scheduled") {
      out.push(h("button", { type: "button", class: "danger", onclick: () => act("Cancel", "DELETE", `/jobs/${enc}`, "Cancelled: the job is deleted.") }, "Cancel"));
    }
    if (job.state === "succeeded" || job.state === "failed") {
      out.push(h("button", { type: "button", class: "danger", onclick: () => act("Delete", "DELETE", `/jobs/${enc}`, "Deleted.") }, "Delete"));
    }
    return out;
  }

  function field(label, value) {
    return h("div", { class: "field" }, h("dt", {}, label), h("dd", {}, value));
  }

  return {
    load: () => api("GET", "/jobs/" + encodeURIComponent(id)),
    fail(error) {
      content.replaceChildren(h("p", { class: error.status === 404 ? "notice" : "error", role: "alert" },
        error.status === 404 ? `No job ${id}: ${error.message}.` : "Could not load: " + error.message));
      current.lastKey = null;
    },
    render(job) {
      const payload = prettyPayload(job.payload);
      const fields = [
        field("State", h("span", { class: "state state-" + job.state }, job.state)),
        field("Name", h("a", { href: link("jobs/" + job.state, { name: job.name }) }, job.name)),
        field("Attempts", job.max_retries === undefined ? String(job.attempts) : `${job.attempts} of ${job.max_retries + 1}`),
        field("Priority", String(job.priority ?? 0)),
        field("Created", when(job.created_at)),
        field(job.state === "scheduled" ? "Runs" : "Available at", when(job.available_at)),
      ];
      if (job.state === "reserved") {
        fields.push(field("Lease holder", h("span", { class: "worker" }, job.reserved_by || "")));
        fields.push(field("Leased", when(job.reserved_at)));
        if (job.lease_expires_at) fields.push(field("Lease expires", when(job.lease_expires_at)));
      }
      if (job.succeeded_at) fields.push(field("Succeeded", when(job.succeeded_at)));
      if (job.failed_at) fields.push(field("Failed", when(job.failed_at)));
      const buttons = actions(job);
      content.replaceChildren(...[
        h("dl", { class: "fields" }, fields),
        buttons.length ? h("div", { class: "actions", role: "group", "aria-label": "Actions" }, buttons) : "",
        job.state === "reserved" && can("admin") ? h("p", { class: "muted" }, "A worker holds this job: nothing to do until its lease ends.") : "",
        h("h3", {}, payload.json ? "Payload (JSON)" : "Payload"),
        h("pre", { class: "payload", tabindex: 0 }, payload.text),
        job.exception !== undefined ? [h("h3", {}, "Exception"), h("pre", { class: "exception", tabindex: 0 }, job.exception)] : "",
      ].flat());
    },
  };
}

// ---------------------------------------------------------------------------------------
// Failures grouped by the first line of their exception.

function failuresView(main, parts, params) {
  const name = params.get("name") || "";
  const nameInput = h("input", { id: "g-name", name: "name", value: name, pattern: NAME_PATTERN, autocomplete: "off", placeholder: "all names" });
  const form = h("form", { class: "filters", role: "search", "aria-label": "Filter failures", onsubmit: (e) => {
    e.preventDefault();
    go("failures", { name: nameInput.value.trim() });
  } }, h("label", { for: "g-name" }, "Name"), nameInput, h("button", { type: "submit" }, "Filter"));
  const body = h("tbody");
  const foot = h("p", { class: "muted" });
  const table = h("table", { class: "groups" }, h("caption", {}, "Failed jobs by the first line of their exception"),
    h("thead", {}, h("tr", {}, ["Exception", "Jobs", "Names", "Last failed", ""].map((t, i) => h("th", { scope: "col", class: i === 1 ? "num" : null }, t)))), body);
  main.append(h("h2", {}, "Failures"), form, h("div", { class: "table-wrap" }, table), foot);
  return {
    load: () => api("GET", "/jobs/failed/groups" + query({ name })),
    render(out) {
      clearError(main);
      body.replaceChildren(...out.groups.map((g) => h("tr", {},
        h("td", { class: "exception" }, g.first_line),
        h("td", { class: "num" }, g.count),
        h("td", {}, Object.entries(g.names).map(([n, count]) => h("a", { class: "chip", href: link("jobs/failed", { name: n }) }, `${n} × ${count}`))),
        h("td", {}, when(g.last_failed_at)),
        h("td", {}, h("a", { href: link("jobs/failed", { name, q: g.first_line.slice(0, MAX_SEARCH) }) }, "Show jobs")))));
      if (!out.groups.length) body.append(h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No failed jobs.")));
      foot.textContent = `Read the newest ${out.scanned} failed jobs` + (out.complete ? " (all of them)." : "; older ones are not counted.");
    },
  };
}

// ---------------------------------------------------------------------------------------
// Enqueue form.

function enqueueView(main) {
  const allowed = can("enqueue");
  const input = (id, attrs) => h("input", { id, name: id, autocomplete: "off", ...attrs });
  const name = input("e-name", { required: true, pattern: NAME_PATTERN, placeholder: "send_email" });
  const payload = h("textarea", { id: "e-payload", name: "payload", rows: 6, placeholder: '{"to": "ada@example.com"}' });
  const delay = input("e-delay", { type: "number", min: 0, step: 1, inputmode: "numeric", placeholder: "0" });
  const retries = input("e-retries", { type: "number", min: 0, step: 1, inputmode: "numeric", placeholder: "server default" });
  const priority = input("e-priority", { type: "number", min: 0, max: 9, step: 1, inputmode: "numeric", placeholder: "0" });
  const note = h("p", { class: "notice", role: "status" });
  const row = (label, control, hint) => h("div", { class: "row" }, h("label", { for: control.id }, label), control, hint ? h("small", {}, hint) : "");
  const form = h("form", { class: "enqueue", onsubmit: submit },
    h("fieldset", { disabled: !allowed },
      h("legend", {}, "New job"),
      row("Name", name, "A-Z a-z 0-9 _ . : - (1 to 255)"),
      row("Payload", payload, "Any text; JSON is shown pretty-printed."),
      row("Delay (ms)", delay, "Available after this many milliseconds."),
      row("Max retries", retries),
      row("Priority", priority, "0 to 9, lower runs first."),
      h("button", { type: "submit" }, "Enqueue")));
  main.append(h("h2", {}, "Enqueue"), allowed ? "" : h("p", { class: "notice" }, "This token lacks the enqueue scope."), form, note);

  async function submit(event) {
    event.preventDefault();
    const body = { name: name.value.trim(), payload: payload.value };
    if (delay.value !== "") body.available_in_ms = Number(delay.value);
    if (retries.value !== "") body.max_retries = Number(retries.value);
    if (priority.value !== "") body.priority = Number(priority.value);
    try {
      const job = await api("POST", "/jobs", body);
      note.replaceChildren("Enqueued ", h("a", { href: link("job/" + encodeURIComponent(job.id)) }, job.id), ` (${job.state}).`);
    } catch (error) {
      note.textContent = "Not enqueued: " + error.message;
    }
  }
  return {};
}

function notFoundView(main) {
  main.append(h("h2", {}, "Not found"), h("p", {}, h("a", { href: "#/" }, "Back to the overview")));
  return {};
}

// ---------------------------------------------------------------------------------------
// Live updates: GET /events read with fetch() (EventSource cannot send a token), parsed
// here, resumed with Last-Event-ID. While the stream is down, /stats is polled; a server
// without /events (404) is polled for good.

const live = {
  paused: false, controller: null, lastEventId: null, retryTimer: null, backoff: 1000,
  noStream: false, pollTimer: null, pollKey: null, lost: false,
};

function setLive(text) {
  byId("live-status").textContent = text;
}

function connect() {
  clearTimeout(live.retryTimer);
  if (live.paused || !can("read")) return;
  if (live.noStream) {
    startPolling();
    return;
  }
  const controller = new AbortController();
  live.controller = controller;
  stream(controller).catch(() => undefined).finally(() => streamEnded(controller));
}

async function stream(controller) {
  const headers = authHeaders({ Accept: "text/event-stream" });
  if (live.lastEventId) headers["Last-Event-ID"] = live.lastEventId;
  const response = await fetch("/events", { headers, signal: controller.signal, cache: "no-store" });
  if (response.status === 404 || response.status === 405) {
    live.noStream = true; // an older server: polling is all there is
    return;
  }
  if (!response.ok || !response.body) return;
  stopPolling();
  live.backoff = 1000;
  setLive("live");
  if (live.lost) {
    live.lost = false;
    scheduleRefresh(); // catch up on anything missed while away
  }
  await readEvents(response.body, onEvent);
}

function streamEnded(controller) {
  if (controller !== live.controller || controller.signal.aborted || live.paused) return;
  if (live.noStream) {
    startPolling();
    return;
  }
  live.lost = true;
  startPolling(); // keep the screen fresh while reconnecting
  live.retryTimer = setTimeout(connect, live.backoff);
  live.backoff = Math.min(live.backoff * 2, 30000);
}

async function readEvents(body, handle) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { type: "", data: [], id: null };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    for (let at = buffer.search(/[\r\n]/); at >= 0; at = buffer.search(/[\r\n]/)) {
      if (buffer[at] === "\r" && at === buffer.length - 1) break; // a \r\n may be split
      const line = buffer.slice(0, at);
      buffer = buffer.slice(buffer.startsWith("\r\n", at) ? at + 2 : at + 1);
      if (line === "") {
        if (event.id !== null) live.lastEventId = event.id;
        if (event.data.length) handle({ type: event.type || "message", data: event.data.join("\n") });
        event = { type: "", data: [], id: null };
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") event.type = text;
      else if (field === "data") event.data.push(text);
      else if (field === "id" && !text.includes("\0")) event.id = text;
    }
  }
}

function onEvent(event) {
  setLive("live · " + new Date().toLocaleTimeString());
  // The kinds of event this page has handled, for anyone inspecting it (and the tests).
  const status = byId("live-status");
  const seen = new Set((status.dataset.seen || "").split(" ").filter(Boolean)).add(event.type);
  status.dataset.seen = [...seen].sort().join(" ");
  if (event.type === "job" || event.type === "coalesced") scheduleRefresh();
  else if (event.type === "reset") {
    if (current) current.lastKey = null;
    refreshNow();
  } else if (event.type === "stats" && current && current.onStats) {
    try {
      current.onStats(JSON.parse(event.data));
    } finally {
      // The rows per name too: a refresh right after a change may have read counts the
      // server had cached for up to a second.
      scheduleRefresh();
    }
  }
}

function startPolling() {
  if (live.pollTimer !== null || live.paused) return;
  setLive(live.noStream ? "live (polling)" : "reconnecting…");
  live.pollTimer = setInterval(poll, POLL_MS);
}

function stopPolling() {
  clearInterval(live.pollTimer);
  live.pollTimer = null;
  live.pollKey = null;
}

async function poll() {
  if (live.paused || !current) return;
  let stats;
  try {
    stats = await api("GET", "/stats");
  } catch {
    setLive("server unreachable; retrying");
    return;
  }
  const t = stats.totals;
  const key = JSON.stringify([t.counts, t.last_minute, t.last_hour]);
  const changed = live.pollKey !== null && key !== live.pollKey;
  live.pollKey = key;
  setLive((live.noStream ? "live (polling) · " : "reconnecting… · ") + new Date().toLocaleTimeString());
  if (current.onStats) refreshNow(); // the overview shows ages that move every second
  else if (changed) scheduleRefresh();
}

function setPaused(paused) {
  live.paused = paused;
  byId("live-toggle").setAttribute("aria-pressed", String(paused));
  if (paused) {
    if (live.controller) live.controller.abort();
    live.controller = null;
    clearTimeout(live.retryTimer);
    stopPolling();
    setLive("paused");
    return;
  }
  live.lost = false;
  refreshNow();
  connect();
}

// ---------------------------------------------------------------------------------------
// Token prompt and start-up.

function askForToken(message) {
  if (message) sessionStorage.removeItem(TOKEN_KEY);
  if (message) auth.token = null;
  setPaused(true);
  byId("main").hidden = true;
  byId("login").hidden = false;
  byId("login-error").textContent = message || "";
  byId("token").focus();
}

async function whoAmI() {
  try {
    const me = await api("GET", "/auth/me");
    auth.scopes = new Set(me.scopes);
    auth.open = me.open;
    return true;
  } catch (error) {
    if (error.status !== 401) {
      byId("main").replaceChildren(h("p", { class: "error", role: "alert" }, "Cannot reach the server: " + error.message));
    }
    return false;
  }
}

function applyScopes() {
  byId("who").textContent = auth.open ? "open server (no tokens)" : "token: " + [...auth.scopes].sort().join(", ");
  byId("forget").hidden = !auth.token;
  for (const a of byId("nav").querySelectorAll("a[data-needs]")) {
    const missing = !can(a.dataset.needs);
    a.classList.toggle("disabled", missing);
    if (missing) {
      a.setAttribute("aria-disabled", "true");
      a.title = `This token lacks the ${a.dataset.needs} scope`;
    } else {
      a.removeAttribute("aria-disabled");
      a.removeAttribute("title");
    }
  }
}

async function start() {
  if (!(await whoAmI())) return;
  byId("login").hidden = true;
  byId("main").hidden = false;
  applyScopes();
  show(false);
  setPaused(false);
}

function wire() {
  window.addEventListener("hashchange", () => show(true));
  byId("live-toggle").addEventListener("click", () => setPaused(!live.paused));
  byId("forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    location.reload();
  });
  byId("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    auth.token = byId("token").value.trim();
    sessionStorage.setItem(TOKEN_KEY, auth.token);
    byId("token").value = "";
    await start();
  });
  setInterval(tickTimes, 5000);
}

wire();
start();
