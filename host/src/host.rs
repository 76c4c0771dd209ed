//! The composition root: [`Host::start`] wires the subsystems together (broker, plugins,
//! supervisor, HTTP server, generator) and [`Host::stop`] takes them down in order.

use crate::config::Config;
use crate::kafka::{self, ClusterView, EmbeddedBroker};
use crate::live::Live;
use crate::metrics::Metrics;
use crate::{clock, generator, http, supervisor, wasm};
use anyhow::Context as _;
use rdkafka::producer::FutureProducer;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

/// A running host. Stop it with [`Host::stop`].
pub struct Host {
    metrics: Arc<Metrics>,
    http_addr: SocketAddr,
    bootstrap: String,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    /// The HTTP server stops last, so live-stream clients get the records of the plugins'
    /// final commits before their stream ends.
    http_shutdown: watch::Sender<bool>,
    /// (A set of one: dropped, as when `start` fails part-way, it aborts the server.)
    http: JoinSet<()>,
    reloads: tokio::sync::mpsc::Sender<supervisor::Request>,
    generator_stop: Arc<AtomicBool>,
    generator: Option<tokio::task::JoinHandle<()>>,
    /// Declared last: dropped after every client of it has stopped.
    _broker: Option<EmbeddedBroker>,
}

impl Host {
    /// Starts everything `config` describes. Fails, naming the cause, if the broker cannot
    /// be started, a plugin cannot be loaded, or the metrics address is taken; once it has
    /// returned, per-event problems never stop the host.
    pub async fn start(config: Config) -> anyhow::Result<Host> {
        let broker = if config.embedded() {
            let broker = EmbeddedBroker::start()?;
            broker.create_topic(&config.kafka.topic, config.kafka.partitions)?;
            // Plugins' own input topics (another plugin's output, say) exist from the start,
            // with as many partitions, so their consumers are assigned at once.
            let inputs: std::collections::BTreeMap<&str, i32> = config
                .plugins
                .iter()
                .filter_map(|p| {
                    let partitions = p.topic_partitions.unwrap_or(config.kafka.partitions);
                    p.topic.as_deref().map(|t| (t, partitions))
                })
                .filter(|(t, _)| *t != config.kafka.topic)
                .collect();
            for (topic, partitions) in &inputs {
                broker.create_topic(topic, *partitions)?;
            }
            info!(
                bootstrap = broker.bootstrap_servers(),
                topic = %config.kafka.topic,
                partitions = config.kafka.partitions,
                "embedded Kafka broker started (any Kafka client can connect to it)"
            );
            Some(broker)
        } else {
            None
        };
        let bootstrap = match &broker {
            Some(b) => b.bootstrap_servers().to_string(),
            None => config.kafka.brokers.clone(),
        };
        let client = kafka::client_config(&config.kafka, &bootstrap);
        if broker.is_none() {
            let (c, topic) = (client.clone(), config.kafka.topic.clone());
            let timeout = std::time::Duration::from_millis(config.kafka.connect_timeout_ms);
            tokio::task::spawn_blocking(move || kafka::wait_until_reachable(&c, &topic, timeout))
                .await??;
        }
        // Consumers' settings (the producers' would warn about consumer-only properties).
        let mut consumer_client = client.clone();
        if broker.is_some() && !config.kafka.settings.contains_key("fetch.wait.max.ms") {
            // The embedded broker answers a fetch only after `fetch.wait.max.ms` (500 ms by
            // default) even while data flows, which would hand plugins events in 500 ms
            // bursts. A real broker answers as soon as data is there. 10 ms keeps what an
            // event waits for its fetch short, for ~2% of a core while the host is idle.
            consumer_client.set("fetch.wait.max.ms", "10");
        }

        // Static group membership, so a restarted host gets its partitions back at once.
        // Only with durable state: its locked files keep two hosts from sharing the id.
        if config.state.durable && !config.kafka.settings.contains_key("group.instance.id") {
            consumer_client.set(
                "group.instance.id",
                kafka::host_instance_id(&config.state.dir),
            );
        }

        let engine = wasm::engine()?;
        // What the saved offsets of durable state are checked against.
        let cluster = if config.state.durable {
            let client = client.clone();
            let mut topics: Vec<String> = config
                .plugins
                .iter()
                .map(|p| p.input_topic(&config.kafka.topic).to_string())
                .collect();
            topics.sort();
            topics.dedup();
            let mut view =
                tokio::task::spawn_blocking(move || ClusterView::probe(&client, &topics)).await?;
            if broker.is_some() {
                view.id = Some(kafka::cluster::embedded_cluster_id());
            }
            view
        } else {
            ClusterView::default()
        };
        if supervisor::partition_scoped(&config.state) {
            // Each plugin's changelog, with as many partitions as its input.
            for plugin in &config.plugins {
                let changelog = crate::state::changelog::topic_for(&plugin.group_id());
                let input = plugin.input_topic(&config.kafka.topic);
                match &broker {
                    Some(b) => {
                        let partitions = match &plugin.topic {
                            Some(t) if *t != config.kafka.topic => {
                                plugin.topic_partitions.unwrap_or(config.kafka.partitions)
                            }
                            _ => config.kafka.partitions,
                        };
                        b.create_topic(&changelog, partitions)?
                    }
                    None => {
                        let partitions =
                            cluster.log_ends.keys().filter(|(t, _)| t == input).count() as i32;
                        anyhow::ensure!(
                            partitions > 0,
                            "plugin `{}`: cannot learn how many partitions topic `{input}` has, for its changelog `{changelog}`",
                            plugin.name
                        );
                        crate::state::changelog::ensure_topic(&client, &changelog, partitions)
                            .await
                            .map_err(|e| anyhow::anyhow!("plugin `{}`: {e:#}", plugin.name))?;
                    }
                }
            }
        }
        let sandboxes = supervisor::load_all(&engine, &config, &cluster).await?;
        // Pools open their connections on first use: a database that is down holds up its
        // outputs (retried, offsets held back), not the start.
        let databases = crate::sinks::Databases::new(&config.postgres)?;
        for (name, db) in &config.postgres {
            if db.migrate_on_start {
                let applied = crate::sinks::postgres::migrate(name, db).await?;
                info!(postgres = %name, ?applied, "migrations applied");
            }
        }

        let metrics = Arc::new(Metrics::default());
        let live = Arc::new(Live::new(
            config.http.stream_buffer,
            config.http.stream_clients(),
            metrics.clone(),
        ));
        let listener = http::bind(config.http.address).await?;
        let http_addr = listener.local_addr()?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (http_shutdown, http_shutdown_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let collector = http::collector::Collector::new(&config, &client, metrics.clone())?;
        let access = Arc::new(http::guard::Access::new(&config.http, http_addr)?);
        if access.outputs_open() && !http_addr.ip().is_loopback() {
            warn!(
                "http: listening on {http_addr} with no [http] read_token: every plugin's output (/v1/stream, /v1/ws, the dashboard's data) is readable by anyone who reaches this address. Set read_token (or {}) unless a proxy in front guards it",
                http::guard::READ_TOKEN_ENV
            );
        }
        let router = http::router(http::Shared {
            metrics: metrics.clone(),
            live: live.clone(),
            shutdown: http_shutdown_rx.clone(),
            access: access.clone(),
        })
        .merge(http::collector::router(
            collector,
            &config.http.cors_origins,
        ))
        .layer(axum::middleware::from_fn_with_state(
            access,
            http::guard::host_check,
        ));
        let (http_config, http_metrics) = (config.http.clone(), metrics.clone());
        let mut http = JoinSet::new();
        http.spawn(async move {
            http::serve(
                listener,
                router,
                &http_config,
                &http_metrics,
                http_shutdown_rx,
            )
            .await
        });
        info!(
            "dashboard at http://{http_addr}/ (metrics at /metrics, health at /healthz, live stream at /v1/stream, collector at /v1/events)"
        );

        let mut producer_client = client.clone();
        if !config.kafka.settings.contains_key("linger.ms") {
            // A batch's offsets are committed once its outputs are acknowledged, so every
            // millisecond the producer lingers is a millisecond the plugin waits, per batch
            // (`make bench-peer`: 0 ms drains 20-35% faster than 1 ms, 5 ms slower still).
            // Records still go out in batches: they gather while a request is in flight.
            producer_client.set("linger.ms", "0");
        }
        let producer: FutureProducer = producer_client
            .create()
            .map_err(|e| anyhow::anyhow!("cannot create the output producer: {e}"))?;
        // Partition-scoped state's changelogs: idempotent, so that a retried request can
        // neither reorder a partition's records (an older value of a key landing after a
        // newer one, which a restore would keep) nor repeat them.
        let changelog_producer: Option<FutureProducer> =
            supervisor::partition_scoped(&config.state)
                .then(|| {
                    let mut c = producer_client.clone();
                    c.set("enable.idempotence", "true");
                    c.create()
                        .map_err(|e| anyhow::anyhow!("cannot create the changelog producer: {e}"))
                })
                .transpose()?;
        let shared_fetch = (config.kafka.shared_fetch_mib > 0 && !config.state.shared_group)
            .then(|| {
                kafka::shared_fetch::SharedFetch::start(
                    &consumer_client,
                    &config.kafka.topic,
                    config.kafka.shared_fetch_mib << 20,
                    shutdown_rx.clone(),
                )
            })
            .transpose()?;
        let (reloads, reload_requests) = tokio::sync::mpsc::channel(4);
        let supervisor = supervisor::Supervisor::start(
            engine,
            config.clone(),
            sandboxes,
            cluster.id.clone().filter(|_| broker.is_some()),
            consumer_client,
            producer,
            changelog_producer,
            databases,
            metrics.clone(),
            shutdown_rx.clone(),
            shared_fetch,
            live,
        );
        tasks.spawn(supervisor::supervise(
            supervisor,
            reload_requests,
            shutdown_rx.clone(),
        ));

        let generator_stop = Arc::new(AtomicBool::new(false));
        let generator = (config.generator.rate > 0).then(|| {
            let opts = generator::ProduceOptions {
                topic: config.kafka.topic.clone(),
                events: None,
                rate: config.generator.rate,
                generator: generator::GeneratorOptions {
                    seed: config.generator.seed,
                    fraud_every: config.generator.fraud_every,
                    start_ms: clock::now_ms(),
                    spacing_ms: config.generator.spacing_ms.map_or_else(
                        || (1000 / i64::from(config.generator.rate)).max(1),
                        |ms| ms.min(i64::MAX as u64) as i64,
                    ),
                    users: config.generator.users,
                    session_events: config.generator.session_events,
                    event_timestamps: config.generator.event_timestamps,
                },
            };
            info!(
                rate = config.generator.rate,
                "generating user-activity events"
            );
            let (stop, metrics, client) = (generator_stop.clone(), metrics.clone(), client.clone());
            tokio::task::spawn_blocking(move || {
                if let Err(e) =
                    generator::produce_blocking(&client, &opts, &stop, &metrics.generated)
                {
                    error!("generator stopped: {e:#}");
                }
            })
        });

        Ok(Host {
            metrics,
            http_addr,
            bootstrap,
            shutdown,
            tasks,
            http_shutdown,
            http,
            reloads,
            generator_stop,
            generator,
            _broker: broker,
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Where `/metrics` and `/healthz` are served.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The Kafka bootstrap address in use (the embedded broker's, if it runs one).
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }

    /// Re-reads `plugins.toml` and applies what changed, as a watched file change or
    /// `SIGHUP` would; returns what it did.
    pub async fn reload(&self) -> anyhow::Result<supervisor::ReloadReport> {
        let (reply, report) = tokio::sync::oneshot::channel();
        self.reloads
            .send(supervisor::Request::Reload(reply))
            .await
            .map_err(|_| anyhow::anyhow!("the host is stopping"))?;
        report
            .await
            .map_err(|_| anyhow::anyhow!("the host is stopping"))
    }

    /// Stops the generator, lets each plugin finish its batch in flight and commit, stops
    /// the HTTP server (live streams end with a `closed` message) and the embedded broker.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.generator_stop.store(true, Ordering::Relaxed);
        if let Some(g) = self.generator.take() {
            g.await.context("generator task")?;
        }
        let _ = self.shutdown.send(true);
        while let Some(r) = self.tasks.join_next().await {
            r.context("host task")?;
        }
        let _ = self.http_shutdown.send(true);
        while let Some(r) = self.http.join_next().await {
            r.context("http server")?;
        }
        Ok(())
    }
}

impl Drop for Host {
    /// A host dropped without [`Host::stop`] (a failed test, say) still stops its generator
    /// and tasks, so that whatever waits for its blocking threads (a runtime shutting down)
    /// does not wait for ever. Nothing is committed beyond what already was.
    fn drop(&mut self) {
        self.generator_stop.store(true, Ordering::Relaxed);
        let _ = self.shutdown.send(true);
        let _ = self.http_shutdown.send(true);
    }
}

/// Compiles every plugin and runs its `init` with its config in a scratch sandbox, as a
/// start would, without a broker or state: `eddy check`. Reports every plugin that fails.
pub fn check_plugins(config: &Config) -> anyhow::Result<()> {
    // Connection strings parse (nothing connects).
    crate::sinks::Databases::new(&config.postgres)?;
    let engine = wasm::engine()?;
    let errors: Vec<String> = config
        .plugins
        .iter()
        .filter_map(|p| {
            wasm::Program::compile(&engine, &p.path, None)
                .map(Arc::new)
                .and_then(|program| wasm::Sandbox::validate(&program, p))
                .err()
                .map(|e| format!("plugin `{}`: {e}", p.name))
        })
        .collect();
    supervisor::load_errors(errors)
}

/// Runs the host until `shutdown` completes (e.g. Ctrl-C), then stops it cleanly.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let host = Host::start(config).await?;
    shutdown.await;
    info!("shutting down: finishing batches in flight");
    host.stop().await
}
