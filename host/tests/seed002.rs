//! Seed 002's dashboard and behaviour analyzer in the real host (issue 17): the generator's
//! seeded traffic through both plugins, and their figures checked against the same figures
//! computed here, independently, from the produced events. One more event, dated in the
//! year 2999 and produced straight to Kafka (issue 26), must change none of them: each
//! plugin dead-letters it, and no clock or window moves.

mod common;

use common::*;
use eddy::Host;
use std::collections::{BTreeMap, BTreeSet};

/// One partition: events arrive in event-time order, so every figure is exact.
const PARTITIONS: i32 = 1;
const EVENTS: usize = 3_000;
const GAP_MS: i64 = 120_000;

struct Seen {
    user: String,
    session: String,
    kind: String,
    t: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_behaviour_figures_match_the_events() {
    init_logs();
    let broker = broker(PARTITIONS);
    let bootstrap = broker.bootstrap_servers().to_string();
    // 250 ms of event time apart: 12.5 minutes of traffic.
    let generated = generate(EVENTS, &generator_options(5, 0));
    produce_generated(&bootstrap, &generated[..EVENTS / 2]);
    // From a producer whose clock (or intent) is wrong: a user and session of the traffic.
    let forged: serde_json::Value = serde_json::from_slice(&generated[10].payload).unwrap();
    let mut forged = forged;
    forged["timestamp"] = serde_json::json!("2999-01-01T00:00:00Z");
    forged["event_id"] = serde_json::json!("from-the-future");
    produce(
        &bootstrap,
        TOPIC,
        &[(
            Some(generated[10].key.clone().into_bytes()),
            forged.to_string().into_bytes(),
        )],
    );
    produce_generated(&bootstrap, &generated[EVENTS / 2..]);
    let events: Vec<Seen> = generated
        .iter()
        .map(|g| {
            let v: serde_json::Value = serde_json::from_slice(&g.payload).unwrap();
            Seen {
                user: v["user_id"].as_str().unwrap().into(),
                session: v["session_id"].as_str().unwrap().into(),
                kind: v["event_type"].as_str().unwrap().into(),
                t: g.time_ms,
            }
        })
        .collect();

    let plugins = format!(
        "[[plugin]]\nname = \"dashboard\"\npath = \"{}\"\ntick_interval_ms = 200\n\
         [plugin.outputs]\nsummary = {{ topic = \"dash-out\" }}\ntext = \"discard\"\n\n\
         [[plugin]]\nname = \"behaviour\"\npath = \"{}\"\ntick_interval_ms = 200\n\
         [plugin.outputs]\ninsights = {{ topic = \"beh-out\" }}\n\
         [plugin.config]\nsession_gap_secs = {}\nidle_close_secs = 5\ninsights_every = 1000\n",
        wasm("eddy_dashboard"),
        wasm("eddy_behaviour"),
        GAP_MS / 1000
    );
    let host = Host::start(config(&config_text(&bootstrap, PARTITIONS, &plugins)))
        .await
        .expect("host starts");
    wait_settled(
        &bootstrap,
        &["dashboard", "behaviour"],
        PARTITIONS,
        EVENTS as u64 + 1,
    )
    .await;
    for plugin in ["dashboard", "behaviour"] {
        assert_eq!(
            host.metrics()
                .plugin(plugin)
                .dead_letters(eddy::metrics::DeadLetterReason::Verdict),
            1,
            "{plugin} dead-letters the event from 2999"
        );
    }
    // Once the stream is quiet for 5 s, behaviour ends its open sessions on a tick (not 1 s:
    // a loaded machine may pause delivery that long mid-stream, which would end sessions
    // early and split them).
    let m = host.metrics().plugin("behaviour");
    let ticks = m.ticks.load(std::sync::atomic::Ordering::Relaxed);
    wait_for(
        std::time::Duration::from_secs(60),
        "ticks after 8 s of quiet",
        || m.ticks.load(std::sync::atomic::Ordering::Relaxed) >= ticks + 40,
    );
    host.stop().await.expect("clean stop");

    // behaviour: sessions by session id, split where 120 s pass without an event.
    let mut by_session: BTreeMap<&str, Vec<&Seen>> = BTreeMap::new();
    for e in &events {
        by_session.entry(&e.session).or_default().push(e);
    }
    let mut sessions = 0u64;
    let mut segments: BTreeMap<&str, u64> = BTreeMap::new();
    let mut purchasing = 0u64;
    for list in by_session.values() {
        let mut visits: Vec<Vec<&Seen>> = Vec::new();
        for e in list {
            match visits.last_mut() {
                Some(v) if e.t - v.last().unwrap().t < GAP_MS => v.push(e),
                _ => visits.push(vec![e]),
            }
        }
        for v in visits {
            sessions += 1;
            let count = |kind: &str| v.iter().filter(|e| e.kind == kind).count();
            if count("purchase") > 0 {
                purchasing += 1;
            }
            let segment = if count("purchase") >= 1 {
                "buyers"
            } else if count("search") >= 2 || count("page_view") >= 5 {
                "researchers"
            } else {
                "browsers"
            };
            *segments.entry(segment).or_default() += 1;
        }
    }
    let insights = read_topic(&bootstrap, "beh-out", usize::MAX);
    let last: serde_json::Value = insights
        .iter()
        .filter_map(|m| {
            serde_json::from_slice::<serde_json::Value>(rdkafka::Message::payload(m)?).ok()
        })
        .max_by_key(|r| (r["events"].as_u64(), r["sessions"].as_u64()))
        .expect("insights");
    assert_eq!(last["events"].as_u64(), Some(EVENTS as u64));
    assert_eq!(last["sessions"].as_u64(), Some(sessions), "{last}");
    assert_eq!(last["purchasing_sessions"].as_u64(), Some(purchasing));
    for (segment, n) in &segments {
        assert_eq!(
            last["segments"][segment]["sessions"].as_u64(),
            Some(*n),
            "{segment}: {last}"
        );
    }

    // dashboard: the first summary for the latest event time, which comes after the last
    // batch (one partition, in order).
    let latest = events.iter().map(|e| e.t).max().unwrap();
    let summaries: Vec<serde_json::Value> = read_topic(&bootstrap, "dash-out", usize::MAX)
        .iter()
        .filter_map(|m| serde_json::from_slice(rdkafka::Message::payload(m)?).ok())
        .collect();
    let s = summaries
        .iter()
        .find(|s| s["event_time_ms"].as_i64() == Some(latest))
        .expect("a summary at the latest event time");
    let active: BTreeSet<&str> = events
        .iter()
        .filter(|e| e.t > latest - 300_000)
        .map(|e| e.user.as_str())
        .collect();
    assert_eq!(s["active_users"].as_u64(), Some(active.len() as u64), "{s}");
    let within = |ms: i64| events.iter().filter(|e| e.t > latest - ms).count() as f64;
    assert_eq!(
        s["events_per_sec_10s"].as_f64(),
        Some(within(10_000) / 10.0)
    );
    assert_eq!(s["events_per_sec_1m"].as_f64(), Some(within(60_000) / 60.0));
}
