//! Durable state, tested on the real `eddy` binary against a broker that outlives it: the
//! host is killed with SIGKILL at random moments under continuous production, and the
//! analytics plugin's counts still come out exact.

mod common;

use common::*;
use eddy::generator::Rng;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const PARTITIONS: i32 = 3;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `plugins.toml` in `dir` for `plugins` against `bootstrap`, with metrics on `port`.
fn write_config(dir: &Path, bootstrap: &str, port: u16, plugins: &str) {
    let text = format!(
        "[kafka]\nbrokers = \"{bootstrap}\"\n[kafka.settings]\n\"session.timeout.ms\" = \"3000\"\n\
         \"heartbeat.interval.ms\" = \"500\"\n\"fetch.wait.max.ms\" = \"20\"\n\
         \"max.poll.interval.ms\" = \"10000\"\n{debug}\
         [http]\naddress = \"127.0.0.1:{port}\"\n[reload]\nwatch = false\n{plugins}",
        // librdkafka's own trace, when chasing a problem: EDDY_TEST_RDKAFKA_DEBUG=consumer,cgrp,fetch
        debug = std::env::var("EDDY_TEST_RDKAFKA_DEBUG")
            .map(|d| format!("\"debug\" = \"{d}\"\n"))
            .unwrap_or_default(),
    );
    std::fs::write(dir.join("plugins.toml"), text).unwrap();
}

fn analytics(name: &str) -> String {
    format!(
        "\n[[plugin]]\nname = \"{name}\"\npath = \"{}\"\nmax_batch = 100\ntick_interval_ms = 0\n\
         [plugin.outputs]\nsnapshots = \"discard\"\n[plugin.config]\nsnapshot_every = 1000000\n",
        wasm("eddy_analytics")
    )
}

