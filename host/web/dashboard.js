// Eddy's live dashboard: reads the host's live stream (/v1/stream, Server-Sent Events).
// - the dashboard plugin's `summary` records: active users, events/s, trending, conversion;
// - every output whose name contains "alert" (alert/alerts, fraud/alerts): the alert feed;
// - the host's `status` every second: per plugin events/s, lag, dead letters, breaker, version.
// Plain JavaScript, no build step. Reconnects by itself when the host goes away, asking
// only for the records after the last one it got (`after=`), so each alert shows once.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_ALERTS = 50;
const STALE_AFTER_MS = 5000; // no status for this long: the host counts as unreachable

let source = null;
let lastMessageAt = 0;
let unreachableSince = null;
let retryDelay = 1000;
let reconnectTimer = null;
let lastSummaryAt = null;
let alertCount = 0;
let missedRecords = 0; // records the host skipped because the page fell behind
let lastRecordId = ""; // the id of the last record received, to resume after on reconnect
const shownAlerts = new Set(); // ids of the alerts shown (the latest few thousand)
const history = new Map(); // plugin -> [[time_ms, events], ...] over the last seconds

function text(el, value) {
  if (el.textContent !== String(value)) el.textContent = value;
}

function number(n) {
  return Number(n).toLocaleString("en-US");
}

function setConnection(state, label) {
  const el = $("connection");
  el.className = state;
  text(el, label);
  const banner = $("unreachable");
  if (state === "down") {
    if (unreachableSince === null) unreachableSince = new Date();
    text($("unreachable-since"), unreachableSince.toLocaleTimeString([], { hour12: false }));
    banner.classList.add("shown");
  } else if (state === "live") {
    unreachableSince = null;
    banner.classList.remove("shown");
  }
}

function liveLabel() {
  return missedRecords ? "live (skipped " + number(missedRecords) + " records in bursts)" : "live";
}

function list(el, items, empty) {
  el.replaceChildren();
  if (items.length === 0) {
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = empty;
    el.append(li);
    return;
  }
  for (const [name, count] of items) {
    const li = document.createElement("li");
    const a = document.createElement("span");
    a.textContent = name;
    const b = document.createElement("span");
    b.textContent = number(count);
    li.append(a, b);
    el.append(li);
  }
}

function showSummary(s) {
  lastSummaryAt = Date.now();
  text($("summary-age"), "0 s");
  text($("active-users"), number(s.active_users));
  text($("events-per-sec"), s.events_per_sec_10s.toFixed(1));
  text($("events-per-sec-1m"), s.events_per_sec_1m.toFixed(1));
  text($("conversion"), (100 * s.conversion_rate).toFixed(1) + " %");
  text($("sessions-bought"), number(s.sessions_that_bought));
  text($("sessions-viewed"), number(s.sessions_with_page_view));
  list($("trending-pages"), s.trending_pages, "no page views in the last minute");
  list($("trending-products"), s.trending_products, "no purchases in the last minute");
}

function describeAlert(plugin, a) {
  if (typeof a !== "object" || a === null) return plugin + ": " + String(a);
  if (a.score !== undefined) {
    return `fraud score ${a.score} for ${a.user_id}: ${(a.reasons || []).join(", ")}`;
  }
  const amount = a.amount !== undefined ? ` (${a.amount.toFixed(2)})` : "";
  return `${a.rule || a.kind || plugin}: ${a.user_id || "?"} ${a.event_type || ""}${amount}`;
}

function showAlert(record, id) {
  // Once each, even if a record came again (it should not: see `after=`).
  if (id) {
    if (shownAlerts.has(id)) return;
    shownAlerts.add(id);
    if (shownAlerts.size > 5000) shownAlerts.delete(shownAlerts.values().next().value);
  }
  const ul = $("alerts");
  if (alertCount === 0) ul.replaceChildren();
  alertCount += 1;
  text($("alert-count"), `(${number(alertCount)})`);
  const a = record.value !== undefined ? record.value : record.text;
  const severity = (a && (a.severity || (a.score >= 90 ? "high" : "medium"))) || "";
  const li = document.createElement("li");
  li.dataset.id = id || "";
  const time = document.createElement("span");
  time.className = "time";
  time.textContent = new Date(record.time_ms).toLocaleTimeString([], { hour12: false });
  const sev = document.createElement("span");
  sev.className = "sev-" + severity;
  sev.textContent = severity || record.plugin;
  const what = document.createElement("span");
  what.className = "what";
  what.textContent = describeAlert(record.plugin, a);
  li.append(time, sev, what);
  ul.prepend(li);
  while (ul.children.length > MAX_ALERTS) ul.lastElementChild.remove();
}

function eventsPerSecond(plugin, time, events) {
  const h = history.get(plugin) || [];
  h.push([time, events]);
  while (h.length > 2 && time - h[0][0] > 5000) h.shift();
  history.set(plugin, h);
  if (h.length < 2) return null;
  const [t0, e0] = h[0];
  return t0 === time ? null : ((events - e0) * 1000) / (time - t0);
}

// Partitions the plugin holds on this host, and those restoring their state from the
// changelog (hosts sharing a group: a partition that moves here restores first).
function partitionsOf(p) {
  if (p.assigned_partitions === undefined) return "–";
  const restoring = p.restoring_partitions || [];
  return restoring.length
    ? `${p.assigned_partitions} (restoring ${restoring.join(", ")})`
    : String(p.assigned_partitions);
}

