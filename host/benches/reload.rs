//! Hot-swap benchmark: `make bench-reload` (or `cargo bench -p eddy --bench reload` after
//! `make plugins`).
//!
//! Under a steady stream of events, with two plugins running (analytics, which is swapped,
//! and logger, which is not), it measures:
//! - reload latency: new `.wasm` written → the first batch handled by the new version
//!   (and, when the host compiles it, → running on optimized code);
//! - the longest stall of the other plugin (no progress) during swaps, against its longest
//!   stall over an equally long stretch without swaps, in the same run.

mod common;

use common::{ms, percentile, plugins_dir};
use eddy::Host;
use eddy::generator::{GeneratorOptions, ProduceOptions};
use eddy::kafka::EmbeddedBroker;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const SWAPS: usize = 10;
const RATE: u32 = 2000;

/// A new version of the same plugin: the same code with a custom section appended.
fn new_version(wasm: &[u8], n: u8) -> Vec<u8> {
    let name = b"eddy-bench";
    let mut out = wasm.to_vec();
    out.push(0);
    out.push((1 + name.len() + 1) as u8);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.push(n);
    out
}

/// Samples `progress` every millisecond for `window` and returns the longest time it did
/// not move.
fn longest_stall(progress: impl Fn() -> u64, window: Duration) -> Duration {
    let start = Instant::now();
    let (mut last, mut since, mut worst) = (progress(), Instant::now(), Duration::ZERO);
    while start.elapsed() < window {
        std::thread::sleep(Duration::from_millis(1));
        let now = progress();
        if now != last {
            worst = worst.max(since.elapsed());
            last = now;
            since = Instant::now();
        }
    }
    worst.max(since.elapsed())
}

