//! Scaling out (issue 28): hosts sharing every stateful plugin's consumer group on a real
//! broker (tansu), while events flow, one host SIGKILLed and brought back, a fourth joining
//! and leaving. Each partition's state follows it from host to host through the plugin's
//! changelog, so at the end every per-user figure and every global figure (two-stage:
//! per-partition partials into a topic, a reducer summing them) equals what the topic holds.

mod common;

use common::host_process::*;
use common::postgres::Postgres;
use common::tansu::Tansu;
use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

const PARTITIONS: i32 = 6;
/// Events produced (`EDDY_SCALE_OUT_EVENTS`, default 40,000): the issue asks for 200,000,
/// which tansu 0.6.0 cannot take here with three hosts' changelogs besides (its SQLite
/// fetch scans every record after the offset asked, so each catching-up reader costs more
/// the more the topic holds; at 200,000 it fell behind the producer and its late
/// heartbeat answers made the groups rebalance one session timeout after another: seen).
fn events_to_produce() -> usize {
    std::env::var("EDDY_SCALE_OUT_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40_000)
}
/// Events per second produced: the moves happen while events flow.
const RATE: usize = 1_000;
const PARTIALS: &str = "analytics-partials";

/// analytics (per-user counters; its global figures as per-partition partials), the
/// reducer summing the partials, and warehouse into PostgreSQL, all partition-scoped.
/// Batches linger 200 ms: each batch of each partition is a commit, sent to the changelog
/// first, and tansu (SQLite, one busy core here) takes a few hundred small produce requests
/// a second at most; with the default 5 ms its heartbeat answers came late and the groups
/// rebalanced one session timeout after another (seen).
fn plugins(pg: &Postgres, migrate: bool) -> String {
    format!(
        r#"
[state]
shared_group = true

[postgres.main]
url = "{url}"
pool_size = 2
migrations = "{migrations}"
migrate_on_start = {migrate}

[[plugin]]
name = "analytics"
path = "{analytics}"
max_batch = 500
batch_linger_ms = 200
tick_interval_ms = 0
[plugin.outputs]
snapshots = "discard"
partials = {{ topic = "{PARTIALS}" }}
[plugin.config]
snapshot_every = 1000000
partials = "partials"

[[plugin]]
name = "reducer"
path = "{reducer}"
topic = "{PARTIALS}"
batch_linger_ms = 200
tick_interval_ms = 0
[plugin.outputs]
totals = "discard"

[[plugin]]
name = "warehouse"
path = "{warehouse}"
max_batch = 500
batch_linger_ms = 200
tick_interval_ms = 0
[plugin.outputs]
events = {{ postgres = "main", table = "user_events", mode = "insert_if_absent", key = ["event_id"] }}
"#,
        url = pg.url(),
        migrations = root().join("migrations").display(),
        analytics = wasm("eddy_analytics"),
        reducer = wasm("eddy_reducer"),
        warehouse = wasm("eddy_warehouse"),
    )
}

/// "partitions assigned" lines in the log of the host in `dir`.
fn assignments(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("host.log"))
        .unwrap_or_default()
        .matches("partitions assigned")
        .count()
}

/// For each partition of `plugin`'s state, the snapshot of the file, among the hosts in
/// `dirs`, that reflects the furthest source offset (the others are copies left behind).
fn latest_partitions(dirs: &[&Path], plugin: &str) -> BTreeMap<i32, eddy::state::Snapshot> {
    let mut latest: BTreeMap<i32, eddy::state::Snapshot> = BTreeMap::new();
    let next = |s: &eddy::state::Snapshot| s.offsets.values().max().copied().unwrap_or(-1);
    for dir in dirs {
        let config = eddy::config::Config::load(&dir.join("plugins.toml")).unwrap();
        for (p, _, snap) in eddy::ops::partitions(&config, plugin).unwrap() {
            if latest.get(&p).is_none_or(|old| next(&snap) > next(old)) {
                latest.insert(p, snap);
            }
        }
    }
    latest
}

fn number(snap: &eddy::state::Snapshot, key: &str) -> f64 {
    snap.state
        .get(key)
        .map(|v| std::str::from_utf8(v).unwrap().parse().unwrap())
        .unwrap_or(0.0)
}

