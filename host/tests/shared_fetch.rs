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

/// Events and their rate for the pace test: 10 s of events, ~5 MiB (five windows of 1 MiB).
const PACED_EVENTS: u64 = 20_000;
const PACED_RATE: u32 = 2_000;

/// A plugin much slower than the topic's rate that never stops taking events (so it never
/// stalls) does not set the pace of a fast one reading the same shared fetch (issue 27):
/// the fast one keeps at least 0.8× the rate it has alone. Both runs produce the same events
/// at the same rate, which the fast plugin keeps up with on any machine, so the ratio does
/// not depend on this machine's speed; the slow plugin handles a fraction of that rate.
/// (Before, the window filled within ~1 s and the fast plugin went at the slow one's pace:
/// see the commit.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_plugin_does_not_set_the_pace_of_a_fast_one() {
    init_logs();
    let (alone, _) = paced_run(false).await;
    let (shared, slow_handled) = paced_run(true).await;
    let ratio = alone.as_secs_f64() / shared.as_secs_f64();
    eprintln!(
        "fast plugin: {alone:?} alone, {shared:?} beside the slow one (ratio {ratio:.2}); \
         the slow one handled {slow_handled} meanwhile"
    );
    assert!(
        ratio >= 0.8,
        "the fast plugin took {shared:?} beside the slow one, {alone:?} alone (ratio {ratio:.2})"
    );
    assert!(
        slow_handled < PACED_EVENTS / 2,
        "the slow plugin was not slow: it handled {slow_handled} while they were produced"
    );
}

/// Runs a host with the `fast` plugin (and the `slow` one, if `with_slow`) on a new broker
/// with a 1 MiB shared fetch window, produces [`PACED_EVENTS`] at [`PACED_RATE`], and returns
/// how long from the start of production until `fast` handled every one, and how many the
/// slow one handled while they were produced.
async fn paced_run(with_slow: bool) -> (Duration, u64) {
    let broker = broker(2);
    let bootstrap = broker.bootstrap_servers().to_string();
    let mut plugins = format!(
        "[[plugin]]\nname = \"fast\"\npath = \"{}\"\ntick_interval_ms = 0\n",
        wasm("eddy_fixture_noop")
    );
    if with_slow {
        // ~3-10 ms per event, whatever this machine: a few hundred events/s at most.
        plugins.push_str(&format!(
            "[[plugin]]\nname = \"slow\"\npath = \"{}\"\nmax_batch = 10\ntick_interval_ms = 0\n\
             [plugin.limits]\ncpu_ms = 10000\n\
             [plugin.config]\nmode = \"slow\"\nmarker = \"\"\nspin = 10000000\n",
            wasm("eddy_fixture_misbehave")
        ));
    }
    let text = config_text(&bootstrap, 2, &plugins).replacen(
        "partitions = 2\n",
        "partitions = 2\nshared_fetch_mib = 1\n",
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&text);
    assert_eq!(cfg.kafka.shared_fetch_mib, 1);
    cfg.state.dir = dir.path().join("state");
    let host = Host::start(cfg).await.expect("host starts");
    let fast = host.metrics().plugin("fast");
    // Warm up: both plugins consuming before the clock starts.
    let warm = generate(100, &generator_options(5, 0));
    produce_generated(&bootstrap, &warm);
    let names: Vec<&str> = if with_slow {
        vec!["fast", "slow"]
    } else {
        vec!["fast"]
    };
    let metrics: Vec<_> = names.iter().map(|n| host.metrics().plugin(n)).collect();
    wait_async(
        Duration::from_secs(120),
        "the plugins to handle the warm-up events",
        move || metrics.iter().all(|m| m.events_handled() >= 100),
    )
    .await;

    let started = std::time::Instant::now();
    let producer = std::thread::spawn(move || {
        let mut client = rdkafka::ClientConfig::new();
        client.set("bootstrap.servers", &bootstrap);
        let opts = eddy::generator::ProduceOptions {
            topic: TOPIC.into(),
            events: Some(PACED_EVENTS),
            rate: PACED_RATE,
            generator: generator_options(6, 0),
        };
        eddy::generator::produce_blocking(
            &client,
            &opts,
            &std::sync::atomic::AtomicBool::new(false),
            &std::sync::atomic::AtomicU64::new(0),
        )
        .expect("produced")
    });
    let slow = with_slow.then(|| host.metrics().plugin("slow"));
    let producer = tokio::task::spawn_blocking(move || {
        let sent = producer.join().unwrap();
        // How many the slow plugin handled while the events were produced.
        let slow_handled = slow.map_or(0, |m| m.events_handled().saturating_sub(100));
        (sent, slow_handled)
    });
    let f = fast.clone();
    // Alone, the fast plugin needs the 10 s of production; at the slow one's pace it would
    // need minutes: the wait gives up after 60 s, and the ratio says how far it got.
    let all = 100 + PACED_EVENTS;
    let done = tokio::time::timeout(Duration::from_secs(60), async move {
        while f.events_handled() < all {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .is_ok();
    let mut took = started.elapsed();
    if !done {
        // Scale to the time it would take at the rate it went.
        let handled = fast.events_handled().saturating_sub(100).max(1);
        took = took.mul_f64(PACED_EVENTS as f64 / handled as f64);
    }
    let (sent, slow_handled) = producer.await.unwrap();
    assert_eq!(sent, PACED_EVENTS);
    host.stop().await.expect("clean stop");
    (took, slow_handled)
}
