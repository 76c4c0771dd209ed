//! Durable state, tested on the real `eddy` binary against a broker that outlives it: the
//! host is killed with SIGKILL at random moments under continuous production (half of
//! them in start-up, half once it consumes), and the analytics plugin's counts still come
//! out exact.

mod common;

use common::host_process::*;
use common::*;
use eddy::generator::Rng;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const PARTITIONS: i32 = 3;

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
    for run in 0..kills {
        let before = runs_consuming(dir.path());
        let mut child = start(dir.path());
        if run % 2 == 0 {
            // Once it consumes, anywhere from its first batches to well into processing
            // (waited for: how soon it consumes depends on this machine's speed).
            wait_for(Duration::from_secs(60), "the host to consume", || {
                runs_consuming(dir.path()) > before
            });
            std::thread::sleep(Duration::from_millis(rng.below(4500)));
        } else {
            // Anywhere in start-up: opening the state, the group join, or its first batches.
            std::thread::sleep(Duration::from_millis(rng.below(2000)));
        }
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
        log.matches("consuming").count() > kills / 2,
        "every run killed while consuming, and the last, consumed:\n{log}"
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
