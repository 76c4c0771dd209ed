//! The HTTP collector against the real host and a real (embedded) broker: `POST /v1/events`
//! takes one event, an array or NDJSON, says per event what became of it, produces the
//! valid ones keyed by `user_id`, answers once Kafka has them, and every plugin then sees
//! each exactly once; 413 past `max_body_kib`, 401 without the token, CORS preflights for
//! `cors_origins`; 503 with `Retry-After` while the broker is down, and 2xx again once it
//! is back.

mod common;

use common::*;
use eddy::Host;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PARTITIONS: i32 = 2;

/// A host on its own runtime (the test thread stays free for the blocking HTTP client).
struct Running {
    host: Option<Host>,
    rt: tokio::runtime::Runtime,
    base: String,
    broker: eddy::kafka::EmbeddedBroker,
}

impl Running {
    /// Starts a host with the logger and analytics plugins and `http` added to `[http]`.
    fn start(http: &str) -> Running {
        Running::start_with(http, "")
    }

    /// [`Running::start`] with `kafka_settings` added to `[kafka.settings]`.
    fn start_with(http: &str, kafka_settings: &str) -> Running {
        init_logs();
        let broker = broker(PARTITIONS);
        let plugins = format!(
            "[[plugin]]\nname = \"logger\"\npath = \"{}\"\n[plugin.outputs]\nlog = \"discard\"\n\n\
             [[plugin]]\nname = \"analytics\"\npath = \"{}\"\n[plugin.outputs]\nsnapshots = \"discard\"\n",
            wasm("eddy_logger"),
            wasm("eddy_analytics")
        );
        let text = config_text(broker.bootstrap_servers(), PARTITIONS, &plugins)
            .replace(
                "address = \"127.0.0.1:0\"\n",
                &format!("address = \"127.0.0.1:0\"\n{http}\n"),
            )
            .replace(
                "[kafka.settings]\n",
                &format!("[kafka.settings]\n{kafka_settings}\n"),
            );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let host = rt
            .block_on(Host::start(config(&text)))
            .expect("host starts");
        let base = format!("http://{}", host.http_addr());
        Running {
            host: Some(host),
            rt,
            base,
            broker,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn bootstrap(&self) -> String {
        self.broker.bootstrap_servers().to_string()
    }

    fn metrics(&self) -> String {
        get(&self.url("/metrics")).1
    }

    /// Waits until both plugins have committed the whole topic (`end` events), then checks
    /// each handled exactly `end`.
    fn each_plugin_handled_exactly(&self, end: u64) {
        wait_committed(
            &self.bootstrap(),
            &["eddy-logger", "eddy-analytics"],
            PARTITIONS,
            end as i64,
            Duration::from_secs(60),
        );
        let host = self.host.as_ref().unwrap();
        for plugin in ["logger", "analytics"] {
            assert_eq!(
                host.metrics().plugin(plugin).events_handled(),
                end,
                "{plugin} handled each event once"
            );
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(host) = self.host.take() {
            let _ = self.rt.block_on(host.stop());
        }
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into()
}

/// Status, body and headers (lowercase names) of a response.
type Answer = (u16, String, BTreeMap<String, String>);

fn read(mut r: ureq::http::Response<ureq::Body>) -> Answer {
    let headers = r
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = r.body_mut().read_to_string().unwrap_or_default();
    (r.status().as_u16(), body, headers)
}

fn get(url: &str) -> (u16, String, BTreeMap<String, String>) {
    read(agent().get(url).call().expect("GET"))
}

/// POSTs `body` with `headers`; the answer, its JSON parsed.
fn post(url: &str, headers: &[(&str, &str)], body: &str) -> (u16, Value, BTreeMap<String, String>) {
    let mut request = agent().post(url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let (status, text, headers) = read(request.send(body).expect("POST"));
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, json, headers)
}

const JSON: (&str, &str) = ("content-type", "application/json");

fn event(n: usize) -> Value {
    json!({
        "event_id": format!("e-{n}"),
        "timestamp": "2026-11-29T10:00:00.000Z",
        "user_id": format!("user-{}", n % 3),
        "session_id": "s-1",
        "event_type": "page_view",
        "page_url": "/",
    })
}

/// Posts `events` as an array, then again those the answer marks `retry` (as the tracker
/// does), until the answer is 200; the first answer.
fn post_until_durable(url: &str, events: Vec<Value>) -> (u16, Value, BTreeMap<String, String>) {
    let mut left = events;
    let mut first = None;
    wait_for(Duration::from_secs(60), "a 200 for every event", || {
        let (status, answer, headers) = post(url, &[JSON], &Value::Array(left.clone()).to_string());
        assert!(status == 200 || status == 503, "{status}: {answer}");
        left = answer["results"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["retry"] == json!(true))
            .map(|r| left[r["index"].as_u64().unwrap() as usize].clone())
            .collect();
        first.get_or_insert((status, answer, headers));
        status == 200
    });
    assert!(left.is_empty());
    first.unwrap()
}

/// The `event_id`s in the topic (at most `up_to`), sorted.
fn ids_in_topic(bootstrap: &str, up_to: usize) -> Vec<String> {
    let mut ids: Vec<String> = read_topic(bootstrap, TOPIC, up_to)
        .iter()
        .map(|m| {
            use rdkafka::Message;
            let v: Value = serde_json::from_slice(m.payload().unwrap()).unwrap();
            v["event_id"].as_str().unwrap().to_string()
        })
        .collect();
    ids.sort();
    ids
}

/// Checks that each sample `series` on the metrics page has its value.
fn assert_samples(page: &str, expected: &[(&str, f64)]) {
    for (series, value) in expected {
        assert_eq!(sample(page, series), *value, "{series}");
    }
}

/// The value of the sample `series` (name and labels as written) on a metrics page.
fn sample(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in\n{page}"))
}

#[test]
fn one_event_an_array_and_ndjson_are_produced_keyed_by_user_and_reach_every_plugin_once() {
    let h = Running::start("");
    let url = h.url("/v1/events");
    let mut sent: Vec<String> = Vec::new();

    let single = event(0).to_string();
    let (status, answer, _) = post(&url, &[JSON], &single);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        json!({"accepted":1,"rejected":0,"retry":0,"results":[{"index":0,"ok":true}]})
    );
    sent.push(single);

    let array: Vec<Value> = (1..4).map(event).collect();
    let (status, answer, _) = post(&url, &[JSON], &Value::Array(array.clone()).to_string());
    assert_eq!((status, &answer["accepted"]), (200, &json!(3)), "{answer}");
    sent.extend(array.iter().map(Value::to_string));

    // NDJSON with a blank line, told by its content type; then the same detected, as text.
    let lines: Vec<String> = (4..7).map(|n| event(n).to_string()).collect();
    let ndjson = format!("{}\n\n{}\r\n{}\n", lines[0], lines[1], lines[2]);
    let (status, answer, _) = post(&url, &[("content-type", "application/x-ndjson")], &ndjson);
    assert_eq!((status, &answer["accepted"]), (200, &json!(3)), "{answer}");
    assert_eq!(answer["results"][1], json!({"index":1,"ok":true,"line":3}));
    sent.extend(lines);
    let lines: Vec<String> = (7..9).map(|n| event(n).to_string()).collect();
    let (status, answer, _) = post(&url, &[("content-type", "text/plain")], &lines.join("\n"));
    assert_eq!((status, &answer["accepted"]), (200, &json!(2)), "{answer}");
    sent.extend(lines);

    // A body large enough to be checked off the runtime's worker (over 64 KiB).
    let large: Vec<Value> = (100..700).map(event).collect();
    let body = Value::Array(large.clone()).to_string();
    assert!(body.len() > 64 << 10);
    let (status, answer, _) = post(&url, &[JSON], &body);
    assert_eq!(
        (status, &answer["accepted"]),
        (200, &json!(600)),
        "{}",
        answer["rejected"]
    );
    sent.extend(large.iter().map(Value::to_string));

    // Posted again (a client that lost the answer), with a new event twice: the events
    // already acknowledged are answered ok without being written again, by `event_id`.
    let again = json!([event(1), event(2), event(3), event(9), event(9)]);
    let (status, answer, _) = post(&url, &[JSON], &again.to_string());
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (&answer["accepted"], &answer["duplicates"]),
        (&json!(5), &json!(4)),
        "{answer}"
    );
    let duplicate: Vec<bool> = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["ok"] == json!(true) && r["duplicate"] == json!(true))
        .collect();
    assert_eq!(duplicate, [true, true, true, false, true]);
    sent.push(event(9).to_string());

    // What reached the topic: each event once, as sent, keyed by its user.
    let records = read_topic(&h.bootstrap(), TOPIC, sent.len() + 1);
    let mut got: Vec<(String, String)> = records
        .iter()
        .map(|m| {
            use rdkafka::Message;
            (
                String::from_utf8_lossy(m.key().unwrap()).into_owned(),
                String::from_utf8_lossy(m.payload().unwrap()).into_owned(),
            )
        })
        .collect();
    got.sort();
    let mut want: Vec<(String, String)> = sent
        .iter()
        .map(|s| {
            let v: Value = serde_json::from_str(s).unwrap();
            (v["user_id"].as_str().unwrap().to_string(), s.clone())
        })
        .collect();
    want.sort();
    assert_eq!(got, want);
    h.each_plugin_handled_exactly(sent.len() as u64);

    assert_samples(
        &h.metrics(),
        &[
            ("eddy_collector_events_accepted_total", 610.0),
            ("eddy_collector_events_duplicate_total", 4.0),
            ("eddy_collector_requests_total{code=\"200\"}", 6.0),
            ("eddy_collector_request_duration_seconds_count", 6.0),
        ],
    );
}

#[test]
fn a_mixed_batch_says_why_each_bad_event_was_refused_and_produces_the_good_ones() {
    let h = Running::start("");
    let url = h.url("/v1/events");
    let mut no_user = event(1);
    no_user.as_object_mut().unwrap().remove("user_id");
    let mut bad_type = event(2);
    bad_type["user_id"] = json!(true);
    let batch = json!([event(0), no_user, 42, bad_type, event(3)]);
    let (status, answer, _) = post(&url, &[JSON], &batch.to_string());
    assert_eq!(status, 200, "the valid events are durable: {answer}");
    assert_eq!(
        (&answer["accepted"], &answer["rejected"]),
        (&json!(2), &json!(3))
    );
    let results = answer["results"].as_array().unwrap();
    let ok: Vec<bool> = results.iter().map(|r| r["ok"] == json!(true)).collect();
    assert_eq!(ok, [true, false, false, false, true]);
    let error = |i: usize| results[i]["error"].as_str().unwrap().to_string();
    assert!(error(1).contains("missing field `user_id`"), "{}", error(1));
    assert!(
        error(2).contains("an event is a JSON object"),
        "{}",
        error(2)
    );
    assert!(error(3).contains("user_id"), "{}", error(3));
    assert!(results.iter().all(|r| r.get("retry").is_none()), "{answer}");

    // NDJSON: a line that is not JSON is refused with its line number, the rest go through.
    let ndjson = format!("{}\n{{\"user_id\": \n{}\n", event(4), event(5));
    let (status, answer, _) = post(&url, &[("content-type", "application/x-ndjson")], &ndjson);
    assert_eq!((status, &answer["accepted"]), (200, &json!(2)), "{answer}");
    let e = answer["results"][1]["error"].as_str().unwrap();
    assert!(e.starts_with("line 2: ") && e.contains("column"), "{e}");

    // Nothing valid: 400. Not even a body: 400 with what is expected.
    let (status, answer, _) = post(&url, &[JSON], r#"{"event_type":"click"}"#);
    assert_eq!((status, &answer["rejected"]), (400, &json!(1)), "{answer}");
    let (status, answer, _) = post(&url, &[JSON], "[{\"a\":1},");
    assert_eq!(status, 400);
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("not a valid JSON array"),
        "{answer}"
    );
    let (status, _, _) = post(&url, &[JSON], "  ");
    assert_eq!(status, 400);

    h.each_plugin_handled_exactly(4);
    assert_samples(
        &h.metrics(),
        &[
            (
                "eddy_collector_events_rejected_total{reason=\"schema\"}",
                3.0,
            ),
            (
                "eddy_collector_events_rejected_total{reason=\"not_object\"}",
                1.0,
            ),
            ("eddy_collector_events_rejected_total{reason=\"json\"}", 1.0),
            ("eddy_collector_requests_total{code=\"400\"}", 3.0),
        ],
    );
}

#[test]
fn size_limit_token_and_cors() {
    let h = Running::start(
        "max_body_kib = 1\ntoken = \"s3cret\"\ncors_origins = [\"https://shop.example\"]",
    );
    let url = h.url("/v1/events");
    let auth = ("authorization", "Bearer s3cret");
    let small = event(0).to_string();

    // 401 without the token and with a wrong one; the right one as a header or in the query.
    let (status, answer, headers) = post(&url, &[JSON], &small);
    assert_eq!(status, 401, "{answer}");
    assert_eq!(headers["www-authenticate"], "Bearer");
    let (status, _, _) = post(&url, &[JSON, ("authorization", "Bearer s3cre")], &small);
    assert_eq!(status, 401);
    assert_eq!(post(&url, &[JSON, auth], &small).0, 200);
    assert_eq!(
        post(
            &(url.clone() + "?token=s3cret"),
            &[("content-type", "text/plain")],
            &small
        )
        .0,
        200
    );
    // Only the collector needs it.
    assert_eq!(get(&h.url("/metrics")).0, 200);
    assert_ne!(get(&h.url("/healthz")).0, 401);

    // 413 past 1 KiB, by Content-Length, and for a chunked body that says no length.
    let big = Value::Array((0..20).map(event).collect()).to_string();
    assert!(big.len() > 1024);
    let (status, answer, _) = post(&url, &[JSON, auth], &big);
    assert_eq!(status, 413, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("max_body_kib"),
        "{answer}"
    );
    let addr = h.base.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let chunk = format!("{:x}\r\n{big}\r\n0\r\n\r\n", big.len());
    write!(
        s,
        "POST /v1/events HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer s3cret\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n{chunk}"
    )
    .unwrap();
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");

    // CORS: a preflight from the allowed origin is answered, one from another is not.
    let preflight = |origin: &str| {
        read(
            agent()
                .options(&url)
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .header(
                    "access-control-request-headers",
                    "authorization,content-type",
                )
                .call()
                .unwrap(),
        )
    };
    let (status, _, headers) = preflight("https://shop.example");
    assert_eq!(status, 200, "{headers:?}");
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://shop.example"
    );
    assert!(
        headers["access-control-allow-methods"].contains("POST"),
        "{headers:?}"
    );
    let allowed = headers["access-control-allow-headers"].to_ascii_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("content-type"),
        "{headers:?}"
    );
    let (_, _, headers) = preflight("https://evil.example");
    assert!(
        !headers.contains_key("access-control-allow-origin"),
        "{headers:?}"
    );
    // The post itself carries the header, and lets the page read Retry-After.
    let (status, _, headers) = post(
        &url,
        &[JSON, auth, ("origin", "https://shop.example")],
        &small,
    );
    assert_eq!(status, 200);
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://shop.example"
    );
    assert!(
        headers["access-control-expose-headers"]
            .to_ascii_lowercase()
            .contains("retry-after")
    );

    // The tracker and the demo page are served, open.
    let (status, js, headers) = get(&h.url("/tracker.js"));
    assert_eq!(status, 200);
    assert!(
        headers["content-type"].starts_with("text/javascript"),
        "{headers:?}"
    );
    assert!(js.contains("sendBeacon") && js.contains("Retry-After"));
    let (status, page, _) = get(&h.url("/demo"));
    assert_eq!(status, 200);
    assert!(page.contains("src=\"/tracker.js\""));

    assert_samples(
        &h.metrics(),
        &[
            ("eddy_collector_requests_total{code=\"401\"}", 2.0),
            ("eddy_collector_requests_total{code=\"413\"}", 2.0),
        ],
    );
}

