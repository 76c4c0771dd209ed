/*
 * Eddy's browser tracker (served by the host at /tracker.js). Plain JavaScript, no build.
 *
 *   <script src="https://eddy.example/tracker.js" data-token="…" defer></script>
 *
 * Records a page view on load and a click on every link and button, batches events (up to
 * data-batch-size, 20, or every data-flush-ms, 5000 ms), and posts them to data-endpoint
 * (by default /v1/events of the host the script came from) with fetch (keepalive). On page
 * hide what is left goes with navigator.sendBeacon. A 503 or a network error puts the
 * events the host did not acknowledge back in the queue, sent again after a backoff that
 * honours Retry-After. Events the host refused for good (400) are logged to the console.
 *
 *   eddy.track("add_to_cart", { product_id: "PROD-1", price: 9.5, quantity: 1 })
 *   eddy.identify("user-42")   // instead of the anonymous id kept in localStorage
 *
 * Settings come from data-* attributes of the script tag or, before the script loads, from
 * window.eddyConfig = { endpoint, token, userId, batchSize, flushMs, autoTrack, onResult }.
 */
(function () {
  "use strict";
  if (window.eddy && window.eddy.track) return;
  var script = document.currentScript;
  var cfg = window.eddyConfig || {};
  function setting(key, attr, fallback) {
    if (cfg[key] !== undefined && cfg[key] !== null) return cfg[key];
    var v = script && script.getAttribute("data-" + attr);
    return v !== null && v !== undefined ? v : fallback;
  }
  var endpoint = setting("endpoint", "endpoint",
    script && script.src ? new URL("/v1/events", script.src).href : "/v1/events");
  var token = setting("token", "token", null);
  var batchSize = Math.max(1, +setting("batchSize", "batch-size", 20));
  var flushMs = Math.max(100, +setting("flushMs", "flush-ms", 5000));
  var autoTrack = String(setting("autoTrack", "auto", true)) !== "false";
  var onResult = typeof cfg.onResult === "function" ? cfg.onResult : null;
  var MAX_QUEUE = 1000;       // events kept while the host is unreachable
  var BEACON_BYTES = 60000;   // browsers cap a beacon (and keepalive bodies) at 64 KiB

  function uuid() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    return "xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx".replace(/[xy]/g, function (c) {
      var r = (Math.random() * 16) | 0;
      return (c === "x" ? r : (r & 3) | 8).toString(16);
    });
  }
  function kept(storage, key) {
    try {
      var v = window[storage].getItem(key);
      if (!v) { v = uuid(); window[storage].setItem(key, v); }
      return v;
    } catch (e) { return uuid(); } // storage disabled: an id for this page only
  }
  var sessionId = kept("sessionStorage", "eddy_session_id");
  var userId = cfg.userId || kept("localStorage", "eddy_anonymous_id");

  var queue = [];
  var inFlight = false, timer = null, attempt = 0, retryAt = 0;

  function schedule(ms) {
    if (timer) clearTimeout(timer);
    timer = setTimeout(function () { timer = null; flush(); }, ms);
  }

  function track(type, properties) {
    queue.push({
      event_id: uuid(),
      timestamp: new Date().toISOString(),
      user_id: userId,
      session_id: sessionId,
      event_type: String(type),
      page_url: location.pathname + location.search,
      referrer: document.referrer || null,
      user_agent: navigator.userAgent,
      properties: properties || {}
    });
    if (queue.length > MAX_QUEUE) {
      var dropped = queue.splice(0, queue.length - MAX_QUEUE);
      console.warn("eddy: the host is unreachable; dropped the " + dropped.length + " oldest events");
    }
    if (queue.length >= batchSize) flush();
    else if (!timer) schedule(flushMs);
  }

  function backoff(retryAfter) {
    attempt += 1;
    var ms = Math.min(60000, 1000 * Math.pow(2, attempt - 1));
    ms = ms / 2 + Math.random() * ms / 2;
    var seconds = parseFloat(retryAfter);
    if (seconds >= 0) ms = Math.max(ms, seconds * 1000);
    retryAt = Date.now() + ms;
    schedule(ms);
  }

  // Back in the queue: the events the host says to send again (or all, without an answer).
  function requeue(batch, answer) {
    var again = batch;
    if (answer && answer.results) {
      again = answer.results.filter(function (r) { return r.retry; })
        .map(function (r) { return batch[r.index]; });
    }
    queue = again.concat(queue);
  }

  function report(status, answer) {
    if (onResult) { try { onResult(status, answer); } catch (e) { /* the page's problem */ } }
    if (answer && answer.results) {
      answer.results.forEach(function (r) {
        if (!r.ok && !r.retry) console.warn("eddy: event refused: " + r.error);
      });
    }
    if (status === 401 || status === 413) console.error("eddy: " + status + ": " + (answer && answer.error));
  }

  function flush() {
    if (inFlight || !queue.length) return;
    var wait = retryAt - Date.now();
    if (wait > 0) { schedule(wait); return; }
    var batch = queue.splice(0, batchSize);
    var body = JSON.stringify(batch);
    var headers = { "Content-Type": "application/json" };
    if (token) headers.Authorization = "Bearer " + token;
    inFlight = true;
    fetch(endpoint, {
      method: "POST", headers: headers, body: body, credentials: "omit",
      keepalive: body.length < BEACON_BYTES
    }).then(function (res) {
      return res.json().catch(function () { return null; }).then(function (answer) {
        if (res.status === 503 || res.status === 429 || res.status >= 500) {
          requeue(batch, answer);
          report(res.status, answer);
          backoff(res.headers.get("Retry-After"));
        } else {
          attempt = 0;
          report(res.status, answer);
        }
      });
    }, function () {
      requeue(batch, null); // a network error: nothing is known, so all of it again
      report(0, null);
      backoff(null);
    }).then(function () {
      inFlight = false;
      if (queue.length >= batchSize) flush();
      else if (queue.length && !timer) schedule(flushMs);
    });
  }

  // Page hide: what is queued goes with sendBeacon (which cannot set headers: the token
  // goes in the query, and the body as text/plain, which needs no CORS preflight).
  function beacon() {
    if (!queue.length || !navigator.sendBeacon) return;
    var url = endpoint + (token ? (endpoint.indexOf("?") < 0 ? "?" : "&") + "token=" + encodeURIComponent(token) : "");
    while (queue.length) {
      var n = Math.min(queue.length, batchSize);
      var body = JSON.stringify(queue.slice(0, n));
      while (n > 1 && body.length > BEACON_BYTES) { n = Math.ceil(n / 2); body = JSON.stringify(queue.slice(0, n)); }
      if (!navigator.sendBeacon(url, new Blob([body], { type: "text/plain" }))) break;
      queue.splice(0, n);
    }
  }
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "hidden") beacon();
  });
  window.addEventListener("pagehide", beacon);

  if (autoTrack) {
    document.addEventListener("click", function (e) {
      var el = e.target && e.target.closest && e.target.closest("a,button,[data-eddy-click]");
      if (!el) return;
      track("click", {
        element: el.tagName.toLowerCase(),
        text: (el.getAttribute("data-eddy-click") || el.textContent || "").trim().slice(0, 100),
        href: el.getAttribute("href") || undefined
      });
    }, true);
    track("page_view", { title: document.title });
  }

  window.eddy = {
    track: track,
    flush: flush,
    identify: function (id) { if (id) userId = String(id); },
    get queued() { return queue.length; }
  };
})();
