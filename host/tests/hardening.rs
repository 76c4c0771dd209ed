//! What a plugin cannot do to the host however it misbehaves, and what holds when it asks for
//! a retry (issue 16): a plugin that emits in a loop through the raw import is stopped at its
//! output limit and its event dead-lettered with a reason naming the limit; one that logs in
//! a loop is throttled and the dropped lines counted; the effects of a call that answers
//! `retry` do not stay, so a retried event's state writes and outputs count once. A broker
//! that answers one plugin's group late while that group rebalances does not stall the
//! other plugins, even on a runtime of one thread.

mod common;

use common::*;
use eddy::Host;
use eddy::metrics::{DeadLetterReason, Outcome, TrapKind};
use rdkafka::Message;
use std::sync::atomic::Ordering::Relaxed;

const PARTITIONS: i32 = 2;

/// `good` generated events with `marked` events carrying the marker `MARK` among them (none
/// first), each a valid activity event.
fn records_with_marks(good: usize, marked: usize) -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
    let mut records: Vec<(Option<Vec<u8>>, Vec<u8>)> = generate(good, &generator_options(3, 0))
        .into_iter()
        .map(|g| (Some(g.key.into_bytes()), g.payload))
        .collect();
    for i in 0..marked {
        let payload = format!(r#"{{"user_id":"m{i}","event_type":"click","note":"MARK"}}"#);
        records.insert(
            (i + 1) * good / (marked + 1),
            (Some(b"m".to_vec()), payload.into_bytes()),
        );
    }
    records
}

async fn wait_all_handled(m: &std::sync::Arc<eddy::metrics::PluginMetrics>, total: u64) {
    let m = m.clone();
    wait_async(
        std::time::Duration::from_secs(120),
        "every event accounted for",
        move || m.events_handled() >= total,
    )
    .await;
}

/// Waits until the marked event waits for its first retry.
async fn wait_first_retry(m: &std::sync::Arc<eddy::metrics::PluginMetrics>) {
    let m = m.clone();
    wait_async(
        std::time::Duration::from_secs(60),
        "the marked event to wait for its first retry",
        move || m.retries.load(Relaxed) >= 1,
    )
    .await;
}

/// A running test: the broker with `records` in the topic, and a host running the
/// `misbehave` fixture as plugin `name` in `mode`, with `settings` (TOML lines of its
/// `[[plugin]]` entry, tables such as `[plugin.limits]` included) and its output
/// `out` going to the topic `<name>-out`.
struct Running {
    broker: eddy::kafka::EmbeddedBroker,
    bootstrap: String,
    config: eddy::config::Config,
    host: Host,
    plugin: std::sync::Arc<eddy::metrics::PluginMetrics>,
}

async fn start(
    records: &[(Option<Vec<u8>>, Vec<u8>)],
    name: &str,
    mode: &str,
    settings: &str,
) -> Running {
    start_with(records, name, mode, settings, "").await
}

