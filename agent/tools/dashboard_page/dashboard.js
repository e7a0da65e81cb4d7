// hpa-edge dashboard: the page's own script, no library. Everything that came over MQTT is
// put on the page as text (textContent), never as HTML.
"use strict";

const page = {
  instruments: new Map(), // topic prefix -> the server's view of one instrument
  results: [], // newest first, each msg_id once
  errors: [],
  shown: new Set(), // msg_ids of the rows on the page
  history: 200,
};

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "className") node.className = value;
    else node.setAttribute(name, String(value));
  }
  for (const child of children) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function clock(iso) {
  const when = new Date(iso);
  return Number.isNaN(when.getTime()) ? String(iso || "") : when.toLocaleTimeString();
}

function ago(seconds) {
  if (!seconds) return "";
  const s = Math.max(0, Math.round(Date.now() / 1000 - seconds));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
}

function score(row, name) {
  const value = row.scores ? row.scores[name] : undefined;
  return typeof value === "number" ? ` (score ${value.toFixed(2)})` : "";
}

function labels(row) {
  const box = el("div", { className: "labels" });
  for (const name of row.confident) {
    box.append(el("span", { className: "label confident", title: `confident${score(row, name)}` }, name));
  }
  for (const name of row.uncertain) {
    box.append(el("span", { className: "label uncertain", title: `near its threshold${score(row, name)}` }, `${name}?`));
  }
  for (const name of row.near_miss) {
    box.append(el("span", { className: "label near-miss", title: `below its threshold, but near${score(row, name)}` }, name));
  }
  if (!row.confident.length && !row.uncertain.length) box.prepend(el("span", { className: "label none" }, "no label"));
  return box;
}

function reviewText(row) {
  return row.review ? `REVIEW: ${row.review_reasons.join(", ") || "yes"}` : "ok";
}

// Instruments ----------------------------------------------------------------------------------
function instrumentCard(view) {
  const card = el("article", { className: "instrument", "data-key": view.key, "data-status": view.status });
  card.append(
    el("div", { className: "head" },
      el("span", { className: "name" }, view.name),
      el("span", { className: "status", "data-status": view.status }, view.status),
      el("span", { className: "since" }, view.status_received ? `since ${ago(view.status_received)}` : ""),
    ),
  );
  if (view.degraded) card.append(el("div", { className: "degraded-reason" }, `degraded: ${view.degraded}`));
  const latest = el("div", { className: "latest" });
  const row = view.latest;
  if (row) {
    latest.append(
      el("div", { className: "meta" }, `last stack ${clock(row.time)} `, row.purpose === "demo" ? el("span", { className: "demo", title: "demo bundle: not for real analyses" }, "demo") : ""),
      el("div", { className: "stack", title: row.stack_id }, row.stack_id),
      labels(row),
      el("div", { className: row.review ? "review" : "ok" }, reviewText(row)),
    );
  } else {
    latest.append(el("div", { className: "meta" }, "no result yet"));
  }
  card.append(latest);
  const picture = el("div", { className: "thumbnail" });
  if (view.thumbnail) {
    picture.append(el("img", { src: view.thumbnail.url, alt: `latest picture from ${view.name}`, title: `${view.thumbnail.type}, ${view.thumbnail.bytes} bytes, ${ago(view.thumbnail.received)}` }));
  }
  card.append(picture);
  const s = view.stats;
  card.append(
    el("div", { className: "stats" },
      s
        ? `processed ${s.processed} · failed ${s.failed} · quarantined ${s.quarantined} · waiting ${s.waiting_stacks ?? "-"} · outbox ${s.outbox_pending} · inflight ${s.inflight}` +
            (s.latency_p95_ms != null ? ` · p95 ${s.latency_p95_ms} ms` : "") + ` (stats ${ago(view.stats_received)})`
        : "no stats message yet",
    ),
  );
  return card;
}

function renderInstruments() {
  const box = document.getElementById("instruments");
  const views = [...page.instruments.values()].sort((a, b) => a.name.localeCompare(b.name));
  box.replaceChildren(...(views.length ? views.map(instrumentCard) : [el("p", { className: "empty" }, "No instrument has spoken yet.")]));
}

