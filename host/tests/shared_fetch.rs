//! The shared fetch: plugins at the same place in the topic read one fetch of it, and a
//! plugin that stops taking events (here: paused by its breaker) does not hold the others
//! back once the window is full; it fetches for itself after its pause and rejoins. Every
//! plugin's count stays exact throughout.

mod common;

use common::*;
use eddy::Host;
use eddy::metrics::Outcome;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

const PARTITIONS: i32 = 6;
const EVENTS: usize = 20_000;

fn write_config(dir: &Path, bootstrap: &str, marker: &str) {
    let plugins = format!(
        r#"
[[plugin]]
name = "first"
path = "{analytics}"
tick_interval_ms = 0
[plugin.outputs]
snapshots = "discard"

[[plugin]]
name = "second"
path = "{analytics}"
tick_interval_ms = 0
[plugin.outputs]
snapshots = "discard"

[[plugin]]
name = "broken"
path = "{fixture}"
max_batch = 50
[plugin.breaker]
failures = 3
window = 50
pause_ms = 240000
max_pause_ms = 240000
[plugin.config]
mode = "panic"
marker = "{marker}"

[reload]
debounce_ms = 100
"#,
        analytics = wasm("eddy_analytics"),
        fixture = wasm("eddy_fixture_misbehave"),
    );
    // A 1 MiB window: the 20,000 events (~10 MiB, ~1.7 MiB per partition) do not fit, so
    // the window fills while the broken plugin is paused, whichever partitions it holds.
    let text = config_text(bootstrap, PARTITIONS, &plugins).replacen(
        &format!("partitions = {PARTITIONS}\n"),
        &format!("partitions = {PARTITIONS}\nshared_fetch_mib = 1\n"),
        1,
    );
    replace_file(&dir.join("plugins.toml"), text.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_plugin_does_not_hold_the_shared_fetch_and_every_count_stays_exact() {
    init_logs();
    let broker = broker(PARTITIONS);
    let bootstrap = broker.bootstrap_servers().to_string();
    let events = generate(EVENTS, &generator_options(11, 0));
    produce_generated(&bootstrap, &events);
    let total = EVENTS as u64;

    let dir = tempfile::tempdir().unwrap();
    // An empty marker: the broken plugin panics on every event, and its breaker pauses it
    // for four minutes: longer than the waits below, however slow this machine is.
    write_config(dir.path(), &bootstrap, "");
    let mut cfg = eddy::config::Config::load(&dir.path().join("plugins.toml")).unwrap();
    assert_eq!(cfg.kafka.shared_fetch_mib, 1);
    cfg.state.dir = dir.path().join("state");
    let host = Host::start(cfg).await.expect("host starts");
    let first = host.metrics().plugin("first");
    let second = host.metrics().plugin("second");
    let broken = host.metrics().plugin("broken");

    // The healthy plugins get through everything while the broken one is paused: with the
    // window held for it, they would stop after ~1 MiB of events.
    let (f, s) = (first.clone(), second.clone());
    wait_async(
        Duration::from_secs(120),
        "the healthy plugins to handle every event",
        move || f.events_handled() >= total && s.events_handled() >= total,
    )
    .await;
    assert_eq!(broken.breaker_state.load(Relaxed), 1, "still paused");
    assert!(broken.events_handled() < total);
    // The paused plugin was let go of the shared fetch; the others read all of it (once
    // they have caught up with it).
    assert_eq!(broken.shared_partitions.load(Relaxed), 0);
    let (f, s) = (first.clone(), second.clone());
    wait_async(
        Duration::from_secs(30),
        "the healthy plugins to read every partition from the shared fetch",
        move || {
            f.shared_partitions.load(Relaxed) == PARTITIONS as i64
                && s.shared_partitions.load(Relaxed) == PARTITIONS as i64
        },
    )
    .await;
    let page = http_get(host.http_addr(), "/metrics").await;
    assert!(
        page.contains(&format!(
            "eddy_shared_fetch_partitions{{plugin=\"first\"}} {PARTITIONS}"
        )),
        "{page}"
    );
    assert!(
        page.contains("eddy_shared_fetch_partitions{plugin=\"broken\"} 0"),
        "{page}"
    );

    // A fix ends the pause: the broken plugin catches up by fetching for itself, then
    // reads from the shared fetch again.
    write_config(dir.path(), &bootstrap, "NOTHING-MATCHES");
    let b = broken.clone();
    wait_async(
        Duration::from_secs(120),
        "the fixed plugin to catch up and rejoin the shared fetch",
        move || {
            b.events_handled() >= total && b.shared_partitions.load(Relaxed) == PARTITIONS as i64
        },
    )
    .await;

    // Exactly once, each: once every group has committed to the end of the topic, no event
    // is left to arrive, and still not one event more.
    wait_settled(
        &bootstrap,
        &["first", "second", "broken"],
        PARTITIONS,
        total,
    )
    .await;
    for (name, m) in [("first", &first), ("second", &second)] {
        assert_eq!(m.events(Outcome::Ok), total, "{name}");
        assert_eq!(m.events_handled(), total, "{name}");
    }
    assert_eq!(
        broken.events(Outcome::Ok) + broken.events(Outcome::DeadLetter),
        total,
        "every event accounted for, once"
    );
    assert_eq!(broken.events_handled(), total);
    host.stop().await.unwrap();
    for group in ["eddy-first", "eddy-second", "eddy-broken"] {
        assert_eq!(
            committed_total(&bootstrap, group, PARTITIONS),
            total as i64,
            "{group}"
        );
    }
}
