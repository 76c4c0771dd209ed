//! The four shipped plugins, built to `.wasm`, run by the real host against a real
//! Kafka-protocol broker: each plugin's group sees every event exactly once, and what the
//! plugins emit matches what was produced.

mod common;

use common::*;
use eddy::Host;
use eddy::metrics::Outcome;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const EVENTS: usize = 3000;
const PARTITIONS: i32 = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_plugins_each_see_every_event_and_their_outputs_match_the_input() {
    let broker = broker(PARTITIONS);
    let bootstrap = broker.bootstrap_servers().to_string();
    let events = generate(EVENTS, &generator_options(7, 500));
    produce_generated(&bootstrap, &events);

    let plugins = format!(
        r#"
[[plugin]]
name = "logger"
path = "{logger}"
[plugin.outputs]
log = {{ topic = "log" }}

[[plugin]]
name = "analytics"
path = "{analytics}"
tick_interval_ms = 0
[plugin.outputs]
snapshots = {{ topic = "snapshots" }}
[plugin.config]
snapshot_every = 1000

[[plugin]]
name = "alert"
path = "{alert}"
[plugin.outputs]
alerts = {{ topic = "alerts" }}
[[plugin.config.rules]]
name = "big-purchase"
event_type = "purchase"
min_amount = 500.0

[[plugin]]
name = "fraud"
path = "{fraud}"
[plugin.outputs]
alerts = {{ topic = "fraud-alerts" }}
"#,
        logger = wasm("eddy_logger"),
        analytics = wasm("eddy_analytics"),
        alert = wasm("eddy_alert"),
        fraud = wasm("eddy_fraud"),
    );
    let host = Host::start(config(&config_text(&bootstrap, PARTITIONS, &plugins)))
        .await
        .expect("host starts");
    let metrics = host.metrics().clone();
    let names = ["logger", "analytics", "alert", "fraud"];
    tokio::task::spawn_blocking(move || {
        wait_for(
            Duration::from_secs(90),
            "every plugin to handle every event",
            || {
                names
                    .iter()
                    .all(|n| metrics.plugin(n).events_handled() >= EVENTS as u64)
            },
        )
    })
    .await
    .unwrap();

    // Exactly once: once every group has committed to the end of the topic, no event is
    // left to arrive, and still not one event more.
    wait_settled(&bootstrap, &names, PARTITIONS, EVENTS as u64).await;
    for name in names {
        let m = host.metrics().plugin(name);
        assert_eq!(m.events_handled(), EVENTS as u64, "plugin {name}");
        assert_eq!(m.events(Outcome::DeadLetter), 0, "plugin {name}");
    }
    assert_eq!(
        host.metrics().plugin("analytics").events(Outcome::Ok),
        EVENTS as u64
    );

    // The same numbers on /metrics, as a user or Prometheus sees them.
    let page = http_get(host.http_addr(), "/metrics").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    assert!(
        page.contains(&format!(
            "eddy_events_total{{plugin=\"analytics\",verdict=\"ok\"}} {EVENTS}"
        )),
        "{page}"
    );
    let health = http_get(host.http_addr(), "/healthz").await;
    assert!(health.contains(r#""status":"ok""#), "{health}");

    host.stop().await.expect("clean stop");

    // Each group committed past every event, on every partition.
    for name in names {
        assert_eq!(
            committed_total(&bootstrap, &format!("eddy-{name}"), PARTITIONS),
            EVENTS as i64,
            "group of {name}"
        );
    }

    // What the events contain, computed here from the produced payloads.
    let parsed: Vec<serde_json::Value> = events
        .iter()
        .map(|g| serde_json::from_slice(&g.payload).unwrap())
        .collect();
    let mut by_type = BTreeMap::<String, i64>::new();
    for v in &parsed {
        *by_type
            .entry(v["event_type"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let users: BTreeSet<&str> = parsed
        .iter()
        .map(|v| v["user_id"].as_str().unwrap())
        .collect();
    let purchases: Vec<&serde_json::Value> = parsed
        .iter()
        .filter(|v| v["event_type"] == "purchase")
        .collect();
    let revenue: f64 = purchases
        .iter()
        .map(|v| v["properties"]["price"].as_f64().unwrap())
        .sum();
    let big = purchases
        .iter()
        .filter(|v| v["properties"]["price"].as_f64().unwrap() >= 500.0)
        .count();

    // analytics: its last snapshot agrees with the input.
    let snapshots = read_topic(&bootstrap, "snapshots", 3);
    let last: serde_json::Value = snapshots
        .iter()
        .map(|m| {
            serde_json::from_slice::<serde_json::Value>(rdkafka::Message::payload(m).unwrap())
                .unwrap()
        })
        .max_by_key(|s| s["total_events"].as_i64().unwrap())
        .expect("analytics emitted snapshots");
    assert_eq!(
        snapshots.len(),
        EVENTS / 1000,
        "one snapshot per 1000 events"
    );
    assert_eq!(last["total_events"], EVENTS as i64);
    assert_eq!(last["malformed_events"], 0);
    assert_eq!(last["distinct_users"], users.len() as i64);
    let snap_types: BTreeMap<String, i64> =
        serde_json::from_value(last["by_type"].clone()).unwrap();
    assert_eq!(snap_types, by_type);
    assert!(
        (last["revenue_total"].as_f64().unwrap() - revenue).abs() < 0.01,
        "{} vs {revenue}",
        last["revenue_total"]
    );

    // logger: one line per event.
    assert_eq!(read_topic(&bootstrap, "log", EVENTS).len(), EVENTS);

    // alert: one alert per purchase of 500 or more.
    let alerts = read_topic(&bootstrap, "alerts", big);
    assert_eq!(alerts.len(), big);

    // fraud: every injected burst user is flagged, with reasons.
    let fraud = read_topic(&bootstrap, "fraud-alerts", 1000);
    let flagged: BTreeSet<String> = fraud
        .iter()
        .map(|m| {
            serde_json::from_slice::<serde_json::Value>(rdkafka::Message::payload(m).unwrap())
                .unwrap()
        })
        .inspect(|a| assert!(!a["reasons"].as_array().unwrap().is_empty()))
        .map(|a| a["user_id"].as_str().unwrap().to_string())
        .collect();
    let burst_users: BTreeSet<String> = users
        .iter()
        .filter(|u| u.starts_with("user-fraud-"))
        .map(|u| u.to_string())
        .collect();
    assert_eq!(
        burst_users.len(),
        EVENTS / 500 - 1,
        "bursts injected every 500 events"
    );
    assert!(
        burst_users.is_subset(&flagged),
        "flagged {flagged:?}, bursts {burst_users:?}"
    );
}

/// `[[plugin]] topic`: one plugin's output topic is the next one's input (issue 28). The echo
/// fixture writes a record per event to `echoed`; a second plugin consumes `echoed` in its
/// own group and handles each of those records once; its saved offsets are on `echoed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_consumes_another_plugins_output_topic() {
    init_logs();
    let broker = broker(2);
    broker.create_topic("echoed", 2).unwrap();
    let bootstrap = broker.bootstrap_servers().to_string();
    let total = 2_000u64;
    produce_generated(
        &bootstrap,
        &generate(total as usize, &generator_options(21, 0)),
    );
    let plugins = format!(
        r#"
[[plugin]]
name = "first"
path = "{echo}"
[plugin.outputs]
seen = {{ topic = "echoed" }}

[[plugin]]
name = "second"
path = "{counter}"
topic = "echoed"
[plugin.config]
mode = "slow"
marker = ""
"#,
        echo = wasm("eddy_fixture_echo"),
        counter = wasm("eddy_fixture_misbehave"),
    );
    let config = config(&config_text(&bootstrap, 2, &plugins));
    let host = Host::start(config.clone()).await.expect("host starts");
    let (first, second) = (
        host.metrics().plugin("first"),
        host.metrics().plugin("second"),
    );
    let (f, s) = (first.clone(), second.clone());
    wait_async(
        Duration::from_secs(120),
        "the second plugin to handle every record of the first",
        move || f.events_handled() >= total && s.events_handled() >= total,
    )
    .await;
    host.stop().await.expect("clean stop");
    assert_eq!(first.events(Outcome::Ok), total);
    assert_eq!(second.events(Outcome::Ok), total);
    let path = eddy::state::path_for(&config.state.dir, "second");
    let snap = eddy::state::store::read_only_snapshot(&path, "second").expect("state file");
    assert_eq!(
        snap.state.get("seen").map(|v| v.as_slice()),
        Some(total.to_string().as_bytes()),
        "each record of `echoed` counted once"
    );
    let on_echoed: i64 = snap
        .offsets
        .iter()
        .filter(|((topic, _), _)| topic == "echoed")
        .map(|(_, next)| next)
        .sum();
    assert_eq!(on_echoed, total as i64, "{:?}", snap.offsets);
    assert!(
        snap.offsets.keys().all(|(topic, _)| topic == "echoed"),
        "{:?}",
        snap.offsets
    );
}
