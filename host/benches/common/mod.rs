//! Helpers shared by the benchmarks.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The plugins' `[plugin.config]`, as JSON, as in the shipped `plugins.toml`.
pub const LOGGER: &str = r#"{"sample_every":10}"#;
pub const ANALYTICS: &str = r#"{"snapshot_every":200,"top_n":3}"#;
pub const ALERT: &str = r#"{"rules":[{"name":"high-value-purchase","event_type":"purchase","min_amount":500.0,"severity":"high"},{"name":"quiz-completed","event_type":"quiz_submission"}]}"#;
pub const FRAUD: &str = r#"{"window_secs":60,"high_value":1000.0,"alert_score":70}"#;

/// One `[[plugin]]` table for the shipped plugin `name`, its output discarded, with `config`
/// (JSON) as its `[plugin.config]`.
pub fn plugin_toml(
    name: &str,
    dir: &Path,
    output: &str,
    config: &str,
    group: Option<&str>,
) -> anyhow::Result<String> {
    // The config as a TOML table (JSON objects are close enough to convert).
    let table: toml::Table = serde_json::from_str(config)?;
    let group = group
        .map(|g| format!("group = \"{g}\"\n"))
        .unwrap_or_default();
    Ok(format!(
        "[[plugin]]\nname = \"{name}\"\npath = \"{}\"\n{group}\
         [plugin.outputs]\n{output} = \"discard\"\n[plugin.config]\n{}\n",
        dir.join(format!("eddy_{name}.wasm")).display(),
        toml::to_string(&table)?.replace("[[rules]]", "[[plugin.config.rules]]"),
    ))
}

/// `plugin` in a sandbox on `engine`, with state in memory and no compile cache.
pub fn sandbox(
    engine: &wasmtime::Engine,
    plugin: &eddy::config::PluginConfig,
) -> anyhow::Result<eddy::wasm::Sandbox> {
    let state = eddy::state::PluginState::in_memory(plugin.limits.state_mib << 20);
    Ok(eddy::wasm::Sandbox::load(engine, plugin, state, None)?)
}

/// The SDK's view of a host event, as the SDK makes it inside the sandbox: for running the
/// same events natively.
pub fn sdk_event(e: &eddy::event::Event) -> eddy_sdk::Event<'_> {
    let mut n = eddy_sdk::Event::new(
        &e.topic,
        e.partition,
        e.offset,
        e.key.as_deref(),
        &e.payload,
    );
    n.timestamp_ms = e.timestamp_ms;
    n
}

/// Where `make plugins` left the `.wasm` files, or `EDDY_BENCH_PLUGINS_DIR` (to compare
/// two builds of the plugins, e.g. of two versions of the SDK).
pub fn plugins_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("EDDY_BENCH_PLUGINS_DIR") {
        return PathBuf::from(dir);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| root.join(d))
        .unwrap_or_else(|| root.join("target"));
    let dir = target.join("wasm32-wasip2").join("plugin");
    assert!(
        dir.join("eddy_analytics.wasm").is_file(),
        "build the plugins first: make plugins"
    );
    dir
}

/// `[kafka]` for a broker at `bootstrap`, with the settings the host uses for its own
/// embedded broker (see `Host::start`).
/// The `[kafka]` section of a benchmark host. `EDDY_BENCH_SHARED_FETCH_MIB` sets
/// `shared_fetch_mib` (0: every plugin fetches for itself), to compare the two.
pub fn kafka_section(bootstrap: &str) -> String {
    let shared = std::env::var("EDDY_BENCH_SHARED_FETCH_MIB")
        .map(|m| format!("shared_fetch_mib = {m}\n"))
        .unwrap_or_default();
    format!(
        "[kafka]\nbrokers = \"{bootstrap}\"\n{shared}[kafka.settings]\n\"fetch.wait.max.ms\" = \"10\"\n"
    )
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// librdkafka's mock cluster keeps at most 5 MiB and 100,000 events per partition (older
/// ones are dropped): spread the events (~450 bytes each, keyed by user, so unevenly) over
/// enough partitions to stay well under that. `main` checks that none was dropped.
pub fn partitions_for(events: u64) -> i32 {
    ((events * 450 / (2 << 20)) as i32 + 1)
        .max(events.div_ceil(50_000) as i32)
        .max(6)
}

/// Fails if the broker dropped any of the produced events (see [`partitions_for`]).
pub fn check_all_kept(bootstrap: &str, partitions: i32, total: u64) -> anyhow::Result<()> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let mut kept = 0;
    for p in 0..partitions {
        let (low, high) =
            consumer.fetch_watermarks("user-activities", p, Duration::from_secs(10))?;
        anyhow::ensure!(
            low == 0,
            "the embedded broker dropped the first {low} events of partition {p}: use more partitions"
        );
        kept += high as u64;
    }
    anyhow::ensure!(kept == total, "{kept} of {total} events on the broker");
    Ok(())
}

