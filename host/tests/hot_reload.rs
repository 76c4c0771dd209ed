//! Hot reload against the real host, real plugins and a real broker, driven the way a user
//! drives it: by replacing `.wasm` files and editing `plugins.toml` while events flow.

mod common;

use common::*;
use eddy::Host;
use eddy::metrics::{Outcome, ReloadOutcome};
use rdkafka::Message;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

const PARTITIONS: i32 = 3;

fn analytics_entry(path: &str, snapshot_every: usize) -> String {
    format!(
        r#"
[[plugin]]
name = "analytics"
path = "{path}"
tick_interval_ms = 0
max_batch = 50
[plugin.outputs]
snapshots = {{ topic = "snapshots" }}
[plugin.config]
snapshot_every = {snapshot_every}
"#
    )
}

fn write_config(dir: &Path, bootstrap: &str, plugins: &str) {
    let text = config_text(bootstrap, PARTITIONS, plugins) + "\n[reload]\ndebounce_ms = 100\n";
    replace_file(&dir.join("plugins.toml"), text.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_a_plugin_under_load_loses_nothing_duplicates_nothing_and_keeps_state() {
    init_logs();
    let broker = broker(PARTITIONS);
    let bootstrap = broker.bootstrap_servers().to_string();
    let dir = tempfile::tempdir().unwrap();
    let wasm_path = dir.path().join("analytics.wasm");
    let original = std::fs::read(wasm("eddy_analytics")).unwrap();
    std::fs::write(&wasm_path, &original).unwrap();
    std::fs::copy(
        wasm("eddy_fixture_misbehave"),
        dir.path().join("traps.wasm"),
    )
    .unwrap();
    let entry = analytics_entry("analytics.wasm", 1);
    write_config(dir.path(), &bootstrap, &entry);

    let host = Host::start(eddy::config::Config::load(&dir.path().join("plugins.toml")).unwrap())
        .await
        .unwrap();
    // Traffic flows until every reload below is done.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = produce_until(
        bootstrap.clone(),
        generator_options(5, 0),
        300,
        stop.clone(),
    );
    let m = host.metrics().plugin("analytics");

    // Five new versions while events flow, with a broken file and a version that traps on
    // its first batch in between.
    let mut last_good = eddy::wasm::digest(&original);
    for step in 1..=7 {
        // Events flow on the running version before each change.
        let handled = m.events_handled();
        let m2 = m.clone();
        wait_async(Duration::from_secs(30), "events to flow", move || {
            m2.events_handled() >= handled + 100
        })
        .await;
        let ok_before = m.reloads(ReloadOutcome::Ok);
        match step {
            3 => {
                // A build that went wrong: not WebAssembly at all.
                let failed_before = m.reloads(ReloadOutcome::Failed);
                replace_file(&wasm_path, b"not a component");
                let m2 = m.clone();
                wait_async(
                    Duration::from_secs(60),
                    "the broken version to be refused",
                    move || m2.reloads(ReloadOutcome::Failed) > failed_before,
                )
                .await;
            }
            5 => {
                // A version that loads and inits but traps on every event: rolled back.
                let trapping = entry
                    .replace("analytics.wasm", "traps.wasm")
                    .replace("snapshot_every = 1", "mode = \"panic\"\nmarker = \"\"");
                write_config(dir.path(), &bootstrap, &trapping);
                let m2 = m.clone();
                wait_async(
                    Duration::from_secs(60),
                    "the trapping version to be rolled back",
                    move || m2.reloads(ReloadOutcome::RolledBack) == 1,
                )
                .await;
                assert_eq!(
                    m.version().digest,
                    last_good,
                    "the previous version runs again"
                );
                // And stays: the trapping version's optimized code, compiled in the
                // background meanwhile, must not bring it back.
                let handled = m.events_handled();
                let m2 = m.clone();
                wait_async(Duration::from_secs(30), "events to flow", move || {
                    m2.events_handled() >= handled + 300
                })
                .await;
                assert_eq!(
                    (m.version().digest, m.reloads(ReloadOutcome::RolledBack)),
                    (last_good.clone(), 1),
                    "the rolled back version stays out"
                );
                write_config(dir.path(), &bootstrap, &entry);
                let m2 = m.clone();
                wait_async(
                    Duration::from_secs(60),
                    "the original settings to be back",
                    move || m2.reloads(ReloadOutcome::Ok) > ok_before + 1,
                )
                .await;
            }
            _ => {
                let version = with_custom_section(&original, "eddy-test-version", &[step as u8]);
                replace_file(&wasm_path, &version);
                last_good = eddy::wasm::digest(&version);
                let (m2, want) = (m.clone(), last_good.clone());
                wait_async(
                    Duration::from_secs(60),
                    "the new version to run",
                    move || m2.version().digest == want,
                )
                .await;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let events = tokio::task::spawn_blocking(move || producer.join().unwrap())
        .await
        .unwrap();
    let total = events.len();
    let m2 = m.clone();
    wait_async(
        Duration::from_secs(60),
        "every event to be handled",
        move || m2.events_handled() >= total as u64,
    )
    .await;
    wait_settled(&bootstrap, &["analytics"], PARTITIONS, total as u64).await;

    assert_eq!(
        m.events(Outcome::Ok),
        total as u64,
        "every event handled once, none dead-lettered"
    );
    assert_eq!(m.events_handled(), total as u64);
    // Five new versions, the trapping one (it switched, then was rolled back), and the
    // original settings back.
    assert_eq!(m.reloads(ReloadOutcome::Ok), 7);
    assert!(m.reloads(ReloadOutcome::Failed) >= 1);
    assert_eq!(m.reloads(ReloadOutcome::RolledBack), 1);
    assert_eq!(m.version().digest, last_good);
    let page = http_get(host.http_addr(), "/metrics").await;
    assert!(
        page.contains(&format!(
            "eddy_plugin_info{{plugin=\"analytics\",digest=\"{last_good}\""
        )),
        "{page}"
    );
    assert!(
        page.contains("eddy_plugin_reloads_total{plugin=\"analytics\",outcome=\"rolled_back\"} 1"),
        "{page}"
    );
    host.stop().await.unwrap();
    assert_eq!(
        committed_total(&bootstrap, "eddy-analytics", PARTITIONS),
        total as i64
    );

    // The plugin's own count: its state went through seven reloads and a rollback, and
    // counted each event exactly once. (A snapshot after every batch: the last one is the
    // state after the last event.)
    let snapshots = read_topic(&bootstrap, "snapshots", usize::MAX);
    let snap: serde_json::Value = snapshots
        .iter()
        .map(|m| serde_json::from_slice::<serde_json::Value>(m.payload().unwrap()).unwrap())
        .max_by_key(|s| s["total_events"].as_i64().unwrap())
        .expect("snapshots");
    assert_eq!(snap["total_events"], total as i64);
    let mut by_type = BTreeMap::<String, i64>::new();
    for g in &events {
        let v: serde_json::Value = serde_json::from_slice(&g.payload).unwrap();
        *by_type
            .entry(v["event_type"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(
        serde_json::from_value::<BTreeMap<String, i64>>(snap["by_type"].clone()).unwrap(),
        by_type
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_are_added_and_removed_by_editing_plugins_toml() {
    init_logs();
    let broker = broker(PARTITIONS);
    let bootstrap = broker.bootstrap_servers().to_string();
    let dir = tempfile::tempdir().unwrap();
    let analytics = analytics_entry(&wasm("eddy_analytics"), 1_000_000);
    let logger = format!(
        "\n[[plugin]]\nname = \"logger\"\npath = \"{}\"\n[plugin.outputs]\nlog = \"discard\"\n",
        wasm("eddy_logger")
    );
    write_config(dir.path(), &bootstrap, &analytics);
    let events = generate(900, &generator_options(9, 0));
    produce_generated(&bootstrap, &events[..500]);
    let host = Host::start(eddy::config::Config::load(&dir.path().join("plugins.toml")).unwrap())
        .await
        .unwrap();
    let a = host.metrics().plugin("analytics");
    let l = host.metrics().plugin("logger");

    // Add: a new consumer group that starts from the earliest event.
    write_config(dir.path(), &bootstrap, &(analytics.clone() + &logger));
    let l2 = l.clone();
    wait_async(
        Duration::from_secs(30),
        "the added logger to catch up",
        move || l2.events_handled() == 500,
    )
    .await;
    produce_generated(&bootstrap, &events[500..700]);
    let (a2, l2) = (a.clone(), l.clone());
    wait_async(
        Duration::from_secs(30),
        "both to see 700 events",
        move || a2.events_handled() == 700 && l2.events_handled() == 700,
    )
    .await;

    // A broken edit changes nothing, and says what is wrong.
    replace_file(&dir.path().join("plugins.toml"), b"[kafka]\nbrokers = 42\n");
    let report = host.reload().await.unwrap();
    let error = report.config_error.expect("the error is reported");
    assert!(
        error.contains("plugins.toml") && error.contains("brokers"),
        "{error}"
    );
    assert!(report.added.is_empty() && report.removed.is_empty());
    assert_eq!(
        l.up.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the logger still runs"
    );

    // Remove: the logger leaves its group after committing what it handled.
    write_config(dir.path(), &bootstrap, &analytics);
    let l2 = l.clone();
    wait_async(Duration::from_secs(30), "the logger to stop", move || {
        l2.up.load(std::sync::atomic::Ordering::Relaxed) == 0
    })
    .await;
    produce_generated(&bootstrap, &events[700..]);
    let a2 = a.clone();
    wait_async(
        Duration::from_secs(30),
        "analytics to see all 900",
        move || a2.events_handled() == 900,
    )
    .await;
    assert_eq!(
        l.events_handled(),
        700,
        "a removed plugin handles nothing more"
    );
    assert!(
        host.metrics()
            .config_reloads_failed
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    host.stop().await.unwrap();
    assert_eq!(committed_total(&bootstrap, "eddy-logger", PARTITIONS), 700);
    assert_eq!(
        committed_total(&bootstrap, "eddy-analytics", PARTITIONS),
        900
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_plugins_are_not_recompiled_and_precompiled_versions_swap_in() {
    init_logs();
    let broker = broker(PARTITIONS);
    let bootstrap = broker.bootstrap_servers().to_string();
    let dir = tempfile::tempdir().unwrap();
    let wasm_path = dir.path().join("analytics.wasm");
    let original = std::fs::read(wasm("eddy_analytics")).unwrap();
    std::fs::write(&wasm_path, &original).unwrap();
    write_config(
        dir.path(),
        &bootstrap,
        &analytics_entry(&wasm_path.display().to_string(), 1_000_000),
    );
    let load = || eddy::config::Config::load(&dir.path().join("plugins.toml")).unwrap();

    // First start: compiled, and the code kept in the state directory's compile cache.
    let host = Host::start(load()).await.unwrap();
    let m = host.metrics().plugin("analytics");
    assert!(!m.version().precompiled, "nothing cached yet");
    host.stop().await.unwrap();
    let cache = load().state.compiled_dir();
    assert_eq!(
        std::fs::read_dir(&cache).unwrap().count(),
        1,
        "one artifact"
    );

    // Second start: the same bytes are not compiled again.
    let host = Host::start(load()).await.unwrap();
    let m = host.metrics().plugin("analytics");
    assert!(m.version().precompiled, "loaded from the cache");

    // A new version, precompiled before its file is replaced (what `eddy compile` does):
    // the swap only loads it.
    let new = with_custom_section(&original, "eddy-test", b"v2");
    let staged = dir.path().join("staged.wasm");
    std::fs::write(&staged, &new).unwrap();
    let engine = eddy::wasm::engine().unwrap();
    eddy::wasm::Program::precompile(&engine, &staged, &cache).unwrap();
    let ok_before = m.reloads(ReloadOutcome::Ok);
    replace_file(&wasm_path, &new);
    let m2 = m.clone();
    wait_async(Duration::from_secs(30), "the swap", move || {
        m2.reloads(ReloadOutcome::Ok) > ok_before
    })
    .await;
    let v = m.version();
    assert_eq!(v.digest, eddy::wasm::digest(&new));
    assert!(v.precompiled, "the swap used the precompiled code");
    let page = http_get(host.http_addr(), "/metrics").await;
    assert!(page.contains("code=\"precompiled\""), "{page}");

    // A new version nobody precompiled: it runs at once on baseline (Winch) code, then on
    // optimized code compiled in the background, which also lands in the cache. The switch
    // to optimized code is not another reload.
    let v3 = with_custom_section(&original, "eddy-test", b"v3");
    let ok_before = m.reloads(ReloadOutcome::Ok);
    replace_file(&wasm_path, &v3);
    let m2 = m.clone();
    wait_async(Duration::from_secs(30), "the swap to v3", move || {
        m2.reloads(ReloadOutcome::Ok) > ok_before
    })
    .await;
    let m2 = m.clone();
    wait_async(
        Duration::from_secs(60),
        "optimized code for v3",
        move || !m2.version().baseline,
    )
    .await;
    // What ran, in order: v3 on baseline code first, then on optimized code (the history,
    // not a look at the current version, which may already be optimized).
    let v3_digest = eddy::wasm::digest(&v3);
    let v3_code: Vec<bool> = m
        .version_history()
        .into_iter()
        .filter(|v| v.digest == v3_digest)
        .map(|v| v.baseline)
        .collect();
    assert_eq!(
        v3_code,
        [true, false],
        "v3 runs on baseline code first, then on optimized code"
    );
    let v = m.version();
    assert_eq!(v.digest, eddy::wasm::digest(&v3));
    assert!(!v.precompiled);
    assert_eq!(m.reloads(ReloadOutcome::Ok), ok_before + 1);
    let page = http_get(host.http_addr(), "/metrics").await;
    assert!(page.contains("code=\"compiled\""), "{page}");
    assert!(
        eddy::wasm::Program::is_cached(&engine, &cache, &eddy::wasm::digest(&v3)),
        "the optimized code of v3 was cached"
    );
    host.stop().await.unwrap();
}