#[test]
fn while_the_broker_is_down_posts_get_503_with_retry_after_and_succeed_once_it_is_back() {
    let h = Running::start("ingest_timeout_ms = 1000");
    let url = h.url("/v1/events");
    assert_eq!(post(&url, &[JSON], &event(0).to_string()).0, 200);

    h.broker.set_broker_up(1, false).unwrap();
    let batch = Value::Array((1..4).map(event).collect()).to_string();
    let started = Instant::now();
    let (status, answer, headers) = post(&url, &[JSON], &batch);
    assert_eq!(status, 503, "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(headers["retry-after"], "2");
    assert_eq!(
        (&answer["accepted"], &answer["retry"]),
        (&json!(0), &json!(3)),
        "{answer}"
    );
    assert!(
        answer["results"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["retry"] == json!(true)),
        "{answer}"
    );
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("ingest_timeout_ms"),
        "{answer}"
    );

    // Back up: the client sends again what it was told to (as the tracker does) until
    // Kafka has every event.
    h.broker.set_broker_up(1, true).unwrap();
    post_until_durable(&url, (1..4).map(event).collect());
    // The plugins are back at work promptly: the connection errors librdkafka queued during
    // the outage are not waited out one backoff each (which took over a minute). Timed on
    // the handling alone: checking the topic and the commits below costs what it costs.
    let durable = Instant::now();
    let metrics = h.host.as_ref().unwrap().metrics().clone();
    wait_for(
        Duration::from_secs(90),
        "both plugins to handle the events",
        || {
            ["logger", "analytics"]
                .iter()
                .all(|p| metrics.plugin(p).events_handled() >= 4)
        },
    );
    assert!(
        durable.elapsed() < Duration::from_secs(20),
        "the plugins took {:?} to handle the events after they were in the topic",
        durable.elapsed()
    );
    // Nothing of the failed posts was written: each event is in the topic once.
    assert_eq!(
        ids_in_topic(&h.bootstrap(), 5),
        ["e-0", "e-1", "e-2", "e-3"]
    );
    h.each_plugin_handled_exactly(4);
    let page = h.metrics();
    assert!(sample(&page, "eddy_collector_events_unacknowledged_total") >= 3.0);
    assert!(sample(&page, "eddy_collector_requests_total{code=\"503\"}") >= 1.0);
}

