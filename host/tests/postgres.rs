//! PostgreSQL outputs against a real PostgreSQL 15 (started by the test, see
//! `common/postgres.rs`): the warehouse plugin keeps seed 004's `user_events` (and the
//! database `user_stats` from it), whose rows must match the produced events and the
//! per-user figures computed here from them, also after `eddy replay` and `eddy reset`; a database stopped under load loses and duplicates nothing; rows the
//! database refuses are dead-lettered with its message, in the topic and the table.

mod common;

use common::postgres::Postgres;
use common::*;
use eddy::Host;
use eddy::generator::Generated;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

const PARTITIONS: i32 = 6;

/// The `[postgres.main]` table and a warehouse plugin writing seed 004's tables to it.
fn plugins(pg: &Postgres, migrate_on_start: bool) -> String {
    format!(
        r#"
[postgres.main]
url = "{url}"
pool_size = 4
migrations = "{migrations}"
migrate_on_start = {migrate_on_start}

[[plugin]]
name = "warehouse"
path = "{wasm}"
max_batch = 200
tick_interval_ms = 0
dead_letter_table = {{ postgres = "main", table = "dead_letter_queue" }}
[plugin.outputs]
events = {{ postgres = "main", table = "user_events", mode = "insert_if_absent", key = ["event_id"] }}
"#,
        url = pg.url(),
        migrations = root().join("migrations").display(),
        wasm = wasm("eddy_warehouse"),
    )
}

/// One user's figures, computed here from the events (not by the plugin's code).
#[derive(Debug, Default, PartialEq, Eq)]
struct Figures {
    events: i64,
    purchases: i64,
    cents: i64,
    last_active_ms: Option<i64>,
    last_purchase_ms: Option<i64>,
}

fn expected_figures(payloads: &[Vec<u8>]) -> BTreeMap<String, Figures> {
    let mut users: BTreeMap<String, Figures> = BTreeMap::new();
    for p in payloads {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(p) else {
            continue;
        };
        let Some(user) = v["user_id"].as_str() else {
            continue;
        };
        let f = users.entry(user.to_string()).or_default();
        f.events += 1;
        let t = v["timestamp"]
            .as_str()
            .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            .map(|t| t.as_millisecond());
        if let Some(t) = t {
            f.last_active_ms = f.last_active_ms.max(Some(t));
        }
        if v["event_type"] == "purchase" {
            f.purchases += 1;
            let props = &v["properties"];
            let amount = match props["price"].as_f64() {
                Some(price) => price * props["quantity"].as_f64().unwrap_or(1.0).max(1.0),
                None => props["cart_value"].as_f64().unwrap_or(0.0),
            };
            f.cents += (amount * 100.0).round() as i64;
            if let Some(t) = t {
                f.last_purchase_ms = f.last_purchase_ms.max(Some(t));
            }
        }
    }
    users
}

fn actual_figures(pg: &Postgres) -> BTreeMap<String, Figures> {
    pg.query(
        "SELECT user_id, total_events, total_purchases, (total_spent * 100)::bigint, \
         (extract(epoch FROM last_active) * 1000)::bigint, \
         (extract(epoch FROM last_purchase) * 1000)::bigint FROM user_stats",
    )
    .into_iter()
    .map(|row| {
        let f: Vec<&str> = row.split('|').collect();
        let opt = |s: &str| (!s.is_empty()).then(|| s.parse().unwrap());
        (
            f[0].to_string(),
            Figures {
                events: f[1].parse().unwrap(),
                purchases: f[2].parse().unwrap(),
                cents: f[3].parse().unwrap(),
                last_active_ms: opt(f[4]),
                last_purchase_ms: opt(f[5]),
            },
        )
    })
    .collect()
}