#[test]
fn state_follows_its_partitions_across_a_sigkill_a_join_and_a_leave() {
    let tansu = Tansu::start();
    tansu.create_topic(PARTITIONS);
    tansu.create_named_topic(PARTIALS, 1);
    // The changelogs are created by the first host (compacted).
    let bootstrap = tansu.bootstrap();
    let pg = Postgres::start();
    let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    for (i, (dir, port)) in dirs.iter().zip(&ports).enumerate() {
        write_config(dir.path(), &bootstrap, *port, &plugins(&pg, i == 0));
        // Twelve consumer groups' members on one loaded 2-core machine: tansu answers
        // heartbeats seconds late at times, and a 3 s session then ends in a rebalance
        // after another (seen). Not 6 s or more either: the members would be static, and
        // tansu 0.6.0 never evicts a static member that does not come back (see README).
        let file = dir.path().join("plugins.toml");
        // And fetches that wait for data: tansu 0.6.0 answers a fetch at once when its
        // (empty) response is larger than `fetch.min.bytes` (1 by default), so a dozen idle
        // consumers kept its one busy core at 100% re-asking, and it answered heartbeats
        // seconds late (restores at 18 records/s, one session timeout after another:
        // seen). 10,000 bytes or 200 ms, whichever first.
        let text = std::fs::read_to_string(&file)
            .unwrap()
            .replace(
                "\"session.timeout.ms\" = \"3000\"",
                "\"session.timeout.ms\" = \"5000\"",
            )
            .replace(
                "\"fetch.wait.max.ms\" = \"20\"",
                "\"fetch.wait.max.ms\" = \"200\"\n\"fetch.min.bytes\" = \"10000\"",
            );
        std::fs::write(&file, text).unwrap();
    }
    let path = |i: usize| dirs[i].path();
    // The first host applies the migrations and creates the changelogs; then two more.
    let mut hosts: Vec<Option<HostProcess>> = vec![Some(start(path(0))), None, None, None];
    wait_for(Duration::from_secs(60), "the first host to consume", || {
        runs_consuming(path(0)) >= 3
    });
    hosts[1] = Some(start(path(1)));
    hosts[2] = Some(start(path(2)));
    wait_for(Duration::from_secs(60), "three hosts in the groups", || {
        assignments(path(1)) > 0 && assignments(path(2)) > 0
    });

    // The events at a steady pace, in the background.
    const EVENTS_PER_CHUNK: usize = 500;
    let total = events_to_produce();
    let produced = Arc::new(AtomicUsize::new(0));
    let producer = {
        let (bootstrap, produced) = (bootstrap.clone(), produced.clone());
        std::thread::spawn(move || {
            let events = generate(total, &generator_options(28, 500));
            let started = Instant::now();
            for chunk in events.chunks(EVENTS_PER_CHUNK) {
                let due =
                    started + Duration::from_secs_f64(produced.load(Relaxed) as f64 / RATE as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                produce_generated(&bootstrap, chunk);
                produced.fetch_add(chunk.len(), Relaxed);
            }
            events
        })
    };
    let at = |share: f64, what: &str| {
        wait_for(Duration::from_secs(300), what, || {
            produced.load(Relaxed) as f64 >= share * total as f64
        })
    };

    // A quarter in: SIGKILL the second host; the others take its partitions (restoring
    // their state from the changelogs) once its session timed out.
    at(0.25, "a quarter of the events");
    let before = (assignments(path(0)), assignments(path(2)));
    let mut killed = hosts[1].take().unwrap();
    killed.kill().unwrap();
    killed.wait().unwrap();
    wait_for(
        Duration::from_secs(60),
        "the others to take the killed host's partitions",
        || assignments(path(0)) > before.0 || assignments(path(2)) > before.1,
    );
    // Half-way: it comes back (its files are behind: it replays what was written since).
    at(0.5, "half of the events");
    hosts[1] = Some(start(path(1)));
    // A fourth host joins, then leaves.
    at(0.6, "60% of the events");
    hosts[3] = Some(start(path(3)));
    wait_for(
        Duration::from_secs(60),
        "the fourth host to get partitions",
        || assignments(path(3)) > 0,
    );
    at(0.8, "80% of the events");
    stop(hosts[3].take().unwrap());
    let events = producer.join().unwrap();
    assert_eq!(events.len(), total);

    // Every event handled and committed, and the reducer caught up with the partials.
    wait_committed(
        &bootstrap,
        &["eddy-analytics", "eddy-warehouse"],
        PARTITIONS,
        total as i64,
        Duration::from_secs(300),
    );
    let partials_end = || {
        eddy::kafka::admin::extents(
            &rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .clone(),
            PARTIALS,
        )
        .unwrap()[0]
            .high
    };
    wait_for(Duration::from_secs(120), "the reducer to catch up", || {
        let end = partials_end();
        end > 0 && committed_total_on(&bootstrap, PARTIALS, "eddy-reducer", 1) == end
    });
    for host in hosts.into_iter().flatten() {
        stop(host);
    }
    let all_dirs: Vec<&Path> = dirs.iter().map(|d| d.path()).collect();

    // What the topic holds.
    let mut per_user: BTreeMap<String, i64> = BTreeMap::new();
    for g in &events {
        *per_user.entry(g.key.clone()).or_default() += 1;
    }
    let per_type = by_type(&events);

    // Per-user figures: analytics' counters, from each partition's latest state.
    let analytics = latest_partitions(&all_dirs, "analytics");
    assert_eq!(analytics.len(), PARTITIONS as usize);
    let mut counted: BTreeMap<String, i64> = BTreeMap::new();
    for snap in analytics.values() {
        for (k, v) in snap.state.range("user:".to_string()..) {
            let Some(user) = k.strip_prefix("user:") else {
                break;
            };
            *counted.entry(user.to_string()).or_default() +=
                std::str::from_utf8(v).unwrap().parse::<i64>().unwrap();
        }
    }
    let wrong: Vec<_> = per_user
        .iter()
        .filter(|(u, n)| counted.get(*u) != Some(n))
        .take(5)
        .map(|(u, n)| format!("{u}: topic {n}, state {:?}", counted.get(u)))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} users, wrong: {wrong:?}",
        per_user.len()
    );
    assert_eq!(counted.len(), per_user.len());

    // Per-user figures in PostgreSQL: one row per event, user_stats from them.
    assert_eq!(
        pg.count("SELECT count(DISTINCT event_id) FROM user_events"),
        total as i64
    );
    assert_eq!(pg.count("SELECT count(*) FROM user_events"), total as i64);
    let stats: BTreeMap<String, i64> = pg
        .query("SELECT user_id, total_events FROM user_stats")
        .into_iter()
        .map(|row| {
            let (u, n) = row.split_once('|').unwrap();
            (u.to_string(), n.parse().unwrap())
        })
        .collect();
    assert_eq!(stats, per_user, "user_stats");

    // Global figures, two-stage: the reducer's sums of the partitions' partials.
    let reducer = latest_partitions(&all_dirs, "reducer");
    let sums = &reducer[&0];
    assert_eq!(number(sums, "sum:total") as i64, total as i64, "total");
    for (kind, n) in &per_type {
        assert_eq!(
            number(sums, &format!("sum:type:{kind}")) as i64,
            *n,
            "type {kind}"
        );
    }

    // And the partitions did move with their state.
    let logs: String = all_dirs
        .iter()
        .map(|d| std::fs::read_to_string(d.join("host.log")).unwrap_or_default())
        .collect();
    assert!(
        logs.contains("restored the partition's state"),
        "no partition was restored from a changelog"
    );
}

