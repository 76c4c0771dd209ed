//! End-to-end throughput against a native baseline, in one run: `make bench-throughput` (or
//! `cargo bench -p eddy --bench throughput` after `make plugins`).
//!
//! A fixed, seeded set of events (`EDDY_BENCH_EVENTS`, 1,000,000 by default) is produced to
//! the embedded broker once. Then, on the same broker and events:
//! - **native**: the four shipped plugins' logic compiled natively (the very crates that
//!   build the `.wasm` files, run through the SDK's native harness with in-memory state),
//!   each in its own consumer group and thread, in batches like the host's (500 events or
//!   5 ms, the host's defaults);
//! - **eddy**: the host with the four `.wasm` plugins, each in its own group, with the CPU
//!   deadline, memory cap and durable state on (the defaults).
//!
//! `EDDY_BENCH_STATE=memory` runs the host with state in memory instead, to see what
//! durability costs; `EDDY_BENCH_COMMIT_INTERVAL_MS` sets `[state] commit_interval_ms`;
//! `EDDY_BENCH_PLUGINS_DIR` runs other builds of the plugins.
//!
//! Also run once: the ceiling, four consumers that do nothing, natively, on the same broker
//! and events, so the figures show how far below the broker's limit they are.
//!
//! Outputs are discarded in both (delivery to Kafka is the same code either way). Each run
//! is timed from the moment every plugin has handled its first event (so consumer-group
//! joins are not counted) until every plugin has handled every event; the events handled
//! before that moment are subtracted. The two are run three times, alternating, and the
//! best of each is compared.

mod common;

use eddy_sdk::testing::Harness;
use eddy_sdk::{Event, Plugin};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

const TOPIC: &str = "user-activities";
const MAX_BATCH: usize = 500;
const LINGER: Duration = Duration::from_millis(5);

/// How many events each plugin handled: what the clock watches.
type Counters = Vec<Arc<AtomicU64>>;