function showStatus(st) {
  text($("host-status"), `host ${st.status} · Kafka ${st.kafka}`);
  const body = $("plugins");
  const rows = [];
  for (const [name, p] of Object.entries(st.plugins)) {
    const rate = eventsPerSecond(name, st.time_ms, p.events);
    const tr = document.createElement("tr");
    tr.dataset.plugin = name;
    const cells = [
      [name],
      [(p.version && p.version.digest ? p.version.digest.replace("sha256:", "").slice(0, 12) : "–"), "code"],
      [rate === null ? "–" : rate.toFixed(1), "num rate"],
      [number(p.events), "num events"],
      [p.consumer_lag < 0 ? "–" : number(p.consumer_lag), "num lag"],
      [partitionsOf(p), "num partitions"],
      [number(p.dead_letters), "num dead-letters"],
      [p.breaker, "breaker"],
      [p.up ? (p.state.full ? "state full" : "up") : "down", "up"],
    ];
    for (const [value, cls] of cells) {
      const td = document.createElement("td");
      if (cls) td.className = cls;
      if (cls === "breaker") {
        const b = document.createElement("span");
        b.className = "badge " + value;
        b.textContent = value.replace("_", "-");
        td.append(b);
      } else if (cls === "code") {
        const c = document.createElement("code");
        c.textContent = value;
        c.title = p.version ? p.version.path : "";
        td.append(c);
      } else {
        td.textContent = value;
      }
      tr.append(td);
    }
    rows.push(tr);
  }
  body.replaceChildren(...rows);
}

// The host has a read token and this browser session has not signed in (or its cookie
// is no longer the host's token).
class SignInNeeded extends Error {}

async function outputsToWatch() {
  const response = await fetch("/v1/outputs", { cache: "no-store" });
  if (response.status === 401) throw new SignInNeeded();
  if (!response.ok) throw new Error("HTTP " + response.status);
  const outputs = await response.json();
  return outputs.filter((o) => o === "dashboard/summary" || /alert/.test(o.split("/")[1]));
}

function scheduleReconnect() {
  if (source) {
    source.close();
    source = null;
  }
  setConnection("down", "unreachable");
  clearTimeout(reconnectTimer);
  reconnectTimer = setTimeout(connect, retryDelay);
  retryDelay = Math.min(retryDelay * 2, 10000);
}

async function connect() {
  setConnection(unreachableSince ? "down" : "waiting", unreachableSince ? "reconnecting" : "connecting");
  let outputs;
  try {
    outputs = await outputsToWatch();
  } catch (e) {
    if (e instanceof SignInNeeded) {
      askForToken();
      return;
    }
    scheduleReconnect();
    return;
  }
  // Nothing to watch still means status messages.
  let query = outputs.length
    ? outputs.map((o) => "output=" + encodeURIComponent(o)).join("&")
    : "records=off";
  if (lastRecordId) query += "&after=" + encodeURIComponent(lastRecordId);
  const es = new EventSource("/v1/stream?" + query);
  source = es;
  es.addEventListener("hello", () => {
    retryDelay = 1000;
    lastMessageAt = Date.now();
    setConnection("live", liveLabel());
  });
  es.addEventListener("status", (e) => {
    lastMessageAt = Date.now();
    setConnection("live", liveLabel());
    showStatus(JSON.parse(e.data));
  });
  es.addEventListener("record", (e) => {
    lastMessageAt = Date.now();
    if (e.lastEventId) lastRecordId = e.lastEventId;
    const record = JSON.parse(e.data);
    if (record.output === "summary" && record.plugin === "dashboard") showSummary(record.value);
    else showAlert(record, e.lastEventId);
  });
  // The page read slower than a burst arrived: the host skipped what it could not hold.
  // The figures are whole in every summary; alerts in the skipped span are not shown.
  es.addEventListener("missed", (e) => {
    lastMessageAt = Date.now();
    missedRecords += JSON.parse(e.data).missed;
    setConnection("live", liveLabel());
  });
  es.addEventListener("closed", () => scheduleReconnect());
  es.onerror = () => scheduleReconnect();
}

// Signing in: the token goes once, in a header, to POST /v1/login, which answers with an
// HttpOnly cookie for this browser session. The page keeps no copy, and the token never
// goes in a URL.
function askForToken() {
  setConnection("waiting", "sign in");
  $("signin").hidden = false;
  $("signin-token").focus();
}

$("signin").addEventListener("submit", async (e) => {
  e.preventDefault();
  const input = $("signin-token");
  let response;
  try {
    response = await fetch("/v1/login", {
      method: "POST",
      headers: { Authorization: "Bearer " + input.value },
    });
  } catch (err) {
    text($("signin-error"), "the host is unreachable");
    return;
  }
  if (response.status !== 204) {
    text($("signin-error"), response.status === 401 ? "wrong token" : "HTTP " + response.status);
    return;
  }
  input.value = "";
  text($("signin-error"), "");
  $("signin").hidden = true;
  connect();
});

setInterval(() => {
  if (source && lastMessageAt && Date.now() - lastMessageAt > STALE_AFTER_MS) scheduleReconnect();
  if (lastSummaryAt) text($("summary-age"), Math.round((Date.now() - lastSummaryAt) / 1000) + " s");
}, 1000);

connect();