/// `user_events` holds exactly one row per event of `events`, and `user_stats` the figures
/// computed from `payloads` (all that was produced).
fn assert_tables_exact(pg: &Postgres, events: &[Generated], payloads: &[Vec<u8>]) {
    let ids: BTreeSet<String> = events
        .iter()
        .map(|g| {
            let v: serde_json::Value = serde_json::from_slice(&g.payload).unwrap();
            v["event_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        ids.len(),
        events.len(),
        "the generator's event ids are unique"
    );
    let rows = pg.count("SELECT count(*) FROM user_events");
    let in_db: BTreeSet<String> = pg
        .query("SELECT event_id FROM user_events")
        .into_iter()
        .collect();
    assert_eq!(rows as usize, in_db.len());
    let missing: Vec<_> = ids.difference(&in_db).take(5).collect();
    assert!(missing.is_empty(), "events not in user_events: {missing:?}");
    assert_eq!(
        in_db.len(),
        ids.len(),
        "user_events holds rows that were not produced"
    );
    // A row holds its event: type, user and time as produced.
    let sample = &events[events.len() / 2];
    let v: serde_json::Value = serde_json::from_slice(&sample.payload).unwrap();
    let row = pg.query(&format!(
        "SELECT user_id, event_type, (extract(epoch FROM timestamp) * 1000)::bigint, metadata->>'session_id' \
         FROM user_events WHERE event_id = '{}'",
        v["event_id"].as_str().unwrap()
    ));
    assert_eq!(
        row[0],
        format!(
            "{}|{}|{}|{}",
            v["user_id"].as_str().unwrap(),
            v["event_type"].as_str().unwrap(),
            sample.time_ms,
            v["session_id"].as_str().unwrap()
        )
    );
    let expected = expected_figures(payloads);
    let actual = actual_figures(pg);
    assert_eq!(actual.len(), expected.len(), "users in user_stats");
    for (user, figures) in &expected {
        assert_eq!(actual.get(user), Some(figures), "user_stats of {user}");
    }
}

/// A host with the warehouse plugin writing to `pg` (migrations applied at start).
async fn start_host(bootstrap: &str, pg: &Postgres) -> Host {
    Host::start(common::config(&config_text(
        bootstrap,
        PARTITIONS,
        &plugins(pg, true),
    )))
    .await
    .expect("host starts")
}

/// Waits until the plugin has handled `n` events and committed the topic's end.
async fn settle(bootstrap: &str, host: &Host, n: u64) {
    let metrics = host.metrics().clone();
    wait_async(
        Duration::from_secs(120),
        "the warehouse plugin to handle every event",
        move || metrics.plugin("warehouse").events_handled() >= n,
    )
    .await;
    wait_settled(bootstrap, &["warehouse"], PARTITIONS, n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_match_the_events_and_refused_rows_are_dead_lettered_with_the_reason() {
    init_logs();
    let pg = Postgres::start();
    // `eddy migrate` twice: the second applies nothing.
    let config = config(&config_text("embedded", PARTITIONS, &plugins(&pg, false)));
    let db = &config.postgres["main"];
    let applied = eddy::sinks::postgres::migrate("main", db).await.unwrap();
    assert_eq!(
        applied,
        ["001_seed004.sql", "002_user_stats_from_events.sql"]
    );
    assert!(
        eddy::sinks::postgres::migrate("main", db)
            .await
            .unwrap()
            .is_empty()
    );

    let broker = broker(PARTITIONS);
    let bootstrap = broker.bootstrap_servers().to_string();
    let events = generate(3000, &generator_options(11, 500));
    produce_generated(&bootstrap, &events);
    // One the database refuses (a time that is none), one that is no event at all.
    let refused = br#"{"event_id":"bad-time","user_id":"user-bad","event_type":"click","timestamp":"yesterday at noon"}"#.to_vec();
    let garbage = b"{not json".to_vec();
    produce(
        &bootstrap,
        TOPIC,
        &[
            (Some(b"user-bad".to_vec()), refused.clone()),
            (Some(b"x".to_vec()), garbage.clone()),
        ],
    );
    let host = start_host(&bootstrap, &pg).await;
    settle(&bootstrap, &host, events.len() as u64 + 2).await;
    let health = http_get(host.http_addr(), "/healthz").await;
    assert!(health.contains(r#""delivering":true"#), "{health}");
    host.stop().await.unwrap();

    // user_stats counts the events user_events holds: not the refused one.
    let payloads: Vec<Vec<u8>> = events.iter().map(|g| g.payload.clone()).collect();
    assert_tables_exact(&pg, &events, &payloads);
    assert_eq!(
        pg.count("SELECT count(*) FROM user_events WHERE event_id = 'bad-time'"),
        0
    );
    assert_eq!(
        pg.count("SELECT count(*) FROM user_stats WHERE user_id = 'user-bad'"),
        0
    );

    // The refused row: in the dead-letter topic with the database's message and the output…
    let letters = read_topic(&bootstrap, "warehouse-dlq", 2);
    assert_eq!(letters.len(), 2, "two dead letters");
    let row_letter = letters
        .iter()
        .find(|m| header(m, "eddy.output").is_some())
        .expect("the refused row's dead letter");
    assert_eq!(header(row_letter, "eddy.output").as_deref(), Some("events"));
    let reason = header(row_letter, "eddy.reason").unwrap();
    assert!(
        reason.contains("invalid input syntax for type timestamp with time zone")
            && reason.contains("SQLSTATE 22007"),
        "{reason}"
    );
    // …and in dead_letter_queue, once each, as is the event that is no event.
    let rows = pg.query(
        "SELECT error_type, event_id, status, output, error_message FROM dead_letter_queue ORDER BY error_type",
    );
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(
        rows[0].starts_with(
            "output|bad-time|dead|events|output `events` cannot be delivered: invalid input syntax"
        ),
        "{rows:?}"
    );
    assert!(rows[1].starts_with("verdict||dead||"), "{rows:?}");
    assert_eq!(
        pg.count("SELECT count(*) FROM dead_letter_queue WHERE source_offset IS NOT NULL AND plugin = 'warehouse'"),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_stopped_under_load_loses_nothing_and_duplicates_nothing() {
    init_logs();
    let pg = Postgres::start();
    let broker = broker(PARTITIONS);
    let bootstrap = broker.bootstrap_servers().to_string();
    let host = start_host(&bootstrap, &pg).await;
    let stop = Arc::new(AtomicBool::new(false));
    let producer = produce_until(
        bootstrap.clone(),
        generator_options(23, 500),
        400,
        stop.clone(),
    );
    let metrics = host.metrics().plugin("warehouse");
    let rows_in = |pg: &Postgres| pg.count("SELECT count(*) FROM user_events");
    wait_for_rows(&pg, 500).await;

    // Down: deliveries fail, /healthz says so, nothing is committed past them.
    tokio::task::block_in_place(|| pg.stop());
    let m = metrics.clone();
    wait_async(Duration::from_secs(60), "deliveries to fail", move || {
        m.delivery_failing.load(Relaxed) == 1
    })
    .await;
    let health = http_get(host.http_addr(), "/healthz").await;
    assert!(
        health.contains(r#""delivering":false"#) && health.contains(r#""status":"degraded""#),
        "{health}"
    );
    assert!(health.contains("delivery_error"), "{health}");
    // Events keep coming while it is down (a few retries' worth).
    let m = metrics.clone();
    let failures = m.output_failures.load(Relaxed);
    wait_async(
        Duration::from_secs(60),
        "three more failed deliveries",
        move || m.output_failures.load(Relaxed) >= failures + 3,
    )
    .await;

    // Back: deliveries resume on their own.
    tokio::task::block_in_place(|| pg.start_again());
    let m = metrics.clone();
    wait_async(
        Duration::from_secs(90),
        "deliveries to go through again",
        move || m.delivery_failing.load(Relaxed) == 0,
    )
    .await;
    let before = rows_in(&pg);
    wait_for_rows(&pg, before + 300).await;
    stop.store(true, Relaxed);
    let produced = tokio::task::spawn_blocking(move || producer.join().unwrap())
        .await
        .unwrap();
    settle(&bootstrap, &host, produced.len() as u64).await;
    let health = http_get(host.http_addr(), "/healthz").await;
    assert!(health.contains(r#""delivering":true"#), "{health}");
    host.stop().await.unwrap();

    let payloads: Vec<Vec<u8>> = produced.iter().map(|g| g.payload.clone()).collect();
    assert_tables_exact(&pg, &produced, &payloads);
    assert_eq!(pg.count("SELECT count(*) FROM dead_letter_queue"), 0);
}

/// `eddy replay --from` an offset in the middle, and `eddy reset`, leave the plugin without
/// the history of the events before: `user_stats` must still count every event, and no row
/// may ever show less than it did (a trigger of the test's records every update that
/// lowers `total_events`). The figures used to come from the plugin's state and overwrote
/// the rows with smaller ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_reset_never_move_user_stats_back() {
    init_logs();
    let pg = Postgres::start();
    let text = plugins(&pg, true);
    let broker = broker(PARTITIONS);
    let bootstrap = broker.bootstrap_servers().to_string();
    let config = common::config(&config_text(&bootstrap, PARTITIONS, &text));
    eddy::sinks::postgres::migrate("main", &config.postgres["main"])
        .await
        .unwrap();
    pg.query(
        "CREATE TABLE went_back (user_id TEXT, was INTEGER, became INTEGER); \
         CREATE FUNCTION record_going_back() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           INSERT INTO went_back VALUES (OLD.user_id, OLD.total_events, NEW.total_events); \
           RETURN NEW; END $$; \
         CREATE TRIGGER went_back BEFORE UPDATE ON user_stats FOR EACH ROW \
           WHEN (NEW.total_events < OLD.total_events) EXECUTE FUNCTION record_going_back()",
    );
    let went_back = |pg: &Postgres| pg.query("SELECT * FROM went_back LIMIT 5");
    let all = generate(2300, &generator_options(29, 500));
    let run = |end: usize| {
        let config = config.clone();
        let bootstrap = bootstrap.clone();
        async move {
            let host = Host::start(config).await.expect("host starts");
            wait_settled(&bootstrap, &["warehouse"], PARTITIONS, end as u64).await;
            host.stop().await.unwrap();
        }
    };
    let exact = |pg: &Postgres, end: usize| {
        let produced = &all[..end];
        let payloads: Vec<Vec<u8>> = produced.iter().map(|g| g.payload.clone()).collect();
        assert_tables_exact(pg, produced, &payloads);
    };
    produce_generated(&bootstrap, &all[..1500]);
    run(1500).await;
    exact(&pg, 1500);

    // Replayed from offset 100 of each partition: the state lacks what came before.
    let said = tokio::task::block_in_place(|| {
        eddy::ops::replay(&config, "warehouse", &eddy::ops::From::Offset(100), false)
    })
    .unwrap();
    assert!(said.contains("state was dropped"), "{said}");
    produce_generated(&bootstrap, &all[1500..2000]);
    run(2000).await;
    assert_eq!(went_back(&pg), Vec::<String>::new(), "rows that went back");
    exact(&pg, 2000);

    // Reset: everything handled again from the start, by a plugin that knows nothing.
    let said = eddy::ops::reset(&config, "warehouse").unwrap();
    assert!(said.contains("dropped the state"), "{said}");
    produce_generated(&bootstrap, &all[2000..]);
    run(2300).await;
    assert_eq!(went_back(&pg), Vec::<String>::new(), "rows that went back");
    exact(&pg, 2300);
}

/// A batch of 500 rows that PostgreSQL refuses every one of, for a reason that used to be
/// taken for a passing one (428C9: `session_id` is a generated column now, SQLSTATE class
/// 42), is dead-lettered within seconds, 500 letters in the topic and 500 rows in
/// `dead_letter_queue`, and the plugin moves on; an event without a `timestamp` (the
/// README's example) is a row with its Kafka record's time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_every_row_is_refused_is_dead_lettered_within_seconds() {
    init_logs();
    let pg = Postgres::start();
    let text = plugins(&pg, false).replace("max_batch = 200", "max_batch = 500");
    let config = config(&config_text("embedded", 1, &text));
    eddy::sinks::postgres::migrate("main", &config.postgres["main"])
        .await
        .unwrap();
    // 500 rows each refused when run (a time that is none, class 22): halved down to each
    // row alone, 999 statements, each with its own time bound.
    let databases = eddy::sinks::postgres::Databases::new(&config.postgres).unwrap();
    let writer = eddy::sinks::postgres::TableWriter::new(
        &databases,
        &eddy::config::TableTarget {
            postgres: "main".into(),
            table: "user_events".into(),
            mode: eddy::config::WriteMode::InsertIfAbsent,
            key: vec!["event_id".into()],
        },
    );
    let bad: Vec<Vec<u8>> = (0..500)
        .map(|i| {
            format!(r#"{{"event_id":"bad-{i}","user_id":"u","timestamp":"never {i}"}}"#)
                .into_bytes()
        })
        .collect();
    let slices: Vec<&[u8]> = bad.iter().map(Vec::as_slice).collect();
    let started = std::time::Instant::now();
    let refused = writer.write(&slices).await.unwrap();
    println!(
        "500 rows each refused, halved to each alone: {:?}",
        started.elapsed()
    );
    assert_eq!(refused.len(), 500);
    assert!(
        refused[499].reason.contains("SQLSTATE 22007"),
        "{refused:?}"
    );

    pg.query(
        "ALTER TABLE user_events DROP COLUMN session_id; \
         ALTER TABLE user_events ADD COLUMN session_id VARCHAR(100) GENERATED ALWAYS AS (user_id) STORED",
    );
    // One partition, all 500 there before the host starts: one batch of 500.
    let broker = broker(1);
    let bootstrap = broker.bootstrap_servers().to_string();
    let events = generate(500, &generator_options(17, 0));
    produce_generated(&bootstrap, &events);
    let host = Host::start(common::config(&config_text(&bootstrap, 1, &text)))
        .await
        .expect("host starts");
    let m = host.metrics().plugin("warehouse");
    wait_async(
        Duration::from_secs(60),
        "the plugin to consume",
        move || m.up.load(Relaxed) == 1,
    )
    .await;
    let started = std::time::Instant::now();
    // Generous for any machine; the old code never got there (it retried the batch forever).
    let b = bootstrap.clone();
    tokio::task::spawn_blocking(move || {
        wait_committed(&b, &["eddy-warehouse"], 1, 500, Duration::from_secs(30))
    })
    .await
    .unwrap();
    let took = started.elapsed();
    println!(
        "500 refused rows dead-lettered and committed {took:?} after the plugin began consuming"
    );
    let m = host.metrics().plugin("warehouse");
    assert_eq!(m.outputs_undeliverable.load(Relaxed), 500);
    assert_eq!(pg.count("SELECT count(*) FROM user_events"), 0);
    let letters = read_topic(&bootstrap, "warehouse-dlq", 501);
    assert_eq!(letters.len(), 500, "one dead letter per refused row");
    for l in &letters {
        assert_eq!(header(l, "eddy.output").as_deref(), Some("events"));
        let reason = header(l, "eddy.reason").unwrap();
        assert!(reason.contains("SQLSTATE 428C9"), "{reason}");
    }
    assert_eq!(
        pg.count("SELECT count(*) FROM dead_letter_queue WHERE error_type = 'output' AND output = 'events'"),
        500
    );

    // The column fixed, an event without a timestamp: its row has the record's time.
    pg.query(
        "ALTER TABLE user_events DROP COLUMN session_id; \
         ALTER TABLE user_events ADD COLUMN session_id VARCHAR(100)",
    );
    let readme_event = eddy::generator::Generated {
        key: "user-1".into(),
        payload:
            br#"{"event_id":"e-1","user_id":"user-1","event_type":"page_view","page_url":"/"}"#
                .to_vec(),
        time_ms: 1_705_314_645_123,
    };
    produce_timestamped(&bootstrap, &[readme_event]);
    let b = bootstrap.clone();
    tokio::task::spawn_blocking(move || {
        wait_committed(&b, &["eddy-warehouse"], 1, 501, Duration::from_secs(60))
    })
    .await
    .unwrap();
    host.stop().await.unwrap();
    assert_eq!(
        pg.query("SELECT (extract(epoch FROM timestamp) * 1000)::bigint FROM user_events WHERE event_id = 'e-1'"),
        ["1705314645123"]
    );
}

/// A delivery given up on stops: its upsert, held back by the server (here: a trigger waits
/// for a lock the test holds, before it touches the row), never lands after a newer write
/// of the same row. (It ran on in its spawned task and landed later, moving the row back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_given_up_on_never_lands_after_a_newer_one() {
    use eddy::config::{PostgresConfig, TableTarget, WriteMode};
    use eddy::sinks::Sink;
    use eddy::sinks::postgres::{Databases, Table};
    init_logs();
    let pg = Postgres::start();
    let db = PostgresConfig {
        url: pg.url(),
        ca_file: None,
        pool_size: 4,
        migrations: Some(root().join("migrations")),
        migrate_on_start: false,
    };
    eddy::sinks::postgres::migrate("main", &db).await.unwrap();
    pg.query(
        "CREATE FUNCTION hold_back() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.total_events = 1 THEN PERFORM pg_advisory_xact_lock(4242); END IF; \
           RETURN NEW; END $$; \
         CREATE TRIGGER hold_back BEFORE INSERT ON user_stats \
           FOR EACH ROW EXECUTE FUNCTION hold_back()",
    );
    let (holder, connection) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    holder
        .batch_execute("SELECT pg_advisory_lock(4242)")
        .await
        .unwrap();

    let databases = Databases::new(&[("main".to_string(), db)].into()).unwrap();
    let table = Table::new(
        &databases,
        &TableTarget {
            postgres: "main".into(),
            table: "user_stats".into(),
            mode: WriteMode::Upsert,
            key: vec!["user_id".into()],
        },
    );
    let record = |n: i64| eddy::wasm::OutputRecord {
        output: "stats".into(),
        key: None,
        payload: format!(
            r#"{{"user_id":"u1","total_events":{n},"total_purchases":0,"total_spent":0}}"#
        )
        .into_bytes(),
    };
    let stale = record(1);
    let delivery = table.send("stats", &[&stale]).unwrap();
    let waiting = "SELECT count(*) FROM pg_stat_activity \
                   WHERE application_name = 'eddy' AND wait_event_type = 'Lock'";
    tokio::task::block_in_place(|| {
        wait_for(
            Duration::from_secs(30),
            "the write to wait for the lock",
            || pg.count(waiting) == 1,
        )
    });
    // Given up on (as the worker does when another output fails, or time is up).
    drop(delivery);
    let newer = record(2);
    let refused = table.send("stats", &[&newer]).unwrap().await.unwrap();
    assert!(refused.is_empty(), "{refused:?}");
    let total = "SELECT total_events FROM user_stats WHERE user_id = 'u1'";
    assert_eq!(pg.query(total), ["2"]);

    // The lock let go: whatever of the given-up write was left must not land now.
    holder
        .batch_execute("SELECT pg_advisory_unlock(4242)")
        .await
        .unwrap();
    let running = "SELECT count(*) FROM pg_stat_activity \
                   WHERE application_name = 'eddy' AND state <> 'idle'";
    tokio::task::block_in_place(|| {
        wait_for(
            Duration::from_secs(30),
            "no statement of the writer's left running",
            || pg.count(running) == 0,
        )
    });
    assert_eq!(
        pg.query(total),
        ["2"],
        "the write given up on landed after the newer one"
    );
}

/// While the dead-letter table is missing, deliveries fail and are retried; each retry used
/// to write the batch's dead letters to the topic again. Now each dead letter is in the
/// topic once and in the table once, however many retries the outage took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_table_that_is_down_duplicates_no_dead_letter() {
    init_logs();
    let pg = Postgres::start();
    let broker = broker(PARTITIONS);
    let bootstrap = broker.bootstrap_servers().to_string();
    // Dead letters of both kinds: events that are no events, and a row the database refuses.
    let mut records: Vec<(Option<Vec<u8>>, Vec<u8>)> = (0..20)
        .map(|i| {
            (
                Some(format!("k{i}").into_bytes()),
                format!("{{not json {i}").into_bytes(),
            )
        })
        .collect();
    records.push((
        Some(b"user-bad".to_vec()),
        br#"{"event_id":"bad-time","user_id":"user-bad","event_type":"click","timestamp":"yesterday at noon"}"#.to_vec(),
    ));
    produce(&bootstrap, TOPIC, &records);
    let text = plugins(&pg, true).replace(
        r#"table = "dead_letter_queue""#,
        r#"table = "dead_letters_later""#,
    );
    let host = Host::start(common::config(&config_text(&bootstrap, PARTITIONS, &text)))
        .await
        .expect("host starts");
    let m = host.metrics().plugin("warehouse");
    wait_async(
        Duration::from_secs(90),
        "three failed deliveries (the table is missing)",
        move || m.output_failures.load(Relaxed) >= 3,
    )
    .await;
    let failures = host
        .metrics()
        .plugin("warehouse")
        .output_failures
        .load(Relaxed);
    pg.query("CREATE TABLE dead_letters_later (LIKE dead_letter_queue INCLUDING ALL)");
    settle(&bootstrap, &host, 21).await;
    host.stop().await.unwrap();

    let letters = read_topic(&bootstrap, "warehouse-dlq", 10_000);
    assert_eq!(
        letters.len(),
        21,
        "each dead letter once in the topic, after {failures} failed deliveries"
    );
    assert_eq!(pg.count("SELECT count(*) FROM dead_letters_later"), 21);
    assert_eq!(
        pg.count("SELECT count(*) FROM dead_letters_later WHERE error_type = 'output'"),
        1
    );
}

/// Waits until `user_events` has at least `n` rows.
async fn wait_for_rows(pg: &Postgres, n: i64) {
    tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(90), "rows in user_events", || {
            pg.count("SELECT count(*) FROM user_events") >= n
        })
    });
}

/// `sslmode=require`: TLS, with the server's certificate verified against `ca_file`; without
/// it (the system's roots do not know the test CA) the connection is refused and the write
/// is an error to retry, not a plaintext connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_connects_with_tls_and_verifies_the_server() {
    use eddy::config::{PostgresConfig, TableTarget, WriteMode};
    use eddy::sinks::postgres::{Databases, TableWriter};
    let pg = Postgres::start_with_tls(true);
    let db = |url: String, ca_file| PostgresConfig {
        url,
        ca_file,
        pool_size: 1,
        migrations: Some(root().join("migrations")),
        migrate_on_start: false,
    };
    let url = |host: &str| {
        format!(
            "postgresql://eddy@{host}:{}/postgres?sslmode=require&application_name=eddy-tls",
            pg.port
        )
    };
    let target = TableTarget {
        postgres: "main".into(),
        table: "user_stats".into(),
        mode: WriteMode::Upsert,
        key: vec!["user_id".into()],
    };
    let row: &[u8] = br#"{"user_id":"u1","total_events":1,"total_purchases":0,"total_spent":0}"#;
    for host in ["localhost", "127.0.0.1"] {
        let trusted = db(url(host), Some(pg.ca()));
        eddy::sinks::postgres::migrate("main", &trusted)
            .await
            .unwrap_or_else(|e| panic!("{host}: {e:#}"));
        let databases = Databases::new(&[("main".to_string(), trusted)].into()).unwrap();
        let writer = TableWriter::new(&databases, &target);
        assert!(writer.write(&[row]).await.unwrap().is_empty(), "{host}");
        // The pool keeps its connection: the server says it is encrypted.
        let sql = "SELECT count(*) FILTER (WHERE ssl), count(*) FILTER (WHERE NOT ssl) \
                   FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
                   WHERE application_name = 'eddy-tls'";
        let counts = pg.query(sql);
        assert!(
            counts[0].starts_with(|c: char| c != '0') && counts[0].ends_with("|0"),
            "{host}: connections with TLS | without: {counts:?}"
        );
    }
    let untrusted = db(url("localhost"), None);
    let databases = Databases::new(&[("main".to_string(), untrusted)].into()).unwrap();
    let e = TableWriter::new(&databases, &target)
        .write(&[row])
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("certificate"), "{e}");
}

/// The cost of exactly-once writes: rows per second of `insert_if_absent` and `upsert`
/// against plain `append` inserts, same rows, same batches, one run (a benchmark, not a
/// test: `cargo test -p eddy --test postgres --release -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn benchmark_write_modes() {
    use eddy::config::{PostgresConfig, TableTarget, WriteMode};
    use eddy::sinks::postgres::{Databases, TableWriter};
    let pg = Postgres::start();
    let db = PostgresConfig {
        url: pg.url(),
        ca_file: None,
        pool_size: 1,
        migrations: Some(root().join("migrations")),
        migrate_on_start: false,
    };
    eddy::sinks::postgres::migrate("main", &db).await.unwrap();
    // The same table and indexes, but the unique one on event_id is a plain index: what is
    // measured is the conflict check (and upsert's sort and update), not index upkeep.
    pg.query(
        "CREATE TABLE events_append (LIKE user_events INCLUDING DEFAULTS); \
         ALTER TABLE events_append ADD PRIMARY KEY (id); \
         CREATE INDEX ON events_append (event_id); \
         CREATE INDEX ON events_append (user_id, timestamp); \
         CREATE INDEX ON events_append (event_type, timestamp); \
         CREATE TABLE events_untriggered (LIKE user_events INCLUDING ALL)",
    );
    let databases = Databases::new(&[("main".to_string(), db)].into()).unwrap();
    let batches: usize = std::env::var("EDDY_BENCH_BATCHES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    const BATCH: usize = 500;
    let events = generate(batches * BATCH, &generator_options(5, 0));
    let rows: Vec<Vec<u8>> = events
        .iter()
        .map(|g| {
            let v: serde_json::Value = serde_json::from_slice(&g.payload).unwrap();
            serde_json::to_vec(&serde_json::json!({
                "event_id": v["event_id"], "user_id": v["user_id"], "event_type": v["event_type"],
                "timestamp": v["timestamp"], "session_id": v["session_id"],
                "page_url": v["page_url"], "metadata": v,
            }))
            .unwrap()
        })
        .collect();
    let writer = |table: &str, mode, key: &[&str]| {
        TableWriter::new(
            &databases,
            &TableTarget {
                postgres: "main".into(),
                table: table.into(),
                mode,
                key: key.iter().map(|k| k.to_string()).collect(),
            },
        )
    };
    let run = |w: TableWriter, rows: Vec<Vec<u8>>| async move {
        let started = std::time::Instant::now();
        for chunk in rows.chunks(BATCH) {
            let slices: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
            assert!(w.write(&slices).await.unwrap().is_empty());
        }
        rows.len() as f64 / started.elapsed().as_secs_f64()
    };
    let append = run(
        writer("events_append", WriteMode::Append, &[]),
        rows.clone(),
    )
    .await;
    // The same table without the trigger that keeps user_stats (migrations/002).
    let untriggered = run(
        writer(
            "events_untriggered",
            WriteMode::InsertIfAbsent,
            &["event_id"],
        ),
        rows.clone(),
    )
    .await;
    let insert = run(
        writer("user_events", WriteMode::InsertIfAbsent, &["event_id"]),
        rows.clone(),
    )
    .await;
    let replay = run(
        writer("user_events", WriteMode::InsertIfAbsent, &["event_id"]),
        rows.clone(),
    )
    .await;
    // Upserts of per-user figures, absolute values, each user once per batch (as warehouse
    // emits them): 20,000 users, so after the first 40 batches every row is an update.
    let stats: Vec<Vec<u8>> = (0..events.len())
        .map(|i| {
            serde_json::to_vec(&serde_json::json!({
                "user_id": format!("user-{}", i % 20_000), "total_events": i, "total_purchases": i / 50,
                "total_spent": i as f64 / 4.0, "last_active": "2024-01-15T10:00:00Z",
            }))
            .unwrap()
        })
        .collect();
    let upsert = run(
        writer("user_stats", WriteMode::Upsert, &["user_id"]),
        stats.clone(),
    )
    .await;
    pg.query(
        "CREATE TABLE stats_append (LIKE user_stats INCLUDING DEFAULTS); \
         ALTER TABLE stats_append ADD PRIMARY KEY (id); \
         CREATE INDEX ON stats_append (user_id); CREATE INDEX ON stats_append (last_active)",
    );
    let stats_append = run(writer("stats_append", WriteMode::Append, &[]), stats).await;
    println!(
        "{} rows in batches of {BATCH}, one connection: user_events append {append:.0} rows/s, \
         insert_if_absent {insert:.0} rows/s ({:.2}x append), the same rows again (a replay, all \
         conflicts) {replay:.0} rows/s ({:.2}x); user_stats append {stats_append:.0} rows/s, \
         upsert {upsert:.0} rows/s ({:.2}x append); user_events insert_if_absent without the \
         user_stats trigger {untriggered:.0} rows/s (with it: {:.2}x)",
        rows.len(),
        insert / append,
        replay / append,
        upsert / stats_append,
        insert / untriggered,
    );
}

/// The real `eddy` binary, killed with SIGKILL at random moments while it consumes under
/// continuous production
/// (rows delivered but not yet committed with the state are written again after each
/// restart): the tables come out exact.
#[test]
fn sigkill_at_random_moments_under_load_leaves_the_tables_exact() {
    use common::host_process::{
        free_port, runs_consuming, start, stop, wait_caught_up, write_config,
    };
    let pg = Postgres::start();
    let broker = broker(PARTITIONS);
    let bootstrap = broker.bootstrap_servers().to_string();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    write_config(dir.path(), &bootstrap, port, &plugins(&pg, true));

    let stop_producing = Arc::new(AtomicBool::new(false));
    let producer = produce_until(
        bootstrap.clone(),
        generator_options(31, 500),
        300,
        stop_producing.clone(),
    );
    let mut rng = eddy::generator::Rng::new(9);
    let kills = 5;
    for run in 0..kills {
        let mut child = start(dir.path());
        // Once it consumes (the first start also compiles the plugin), anywhere from its first
        // batches to well into writing rows.
        wait_for(Duration::from_secs(60), "the host to consume", || {
            runs_consuming(dir.path()) > run
        });
        std::thread::sleep(Duration::from_millis(rng.below(4000)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }
    stop_producing.store(true, Relaxed);
    let produced = producer.join().unwrap();
    let child = start(dir.path());
    wait_caught_up(dir.path(), port, &["warehouse"], Duration::from_secs(120));
    stop(child);
    let log = std::fs::read_to_string(dir.path().join("host.log")).unwrap();
    assert!(
        log.matches("consuming").count() > kills,
        "every run started:\n{log}"
    );
    let payloads: Vec<Vec<u8>> = produced.iter().map(|g| g.payload.clone()).collect();
    assert_tables_exact(&pg, &produced, &payloads);
}

/// Three `eddy` processes sharing warehouse's consumer group (`[state] shared_group`) into
/// one PostgreSQL, one of them killed with SIGKILL and started again while events flow
/// (issue 27, item 2: before, 39 of 1,221 users' `user_stats` rows came out wrong, each
/// host upserting the figures of its own state). `user_stats` is kept by the database from
/// `user_events` now, whichever host writes a user's events: both tables come out exact.
#[test]
fn three_hosts_sharing_the_group_and_a_sigkill_leave_the_tables_exact() {
    use common::host_process::{free_port, runs_consuming, start, stop, write_config};
    let pg = Postgres::start();
    let broker = broker(PARTITIONS);
    // warehouse's changelog (partition-scoped state): the mock broker cannot create topics
    // on request.
    broker
        .create_topic("eddy-warehouse-changelog", PARTITIONS)
        .unwrap();
    let bootstrap = broker.bootstrap_servers().to_string();
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    for (i, (dir, port)) in dirs.iter().zip(&ports).enumerate() {
        // One host applies the migrations; the others start once it has.
        let plugins = format!("[state]\nshared_group = true\n{}", plugins(&pg, i == 0));
        write_config(dir.path(), &bootstrap, *port, &plugins);
    }
    let mut hosts = vec![start(dirs[0].path())];
    wait_for(Duration::from_secs(60), "the first host to consume", || {
        runs_consuming(dirs[0].path()) > 0
    });
    hosts.push(start(dirs[1].path()));
    hosts.push(start(dirs[2].path()));

    let stop_producing = Arc::new(AtomicBool::new(false));
    let producing_since = std::time::Instant::now();
    // 300 users: each has events before, during and after the moves.
    let generator = eddy::generator::GeneratorOptions {
        users: 300,
        ..generator_options(53, 500)
    };
    let producer = produce_until(bootstrap.clone(), generator, 400, stop_producing.clone());
    let assignments = |i: usize| {
        std::fs::read_to_string(dirs[i].path().join("host.log"))
            .unwrap_or_default()
            .matches("partitions assigned")
            .count()
    };
    // The second host, once it has partitions and handled their events for a while, is
    // killed and started again.
    wait_for(
        Duration::from_secs(60),
        "the second host to get partitions",
        || assignments(1) > 0,
    );
    std::thread::sleep(Duration::from_secs(3));
    let before = (assignments(0), assignments(2));
    let mut killed = hosts.remove(1);
    killed.kill().unwrap(); // SIGKILL
    killed.wait().unwrap();
    // Its partitions go to the others once its session timed out (3 s), and their events
    // are handled there for a while; then it comes back.
    wait_for(
        Duration::from_secs(60),
        "the others to take the killed host's partitions",
        || assignments(0) > before.0 || assignments(2) > before.1,
    );
    std::thread::sleep(Duration::from_secs(3));
    hosts.insert(1, start(dirs[1].path()));
    wait_for(
        Duration::from_secs(60),
        "the second host to consume again",
        || runs_consuming(dirs[1].path()) > 1,
    );
    // Events flow for at least 15 s in all (~6,000), and for 2 s after it is back.
    let until = (producing_since + Duration::from_secs(15))
        .max(std::time::Instant::now() + Duration::from_secs(2));
    std::thread::sleep(until.saturating_duration_since(std::time::Instant::now()));
    stop_producing.store(true, Relaxed);
    let produced = producer.join().unwrap();
    wait_committed(
        &bootstrap,
        &["eddy-warehouse"],
        PARTITIONS,
        produced.len() as i64,
        Duration::from_secs(120),
    );
    for host in hosts {
        stop(host);
    }
    let payloads: Vec<Vec<u8>> = produced.iter().map(|g| g.payload.clone()).collect();
    assert!(produced.len() > 2000, "{} events", produced.len());
    assert_tables_exact(&pg, &produced, &payloads);
}

/// The warehouse plugin end to end in the host (a benchmark, not a test: `--ignored
/// --nocapture`): events/s from the first event handled to the last committed, with its
/// outputs going to PostgreSQL, against the same with its outputs discarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn benchmark_warehouse_end_to_end() {
    let n: usize = std::env::var("EDDY_BENCH_EVENTS")
        .ok()
        .and_then(|s| s.parse().ok())
        // The embedded broker keeps 5 MiB per partition: 30,000 events fit in 6.
        .unwrap_or(30_000);
    let pg = Postgres::start();
    let events = generate(n, &generator_options(41, 500));
    let mut rates = Vec::new();
    for to_postgres in [true, false] {
        let broker = broker(PARTITIONS);
        let bootstrap = broker.bootstrap_servers().to_string();
        produce_generated(&bootstrap, &events);
        let mut text = plugins(&pg, true).replace("max_batch = 200", "max_batch = 500");
        if !to_postgres {
            text = text
                .replace(
                    r#"{ postgres = "main", table = "user_events", mode = "insert_if_absent", key = ["event_id"] }"#,
                    r#""discard""#,
                )
;
        }
        let host = Host::start(common::config(&config_text(&bootstrap, PARTITIONS, &text)))
            .await
            .expect("host starts");
        let m = host.metrics().plugin("warehouse");
        let started = tokio::task::spawn_blocking(move || {
            wait_for(Duration::from_secs(60), "a first event", || {
                m.events_handled() > 0
            });
            std::time::Instant::now()
        })
        .await
        .unwrap();
        // Counted once delivered and committed.
        let m = host.metrics().plugin("warehouse");
        wait_async(Duration::from_secs(300), "every event handled", move || {
            m.events_handled() >= n as u64
        })
        .await;
        rates.push(n as f64 / started.elapsed().as_secs_f64());
        settle(&bootstrap, &host, n as u64).await;
        host.stop().await.unwrap();
        if to_postgres {
            assert_eq!(pg.count("SELECT count(*) FROM user_events"), n as i64);
        }
    }
    println!(
        "{n} events through warehouse (6 partitions, max_batch 500): to PostgreSQL {:.0} events/s, outputs discarded {:.0} events/s ({:.2}x)",
        rates[0],
        rates[1],
        rates[0] / rates[1]
    );
}