fn main() -> anyhow::Result<()> {
    let dir = plugins_dir();
    anyhow::ensure!(
        dir.join("eddy_analytics.wasm").is_file(),
        "build the plugins first: make plugins"
    );
    let runtime = tokio::runtime::Runtime::new()?;
    let broker = EmbeddedBroker::start()?;
    broker.create_topic("user-activities", 6)?;
    let work = tempfile::tempdir()?;
    let analytics = work.path().join("analytics.wasm");
    let original = std::fs::read(dir.join("eddy_analytics.wasm"))?;
    std::fs::write(&analytics, &original)?;
    let config_path = work.path().join("plugins.toml");
    std::fs::write(
        &config_path,
        format!(
            r#"
{kafka}
[http]
address = "127.0.0.1:0"

[[plugin]]
name = "analytics"
path = "analytics.wasm"
[plugin.outputs]
snapshots = "discard"

[[plugin]]
name = "logger"
path = "{logger}"
[plugin.outputs]
log = "discard"
"#,
            kafka = common::kafka_section(broker.bootstrap_servers()),
            logger = dir.join("eddy_logger.wasm").display(),
        ),
    )?;

    // Steady traffic for the whole run.
    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (stop, client) = (
            stop.clone(),
            eddy::kafka::client_config(
                &eddy::config::KafkaConfig {
                    brokers: broker.bootstrap_servers().into(),
                    topic: "user-activities".into(),
                    partitions: 6,
                    settings: Default::default(),
                    connect_timeout_ms: 30_000,
                    shared_fetch_mib: 64,
                },
                broker.bootstrap_servers(),
            ),
        );
        std::thread::spawn(move || {
            let opts = ProduceOptions {
                topic: "user-activities".into(),
                events: None,
                rate: RATE,
                generator: GeneratorOptions {
                    seed: 1,
                    fraud_every: 0,
                    start_ms: eddy::clock::now_ms(),
                    spacing_ms: 1,
                    ..Default::default()
                },
            };
            eddy::generator::produce_blocking(&client, &opts, &stop, &AtomicU64::new(0))
        })
    };

    let host = runtime.block_on(Host::start(eddy::config::Config::load(&config_path)?))?;
    let a = host.metrics().plugin("analytics");
    let l = host.metrics().plugin("logger");
    // Let both groups join and catch up.
    while a.events_handled() < u64::from(RATE) || l.events_handled() < u64::from(RATE) {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));

    let cache = eddy::config::Config::load(&config_path)?
        .state
        .compiled_dir();
    let engine = eddy::wasm::engine()?;
    let mut latencies = Vec::new();
    let mut precompiled_latencies = Vec::new();
    let mut stalls = Vec::new();
    let mut baseline = Vec::new();
    let mut compiles = Vec::new();
    let mut optimized = Vec::new();
    for n in 1..=2 * SWAPS as u8 {
        // Every other new version is precompiled before its file is written, as
        // `eddy compile` would; the others are compiled by the host on reload.
        let precompile = n % 2 == 0;
        // Baseline: the logger's longest stall over 1.5 s with no swap.
        let logger = l.clone();
        baseline.push(longest_stall(
            move || logger.events_handled(),
            Duration::from_millis(1500),
        ));

        // The same window with a swap of the other plugin in it.
        let logger = l.clone();
        let watcher = std::thread::spawn(move || {
            longest_stall(move || logger.events_handled(), Duration::from_millis(1500))
        });
        let bytes = new_version(&original, n);
        let digest = eddy::wasm::digest(&bytes);
        let tmp = analytics.with_extension("tmp");
        std::fs::write(&tmp, &bytes)?;
        if precompile {
            eddy::wasm::Program::precompile(&engine, &tmp, &cache)?;
        }
        let written = Instant::now();
        std::fs::rename(&tmp, &analytics)?;
        while a.version().digest != digest {
            std::thread::sleep(Duration::from_micros(200));
            anyhow::ensure!(
                written.elapsed() < Duration::from_secs(30),
                "swap {n} did not happen"
            );
        }
        let handled = a.events_handled();
        while a.events_handled() == handled {
            std::thread::sleep(Duration::from_micros(200));
        }
        if precompile {
            anyhow::ensure!(a.version().precompiled, "swap {n} compiled after all");
            precompiled_latencies.push(written.elapsed());
        } else {
            latencies.push(written.elapsed());
            anyhow::ensure!(a.version().baseline, "swap {n} waited for optimized code");
            compiles.push(Duration::from_secs_f64(a.version().compile_seconds));
            while a.version().baseline {
                std::thread::sleep(Duration::from_micros(200));
                anyhow::ensure!(
                    written.elapsed() < Duration::from_secs(30),
                    "swap {n}: no optimized code"
                );
            }
            optimized.push(written.elapsed());
        }
        stalls.push(watcher.join().expect("watcher"));
    }
    stop.store(true, Ordering::Relaxed);
    producer.join().expect("producer")?;
    runtime.block_on(host.stop())?;

    latencies.sort();
    precompiled_latencies.sort();
    stalls.sort();
    baseline.sort();
    println!(
        "hot swap, {} swaps of analytics under {RATE} events/s (default debounce, files renamed into place):",
        2 * SWAPS
    );
    println!(
        "  precompiled (eddy compile), file written -> first batch on the new version: median {:.0} ms, p90 {:.0} ms, max {:.0} ms",
        ms(percentile(&precompiled_latencies, 0.5)),
        ms(percentile(&precompiled_latencies, 0.9)),
        ms(*precompiled_latencies.last().unwrap())
    );
    println!(
        "  compiled on reload, file written -> first batch on the new version: median {:.0} ms, p90 {:.0} ms, max {:.0} ms",
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.9)),
        ms(*latencies.last().unwrap())
    );
    compiles.sort();
    optimized.sort();
    println!(
        "  of which compiling the new version with the baseline compiler: median {:.0} ms",
        ms(percentile(&compiles, 0.5))
    );
    println!(
        "  compiled on reload, file written -> running on optimized code: median {:.0} ms, p90 {:.0} ms, max {:.0} ms",
        ms(percentile(&optimized, 0.5)),
        ms(percentile(&optimized, 0.9)),
        ms(*optimized.last().unwrap())
    );
    let (worst_stall, worst_base) = (*stalls.last().unwrap(), *baseline.last().unwrap());
    println!(
        "  logger's longest stall: with swaps {:.0} ms (median {:.0} ms), baseline without swaps {:.0} ms (median {:.0} ms): {:.2}x",
        ms(worst_stall),
        ms(percentile(&stalls, 0.5)),
        ms(worst_base),
        ms(percentile(&baseline, 0.5)),
        ms(worst_stall) / ms(worst_base).max(1.0)
    );
    println!(
        "  analytics reloads: {} ok, {} failed",
        a.reloads(eddy::metrics::ReloadOutcome::Ok),
        a.reloads(eddy::metrics::ReloadOutcome::Failed)
    );
    Ok(())
}
