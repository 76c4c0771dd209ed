//! Cost of durable state: `make bench-state` (or `cargo bench -p eddy --bench state` after
//! `make plugins`).
//!
//! The analytics plugin handles the same pre-produced events twice, in the same run: once
//! with state in memory (`[state] durable = false`), once with durable state (one redb
//! transaction with the batch's state changes and offsets, fsync'd, per batch). Each run has
//! its own consumer group, so both read everything from the start. Timing starts at the
//! first handled event, so the group join is not counted.

mod common;

use eddy::Host;
use eddy::generator::{GeneratorOptions, ProduceOptions};
use eddy::kafka::EmbeddedBroker;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant};

/// librdkafka's mock cluster keeps at most 5 MiB per partition (older events are dropped),
/// so the events are spread over enough partitions to stay under that.
const EVENTS: u64 = 150_000;
const PARTITIONS: i32 = 24;

struct Run {
    elapsed: Duration,
    batches: u64,
    mean_commit: Duration,
}

fn run(
    runtime: &tokio::runtime::Runtime,
    bootstrap: &str,
    name: &str,
    durable: bool,
) -> anyhow::Result<Run> {
    let work = tempfile::tempdir()?;
    let config_path = work.path().join("plugins.toml");
    std::fs::write(
        &config_path,
        format!(
            "{kafka}\n[http]\naddress = \"127.0.0.1:0\"\n[reload]\nwatch = false\n[state]\ndurable = {durable}\n\n\
             [[plugin]]\nname = \"{name}\"\npath = \"{wasm}\"\ntick_interval_ms = 0\n\
             [plugin.outputs]\nsnapshots = \"discard\"\n[plugin.config]\nsnapshot_every = 1000000000\n",
            kafka = common::kafka_section(bootstrap),
            wasm = common::plugins_dir().join("eddy_analytics.wasm").display(),
        ),
    )?;
    let host = runtime.block_on(Host::start(eddy::config::Config::load(&config_path)?))?;
    let m = host.metrics().plugin(name);
    let waiting = Instant::now();
    while m.events_handled() == 0 {
        std::thread::sleep(Duration::from_millis(1));
        anyhow::ensure!(
            waiting.elapsed() < Duration::from_secs(60),
            "{name}: no event handled after 60 s"
        );
    }
    let (started, batches_before, events_before) =
        (Instant::now(), m.batches(), m.events_handled());
    let mut report = Instant::now();
    while m.events_handled() < EVENTS {
        std::thread::sleep(Duration::from_millis(1));
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300),
            "{name}: stuck at {} events",
            m.events_handled()
        );
        if report.elapsed() > Duration::from_secs(5) {
            eprintln!("  {name}: {} events", m.events_handled());
            report = Instant::now();
        }
    }
    let elapsed = started.elapsed();
    let batches = m.batches() - batches_before;
    anyhow::ensure!(
        m.events_handled() == EVENTS,
        "{} events handled",
        m.events_handled()
    );
    runtime.block_on(host.stop())?;
    // Scale to all events (the first batch ran before the clock started).
    let scale = EVENTS as f64 / (EVENTS - events_before) as f64;
    Ok(Run {
        elapsed: elapsed.mul_f64(scale),
        batches,
        mean_commit: m.mean_commit(),
    })
}

fn main() -> anyhow::Result<()> {
    common::init_logs();
    let runtime = tokio::runtime::Runtime::new()?;
    let broker = EmbeddedBroker::start()?;
    broker.create_topic("user-activities", PARTITIONS)?;
    let client = eddy::kafka::client_config(
        &eddy::config::KafkaConfig {
            brokers: broker.bootstrap_servers().into(),
            topic: "user-activities".into(),
            partitions: PARTITIONS,
            settings: Default::default(),
            connect_timeout_ms: 30_000,
            shared_fetch_mib: 64,
        },
        broker.bootstrap_servers(),
    );
    let opts = ProduceOptions {
        topic: "user-activities".into(),
        events: Some(EVENTS),
        rate: 0,
        generator: GeneratorOptions {
            seed: 3,
            fraud_every: 0,
            start_ms: 1_705_314_600_000,
            spacing_ms: 10,
            ..Default::default()
        },
    };
    eddy::generator::produce_blocking(&client, &opts, &AtomicBool::new(false), &AtomicU64::new(0))?;
    eprintln!("produced {EVENTS} events");

    // Alternate, twice each, so drift on a shared machine hits both alike.
    let mut memory = Vec::new();
    let mut durable = Vec::new();
    for round in 0..2 {
        memory.push(run(
            &runtime,
            broker.bootstrap_servers(),
            &format!("memory{round}"),
            false,
        )?);
        durable.push(run(
            &runtime,
            broker.bootstrap_servers(),
            &format!("durable{round}"),
            true,
        )?);
    }
    let best = |runs: &[Run]| {
        runs.iter()
            .min_by_key(|r| r.elapsed)
            .map(|r| (r.elapsed, r.batches))
            .unwrap()
    };
    let ((mem_t, mem_b), (dur_t, dur_b)) = (best(&memory), best(&durable));
    let rate = |t: Duration| EVENTS as f64 / t.as_secs_f64();
    println!("durable state, analytics over {EVENTS} pre-produced events (best of 2 each):");
    println!(
        "  state in memory: {:>9.0} events/s ({mem_b} batches)",
        rate(mem_t)
    );
    println!(
        "  durable state:   {:>9.0} events/s ({dur_b} batches)",
        rate(dur_t)
    );
    println!(
        "  durable / memory throughput: {:.2}x",
        rate(dur_t) / rate(mem_t)
    );
    let mean =
        |runs: &[Run]| runs.iter().map(|r| r.mean_commit).sum::<Duration>() / runs.len() as u32;
    println!(
        "  commit per batch (state changes + offsets): {:.3} ms durable, {:.3} ms in memory",
        common::ms(mean(&durable)),
        common::ms(mean(&memory))
    );
    Ok(())
}
