//! Plugins that fail on purpose (the `misbehave` fixture: panic, infinite loop, unbounded
//! memory, endless `retry`), run beside the four real plugins on a real (embedded) broker:
//! the real plugins' counts stay exact, the bad events end up in the dead-letter topics with
//! headers that say where from and why, offsets never pass an unaccounted event, a plugin
//! that fails on everything is paused by its breaker, and a dead letter that cannot be
//! written holds its offset back until it can.

mod common;

use common::misbehaving::*;
use common::*;
use eddy::Host;
use eddy::metrics::{DeadLetterReason, Outcome, TrapKind};
use rdkafka::Message;
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

const PARTITIONS: i32 = 3;
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_that_panic_loop_eat_memory_or_retry_forever_hurt_nothing_else() {
    init_logs();
    let broker = broker(PARTITIONS);
    let bootstrap = broker.bootstrap_servers().to_string();
    let good = 600;
    let records = records_with_poison(good, 11);
    produce(&bootstrap, TOPIC, &records);
    let total = records.len() as u64;

    let text = config_text(
        &bootstrap,
        PARTITIONS,
        &(real_plugins() + &bad_plugins("POISON")),
    );
    let host = Host::start(config(&text)).await.expect("host starts");
    let bad = ["panics", "loops", "grows", "retries"];
    let all: Vec<&str> = REAL.iter().chain(bad.iter()).copied().collect();
    wait_handled(&host, &all, total).await;
    wait_settled(&bootstrap, &all, PARTITIONS, total).await;

    for name in REAL {
        let m = host.metrics().plugin(name);
        assert_eq!(
            m.events_handled(),
            total,
            "{name}: every event exactly once"
        );
        let failures: u64 = [TrapKind::Trap, TrapKind::Deadline, TrapKind::Memory]
            .iter()
            .map(|k| m.traps(*k))
            .sum();
        assert_eq!(failures, 0, "{name} never failed");
    }
    for (name, reason) in [
        ("panics", DeadLetterReason::Failed(TrapKind::Trap)),
        ("loops", DeadLetterReason::Failed(TrapKind::Deadline)),
        ("grows", DeadLetterReason::Failed(TrapKind::Memory)),
        ("retries", DeadLetterReason::RetriesExhausted),
    ] {
        let m = host.metrics().plugin(name);
        assert_eq!(
            m.events(Outcome::Ok),
            good as u64,
            "{name}: every good event once"
        );
        assert_eq!(
            m.events(Outcome::DeadLetter),
            POISON_KEYS.len() as u64,
            "{name}: every poison event dead-lettered"
        );
        assert_eq!(
            m.dead_letters(reason),
            POISON_KEYS.len() as u64,
            "{name}: counted under its reason"
        );
        assert_eq!(
            m.breaker_trips.load(Relaxed),
            0,
            "{name}: three poison events in {total} are not a broken plugin"
        );
    }
    let page = http_get(host.http_addr(), "/metrics").await;
    assert!(
        page.contains(r#"eddy_dead_letters_total{plugin="loops",reason="deadline"} 3"#),
        "{page}"
    );
    let digest = host.metrics().plugin("panics").version().digest;
    host.stop().await.expect("clean stop");

    for name in &all {
        assert_eq!(
            committed_total(&bootstrap, &format!("eddy-{name}"), PARTITIONS),
            total as i64,
            "group of {name}: offsets at the end, past every accounted event"
        );
    }
    for name in REAL {
        assert!(read_topic(&bootstrap, &format!("{name}-dlq"), 0).is_empty());
    }

    // The dead letters: original key and payload, and headers that say where from and why.
    for (name, why) in [
        ("panics", "poison event at offset"),
        ("loops", "limits.cpu_ms = 150"),
        ("grows", "limits.memory_mib = 16"),
        (
            "retries",
            "still failing after 3 attempts: the marked event never succeeds",
        ),
    ] {
        let dlq = read_exactly(&bootstrap, &format!("{name}-dlq"), POISON_KEYS.len());
        assert_eq!(dlq.len(), POISON_KEYS.len(), "{name}-dlq");
        let keys: BTreeSet<String> = dlq
            .iter()
            .map(|m| String::from_utf8(m.key().unwrap().to_vec()).unwrap())
            .collect();
        assert_eq!(keys, POISON_KEYS.iter().map(|k| k.to_string()).collect());
        for m in &dlq {
            assert!(
                std::str::from_utf8(m.payload().unwrap())
                    .unwrap()
                    .contains("POISON")
            );
            let reason = header(m, "eddy.reason").unwrap();
            assert!(
                reason.contains(why),
                "{name}: reason `{reason}` should mention `{why}`"
            );
            assert_eq!(header(m, "eddy.plugin").as_deref(), Some(name));
            assert_eq!(
                header(m, "eddy.plugin.version").as_deref(),
                Some(digest.as_str()),
                "every fixture runs the same .wasm"
            );
            assert_eq!(header(m, "eddy.source.topic").as_deref(), Some(TOPIC));
            let attempts = if name == "retries" { "3" } else { "1" };
            assert_eq!(header(m, "eddy.attempts").as_deref(), Some(attempts));
            // The source offset and partition point back at the very record.
            let partition: i32 = header(m, "eddy.source.partition").unwrap().parse().unwrap();
            let offset: i64 = header(m, "eddy.source.offset").unwrap().parse().unwrap();
            assert!((0..PARTITIONS).contains(&partition));
            assert!(offset >= 0 && offset < total as i64);
        }
    }
}

/// A copy of the test config in a directory of its own, for tests that edit it.
fn write_config(dir: &Path, text: &str) {
    replace_file(&dir.join("plugins.toml"), text.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_fails_on_everything_is_paused_by_its_breaker_and_a_fix_resumes_it() {
    init_logs();
    let broker = broker(PARTITIONS);
    let bootstrap = broker.bootstrap_servers().to_string();
    let events = generate(400, &generator_options(5, 0));
    produce_generated(&bootstrap, &events);
    let total = events.len() as u64;

    let dir = tempfile::tempdir().unwrap();
    let entry = |marker: &str| {
        format!(
            r#"
[[plugin]]
name = "analytics"
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
pause_ms = 400
max_pause_ms = 800
[plugin.config]
mode = "panic"
marker = "{marker}"
"#,
            analytics = wasm("eddy_analytics"),
            fixture = wasm("eddy_fixture_misbehave"),
        )
    };
    // An empty marker: the plugin panics on every event.
    write_config(
        dir.path(),
        &(config_text(&bootstrap, PARTITIONS, &entry("")) + "\n[reload]\ndebounce_ms = 100\n"),
    );
    let mut cfg = eddy::config::Config::load(&dir.path().join("plugins.toml")).unwrap();
    cfg.state.dir = dir.path().join("state");
    let host = Host::start(cfg).await.expect("host starts");
    let analytics = host.metrics().plugin("analytics");
    let broken = host.metrics().plugin("broken");

    // The breaker opens, and opens again after each trial, with longer pauses.
    let b = broken.clone();
    wait_async(
        Duration::from_secs(60),
        "the breaker to open three times",
        move || b.breaker_trips.load(Relaxed) >= 3,
    )
    .await;
    let a = analytics.clone();
    wait_async(
        Duration::from_secs(60),
        "analytics to handle everything",
        move || a.events_handled() >= total,
    )
    .await;
    let health = http_get(host.http_addr(), "/healthz").await;
    assert!(health.contains(r#""status":"degraded""#), "{health}");
    assert!(
        health.contains(r#""breaker":"open""#) || health.contains(r#""breaker":"half_open""#),
        "{health}"
    );
    let page = http_get(host.http_addr(), "/metrics").await;
    assert!(
        page.contains("eddy_breaker_trips_total{plugin=\"broken\"}"),
        "{page}"
    );

    // While paused, only the events that tripped the breaker are dead-lettered: at most
    // `failures` per opening, not the whole stream.
    let trips = broken.breaker_trips.load(Relaxed);
    let dead = broken.events(Outcome::DeadLetter);
    assert!(dead >= 3, "the failures that opened it are dead-lettered");
    assert!(
        dead <= 3 * (trips + 1),
        "{dead} dead letters after {trips} openings: the breaker should have held the rest"
    );
    assert_eq!(broken.events(Outcome::Ok), 0);
    assert!(broken.events_handled() < total);
    assert_eq!(
        analytics.events(Outcome::Ok),
        total,
        "the other plugin is unaffected"
    );

    // A fix (here: a config under which it no longer panics) is swapped in at once, without
    // waiting out the pause, and the held and remaining events go through it.
    write_config(
        dir.path(),
        &(config_text(&bootstrap, PARTITIONS, &entry("NOTHING-MATCHES"))
            + "\n[reload]\ndebounce_ms = 100\n"),
    );
    let b = broken.clone();
    wait_async(
        Duration::from_secs(60),
        "the fixed plugin to catch up",
        move || b.events_handled() >= total,
    )
    .await;
    assert_eq!(broken.breaker_state.load(Relaxed), 0, "closed again");
    let dead = broken.events(Outcome::DeadLetter);
    assert_eq!(
        broken.events(Outcome::Ok) + dead,
        total,
        "every event accounted for, once"
    );
    let health = http_get(host.http_addr(), "/healthz").await;
    assert!(health.contains(r#""status":"ok""#), "{health}");
    host.stop().await.unwrap();

    assert_eq!(
        committed_total(&bootstrap, "eddy-broken", PARTITIONS),
        total as i64
    );
    let dlq = read_exactly(&bootstrap, "broken-dlq", dead as usize);
    assert_eq!(dlq.len() as u64, dead, "what was counted is in the topic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_that_cannot_be_written_holds_the_offset_back_until_it_can() {
    init_logs();
    let broker = broker(PARTITIONS);
    let bootstrap = broker.bootstrap_servers().to_string();
    let records = records_with_poison(300, 3);
    produce(&bootstrap, TOPIC, &records);
    let total = records.len() as u64;
    // The next produce requests (the host's first dead letters) are refused.
    broker.fail_next_produce_requests(4).unwrap();

    let plugins = format!(
        "[[plugin]]\nname = \"panics\"\npath = \"{}\"\n[plugin.config]\nmode = \"panic\"\n",
        wasm("eddy_fixture_misbehave")
    );
    let host = Host::start(config(&config_text(&bootstrap, PARTITIONS, &plugins)))
        .await
        .unwrap();
    let m = host.metrics().plugin("panics");
    let m2 = m.clone();
    wait_async(Duration::from_secs(60), "a failed delivery", move || {
        m2.output_failures.load(Relaxed) >= 1
    })
    .await;
    // The batch with the poison event is held: not counted, offsets not stored.
    assert_eq!(m.events(Outcome::DeadLetter), 0);
    assert!(m.events_handled() < total);

    // Delivery is retried until the broker takes it; then everything is accounted for.
    let m2 = m.clone();
    wait_async(Duration::from_secs(60), "every event", move || {
        m2.events_handled() >= total
    })
    .await;
    assert!(
        m.output_failures.load(Relaxed) >= 2,
        "it was refused a few times"
    );
    assert_eq!(m.events(Outcome::DeadLetter), POISON_KEYS.len() as u64);
    assert_eq!(m.events(Outcome::Ok), total - POISON_KEYS.len() as u64);
    host.stop().await.unwrap();
    assert_eq!(
        committed_total(&bootstrap, "eddy-panics", PARTITIONS),
        total as i64
    );
    let dlq = read_exactly(&bootstrap, "panics-dlq", POISON_KEYS.len());
    let keys: BTreeSet<String> = dlq
        .iter()
        .map(|m| String::from_utf8(m.key().unwrap().to_vec()).unwrap())
        .collect();
    assert_eq!(keys, POISON_KEYS.iter().map(|k| k.to_string()).collect());
}