#[test]
fn a_full_producer_queue_answers_503_for_the_events_it_could_not_take() {
    // A producer queue of 5 events: a post of 40 fills it.
    let h = Running::start_with("", "\"queue.buffering.max.messages\" = \"5\"");
    let url = h.url("/v1/events");
    let events: Vec<Value> = (0..40).map(event).collect();
    let (status, answer, headers) = post_until_durable(&url, events);
    assert_eq!(status, 503, "{answer}");
    assert_eq!(headers["retry-after"], "2");
    let retry = answer["retry"].as_u64().unwrap();
    assert!(
        retry > 0 && answer["accepted"].as_u64().unwrap() + retry == 40,
        "{answer}"
    );
    let first_retry = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["retry"] == json!(true))
        .unwrap();
    assert!(
        first_retry["error"].as_str().unwrap().contains("not sent"),
        "{first_retry}"
    );
    // Sent again until all were taken: each event once in the topic, and in each plugin.
    let mut want: Vec<String> = (0..40).map(|n| format!("e-{n}")).collect();
    want.sort();
    assert_eq!(ids_in_topic(&h.bootstrap(), 41), want);
    h.each_plugin_handled_exactly(40);
}

/// Resident memory of this process (the host runs in it), in MiB.
fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024.0
}

/// Issue 26's first probe: twelve concurrent 1 MiB bodies `[1,1,…]` took the host from
/// 77 MiB to 10.6 GiB (a value, a fate and a result built per element). A post now holds
/// at most `max_events_per_post` events, found out while splitting: each is refused 413
/// before anything is built per element, and the process grows by a few MiB.
#[test]
fn twelve_concurrent_posts_of_a_million_tiny_elements_cost_what_their_bodies_weigh() {
    let h = Running::start("token = \"s3cret\"");
    let url = h.url("/v1/events");
    // 1 MiB less a byte: just under max_body_kib's default.
    let body = Arc::new(format!("[{}1]", "1,".repeat((1 << 20) / 2 - 2)));
    assert_eq!(body.len(), (1 << 20) - 1);
    let before = rss_mib();
    let posts: Vec<_> = (0..12)
        .map(|_| {
            let (url, body) = (url.clone(), body.clone());
            std::thread::spawn(move || {
                post(
                    &url,
                    &[JSON, ("authorization", "Bearer s3cret")],
                    body.as_str(),
                )
            })
        })
        .collect();
    for p in posts {
        let (status, answer, _) = p.join().unwrap();
        assert_eq!(status, 413, "{answer}");
        assert!(
            answer["error"]
                .as_str()
                .unwrap()
                .contains("more than 1000 events in one post ([http] max_events_per_post)"),
            "{answer}"
        );
    }
    let grown = rss_mib() - before;
    eprintln!("12 concurrent 1 MiB posts of [1,1,…]: resident memory grew {grown:.1} MiB");
    assert!(
        grown < 128.0,
        "resident memory grew {grown:.1} MiB for 12 MiB of posts"
    );
    // The collector still takes events.
    assert_eq!(
        post(
            &url,
            &[JSON, ("authorization", "Bearer s3cret")],
            &event(0).to_string()
        )
        .0,
        200
    );
}