/// An embedded broker holding `total` seeded events (seed 42, a fraud burst every 500) on
/// `user-activities`, spread over enough partitions that it keeps them all. Returns the
/// broker, its bootstrap address and the partition count.
pub fn seeded_broker(total: u64) -> anyhow::Result<(eddy::kafka::EmbeddedBroker, String, i32)> {
    use eddy::generator::{GeneratorOptions, ProduceOptions};
    use std::sync::atomic::{AtomicBool, AtomicU64};
    const TOPIC: &str = "user-activities";
    let partitions = partitions_for(total);
    let broker = eddy::kafka::EmbeddedBroker::start()?;
    broker.create_topic(TOPIC, partitions)?;
    let bootstrap = broker.bootstrap_servers().to_string();
    let client = eddy::kafka::client_config(
        &eddy::config::KafkaConfig {
            brokers: bootstrap.clone(),
            topic: TOPIC.into(),
            partitions,
            // Large producer batches: the embedded broker finds the batch a fetch starts in
            // by a linear search of the partition's log, so thousands of small batches would
            // slow every consumer of the benchmark, the ceiling included.
            settings: [("linger.ms", "200"), ("batch.num.messages", "100000")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            connect_timeout_ms: 30_000,
            shared_fetch_mib: 64,
        },
        &bootstrap,
    );
    let started = std::time::Instant::now();
    eddy::generator::produce_blocking(
        &client,
        &ProduceOptions {
            topic: TOPIC.into(),
            events: Some(total),
            rate: 0,
            generator: GeneratorOptions {
                seed: 42,
                fraud_every: 500,
                start_ms: 1_705_314_600_000,
                spacing_ms: 5,
                ..Default::default()
            },
        },
        &AtomicBool::new(false),
        &AtomicU64::new(0),
    )?;
    check_all_kept(&bootstrap, partitions, total)?;
    eprintln!(
        "produced {total} events to {partitions} partitions in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok((broker, bootstrap, partitions))
}

/// The four shipped plugins as `[[plugin]]` tables with their shipped `[plugin.config]`,
/// each in group `eddy-<name>-<round>`. Outputs go to Kafka topics `eddy-<name>` if
/// `to_topics` (else they are discarded); `shipped_limits` adds fraud's limits from the
/// shipped `plugins.toml`.
pub fn shipped_plugins(
    round: usize,
    to_topics: bool,
    shipped_limits: bool,
) -> anyhow::Result<String> {
    let dir = plugins_dir();
    let mut plugins = String::new();
    for (name, output, config) in [
        ("logger", "log", LOGGER),
        ("analytics", "snapshots", ANALYTICS),
        ("alert", "alerts", ALERT),
        ("fraud", "alerts", FRAUD),
    ] {
        let group = format!("eddy-{name}-{round}");
        let mut table = plugin_toml(name, &dir, output, config, Some(&group))?;
        if to_topics {
            table = table.replace(
                &format!("{output} = \"discard\""),
                &format!("{output} = {{ topic = \"eddy-{name}\" }}"),
            );
        }
        plugins += &table;
        if shipped_limits && name == "fraud" {
            plugins += "[plugin.limits]\nmemory_mib = 32\ncpu_ms = 200\n";
        }
    }
    Ok(plugins)
}

/// Starts a host on `config_path`, its plugins compiled first into its compile cache (as
/// `eddy compile` does, and as any host that ran these `.wasm` files before has them): the
/// benchmarks measure the steady state, not the first minute's background compiles.
pub fn start_host(
    runtime: &tokio::runtime::Runtime,
    config_path: &Path,
) -> anyhow::Result<eddy::Host> {
    let config = eddy::config::Config::load(config_path)?;
    let engine = eddy::wasm::engine()?;
    for plugin in &config.plugins {
        eddy::wasm::Program::precompile(&engine, &plugin.path, &config.state.compiled_dir())?;
    }
    runtime.block_on(eddy::Host::start(config))
}

/// Logs to stderr at `warn` (or as `EDDY_LOG` says), so the figures on stdout stand alone.
pub fn init_logs() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDDY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// How many events to run: `EDDY_BENCH_EVENTS`, else `default`.
pub fn events_to_run(default: u64) -> u64 {
    std::env::var("EDDY_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
