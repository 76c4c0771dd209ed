//! Dispatch overhead: `cargo bench -p eddy --bench dispatch` (after `make plugins`).
//!
//! The no-op plugin (`plugins/fixtures/noop`: answers `ok`, looks at nothing) run in the
//! sandbox, against the same code run natively through the SDK's harness, in the same run,
//! per event, at batch sizes 1, 64 and 512. The events are realistic (~450-byte generated
//! activity events with a key), so the sandbox's cost includes copying them into the
//! plugin's memory: what every plugin pays before it does any work. The CPU deadline and
//! memory cap are on, as in production.
//!
//! Then the cost of two safety knobs on real work, the analytics plugin on 512-event
//! batches: the CPU deadline (an engine with the epoch checks against one without) and the
//! memory cap (the default cap against one no guest reaches). The third knob, durable state,
//! is `make bench-state`.
//!
//! For profiling: `EDDY_BENCH_SIZES=64` measures only those batch sizes, and
//! `EDDY_BENCH_DISPATCH_ONLY=1` skips the safety knobs.

mod common;

use eddy::event::Event;
use eddy::generator::{Generator, GeneratorOptions};
use eddy_sdk::testing::Harness;
use std::time::{Duration, Instant};

/// Events per measurement (per batch size and side).
const EVENTS: usize = 1_000_000;
const SIZES: [usize; 3] = [1, 64, 512];

fn main() -> anyhow::Result<()> {
    let generated: Vec<_> = Generator::new(GeneratorOptions {
        seed: 7,
        fraud_every: 0,
        start_ms: 1_705_314_600_000,
        spacing_ms: 10,
        ..Default::default()
    })
    .take(512)
    .collect();
    let events: Vec<Event> = generated
        .iter()
        .enumerate()
        .map(|(i, g)| Event {
            topic: "user-activities".into(),
            partition: 0,
            offset: i as i64,
            timestamp_ms: Some(1_705_314_600_000 + i as i64),
            key: Some(g.key.clone().into_bytes().into()),
            headers: Vec::new(),
            payload: g.payload.clone().into(),
        })
        .collect();
    let native_events: Vec<eddy_sdk::Event> = events.iter().map(common::sdk_event).collect();

    let engine = eddy::wasm::engine()?;
    let text = format!(
        "[kafka]\nbrokers = \"embedded\"\n[[plugin]]\nname = \"noop\"\npath = \"{}\"\n",
        common::plugins_dir()
            .join("eddy_fixture_noop.wasm")
            .display()
    );
    let config = eddy::config::Config::parse(&text, std::path::Path::new("plugins.toml"))?;
    let plugin = &config.plugins[0];
    let mut sandbox = common::sandbox(&engine, plugin)?;
    let mut harness = Harness::<eddy_fixture_noop::Noop>::new("{}").map_err(anyhow::Error::msg)?;

    println!("dispatch, no-op plugin, per event ({EVENTS} events per figure):");
    println!("  batch   sandboxed    native   sandboxed - native");
    let sizes: Vec<usize> = match std::env::var("EDDY_BENCH_SIZES") {
        Ok(list) => list
            .split(',')
            .map(|s| s.trim().parse())
            .collect::<Result<_, _>>()?,
        Err(_) => SIZES.to_vec(),
    };
    for size in sizes {
        let rounds = EVENTS / size;
        let per_event = |d: Duration| d.as_secs_f64() * 1e9 / (rounds * size) as f64;
        // Warm up both, then measure each twice and keep the faster.
        let mut wasm = f64::MAX;
        let mut native = f64::MAX;
        for _ in 0..3 {
            let started = Instant::now();
            for _ in 0..rounds {
                let verdicts = sandbox
                    .call_batch(&events[..size])
                    .map_err(|t| anyhow::anyhow!("{t}"))?;
                assert_eq!(verdicts.len(), size);
            }
            wasm = wasm.min(per_event(started.elapsed()));
            let started = Instant::now();
            for _ in 0..rounds {
                let verdicts = harness.run(&native_events[..size]);
                assert_eq!(verdicts.len(), size);
            }
            native = native.min(per_event(started.elapsed()));
        }
        println!(
            "  {size:>5}   {:>7.3} µs  {:>6.3} µs   {:>7.3} µs",
            wasm / 1000.0,
            native / 1000.0,
            (wasm - native) / 1000.0
        );
    }

    if std::env::var_os("EDDY_BENCH_DISPATCH_ONLY").is_some() {
        return Ok(());
    }
    // What the CPU deadline costs on real work: analytics on 512-event batches, compiled
    // with and without the epoch checks.
    let text = format!(
        "[kafka]\nbrokers = \"embedded\"\n[[plugin]]\nname = \"analytics\"\npath = \"{}\"\n\
         [plugin.outputs]\nsnapshots = \"discard\"\n[plugin.config]\nsnapshot_every = 1000000000\n",
        common::plugins_dir().join("eddy_analytics.wasm").display()
    );
    let config = eddy::config::Config::parse(&text, std::path::Path::new("plugins.toml"))?;
    let analytics = &config.plugins[0];
    // The memory cap is checked when the guest grows its memory, not per access: lifting it
    // (a cap no guest reaches) shows what the check costs.
    let mut uncapped = analytics.clone();
    uncapped.limits.memory_mib = 1 << 20;
    let with_deadline = eddy::wasm::engine()?;
    let runs = [
        (&with_deadline, analytics),
        (&eddy::wasm::engine_without_deadline()?, analytics),
        (&with_deadline, &uncapped),
    ];
    let mut per_event = Vec::new();
    for (engine, plugin) in runs {
        let mut sandbox = common::sandbox(engine, plugin)?;
        let rounds = 100_000 / 512;
        let mut best = f64::MAX;
        for _ in 0..3 {
            let started = Instant::now();
            for _ in 0..rounds {
                sandbox
                    .call_batch(&events[..512])
                    .map_err(|t| anyhow::anyhow!("{t}"))?;
                sandbox.abort_batch();
            }
            best = best.min(started.elapsed().as_secs_f64() * 1e9 / (rounds * 512) as f64);
        }
        per_event.push(best);
    }
    println!("safety knobs, analytics, batch 512, per event (best of 3):");
    println!(
        "  CPU deadline (epoch checks): with {:.3} µs, without {:.3} µs: {:+.0}%",
        per_event[0] / 1000.0,
        per_event[1] / 1000.0,
        (per_event[0] / per_event[1] - 1.0) * 100.0
    );
    println!(
        "  memory cap ({} MiB):          with {:.3} µs, without {:.3} µs: {:+.0}%",
        analytics.limits.memory_mib,
        per_event[0] / 1000.0,
        per_event[2] / 1000.0,
        (per_event[0] / per_event[2] - 1.0) * 100.0
    );
    Ok(())
}