/// The posts in flight together hold at most `[http] ingest_memory_mib`: while one post
/// declared 1 MiB and sends its body slowly (holding 4 MiB of a 5 MiB budget: 4 bytes per
/// byte of body), another declaring 1 MiB waits a second, then is answered 503 with
/// `Retry-After`, its body unread; a small post still fits (its body's share and 1 KiB per
/// event). Once the first is answered, the large one goes through.
#[test]
fn past_the_memory_of_posts_in_flight_a_post_is_told_to_come_back() {
    let h = Running::start("ingest_memory_mib = 5");
    let url = h.url("/v1/events");
    let addr = h.base.trim_start_matches("http://").to_string();
    let length = 1 << 20;
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n"
    );
    let answer_of = |stream: &mut std::net::TcpStream| {
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut answer = String::new();
        let mut buf = [0u8; 4096];
        while !answer.contains("\r\n\r\n") || !answer.ends_with('\n') {
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "no answer: {answer}");
            answer.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        answer
    };
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    let first = event(1).to_string();
    write!(slow, "{head}{first}").unwrap();
    wait_for(
        Duration::from_secs(30),
        "the slow post to hold its room",
        || sample(&h.metrics(), "eddy_collector_memory_held_bytes") == (4 << 20) as f64,
    );
    // Another large one is turned away unread.
    let mut large = std::net::TcpStream::connect(&addr).unwrap();
    large.write_all(head.as_bytes()).unwrap();
    let answer = answer_of(&mut large);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 1\r\n"), "{answer}");
    assert!(answer.contains("[http] ingest_memory_mib"), "{answer}");
    assert!(sample(&h.metrics(), "eddy_collector_busy_total") >= 1.0);
    // A small post fits beside the slow one.
    assert_eq!(post(&url, &[JSON], &event(2).to_string()).0, 200);
    // The slow post ends (padding after its event: one JSON value, then spaces).
    slow.write_all(&vec![b' '; length - first.len()]).unwrap();
    let answer = answer_of(&mut slow);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        sample(&h.metrics(), "eddy_collector_memory_held_bytes"),
        0.0
    );
    let padded = format!(
        "{}{}",
        event(3),
        " ".repeat(length - event(3).to_string().len())
    );
    assert_eq!(post(&url, &[JSON], &padded).0, 200);
}