/// [`start`], with `client_settings` (TOML lines) added to the host's `[kafka.settings]`.
async fn start_with(
    records: &[(Option<Vec<u8>>, Vec<u8>)],
    name: &str,
    mode: &str,
    settings: &str,
    client_settings: &str,
) -> Running {
    init_logs();
    let broker = broker(PARTITIONS);
    let bootstrap = broker.bootstrap_servers().to_string();
    produce(&bootstrap, TOPIC, records);
    let entry = format!(
        "[[plugin]]\nname = \"{name}\"\npath = \"{}\"\n{settings}\n[plugin.outputs]\nout = {{ topic = \"{name}-out\" }}\n[plugin.config]\nmode = \"{mode}\"\nmarker = \"MARK\"\n",
        wasm("eddy_fixture_misbehave")
    );
    let text = config_text(&bootstrap, PARTITIONS, &entry).replacen(
        "[kafka.settings]\n",
        &format!("[kafka.settings]\n{client_settings}\n"),
        1,
    );
    let config = config(&text);
    let host = Host::start(config.clone()).await.expect("host starts");
    let plugin = host.metrics().plugin(name);
    Running {
        broker,
        bootstrap,
        config,
        host,
        plugin,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_emits_in_a_loop_is_stopped_at_its_output_limit() {
    let records = records_with_marks(300, 2);
    // A generous CPU deadline: without the output limit, the loop runs until it and copies
    // gigabytes into the host meanwhile.
    let Running {
        broker: _broker,
        bootstrap,
        host,
        plugin: m,
        ..
    } = start(
        &records,
        "flood",
        "flood",
        "[plugin.limits]\ncpu_ms = 1500\noutput_records = 1000\noutput_mib = 8",
    )
    .await;
    wait_all_handled(&m, records.len() as u64).await;
    assert_eq!(m.events(Outcome::Ok), 300, "the good events went through");
    assert_eq!(
        m.dead_letters(DeadLetterReason::Failed(TrapKind::Output)),
        2,
        "each flooding event dead-lettered for its output"
    );
    assert_eq!(
        m.traps(TrapKind::Deadline),
        0,
        "stopped well before the deadline"
    );
    host.stop().await.expect("clean stop");
    let dlq = read_topic(&bootstrap, "flood-dlq", 2);
    assert_eq!(dlq.len(), 2);
    for d in &dlq {
        let reason = header(d, "eddy.reason").unwrap();
        assert!(reason.contains("limits.output_mib = 8 MiB"), "{reason}");
    }
    // Nothing the flooding calls emitted was delivered.
    assert!(read_topic(&bootstrap, "flood-out", 0).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_logs_in_a_loop_is_throttled_and_the_dropped_lines_counted() {
    // 20 marked events, 200 lines each: 4,000 lines in well under a second.
    let records = records_with_marks(200, 20);
    let total = records.len() as u64;
    let Running {
        broker: _broker,
        host,
        plugin: m,
        ..
    } = start(
        &records,
        "chatty",
        "chatter",
        "[plugin.limits]\nlog_lines_per_s = 50",
    )
    .await;
    wait_all_handled(&m, total).await;
    assert_eq!(m.events(Outcome::Ok), total, "logging never fails an event");
    let page = http_get(host.http_addr(), "/metrics").await;
    let dropped: u64 = page
        .lines()
        .find_map(|l| l.strip_prefix(r#"eddy_plugin_log_lines_dropped_total{plugin="chatty"} "#))
        .unwrap_or_else(|| panic!("no dropped-lines counter in\n{page}"))
        .parse()
        .unwrap();
    // At most a burst of 50 plus 50 a second for however long it took got through.
    assert!(
        dropped >= 3_000,
        "dropped {dropped} of 4,000 lines at 50 a second"
    );
    assert_eq!(m.log_lines_dropped.load(Relaxed), dropped);
    host.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_events_state_writes_and_outputs_count_once() {
    let marked = 5;
    let records = records_with_marks(200, marked);
    let total = records.len() as u64;
    // The fixture answers `retry` for a marked event unless it is alone in its call, after it
    // wrote state and emitted: the host hands it again alone, where it succeeds.
    let Running {
        broker: _broker,
        bootstrap,
        config,
        host,
        plugin: m,
    } = start(
        &records,
        "retrier",
        "retry-after-effects",
        "[plugin.limits]\nmax_retries = 3\nretry_backoff_ms = 1",
    )
    .await;
    wait_all_handled(&m, total).await;
    assert_eq!(
        m.events(Outcome::Ok),
        total,
        "each marked event succeeded alone"
    );
    assert!(m.retries.load(Relaxed) > 0, "the retry path ran");
    host.stop().await.expect("clean stop");
    let number = |key: &str| -> u64 {
        let value = eddy::ops::get(&config, "retrier", key).unwrap().unwrap();
        serde_json::from_slice(&value).unwrap()
    };
    assert_eq!(
        number("effects"),
        marked as u64,
        "each marked event's write once"
    );
    assert_eq!(number("seen"), total);
    let out = read_topic(&bootstrap, "retrier-out", marked);
    assert_eq!(out.len(), marked, "one output per marked event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_backoff_ends_at_once_when_the_host_stops_and_keeps_nothing() {
    let records = records_with_marks(100, 1);
    // The marked event answers `retry` every time, and its retries wait 10 s each, 60 s in
    // all: a stop that waited for them would take far longer than the bound below, which
    // leaves a slow machine room for the stop's own work.
    let Running {
        broker: _broker,
        bootstrap,
        host,
        plugin: m,
        ..
    } = start(
        &records,
        "waits",
        "retry",
        "[plugin.limits]\nmax_retries = 6\nretry_backoff_ms = 10000",
    )
    .await;
    wait_first_retry(&m).await;
    let handled = m.events_handled();
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(20), host.stop()).await;
    assert!(
        stopped.is_ok(),
        "the host stopped while a retry waited, not up to 60 s later"
    );
    // The batch with the waiting event was dropped, not committed: it is consumed again at
    // the next start, and nothing past the marked event was committed on its partition.
    assert_eq!(m.events_handled(), handled);
    let committed = committed_total(&bootstrap, "eddy-waits", PARTITIONS);
    assert!(
        committed < records.len() as i64,
        "committed {committed} of {}: the marked event's batch must not be",
        records.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_quota_dead_letters_with_the_limit_named_and_never_panics() {
    // Every event keeps 1 KiB more state; 1 MiB holds about 900 of them.
    let records = records_with_marks(0, 1_500);
    let total = records.len() as u64;
    let Running {
        broker: _broker,
        bootstrap,
        host,
        plugin: m,
        ..
    } = start(
        &records,
        "hoarder",
        "hoard",
        "[plugin.limits]\nstate_mib = 1\n[plugin.breaker]\nfailures = 0",
    )
    .await;
    wait_all_handled(&m, total).await;
    let refused = m.dead_letters(DeadLetterReason::Failed(TrapKind::StateQuota));
    assert!(
        (400..=700).contains(&refused),
        "{refused} of {total} refused for the quota: the rest fit in 1 MiB"
    );
    assert_eq!(m.events(Outcome::Ok) + refused, total);
    assert_eq!(
        m.traps(TrapKind::Trap),
        0,
        "no panic, in the SDK or elsewhere"
    );
    let page = http_get(host.http_addr(), "/metrics").await;
    assert!(
        page.contains(&format!(
            r#"eddy_dead_letters_total{{plugin="hoarder",reason="state_quota"}} {refused}"#
        )),
        "{page}"
    );
    host.stop().await.expect("clean stop");
    let dlq = read_topic(&bootstrap, "hoarder-dlq", refused as usize);
    let reason = header(&dlq[0], "eddy.reason").unwrap();
    assert!(reason.contains("over limits.state_mib = 1"), "{reason}");
    assert!(!reason.contains("panicked"), "{reason}");
}

/// A consumer of group `group`, not subscribed yet.
fn group_consumer(
    bootstrap: &str,
    group: &str,
    session_ms: u32,
) -> rdkafka::consumer::BaseConsumer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", session_ms.to_string())
        .create()
        .unwrap()
}

/// `consumer` as another member of the host's group: joins, polls until `done` says so, then
/// leaves (a rebalance for the host as it joins, another as it leaves).
fn other_member(
    consumer: rdkafka::consumer::BaseConsumer,
    mut done: impl FnMut(&rdkafka::consumer::BaseConsumer) -> bool,
) {
    use rdkafka::consumer::Consumer;
    consumer.subscribe(&[TOPIC]).unwrap();
    while !done(&consumer) {
        let _ = consumer.poll(std::time::Duration::from_millis(50));
    }
    consumer.unsubscribe();
}

/// A consumer of the host's group that joins, takes its share of the partitions, and leaves
/// without consuming: two rebalances for the host.
fn join_and_leave(bootstrap: &str, group: &str) {
    use rdkafka::consumer::Consumer;
    let started = std::time::Instant::now();
    other_member(group_consumer(bootstrap, group, 6000), |consumer| {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(45),
            "the second member never got a partition"
        );
        consumer.assignment().unwrap().count() > 0
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_while_a_batch_fills_applies_no_event_twice() {
    let records = records_with_marks(300, 0);
    let total = records.len() as u64;
    // The first batch takes every event at once, then lingers for more while the group
    // rebalances twice; each new assignment starts at the offsets saved with the state,
    // which do not hold that batch yet, so its events are fetched again.
    let Running {
        broker: _broker,
        bootstrap,
        config,
        host,
        plugin: m,
    } = start(
        &records,
        "counter",
        "panic",
        "max_batch = 100000\nbatch_linger_ms = 60000",
    )
    .await;
    {
        let bootstrap = bootstrap.clone();
        tokio::task::spawn_blocking(move || join_and_leave(&bootstrap, "eddy-counter"))
            .await
            .unwrap();
    }
    assert_eq!(
        m.events_handled(),
        0,
        "the rebalances came while the batch filled"
    );
    {
        let (m, bootstrap) = (m.clone(), bootstrap.clone());
        wait_async(
            std::time::Duration::from_secs(150),
            "every event handled and its offset committed",
            move || {
                m.events_handled() >= total
                    && committed_total(&bootstrap, "eddy-counter", PARTITIONS) == total as i64
            },
        )
        .await;
    }
    host.stop().await.expect("clean stop");
    assert_eq!(m.events_handled(), total, "each event handled once");
    let seen = eddy::ops::get(&config, "counter", "seen").unwrap().unwrap();
    assert_eq!(
        serde_json::from_slice::<u64>(&seen).unwrap(),
        total,
        "each event applied to the state once"
    );
}

/// Item 2: a batch whose event waits for its retries (8 + 10 + 10 + 10 s, over six times the
/// consumer's `max.poll.interval.ms` of 6 s) keeps its consumer polled meanwhile. A second member that
/// joins the group during the wait gets its share of the partitions within seconds, and the
/// host's member keeps the other one throughout: it takes part in the rebalance rather than
/// holding it up, and is not thrown out of its group for not polling. Afterwards every event
/// is handled once, the in-flight batch's too, on the partition that went and came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_waiting_on_retries_stays_polled_and_lets_a_member_join() {
    use rdkafka::consumer::Consumer;
    use std::time::{Duration, Instant};
    let records = records_with_marks(200, 1);
    let Running {
        broker: _broker,
        bootstrap,
        config,
        host,
        plugin: m,
    } = start_with(
        &records,
        "patient",
        "retry",
        "[plugin.limits]\nmax_retries = 4\nretry_backoff_ms = 8000",
        "\"max.poll.interval.ms\" = \"6000\"",
    )
    .await;
    wait_first_retry(&m).await;
    let waiting_since = Instant::now();
    let handled_before = m.events_handled();
    // A second member joins and stays, polling, until the batch in flight is done; it
    // reports how long its first assignment took and every assignment it had.
    let (joined_tx, joined_rx) = tokio::sync::oneshot::channel();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let member = {
        let (bootstrap, done) = (bootstrap.clone(), done.clone());
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut joined_tx = Some(joined_tx);
            let mut held = std::collections::BTreeSet::new();
            other_member(
                group_consumer(&bootstrap, "eddy-patient", 6000),
                |consumer| {
                    let now: Vec<i32> = consumer
                        .assignment()
                        .unwrap()
                        .elements()
                        .iter()
                        .map(|e| e.partition())
                        .collect();
                    if !now.is_empty() {
                        held.insert(now.len());
                        if let Some(tx) = joined_tx.take() {
                            let _ = tx.send((started.elapsed(), now.len()));
                        }
                    }
                    done.load(Relaxed) || started.elapsed() > Duration::from_secs(120)
                },
            );
            held
        })
    };
    let (took, partitions) = tokio::time::timeout(Duration::from_secs(60), joined_rx)
        .await
        .expect("the second member got partitions within a minute")
        .unwrap();
    let waited = waiting_since.elapsed();
    let handled_then = m.events_handled();
    // The batch waits until 38 s after its first retry: all of this happened during it.
    {
        let (m, first) = (m.clone(), records.len() as u64);
        wait_async(
            Duration::from_secs(120),
            "the batch in flight to be done",
            move || m.events_handled() >= first,
        )
        .await;
    }
    done.store(true, Relaxed);
    let held = member.join().unwrap();
    assert_eq!(
        handled_then, handled_before,
        "the member joined while the batch waited"
    );
    // The embedded broker gives a joining member's group the session less a second (5 s)
    // to rejoin, then hands out the partitions: a member that is not polled is thrown out
    // of the group after max.poll.interval.ms (6 s) instead, and the joiner gets both
    // partitions (after ~11 s). Time is bounded loosely (a busy machine delays the join);
    // the partition count is what tells the two apart.
    assert!(
        took < Duration::from_secs(30) && partitions == 1,
        "a member joining while the batch waited for its retries got {partitions} partition(s) after {took:?} ({waited:?} into the wait): the host's member must keep polling, so that it rejoins at once and keeps a partition"
    );
    assert_eq!(
        held,
        [1].into(),
        "the second member held one partition throughout the wait: the host's member was never thrown out of its group"
    );
    // More events, on both partitions, once the host holds both again: it handles them and
    // commits both partitions' offsets (the embedded broker refuses the commit that comes
    // with a revocation, so the offsets stored before the last rebalance are not committed).
    {
        let m = m.clone();
        wait_async(
            Duration::from_secs(60),
            "the host to hold both partitions again",
            move || m.assigned_partitions.load(Relaxed) == PARTITIONS as i64,
        )
        .await;
    }
    let more = records_with_marks(20, 0);
    produce(&bootstrap, TOPIC, &more);
    let total = (records.len() + more.len()) as u64;
    wait_all_handled(&m, total).await;
    wait_settled(&bootstrap, &["patient"], PARTITIONS, total).await;
    assert_eq!(m.events_handled(), total, "each event handled once");
    assert_eq!(m.events(Outcome::Ok), total - 1);
    assert_eq!(m.dead_letters(DeadLetterReason::RetriesExhausted), 1);
    host.stop().await.expect("clean stop");
    let seen = eddy::ops::get(&config, "patient", "seen").unwrap().unwrap();
    assert_eq!(
        serde_json::from_slice::<u64>(&seen).unwrap(),
        total - 1,
        "each event applied to the state once"
    );
}

/// Item 7: per-user keys under a `[plugin.expire]` rule go once event time has passed their
/// last write by the rule's duration (never before), with the batch that moved the time on,
/// and are counted; the rest stay. Events carry their event time as Kafka timestamp, 100 ms
/// apart: 300 s of event time for 3,000 events, and a rule of 20 s.
///
/// And a key that expired starts again from nothing when its user comes back (issue 27): the
/// values of the keys, not only which keys exist, are those of the events since the user's
/// last long absence, with one instance throughout or a new one in between. (Before, the
/// SDK's cache never learned of the host's deletion: a returning user's `user:` count went
/// on from the expired value and `users` did not count them again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_expire_by_event_time_and_the_state_stays_bounded() {
    check_expiry(false).await;
}

/// [`keys_expire_by_event_time_and_the_state_stays_bounded`] with the host stopped half-way
/// and started again (a new instance, its cache cold): the same figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_keys_come_back_from_nothing_across_a_new_instance() {
    check_expiry(true).await;
}

async fn check_expiry(restart_half_way: bool) {
    init_logs();
    // One partition: a batch then spans at most `max_batch` events of event time (2 s).
    let broker = broker(1);
    let bootstrap = broker.bootstrap_servers().to_string();
    let total = 3_000u64;
    let generator = eddy::generator::GeneratorOptions {
        spacing_ms: 100,
        users: 1_000_000,
        event_timestamps: true,
        ..generator_options(11, 0)
    };
    let events = generate(total as usize, &generator);
    let entry = format!(
        "[[plugin]]\nname = \"analytics\"\npath = \"{}\"\nmax_batch = 20\n\
         [plugin.expire]\nafter = {{ \"user:\" = \"20s\", \"journey:\" = \"20s\" }}\n\
         [plugin.outputs]\nsnapshots = \"discard\"\n",
        wasm("eddy_analytics")
    );
    let config = config(&config_text(&bootstrap, 1, &entry));
    let halves: Vec<&[eddy::generator::Generated]> = if restart_half_way {
        let (a, b) = events.split_at(events.len() / 2);
        vec![a, b]
    } else {
        vec![&events]
    };
    let mut counted = 0;
    let mut expiring = 0;
    let mut produced = 0u64;
    for part in halves {
        produce_timestamped(&bootstrap, part);
        produced += part.len() as u64;
        let host = Host::start(config.clone()).await.expect("host starts");
        let m = host.metrics().plugin("analytics");
        wait_all_handled(&m, part.len() as u64).await;
        wait_settled(&bootstrap, &["analytics"], 1, produced).await;
        host.stop().await.expect("clean stop");
        counted += m.state_keys_expired.load(Relaxed);
        expiring = m.state_expiring_keys.load(Relaxed);
    }

    // Each user's event times, and the latest event time of all.
    let mut times: std::collections::BTreeMap<String, Vec<i64>> = Default::default();
    // Users with a funnel event (page view, add to cart, purchase): those with a journey: key.
    let mut funnel = std::collections::BTreeMap::new();
    // Gaps between a key's writes: one of more than 20 s may have let it expire in between.
    let mut gaps = Vec::new();
    for g in &events {
        let event: serde_json::Value = serde_json::from_slice(&g.payload).unwrap();
        let kind = event["event_type"].as_str().unwrap();
        if ["page_view", "add_to_cart", "purchase"].contains(&kind)
            && let Some(t) = funnel.insert(g.key.clone(), g.time_ms)
        {
            gaps.push(g.time_ms - t);
        }
        let seen = times.entry(g.key.clone()).or_default();
        if let Some(t) = seen.last() {
            gaps.push(g.time_ms - t);
        }
        seen.push(g.time_ms);
    }
    let latest = events.iter().map(|g| g.time_ms).max().unwrap();
    let path = eddy::state::path_for(&config.state.dir, "analytics");
    let snap = eddy::state::store::read_only_snapshot(&path, "analytics").expect("state file");
    let value = |key: &str| -> Option<i64> {
        let v = snap.state.get(key)?;
        Some(serde_json::from_slice(v).expect("a JSON number"))
    };
    let kept = |user: &str| snap.state.contains_key(&format!("user:{user}"));
    let (mut recent, mut old, mut returned) = (0, 0, 0);
    // How many times users were first seen or came back: once per user, and once more per
    // absence of more than 24 s certainly, of less than 18 s never.
    let (mut arrivals_min, mut arrivals_max) = (0, 0);
    for (user, seen) in &times {
        let t = *seen.last().unwrap();
        let user_gaps: Vec<i64> = seen.windows(2).map(|w| w[1] - w[0]).collect();
        arrivals_min += 1 + user_gaps.iter().filter(|g| **g > 24_000).count() as i64;
        arrivals_max += 1 + user_gaps.iter().filter(|g| **g > 18_000).count() as i64;
        if t > latest - 20_000 {
            recent += 1;
            assert!(
                kept(user),
                "{user} was last seen {} ms before the end: too early to expire",
                latest - t
            );
            assert!(snap.expires.contains_key(&format!("user:{user}")));
            // The count is of the events since the user's last absence, when it is certain
            // whether each absence made the key expire.
            if user_gaps.iter().all(|g| *g <= 18_000 || *g > 24_000) {
                let since = 1 + user_gaps.iter().rev().take_while(|g| **g <= 18_000).count();
                if since < seen.len() {
                    returned += 1;
                }
                assert_eq!(
                    value(&format!("user:{user}")),
                    Some(since as i64),
                    "{user}'s count: events {seen:?}"
                );
            }
        } else if t < latest - 22_000 {
            old += 1;
            assert!(
                !kept(user),
                "{user} was last seen {} ms before the end: should have expired",
                latest - t
            );
        }
    }
    assert!(
        recent > 0 && old > recent && returned > 0,
        "{recent} recent users ({returned} back after an absence), {old} old ones"
    );
    // `users` counts each arrival: a user back after their key expired counts again.
    let users_counted = value("users").expect("users");
    assert!(
        (arrivals_min..=arrivals_max).contains(&users_counted),
        "users = {users_counted}, arrivals between {arrivals_min} and {arrivals_max}"
    );
    // The totals do not expire (no rule), and every expired key was counted.
    assert_eq!(value("total"), Some(total as i64));
    let count = |prefix: &str| snap.state.keys().filter(|k| k.starts_with(prefix)).count();
    let (users, journeys) = (count("user:"), count("journey:"));
    // Every key gone was counted, and so was each time a key expired and came back: a gap of
    // more than 24 s certainly, of less than 18 s never (a batch spans up to 2 s).
    let gone = (times.len() - users + funnel.len() - journeys) as u64;
    let gaps_over = |ms: i64| gaps.iter().filter(|g| **g > ms).count() as u64;
    assert!(
        (gone + gaps_over(24_000)..=gone + gaps_over(18_000)).contains(&counted),
        "{counted} counted expired, {gone} keys gone, {} + {} gaps",
        gaps_over(24_000),
        gaps_over(18_000) - gaps_over(24_000)
    );
    assert_eq!(expiring, (users + journeys) as i64);
    assert_eq!(snap.expires.len(), users + journeys);
}

/// Item 5: what can never be delivered is dead-lettered, never a wedge. The host's producer
/// takes at most 100,000 bytes a record; the plugin emits a 120 KB record for each marked
/// event and dead-letters the event, one of which is itself 150 KB. Before, delivery retried
/// the refused record until shutdown and the plugin never committed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_that_can_never_be_delivered_are_dead_lettered_not_retried_forever() {
    let mut records = records_with_marks(200, 1);
    let big = format!(
        r#"{{"user_id":"big","event_type":"click","note":"MARK","pad":"{}"}}"#,
        "p".repeat(150_000)
    );
    records.push((Some(b"big".to_vec()), big.into_bytes()));
    let Running {
        broker: _broker,
        bootstrap,
        host,
        plugin: m,
        ..
    } = start_with(
        &records,
        "oversize",
        "oversize",
        "",
        "\"message.max.bytes\" = \"100000\"",
    )
    .await;
    wait_all_handled(&m, records.len() as u64).await;
    // Committed to the end: nothing wedged.
    wait_settled(&bootstrap, &["oversize"], PARTITIONS, records.len() as u64).await;
    assert_eq!(m.events(Outcome::Ok), 200);
    assert_eq!(m.events(Outcome::DeadLetter), 2);
    assert_eq!(
        m.outputs_undeliverable.load(Relaxed),
        2,
        "both 120 KB records"
    );
    // The big event's dead letter and both records' (each over 100,000 bytes) go without
    // their payload; the small marked event's goes whole.
    assert_eq!(m.dead_letters_without_payload.load(Relaxed), 3);
    assert_eq!(m.dead_letters_lost.load(Relaxed), 0);
    host.stop().await.expect("clean stop");
    let dlq = read_topic(&bootstrap, "oversize-dlq", 4);
    assert_eq!(dlq.len(), 4, "two events and two output records");
    let (outputs, events): (Vec<_>, Vec<_>) =
        dlq.iter().partition(|d| header(d, "eddy.output").is_some());
    for d in &outputs {
        assert_eq!(header(d, "eddy.output").as_deref(), Some("out"));
        let reason = header(d, "eddy.reason").unwrap();
        assert!(
            reason.contains("output `out` cannot be delivered"),
            "{reason}"
        );
        assert!(reason.to_lowercase().contains("too large"), "{reason}");
        let dropped = header(d, "eddy.payload.dropped").expect("stripped");
        assert!(dropped.contains("120000 bytes of payload"), "{dropped}");
        assert!(d.payload().is_none_or(|p| p.is_empty()));
    }
    let whole: Vec<_> = events
        .iter()
        .filter(|d| header(d, "eddy.payload.dropped").is_none())
        .collect();
    assert_eq!(whole.len(), 1, "the small event's dead letter is whole");
    assert!(whole[0].payload().unwrap().windows(4).any(|w| w == b"MARK"));
    let stripped = events
        .iter()
        .find(|d| header(d, "eddy.payload.dropped").is_some())
        .expect("the big event's dead letter");
    assert_eq!(
        header(stripped, "eddy.reason").as_deref(),
        Some("marked: over the size")
    );
    assert!(header(stripped, "eddy.source.offset").is_some());
}

/// Produces small events to the input topic, about 200 a second, until `stop`; counts in
/// the returned counter those the broker acknowledged. One producer throughout: a new one per
/// chunk would ask any broker, a slowed one too, for metadata.
fn produce_steadily(
    bootstrap: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (
    std::thread::JoinHandle<()>,
    std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
    use std::sync::Arc;
    use std::sync::atomic::AtomicU64;
    struct Acked(Arc<AtomicU64>);
    impl rdkafka::ClientContext for Acked {}
    impl ProducerContext for Acked {
        type DeliveryOpaque = ();
        fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
            if result.is_ok() {
                self.0.fetch_add(1, Relaxed);
            }
        }
    }
    let acked = Arc::new(AtomicU64::new(0));
    let context = Acked(acked.clone());
    let thread = std::thread::spawn(move || {
        let producer: BaseProducer<Acked> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("linger.ms", "5")
            .create_with_context(context)
            .unwrap();
        for n in 0u64.. {
            if stop.load(Relaxed) {
                break;
            }
            let key = format!("u{}", n % 50);
            let payload = format!(r#"{{"user_id":"{key}","event_type":"click"}}"#);
            let _ = producer.send(BaseRecord::to(TOPIC).key(&key).payload(&payload));
            producer.poll(std::time::Duration::ZERO);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let _ = producer.flush(std::time::Duration::from_secs(30));
    });
    (thread, acked)
}

/// One runtime thread, so that anything blocking it stalls every plugin: the slow plugin's
/// group is coordinated by a broker that answers 8 s late, and a second member joins it.
/// Through that whole rebalance (until the slow plugin has partitions again), the fast
/// plugin, whose group and partitions are on the other broker, keeps handling events.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_slow_broker_in_one_plugins_rebalance_does_not_stall_the_others() {
    slow_rebalance_beside_a_fast_plugin(false).await;
}

/// The same with `[state] shared_group`, where a new assignment also asks the slow broker for
/// the group's committed offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_slow_broker_in_a_shared_groups_rebalance_does_not_stall_the_others() {
    slow_rebalance_beside_a_fast_plugin(true).await;
}

async fn slow_rebalance_beside_a_fast_plugin(shared_group: bool) {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    use std::time::{Duration, Instant};
    const SLOW: Duration = Duration::from_secs(8);
    init_logs();
    let broker = eddy::kafka::EmbeddedBroker::start_with_brokers(2).unwrap();
    broker.create_topic(TOPIC, PARTITIONS).unwrap();
    for p in 0..PARTITIONS {
        broker.set_partition_leader(TOPIC, p, 1).unwrap();
    }
    broker.set_group_coordinator("eddy-fast", 1).unwrap();
    broker.set_group_coordinator("eddy-slow", 2).unwrap();
    if shared_group {
        // Partition-scoped state's changelogs (the mock broker cannot create topics on
        // request), on the broker that answers at once.
        for changelog in ["eddy-fast-changelog", "eddy-slow-changelog"] {
            broker.create_topic(changelog, PARTITIONS).unwrap();
            for p in 0..PARTITIONS {
                broker.set_partition_leader(changelog, p, 1).unwrap();
            }
        }
    }
    let bootstrap = broker.bootstrap_servers().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let (producing, acked) = produce_steadily(bootstrap.clone(), stop.clone());
    let entry = |name: &str| {
        format!(
            "[[plugin]]\nname = \"{name}\"\npath = \"{}\"\n[plugin.config]\nmode = \"panic\"\nmarker = \"NEVER\"\n",
            wasm("eddy_fixture_misbehave")
        )
    };
    let state = if shared_group {
        "[state]\nshared_group = true\n"
    } else {
        ""
    };
    // Heartbeats answered 8 s late must not time the members out, and the rebalance must
    // wait for the host's member, which rejoins once the commit of its revoked partitions
    // is answered, 8 s late (the broker waits the session less a second for every member).
    let text = config_text(
        &bootstrap,
        PARTITIONS,
        &format!("{state}{}{}", entry("fast"), entry("slow")),
    )
    .replace(
        "\"session.timeout.ms\" = \"6000\"",
        "\"session.timeout.ms\" = \"30000\"",
    )
    // Each plugin fetches for itself. With the shared fetch (a consumer outside any group,
    // reading for both plugins) the fast plugin went ~8.9 s without an event one run in
    // three here while acknowledged events waited, every runtime thread idle: the fetch
    // itself waited on the slowed broker. That is not what this test is about (see Known
    // limits in the README).
    .replace("[kafka]\n", "[kafka]\nshared_fetch_mib = 0\n");
    let host = Host::start(config(&text)).await.expect("host starts");
    let (fast, slow) = (host.metrics().plugin("fast"), host.metrics().plugin("slow"));
    {
        let (fast, slow) = (fast.clone(), slow.clone());
        wait_async(
            Duration::from_secs(60),
            "both plugins consuming, the slow one holding its partitions",
            move || {
                fast.events_handled() > 100
                    && slow.events_handled() > 100
                    && slow.assigned_partitions.load(Relaxed) == PARTITIONS as i64
            },
        )
        .await;
    }
    // The second member finds the group's coordinator while it still answers at once, so
    // its join reaches it at once; the host's member hears of the rebalance with its next
    // heartbeat, answered 8 s late (after up to one more round trip already under way).
    let joiner = group_consumer(&bootstrap, "eddy-slow", 30_000);
    {
        use rdkafka::consumer::Consumer;
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition(TOPIC, 0);
        // The list must be gone before the consumer (librdkafka 2.12 hangs on drop otherwise).
        drop(
            joiner
                .committed_offsets(tpl, Duration::from_secs(10))
                .unwrap(),
        );
    }
    broker.set_broker_round_trip_time(2, SLOW).unwrap();
    let member = {
        let stop = stop.clone();
        std::thread::spawn(move || other_member(joiner, |_| stop.load(Relaxed)))
    };
    // From the slowdown until the slow plugin holds partitions again after losing them: the
    // longest the fast plugin went without handling an event while events it had not
    // handled were in the topic (it gets 200 a second; the producer, which also talks to
    // the slowed broker, may itself stall now and then), the events it handled during the
    // rebalance, and how long that rebalance took. Measured without panicking, so that the
    // host is stopped cleanly either way.
    let measured = {
        let (fast, slow) = (fast.clone(), slow.clone());
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let (mut last, mut changed) = (fast.events_handled(), started);
            let mut longest = Duration::ZERO;
            let mut revoked: Option<(Instant, u64)> = None;
            while started.elapsed() < SLOW * 10 {
                std::thread::sleep(Duration::from_millis(10));
                let (n, now) = (fast.events_handled(), Instant::now());
                let waiting = acked.load(Relaxed) > n;
                longest = longest.max(now - changed);
                if n != last || !waiting {
                    (last, changed) = (n, now);
                }
                match (revoked, slow.assigned_partitions.load(Relaxed)) {
                    (None, 0) => revoked = Some((now, n)),
                    (Some((at, before)), held) if held > 0 => {
                        return Some((longest, n - before, now - at));
                    }
                    _ => {}
                }
            }
            None
        })
        .await
        .unwrap()
    };
    broker
        .set_broker_round_trip_time(2, Duration::ZERO)
        .unwrap();
    stop.store(true, Relaxed);
    producing.join().unwrap();
    host.stop().await.expect("clean stop");
    member.join().unwrap();
    let (longest, handled, rebalance) = measured.unwrap_or_else(|| {
        panic!(
            "the slow plugin's group did not rebalance within {:?}",
            SLOW * 10
        )
    });
    eprintln!(
        "shared_group = {shared_group}: the slow plugin's rebalance took {rebalance:?}; the fast plugin handled {handled} events meanwhile and never waited more than {longest:?} for one"
    );
    assert!(
        longest < SLOW / 2,
        "the fast plugin went {longest:?} without an event while the slow plugin's group rebalanced against a broker answering {SLOW:?} late"
    );
}