fn start(dir: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_eddy"))
        .arg("run")
        .current_dir(dir)
        .env(
            "EDDY_LOG",
            std::env::var("EDDY_TEST_LOG")
                .unwrap_or_else(|_| "info,librdkafka=warn,rdkafka=warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(
            std::fs::File::options()
                .create(true)
                .append(true)
                .open(dir.join("host.log"))
                .unwrap(),
        )
        .spawn()
        .unwrap()
}

fn metrics(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

/// Waits until every plugin of the host on `port` is up with no lag.
fn wait_caught_up(dir: &Path, port: u16, plugins: &[&str], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let health: Option<serde_json::Value> = metrics(port).and_then(|h| {
            h.split_once("\r\n\r\n")
                .and_then(|(_, b)| serde_json::from_str(b).ok())
        });
        if let Some(h) = health
            && plugins
                .iter()
                .all(|p| h["plugins"][p]["up"] == true && h["plugins"][p]["consumer_lag"] == 0)
        {
            return;
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(dir.join("host.log")).unwrap_or_default();
            panic!(
                "not caught up after {timeout:?}: {:?}\nhost log:\n{log}",
                metrics(port)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn stop(mut child: Child) {
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
}

fn state_value(dir: &Path, plugin: &str, key: &str) -> Option<i64> {
    let config = eddy::config::Config::load(&dir.join("plugins.toml")).unwrap();
    eddy::ops::get(&config, plugin, key)
        .unwrap()
        .map(|v| String::from_utf8(v).unwrap().parse().unwrap())
}

fn by_type(events: &[eddy::generator::Generated]) -> BTreeMap<String, i64> {
    let mut m = BTreeMap::new();
    for g in events {
        let v: serde_json::Value = serde_json::from_slice(&g.payload).unwrap();
        *m.entry(v["event_type"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    m
}

#[test]
fn sigkill_at_random_moments_under_load_leaves_exact_counts() {
    let broker = broker(PARTITIONS);
    let bootstrap = broker.bootstrap_servers().to_string();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    write_config(dir.path(), &bootstrap, port, &analytics("analytics"));

    let stop_producing = Arc::new(AtomicBool::new(false));
    let producer = produce_until(
        bootstrap.clone(),
        generator_options(21, 0),
        400,
        stop_producing.clone(),
    );
    let mut rng = Rng::new(7);
    let kills = 6;
    for _ in 0..kills {
        let child = start(dir.path());
        // Anywhere from during start-up and the group join to well into processing.
        std::thread::sleep(Duration::from_millis(800 + rng.below(4500)));
        let mut child = child;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    stop_producing.store(true, Ordering::Relaxed);
    let events = producer.join().unwrap();
    let child = start(dir.path());
    wait_caught_up(dir.path(), port, &["analytics"], Duration::from_secs(90));
    stop(child);

    let log = std::fs::read_to_string(dir.path().join("host.log")).unwrap();
    assert!(
        log.matches("consuming").count() > kills,
        "every run started:\n{log}"
    );
    assert_eq!(
        state_value(dir.path(), "analytics", "total"),
        Some(events.len() as i64),
        "log:\n{log}"
    );
    for (kind, n) in by_type(&events) {
        assert_eq!(
            state_value(dir.path(), "analytics", &format!("type:{kind}")),
            Some(n),
            "{kind}"
        );
    }

    // Replay one plugin from the start: its state is recomputed, not doubled.
    let config = eddy::config::Config::load(&dir.path().join("plugins.toml")).unwrap();
    let said = eddy::ops::replay(&config, "analytics", &eddy::ops::From::Earliest, false).unwrap();
    assert!(said.contains("state was dropped"), "{said}");
    assert_eq!(state_value(dir.path(), "analytics", "total"), None);
    let child = start(dir.path());
    wait_caught_up(dir.path(), port, &["analytics"], Duration::from_secs(90));
    stop(child);
    assert_eq!(
        state_value(dir.path(), "analytics", "total"),
        Some(events.len() as i64)
    );
}

#[test]
fn plugins_cannot_reach_each_others_state_and_bad_files_are_explained() {
    let broker = broker(PARTITIONS);
    let bootstrap = broker.bootstrap_servers().to_string();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Two instances of the same plugin write the same keys: each sees only its own.
    write_config(
        dir.path(),
        &bootstrap,
        port,
        &(analytics("one") + &analytics("two")),
    );
    let events = generate(500, &generator_options(3, 0));
    produce_generated(&bootstrap, &events);
    let child = start(dir.path());
    wait_caught_up(dir.path(), port, &["one", "two"], Duration::from_secs(60));
    stop(child);
    assert_eq!(state_value(dir.path(), "one", "total"), Some(500));
    assert_eq!(state_value(dir.path(), "two", "total"), Some(500));
    assert!(
        dir.path().join("eddy-data/one.redb").is_file()
            && dir.path().join("eddy-data/two.redb").is_file()
    );

    // A damaged file: a clear error naming the file and the way out; nothing starts.
    std::fs::write(dir.path().join("eddy-data/two.redb"), vec![0x5a; 8192]).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_eddy"))
        .arg("run")
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("two.redb") && err.contains("eddy reset two"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_eddy"))
        .args(["reset", "two"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A missing file of a plugin that ran before: said loudly, then recomputed from the start.
    std::fs::remove_file(dir.path().join("eddy-data/one.redb")).unwrap();
    let child = start(dir.path());
    wait_caught_up(dir.path(), port, &["one", "two"], Duration::from_secs(60));
    stop(child);
    let log = std::fs::read_to_string(dir.path().join("host.log")).unwrap();
    assert!(
        log.contains("no state file, but consumer group `eddy-one` has committed offsets"),
        "{log}"
    );
    assert_eq!(state_value(dir.path(), "one", "total"), Some(500));
    assert_eq!(state_value(dir.path(), "two", "total"), Some(500));
}

#[test]
fn state_of_an_earlier_embedded_broker_is_not_misapplied() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let text = format!(
        "[kafka]\nbrokers = \"embedded\"\npartitions = 2\n[http]\naddress = \"127.0.0.1:{port}\"\n\
         [generator]\nrate = 200\n[reload]\nwatch = false\n{}",
        analytics("analytics")
    );
    std::fs::write(dir.path().join("plugins.toml"), text).unwrap();
    for _ in 0..2 {
        let child = start(dir.path());
        let deadline = Instant::now() + Duration::from_secs(60);
        while !metrics(port)
            .is_some_and(|h| h.contains("\"events\":") && !h.contains("\"events\":0"))
        {
            assert!(Instant::now() < deadline, "no events handled");
            std::thread::sleep(Duration::from_millis(200));
        }
        stop(child);
    }
    let log = std::fs::read_to_string(dir.path().join("host.log")).unwrap();
    assert!(log.contains("starting with fresh state"), "{log}");
    assert!(log.contains("the embedded broker forgets"), "{log}");
}