/// Issue 26: one event dated 2999 was accepted, and the dashboard's clock jumped ~973
/// years ahead for good. The collector now refuses, per event and with the reason, an
/// event dated further ahead of its clock than `[http] max_clock_skew_ms` (5 minutes);
/// one a minute ahead (a browser's clock a little fast) goes through.
#[test]
fn an_event_dated_far_in_the_future_is_refused_with_the_reason() {
    let h = Running::start("");
    let url = h.url("/v1/events");
    let at = |ms: i64| {
        let mut e = event(0);
        e["event_id"] = json!(format!("at-{ms}"));
        e["timestamp"] = json!(eddy::clock::format_rfc3339_ms(ms));
        e
    };
    let now = eddy::clock::now_ms();
    let mut year_2999 = event(1);
    year_2999["timestamp"] = json!("2999-01-01T00:00:00Z");
    let batch = json!([year_2999, at(now + 60_000), at(now + 3_600_000), event(2)]);
    let (status, answer, _) = post(&url, &[JSON], &batch.to_string());
    assert_eq!(status, 200, "{answer}");
    let ok: Vec<bool> = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["ok"] == json!(true))
        .collect();
    assert_eq!(ok, [false, true, false, true], "{answer}");
    let error = answer["results"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("ahead of the host's clock") && error.contains("max_clock_skew_ms"),
        "{error}"
    );
    assert_samples(
        &h.metrics(),
        &[(
            "eddy_collector_events_rejected_total{reason=\"future\"}",
            2.0,
        )],
    );
}