// Tables -------------------------------------------------------------------------------------------
function resultRow(row, fresh) {
  const top = row.top ? `${row.top[0]} ${Number(row.top[1]).toFixed(2)}` : "-";
  return el("tr", { "data-msg-id": row.msg_id, className: [row.review ? "flagged" : "", fresh ? "fresh" : ""].join(" ").trim() || null },
    el("td", { title: row.time }, clock(row.time)),
    el("td", {}, row.instrument),
    el("td", { className: "mono", title: row.stack_id }, row.stack_id),
    el("td", {}, labels(row)),
    el("td", {}, top),
    el("td", { className: "num" }, row.total_ms == null ? "-" : Number(row.total_ms).toFixed(1)),
    el("td", {}, reviewText(row)),
  );
}

function errorRow(row, fresh) {
  return el("tr", { "data-msg-id": row.msg_id, className: fresh ? "fresh" : null },
    el("td", { title: row.time }, clock(row.time)),
    el("td", {}, row.instrument),
    el("td", { className: "mono", title: row.stack_id }, row.stack_id || "-"),
    el("td", {}, row.code),
    el("td", {}, row.moved_to),
    el("td", {}, row.message),
  );
}

function counts() {
  document.getElementById("result-count").textContent = `(${page.results.length}${page.results.length >= page.history ? ", the newest" : ""})`;
  document.getElementById("error-count").textContent = `(${page.errors.length})`;
}

function renderTables() {
  document.querySelector("#results tbody").replaceChildren(...page.results.map((r) => resultRow(r, false)));
  document.querySelector("#errors tbody").replaceChildren(...page.errors.map((r) => errorRow(r, false)));
  counts();
}

function addRow(list, row, tableId, make) {
  const id = `${tableId}:${row.msg_id}`;
  if (page.shown.has(id)) return; // at-least-once delivery: each msg_id once
  page.shown.add(id);
  list.unshift(row);
  const body = document.querySelector(`#${tableId} tbody`);
  body.prepend(make(row, true));
  while (list.length > page.history) {
    const gone = list.pop();
    page.shown.delete(`${tableId}:${gone.msg_id}`);
    body.lastElementChild.remove();
  }
  counts();
}

function showBroker(broker) {
  const badge = document.getElementById("broker");
  badge.dataset.connected = String(broker.connected);
  badge.textContent = broker.connected
    ? `broker ${broker.address}: connected`
    : `broker ${broker.address}: ${broker.detail} (values may be stale)`;
}

// The event stream ---------------------------------------------------------------------------------
function connect() {
  const stream = new EventSource("events");
  const lost = document.getElementById("stream");
  stream.addEventListener("open", () => { lost.hidden = true; });
  stream.addEventListener("error", () => { lost.hidden = false; }); // EventSource retries by itself
  stream.addEventListener("snapshot", (event) => {
    const data = JSON.parse(event.data);
    page.history = data.history;
    page.instruments = new Map(data.instruments.map((view) => [view.key, view]));
    page.results = data.results;
    page.errors = data.errors;
    page.shown = new Set([...data.results.map((r) => `results:${r.msg_id}`), ...data.errors.map((r) => `errors:${r.msg_id}`)]);
    showBroker(data.broker);
    renderInstruments();
    renderTables();
    document.body.dataset.ready = "true";
  });
  stream.addEventListener("instrument", (event) => {
    const view = JSON.parse(event.data);
    page.instruments.set(view.key, view);
    renderInstruments();
  });
  stream.addEventListener("result", (event) => addRow(page.results, JSON.parse(event.data), "results", resultRow));
  stream.addEventListener("stack_error", (event) => addRow(page.errors, JSON.parse(event.data), "errors", errorRow));
  stream.addEventListener("broker", (event) => showBroker(JSON.parse(event.data)));
}

connect();
setInterval(renderInstruments, 10000); // keeps "since ... ago" current