/// The restore rate and the failover time (a benchmark, not a test: `make bench-scale-out`,
/// i.e. `--ignored --nocapture`), on the embedded broker with real `eddy` processes:
/// 1. host A handles `EDDY_BENCH_EVENTS` events (default 100,000, 100,000 users) with
///    analytics, partition-scoped; stopped; host B, with an empty state directory, restores
///    every partition from the changelog: records/s;
/// 2. A started again, both share the group while events flow; B is SIGKILLed: the time
///    until A holds every partition again with none restoring (session timeout + restore).
#[test]
#[ignore]
fn benchmark_restore_and_failover() {
    let n: usize = std::env::var("EDDY_BENCH_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    // The embedded broker (tansu's fetches cost more the more a topic holds: a restore there
    // measures tansu). It keeps at most 5 MiB or 100,000 batches per partition: 24
    // partitions hold the events and their whole changelog (checked below).
    const PARTITIONS: i32 = 24;
    let broker = broker(PARTITIONS);
    broker
        .create_topic("eddy-analytics-changelog", PARTITIONS)
        .unwrap();
    let bootstrap = broker.bootstrap_servers().to_string();
    let generator = eddy::generator::GeneratorOptions {
        users: 100_000,
        ..generator_options(7, 0)
    };
    let events = generate(n, &generator);
    produce_generated(&bootstrap, &events);
    let plugin = format!(
        "[state]\nshared_group = true\n{}",
        analytics("analytics").replace("max_batch = 100", "max_batch = 500")
    );
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (pa, pb) = (free_port(), free_port());
    for (dir, port) in [(a.path(), pa), (b.path(), pb)] {
        write_config(dir, &bootstrap, port, &plugin);
        let file = dir.join("plugins.toml");
        // 5 s, as in the test above.
        let text = std::fs::read_to_string(&file).unwrap().replace(
            "\"session.timeout.ms\" = \"3000\"",
            "\"session.timeout.ms\" = \"5000\"",
        );
        std::fs::write(&file, text).unwrap();
    }
    let host_a = start(a.path());
    wait_committed(
        &bootstrap,
        &["eddy-analytics"],
        PARTITIONS,
        n as i64,
        Duration::from_secs(600),
    );
    stop(host_a);

    // 1. Restore everything on a new host: a partition's lane opens (restoring it) with its
    // first events, so a few more come to every partition.
    let started = Instant::now();
    let host_b = start(b.path());
    produce_generated(&bootstrap, &generate(2000, &generator_options(9, 0)));
    let health = |port: u16| -> Option<serde_json::Value> {
        metrics(port).and_then(|h| {
            h.split_once("\r\n\r\n")
                .and_then(|(_, body)| serde_json::from_str(body).ok())
        })
    };
    let restored = |dir: &Path| {
        std::fs::read_to_string(dir.join("host.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("restored the partition's state"))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    wait_for(Duration::from_secs(600), "every partition restored", || {
        restored(b.path()).len() >= PARTITIONS as usize
    });
    let wall = started.elapsed();
    let field = |line: &str, name: &str| -> f64 {
        let plain: String = line
            .split('\u{1b}')
            .map(|part| part.split_once('m').map_or(part, |(_, rest)| rest))
            .collect();
        plain
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let lines = restored(b.path());
    let records: f64 = lines.iter().map(|l| field(l, "records")).sum();
    let took_s: f64 = lines.iter().map(|l| field(l, "took_ms")).sum::<f64>() / 1000.0;
    let extents = eddy::kafka::admin::extents(
        rdkafka::ClientConfig::new().set("bootstrap.servers", &bootstrap),
        "eddy-analytics-changelog",
    )
    .unwrap();
    let (low, high): (i64, i64) = extents
        .iter()
        .fold((0, 0), |(l, h), e| (l + e.low, h + e.high));
    println!("changelog: {high} records written, the first {low} dropped by the broker");
    // The whole changelog was there to restore.
    assert_eq!(low, 0, "the broker dropped changelog records");

    println!(
        "restore: {records:.0} changelog records ({n} events, 100,000 users, analytics) in {took_s:.1} s of restoring: {:.0} records/s; {:.1} s from the new host's start to every partition restored",
        records / took_s.max(1e-3),
        wall.as_secs_f64()
    );

    // 2. Failover: both hosts, events flowing, B killed.
    let host_a = start(a.path());
    wait_for(Duration::from_secs(120), "the partitions split", || {
        let held = |port| {
            health(port).map_or(0, |h| {
                h["plugins"]["analytics"]["assigned_partitions"]
                    .as_i64()
                    .unwrap_or(0)
            })
        };
        let (ha, hb) = (held(pa), held(pb));
        ha > 0 && hb > 0 && ha + hb == PARTITIONS as i64
    });
    let stop_producing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let producer = produce_until(
        bootstrap.clone(),
        generator_options(8, 0),
        1000,
        stop_producing.clone(),
    );
    std::thread::sleep(Duration::from_secs(5));
    let mut killed = host_b;
    let kill_at = Instant::now();
    killed.kill().unwrap();
    killed.wait().unwrap();
    wait_for(
        Duration::from_secs(120),
        "A to hold every partition",
        || {
            health(pa).is_some_and(|h| {
                let p = &h["plugins"]["analytics"];
                p["assigned_partitions"].as_i64() == Some(PARTITIONS as i64)
                    && p["restoring_partitions"]
                        .as_array()
                        .is_some_and(|r| r.is_empty())
            })
        },
    );
    let assigned = kill_at.elapsed();
    // Handled again: A's lane for every partition is open (restored) once its events came.
    wait_for(
        Duration::from_secs(120),
        "A to handle every partition",
        || {
            health(pa).is_some_and(|h| {
                h["plugins"]["analytics"]["consumer_lag"]
                    .as_i64()
                    .is_some_and(|lag| (0..2000).contains(&lag))
            })
        },
    );
    let handled = kill_at.elapsed();
    stop_producing.store(true, Relaxed);
    producer.join().unwrap();
    stop(host_a);
    println!(
        "failover: SIGKILL of a host to its partitions assigned elsewhere {:.1} s (session.timeout.ms 5 s), to their events handled again {:.1} s",
        assigned.as_secs_f64(),
        handled.as_secs_f64()
    );
}

/// Partition-scoped state in-process on the embedded broker: one host counts 3,000 events,
/// a second joins (its partitions restore from the changelog while events flow), 3,000
/// more: each partition's latest file counts its events once, 6,000 in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_host_restores_the_partitions_it_is_given_and_counts_on() {
    use eddy::Host;
    init_logs();
    let broker = broker(PARTITIONS);
    broker
        .create_topic("eddy-analytics-changelog", PARTITIONS)
        .unwrap();
    let bootstrap = broker.bootstrap_servers().to_string();
    let text = config_text(
        &bootstrap,
        PARTITIONS,
        &format!("[state]\nshared_group = true\n{}", analytics("analytics")),
    );
    let (config_a, config_b) = (common::config(&text), common::config(&text));
    produce_generated(&bootstrap, &generate(3000, &generator_options(5, 0)));
    let a = Host::start(config_a.clone()).await.expect("host A starts");
    let m = a.metrics().plugin("analytics");
    wait_async(
        Duration::from_secs(60),
        "A to handle 3,000 events",
        move || m.events_handled() >= 3000,
    )
    .await;
    let b = Host::start(config_b.clone()).await.expect("host B starts");
    let mb = b.metrics().plugin("analytics");
    wait_async(Duration::from_secs(60), "B to get partitions", move || {
        mb.assigned_partitions.load(Relaxed) > 0
    })
    .await;
    produce_generated(&bootstrap, &generate(3000, &generator_options(6, 0)));
    let (ma, mb) = (
        a.metrics().plugin("analytics"),
        b.metrics().plugin("analytics"),
    );
    wait_async(Duration::from_secs(90), "6,000 events handled", move || {
        ma.events_handled() + mb.events_handled() >= 6000
    })
    .await;
    let restored = b
        .metrics()
        .plugin("analytics")
        .state_restore_records
        .load(Relaxed);
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    let mut latest: BTreeMap<i32, eddy::state::Snapshot> = BTreeMap::new();
    let next = |s: &eddy::state::Snapshot| s.offsets.values().max().copied().unwrap_or(-1);
    for config in [&config_a, &config_b] {
        for (p, _, snap) in eddy::ops::partitions(config, "analytics").unwrap() {
            if latest.get(&p).is_none_or(|old| next(&snap) > next(old)) {
                latest.insert(p, snap);
            }
        }
    }
    let total: i64 = latest.values().map(|s| number(s, "total") as i64).sum();
    assert_eq!(latest.len(), PARTITIONS as usize);
    assert_eq!(
        total, 6000,
        "each event counted once, in its partition's state"
    );
    assert!(restored > 0, "B restored the partitions it was given");
}
