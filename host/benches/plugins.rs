//! What each shipped plugin's logic costs in the sandbox against the same crate compiled
//! natively, without Kafka: `cargo bench -p eddy --bench plugins` (after `make plugins`).
//!
//! The same seeded events (`EDDY_BENCH_EVENTS`, 100,000 by default) in 500-event batches go
//! through each plugin twice: in a [`Sandbox`] (CPU deadline and memory cap on, state in
//! memory and committed after every batch, outputs dropped) and through the SDK's native
//! harness (state in memory, outputs dropped). `EDDY_BENCH_PLUGIN=<name>` runs one plugin. This isolates the plugin's own cost, which the
//! end-to-end benchmark mixes with consuming from the broker.

mod common;

use eddy::event::Event;
use eddy::generator::{Generator, GeneratorOptions};
use eddy_sdk::Plugin;
use eddy_sdk::testing::Harness;
use std::time::Instant;

const BATCH: usize = 500;

fn events() -> Vec<Event> {
    let total = std::env::var("EDDY_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    Generator::new(GeneratorOptions {
        seed: 42,
        fraud_every: 500,
        start_ms: 1_705_314_600_000,
        spacing_ms: 5,
        ..Default::default()
    })
    .take(total)
    .enumerate()
    .map(|(i, g)| Event {
        topic: "user-activities".into(),
        partition: 0,
        offset: i as i64,
        timestamp_ms: Some(1_705_314_600_000 + 5 * i as i64),
        key: Some(g.key.into_bytes().into()),
        headers: Vec::new(),
        payload: g.payload.into(),
    })
    .collect()
}

/// Nanoseconds per event in the sandbox.
fn sandboxed(engine: &wasmtime::Engine, toml: &str, events: &[Event]) -> anyhow::Result<f64> {
    let config = eddy::config::Config::parse(toml, std::path::Path::new("plugins.toml"))?;
    let plugin = &config.plugins[0];
    let mut sandbox = common::sandbox(engine, plugin)?;
    let started = Instant::now();
    for batch in events.chunks(BATCH) {
        sandbox
            .call_batch(batch)
            .map_err(|t| anyhow::anyhow!("{t}"))?;
        drop(sandbox.take_outputs());
        let last = batch.last().unwrap();
        let offsets = [((last.topic.to_string(), 0), last.offset + 1)].into();
        sandbox.commit_batch(&offsets, eddy::state::Durability::Immediate)?;
    }
    Ok(started.elapsed().as_secs_f64() * 1e9 / events.len() as f64)
}

/// [`native`] for one plugin type.
type NativeRun = fn(&str, &[Event]) -> anyhow::Result<f64>;

/// Nanoseconds per event natively. Each batch's events are made from the host's inside the
/// timed loop, as a native consumer makes them from Kafka's messages (and because an SDK
/// event keeps its parsed payload, so reusing them would skip the parsing).
fn native<P: Plugin>(config: &str, events: &[Event]) -> anyhow::Result<f64> {
    let mut harness = Harness::<P>::new(config).map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    for batch in events.chunks(BATCH) {
        let batch: Vec<eddy_sdk::Event> = batch.iter().map(common::sdk_event).collect();
        harness.run(&batch);
        harness.clear_outputs();
    }
    Ok(started.elapsed().as_secs_f64() * 1e9 / events.len() as f64)
}

fn main() -> anyhow::Result<()> {
    let events = events();
    let engine = eddy::wasm::engine()?;
    let dir = common::plugins_dir();
    let plugins: [(&str, &str, &str, NativeRun); 4] = [
        (
            "logger",
            "log",
            common::LOGGER,
            native::<eddy_logger::Logger>,
        ),
        (
            "analytics",
            "snapshots",
            common::ANALYTICS,
            native::<eddy_analytics::Analytics>,
        ),
        (
            "alert",
            "alerts",
            common::ALERT,
            native::<eddy_alert::Alerter>,
        ),
        (
            "fraud",
            "alerts",
            common::FRAUD,
            native::<eddy_fraud::Fraud>,
        ),
    ];
    println!(
        "per plugin, {} events in batches of {BATCH}, per event (best of 3):",
        events.len()
    );
    println!("  plugin        sandboxed      native    ratio");
    // `EDDY_BENCH_PLUGIN=fraud` measures that one alone (e.g. under `perf record`).
    let only = std::env::var("EDDY_BENCH_PLUGIN").ok();
    for (name, output, config, run_native) in plugins {
        if only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let toml = common::plugin_toml(name, &dir, output, config, None)?;
        let toml = format!("[kafka]\nbrokers = \"embedded\"\n{toml}");
        let (mut wasm, mut nat) = (f64::MAX, f64::MAX);
        for _ in 0..3 {
            wasm = wasm.min(sandboxed(&engine, &toml, &events)?);
            nat = nat.min(run_native(config, &events)?);
        }
        println!(
            "  {name:<10} {:>9.2} µs {:>9.2} µs   {:>5.2}x",
            wasm / 1000.0,
            nat / 1000.0,
            wasm / nat
        );
    }
    Ok(())
}
