//! The `eddy` command: a thin shell over the library.

use clap::{Parser, Subcommand};
use eddy::config::{Config, KafkaConfig};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64};

#[derive(Parser)]
#[command(
    name = "eddy",
    version,
    about = "Run Kafka events through sandboxed WebAssembly plugins"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume the topic and run every event through the plugins of plugins.toml.
    Run {
        #[arg(long, short, default_value = "plugins.toml")]
        config: PathBuf,
    },
    /// Check plugins.toml (syntax, keys, values, plugin files) without running anything.
    Check {
        #[arg(long, short, default_value = "plugins.toml")]
        config: PathBuf,
    },
    /// Write realistic user-activity events to a Kafka topic.
    Produce {
        /// Kafka bootstrap servers, e.g. 127.0.0.1:9092.
        #[arg(long)]
        brokers: String,
        #[arg(long, default_value = "user-activities")]
        topic: String,
        /// Stop after this many events (default: run until Ctrl-C).
        #[arg(long)]
        events: Option<u64>,
        /// Events per second; 0 for as fast as the broker takes them.
        #[arg(long, default_value_t = 100)]
        rate: u32,
        /// Seed for reproducible traffic.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Inject a burst of fraud-like purchases every N events (0: never).
        #[arg(long, default_value_t = 0)]
        fraud_every: u64,
        /// Timestamp of the first event in Unix milliseconds (default: now). With --seed this
        /// makes the events byte-for-byte reproducible.
        #[arg(long)]
        start_ms: Option<i64>,
        /// A librdkafka setting, e.g. -X security.protocol=SASL_SSL (repeatable).
        #[arg(short = 'X', value_parser = parse_setting)]
        settings: Vec<(String, String)>,
    },
}

fn parse_setting(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("`{s}` is not KEY=VALUE"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDDY_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,librdkafka=warn,rdkafka=warn")
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Check { config } => {
            let c = Config::load(&config)?;
            println!("{}: ok ({} plugins)", config.display(), c.plugins.len());
            Ok(())
        }
        Command::Run { config } => {
            let config = Config::load(&config)?;
            tokio::runtime::Runtime::new()?.block_on(eddy::run(config, shutdown_signal()))
        }
        Command::Produce {
            brokers,
            topic,
            events,
            rate,
            seed,
            fraud_every,
            start_ms,
            settings,
        } => {
            let kafka = KafkaConfig {
                brokers: brokers.clone(),
                topic: topic.clone(),
                partitions: 6,
                settings: settings.into_iter().collect(),
            };
            let client = eddy::broker::client_config(&kafka, &brokers);
            let opts = eddy::generator::ProduceOptions {
                topic,
                events,
                rate,
                generator: eddy::generator::GeneratorOptions {
                    seed,
                    fraud_every,
                    start_ms: start_ms.unwrap_or_else(eddy::generator::now_ms),
                    spacing_ms: if rate > 0 {
                        (1000 / i64::from(rate)).max(1)
                    } else {
                        1
                    },
                },
            };
            let stop = std::sync::Arc::new(AtomicBool::new(false));
            let on_signal = stop.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(shutdown_signal());
                on_signal.store(true, std::sync::atomic::Ordering::Relaxed);
            });
            let sent =
                eddy::generator::produce_blocking(&client, &opts, &stop, &AtomicU64::new(0))?;
            eprintln!("produced {sent} events to `{}`", opts.topic);
            Ok(())
        }
    }
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
