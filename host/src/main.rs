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
    /// Compile plugins ahead of time into the host's compile cache (`<state dir>/compiled`):
    /// every plugin of plugins.toml, or the given `.wasm` files. A host that starts, or swaps
    /// to, a compiled `.wasm` then only loads it. Run it before replacing a running plugin's
    /// file for the fastest hot swap.
    Compile {
        #[arg(long, short, default_value = "plugins.toml")]
        config: PathBuf,
        /// `.wasm` files to compile instead of the plugins of plugins.toml.
        files: Vec<PathBuf>,
    },
    /// Check plugins.toml (syntax, keys, values) and every plugin (compiles, implements the
    /// contract, accepts its config) without connecting to Kafka.
    Check {
        #[arg(long, short, default_value = "plugins.toml")]
        config: PathBuf,
    },
    /// Apply the `migrations` of every `[postgres.NAME]` (each `.sql` file once, in name
    /// order; idempotent: files already applied are skipped).
    Migrate {
        #[arg(long, short, default_value = "plugins.toml")]
        config: PathBuf,
    },
    /// Show a plugin's durable state: size, saved offsets, keys. Stop the host first.
    State {
        plugin: String,
        #[arg(long, short, default_value = "plugins.toml")]
        config: PathBuf,
        /// Print this key's value, as stored, and nothing else.
        #[arg(long)]
        get: Option<String>,
        /// Only keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// At most this many keys.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Drop a plugin's state and offsets: at its next start it begins again from `start_from`.
    /// Stop the host first.
    Reset {
        plugin: String,
        #[arg(long, short, default_value = "plugins.toml")]
        config: PathBuf,
    },
    /// Make one plugin handle events again from a position (the others are not touched).
    /// Drops its state unless --keep-state. Stop the host first.
    Replay {
        plugin: String,
        #[arg(long, short, default_value = "plugins.toml")]
        config: PathBuf,
        /// `earliest`, `latest`, an offset, or an RFC 3339 time such as 2024-01-15T10:00:00Z.
        #[arg(long)]
        from: eddy::ops::From,
        /// Keep the state (its counts then include the replayed events twice).
        #[arg(long)]
        keep_state: bool,
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
        /// How many distinct users the events come from.
        #[arg(long, default_value_t = eddy::generator::DEFAULT_USERS)]
        users: u64,
        /// Mean events of a user's session.
        #[arg(long, default_value_t = eddy::generator::DEFAULT_SESSION_EVENTS)]
        session_events: u64,
        /// Event time between consecutive events in milliseconds (default: 1000 / rate).
        #[arg(long)]
        spacing_ms: Option<i64>,
        /// Stamp each Kafka record with its event's time, not the time it was produced.
        #[arg(long)]
        event_timestamps: bool,
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
        Command::Compile { config, files } => {
            let c = Config::load(&config)?;
            let files = if files.is_empty() {
                c.plugins.iter().map(|p| p.path.clone()).collect()
            } else {
                files
            };
            let engine = eddy::wasm::engine()?;
            let cache = c.state.compiled_dir();
            for file in files {
                let started = std::time::Instant::now();
                let artifact = eddy::wasm::Program::precompile(&engine, &file, &cache)?;
                println!(
                    "{} → {} ({:.0} ms)",
                    file.display(),
                    artifact.display(),
                    started.elapsed().as_secs_f64() * 1000.0
                );
            }
            Ok(())
        }
        Command::Check { config } => {
            let c = Config::load(&config)?;
            eddy::check_plugins(&c)?;
            println!(
                "{}: ok ({} plugins compiled and initialised with their config)",
                config.display(),
                c.plugins.len()
            );
            Ok(())
        }
        Command::State {
            plugin,
            config,
            get,
            prefix,
            limit,
        } => {
            let config = Config::load(&config)?;
            match get {
                Some(key) => match eddy::ops::get(&config, &plugin, &key)? {
                    Some(value) => {
                        use std::io::Write;
                        let mut out = std::io::stdout().lock();
                        out.write_all(&value)?;
                        out.write_all(b"\n")?;
                    }
                    None => anyhow::bail!("plugin {plugin} has no key `{key}`"),
                },
                None => print!(
                    "{}",
                    eddy::ops::describe(&config, &plugin, &eddy::ops::Show { prefix, limit })?
                ),
            }
            Ok(())
        }
        Command::Migrate { config } => {
            let c = Config::parse(
                &std::fs::read_to_string(&config)
                    .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", config.display()))?,
                &config,
            )?;
            if !c.postgres.values().any(|db| db.migrations.is_some()) {
                anyhow::bail!("{}: no [postgres.NAME] has `migrations`", config.display());
            }
            tokio::runtime::Runtime::new()?.block_on(async {
                for (name, db) in c.postgres.iter().filter(|(_, db)| db.migrations.is_some()) {
                    let applied = eddy::sinks::postgres::migrate(name, db).await?;
                    if applied.is_empty() {
                        println!("[postgres.{name}]: up to date");
                    } else {
                        println!("[postgres.{name}]: applied {}", applied.join(", "));
                    }
                }
                anyhow::Ok(())
            })
        }
        Command::Reset { plugin, config } => {
            let config = Config::load(&config)?;
            println!("{}", eddy::ops::reset(&config, &plugin)?);
            Ok(())
        }
        Command::Replay {
            plugin,
            config,
            from,
            keep_state,
        } => {
            let config = Config::load(&config)?;
            println!(
                "{}",
                eddy::ops::replay(&config, &plugin, &from, keep_state)?
            );
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
            users,
            session_events,
            spacing_ms,
            event_timestamps,
            settings,
        } => {
            let kafka = KafkaConfig {
                brokers: brokers.clone(),
                topic: topic.clone(),
                partitions: 6,
                connect_timeout_ms: 30_000,
                shared_fetch_mib: 64,
                settings: settings.into_iter().collect(),
            };
            let client = eddy::kafka::client_config(&kafka, &brokers);
            let opts = eddy::generator::ProduceOptions {
                topic,
                events,
                rate,
                generator: eddy::generator::GeneratorOptions {
                    seed,
                    fraud_every,
                    start_ms: start_ms.unwrap_or_else(eddy::clock::now_ms),
                    spacing_ms: spacing_ms.unwrap_or(if rate > 0 {
                        (1000 / i64::from(rate)).max(1)
                    } else {
                        1
                    }),
                    users,
                    session_events,
                    event_timestamps,
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