/// Waits until every counter is past zero, then until every one reached `total`; returns the
/// events per second (per plugin) over that second stretch.
fn time_until_done(counters: &Counters, total: u64, what: &str) -> anyhow::Result<f64> {
    let waiting = Instant::now();
    while counters.iter().any(|c| c.load(Relaxed) == 0) {
        std::thread::sleep(Duration::from_millis(1));
        anyhow::ensure!(
            waiting.elapsed() < Duration::from_secs(120),
            "{what}: a plugin handled nothing in 120 s"
        );
    }
    let started = Instant::now();
    let before: u64 = counters.iter().map(|c| c.load(Relaxed)).sum();
    let mut report = Instant::now();
    while counters.iter().any(|c| c.load(Relaxed) < total) {
        std::thread::sleep(Duration::from_millis(2));
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(1800),
            "{what}: stuck"
        );
        if report.elapsed() > Duration::from_secs(10) {
            let counts: Vec<u64> = counters.iter().map(|c| c.load(Relaxed)).collect();
            eprintln!("  {what}: {counts:?}");
            report = Instant::now();
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let handled = total * counters.len() as u64 - before;
    Ok(handled as f64 / counters.len() as f64 / elapsed)
}

/// One plugin's native consumer: same group-per-plugin, batch size and linger as the host.
fn native_consumer<P: Plugin>(
    bootstrap: &str,
    group: &str,
    config: &str,
    handled: Arc<AtomicU64>,
    total: u64,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", "20")
        .create()?;
    consumer.subscribe(&[TOPIC])?;
    let config = config.to_string();
    Ok(std::thread::spawn(move || {
        // Made on its thread: the harness's in-memory state is not `Send`.
        let mut harness = Harness::<P>::new(&config).map_err(anyhow::Error::msg)?;
        while handled.load(Relaxed) < total {
            // The messages stay librdkafka's; the events borrow their bytes, as the SDK's
            // events borrow from the batch the host hands over.
            let mut batch = Vec::with_capacity(MAX_BATCH);
            let deadline = Instant::now() + LINGER;
            while batch.len() < MAX_BATCH {
                let left = deadline.saturating_duration_since(Instant::now());
                match consumer.poll(left) {
                    Some(Ok(m)) => batch.push(m),
                    Some(Err(e)) => anyhow::bail!("consume: {e}"),
                    None => break,
                }
            }
            if batch.is_empty() {
                continue;
            }
            let events: Vec<Event> = batch
                .iter()
                .map(|m| {
                    let mut e = Event::new(
                        m.topic(),
                        m.partition(),
                        m.offset(),
                        m.key(),
                        m.payload().unwrap_or_default(),
                    );
                    e.timestamp_ms = m.timestamp().to_millis();
                    e
                })
                .collect();
            let verdicts = harness.run(&events);
            assert_eq!(verdicts.len(), events.len());
            harness.clear_outputs();
            for m in &batch {
                consumer.store_offset(m.topic(), m.partition(), m.offset())?;
            }
            handled.fetch_add(batch.len() as u64, Relaxed);
        }
        Ok(())
    }))
}

fn run_native(bootstrap: &str, round: usize, total: u64) -> anyhow::Result<f64> {
    let counters: Counters = (0..4).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let g = |name: &str| format!("native-{name}-{round}");
    let threads = vec![
        native_consumer::<eddy_logger::Logger>(
            bootstrap,
            &g("logger"),
            common::LOGGER,
            counters[0].clone(),
            total,
        )?,
        native_consumer::<eddy_analytics::Analytics>(
            bootstrap,
            &g("analytics"),
            common::ANALYTICS,
            counters[1].clone(),
            total,
        )?,
        native_consumer::<eddy_alert::Alerter>(
            bootstrap,
            &g("alert"),
            common::ALERT,
            counters[2].clone(),
            total,
        )?,
        native_consumer::<eddy_fraud::Fraud>(
            bootstrap,
            &g("fraud"),
            common::FRAUD,
            counters[3].clone(),
            total,
        )?,
    ];
    let rate = time_until_done(&counters, total, "native")?;
    for t in threads {
        t.join().expect("native consumer thread")?;
    }
    Ok(rate)
}

/// The ceiling: four consumers that do nothing with the events (the no-op fixture, natively),
/// each in its own group, on the same broker and events. The plugins' rates must stay well
/// below it, or the benchmark measures the broker.
fn run_ceiling(bootstrap: &str, total: u64) -> anyhow::Result<f64> {
    let counters: Counters = (0..4).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let threads = counters
        .iter()
        .enumerate()
        .map(|(i, c)| {
            native_consumer::<eddy_fixture_noop::Noop>(
                bootstrap,
                &format!("ceiling-{i}"),
                "{}",
                c.clone(),
                total,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let rate = time_until_done(&counters, total, "ceiling")?;
    for t in threads {
        t.join().expect("ceiling consumer thread")?;
    }
    Ok(rate)
}

/// `changelog`: with partition-scoped state and its changelog (`[state] shared_group`, on
/// one host), in groups of their own (`round` + 100).
fn run_eddy(
    runtime: &tokio::runtime::Runtime,
    broker: &eddy::kafka::EmbeddedBroker,
    partitions: i32,
    round: usize,
    total: u64,
    changelog: bool,
) -> anyhow::Result<f64> {
    let bootstrap = broker.bootstrap_servers();
    let work = tempfile::tempdir()?;
    let round = if changelog { round + 100 } else { round };
    let plugins = common::shipped_plugins(round, false, false)?;
    if changelog {
        // The embedded broker cannot create topics on request.
        for name in ["logger", "analytics", "alert", "fraud"] {
            broker.create_topic(&format!("eddy-{name}-{round}-changelog"), partitions)?;
        }
    }
    let config_path = work.path().join("plugins.toml");
    std::fs::write(
        &config_path,
        format!(
            "{kafka}\n[http]\naddress = \"127.0.0.1:0\"\n[reload]\nwatch = false\n[state]\ndurable = {durable}\nshared_group = {changelog}\n{interval}\n{plugins}",
            durable = std::env::var("EDDY_BENCH_STATE").as_deref() != Ok("memory"),
            interval = std::env::var("EDDY_BENCH_COMMIT_INTERVAL_MS")
                .map(|ms| format!("commit_interval_ms = {ms}\n"))
                .unwrap_or_default(),
            kafka = common::kafka_section(bootstrap),
        ),
    )?;
    let host = common::start_host(runtime, &config_path)?;
    let counters: Counters = ["logger", "analytics", "alert", "fraud"]
        .iter()
        .map(|name| {
            let m = host.metrics().plugin(name);
            let counter = Arc::new(AtomicU64::new(0));
            let (c, stop) = (counter.clone(), Arc::new(AtomicBool::new(false)));
            // Mirror the plugin's handled count into the counter the clock watches.
            std::thread::spawn(move || {
                while !stop.load(Relaxed) {
                    c.store(m.events_handled(), Relaxed);
                    if m.events_handled() >= total {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            });
            counter
        })
        .collect();
    let rate = time_until_done(&counters, total, "eddy")?;
    runtime.block_on(host.stop())?;
    Ok(rate)
}

fn main() -> anyhow::Result<()> {
    common::init_logs();
    let total = common::events_to_run(1_000_000);
    let runtime = tokio::runtime::Runtime::new()?;
    let (broker, bootstrap, partitions) = common::seeded_broker(total)?;

    // `EDDY_BENCH_ONLY=eddy` (or `native`) runs one side alone, once, without the ceiling:
    // for profiling.
    let only = std::env::var("EDDY_BENCH_ONLY").ok();
    let ceiling = match only {
        Some(_) => f64::NAN,
        None => run_ceiling(&bootstrap, total)?,
    };
    eprintln!("  ceiling (four consumers that do nothing): {ceiling:.0} events/s");
    let (mut native, mut eddy, mut changelog) = (Vec::new(), Vec::new(), Vec::new());
    // Best of three, alternating: these machines are shared, and a round can run 20%
    // slower than the next for no reason of its own.
    let rounds = if only.is_some() { 1 } else { 3 };
    for round in 0..rounds {
        if only.as_deref() != Some("eddy") {
            native.push(run_native(&bootstrap, round, total)?);
            eprintln!("  native, round {round}: {:.0} events/s", native[round]);
        }
        if only.as_deref() != Some("native") {
            eddy.push(run_eddy(
                &runtime, &broker, partitions, round, total, false,
            )?);
            eprintln!("  eddy,   round {round}: {:.0} events/s", eddy[round]);
        }
        if only.is_none() {
            changelog.push(run_eddy(&runtime, &broker, partitions, round, total, true)?);
            eprintln!(
                "  eddy with changelog, round {round}: {:.0} events/s",
                changelog[round]
            );
        }
    }
    let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let (n, e) = (best(&native), best(&eddy));
    println!("end-to-end, {total} events, four plugins each in its own group:");
    println!("  ceiling (no-op)   {ceiling:>10.0} events/s per consumer");
    println!("  native baseline   {n:>10.0} events/s per plugin   (runs: {native:.0?})");
    println!("  eddy (sandboxed)  {e:>10.0} events/s per plugin   (runs: {eddy:.0?})");
    println!("  eddy / native     {:>10.2}x", e / n);
    if !changelog.is_empty() {
        let c = best(&changelog);
        println!(
            "  eddy, partition-scoped state with changelog ([state] shared_group, one host) {c:>10.0} events/s per plugin   (runs: {changelog:.0?})"
        );
        println!("  changelog on / off {:>10.2}x", c / e);
    }
    Ok(())
}
