//! `plugins.toml`: what the host consumes, which plugins run, and with what limits.
//!
//! Every table rejects unknown keys (a typo must not silently fall back to a default), and
//! every error names the file, the key and what was expected. Relative paths are resolved
//! against the directory of `plugins.toml`, so the host can be started from anywhere.

mod outputs;
mod plugin;
mod postgres;

pub use outputs::OutputTarget;
pub use plugin::{
    BreakerPolicy, DEFAULT_MAX_AHEAD_MS, Expire, ExpireClock, ExpireRule, Limits,
    MAX_BREAKER_PAUSE_MS, PluginConfig, StartFrom,
};
pub use postgres::{DeadLetterTable, PostgresConfig, TableTarget, WriteMode, tls_refusal};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The longest wait before a retried event is handed again: `limits.retry_backoff_ms`
/// doubles after each attempt, up to this.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(10);

/// The longest a batch may wait for its retries, summed over `limits.max_retries` attempts:
/// its offsets wait meanwhile, and with `[state] shared_group` so does a rebalance of the
/// group, which Kafka waits for at most `max.poll.interval.ms` (5 minutes by default). The
/// plugin's consumer stays polled (see `pipeline::source`).
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(120);

/// Why `plugins.toml` could not be used. Callers print it as is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key or a value of the wrong type. toml's message already
    /// carries the line, the column and the offending key.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// Parsed, but a value is not acceptable.
    #[error("{path}: `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub generator: GeneratorConfig,
    #[serde(default)]
    pub reload: ReloadConfig,
    #[serde(default)]
    pub state: StateConfig,
    /// `[postgres.NAME]`: databases outputs may write to.
    #[serde(default)]
    pub postgres: BTreeMap<String, PostgresConfig>,
    #[serde(default, rename = "plugin")]
    pub plugins: Vec<PluginConfig>,
    /// Where this config was read from; relative paths in it are resolved against its
    /// directory. Not a key of the file.
    #[serde(skip)]
    pub source: PathBuf,
}

/// `[kafka]`: where events come from.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `"embedded"` starts an in-process broker (librdkafka's mock cluster) and prints its
    /// address; anything else is a `bootstrap.servers` list such as `"kafka1:9092,kafka2:9092"`.
    pub brokers: String,
    /// The topic every plugin consumes.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Partitions of the topic the embedded broker creates. Ignored for a real cluster,
    /// whose topics are created by its operators.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Passed to librdkafka as is, for every consumer and producer: security settings
    /// (`"security.protocol" = "SASL_SSL"`, `"sasl.mechanisms"`, …), timeouts, tuning.
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
    /// How long the host waits at start for a real cluster to answer before it gives up
    /// with an error naming the brokers (a typo in `brokers`, a cluster that is down).
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Plugins at the same place in the topic share one fetch of it (one copy of each
    /// event, fetched once, instead of one per plugin), through a window of at most this
    /// many MiB of events; when it is full, fetching waits for the slowest plugin reading
    /// it (a plugin that takes nothing for 2 s meanwhile, e.g. paused by its breaker,
    /// fetches for itself until it catches up). 0: every plugin fetches for itself. Not
    /// with `[state] shared_group`.
    #[serde(default = "default_shared_fetch_mib")]
    pub shared_fetch_mib: usize,
}

fn default_shared_fetch_mib() -> usize {
    64
}

fn default_connect_timeout_ms() -> u64 {
    30_000
}

/// `[http]`: the Prometheus `/metrics` and `/healthz` endpoint.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on; port 0 picks a free port (printed at start).
    #[serde(default = "default_http_address")]
    pub address: SocketAddr,
    /// Most connections served at once. When all are taken, a new connection takes the place
    /// of the oldest one that has not sent a whole request yet; if none is silent, it waits
    /// until one closes.
    #[serde(default = "default_http_max_connections")]
    pub max_connections: usize,
    /// Most clients of the live stream (`/v1/stream`, `/v1/ws`) at once; more get 503.
    /// At most `max_connections - 1` take effect (`/metrics` and `/healthz` keep one).
    #[serde(default = "default_stream_max_clients")]
    pub stream_max_clients: usize,
    /// How many records a live-stream client may fall behind before it is disconnected
    /// (it has then missed records, and is told so).
    #[serde(default = "default_stream_buffer")]
    pub stream_buffer: usize,
    /// A connection that takes nothing of what the host sends for this long is closed (a
    /// live-stream client that stopped reading, say).
    #[serde(default = "default_send_timeout_ms")]
    pub send_timeout_ms: u64,
    /// Time a connection has to send a complete request head, counted from when it opens or
    /// its previous response ended: a silent connection, a head sent a byte at a time and
    /// an idle keep-alive connection are closed after it.
    #[serde(default = "default_head_timeout_ms")]
    pub head_timeout_ms: u64,
    /// Time a client has to send the whole body of `POST /v1/events` once its head came;
    /// after it the post is answered 408 and nothing of it is produced.
    #[serde(default = "default_body_timeout_ms")]
    pub body_timeout_ms: u64,
    /// The largest body `POST /v1/events` takes, in KiB; a larger one is answered 413.
    #[serde(default = "default_http_max_body_kib")]
    pub max_body_kib: usize,
    /// The most events one `POST /v1/events` may hold; a body with more is answered 413
    /// before anything is built for them.
    #[serde(default = "default_http_max_events_per_post")]
    pub max_events_per_post: usize,
    /// MiB of memory that posts in flight may hold together: each holds 4 bytes per byte of
    /// its body from before the body is read, and 1 KiB per event once they are counted,
    /// until it is answered. Past it a post waits up to a second, then gets 503 with
    /// `Retry-After`.
    #[serde(default = "default_http_ingest_memory_mib")]
    pub ingest_memory_mib: usize,
    /// How far ahead of the host's clock an event's `timestamp` may be; a later one is
    /// refused (per event, with the reason). A browser's clock is often off by seconds or
    /// minutes, never by years.
    #[serde(default = "default_http_max_clock_skew_ms")]
    pub max_clock_skew_ms: u64,
    /// How long `POST /v1/events` waits for Kafka to acknowledge its events before it
    /// answers 503 (the client retries).
    #[serde(default = "default_http_ingest_timeout_ms")]
    pub ingest_timeout_ms: u64,
    /// The bearer token `POST /v1/events` requires (`EDDY_HTTP_TOKEN` overrides it); none:
    /// anyone who reaches the address may post. `/metrics`, `/healthz`, `/tracker.js` and
    /// `/demo` stay open.
    #[serde(default)]
    pub token: Option<String>,
    /// The bearer token that reading the outputs requires (`/v1/stream`, `/v1/ws`,
    /// `/v1/outputs`, the dashboard's data; `EDDY_HTTP_READ_TOKEN` overrides it). Not the
    /// ingest token, which sits in public pages. None: anyone who reaches the address reads
    /// every plugin's output (said loudly at start unless bound to loopback).
    #[serde(default)]
    pub read_token: Option<String>,
    /// Host names requests may name (`Host`), against DNS rebinding: bound to loopback,
    /// `localhost` and the loopback addresses are allowed, and these too; bound elsewhere,
    /// only these when any are set.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Origins whose pages may post to `/v1/events` (CORS), e.g. `["https://shop.example"]`,
    /// or `["*"]` for any. Empty: only pages served by the host itself.
    #[serde(default)]
    pub cors_origins: Vec<String>,
}

/// Whether `token` can be a bearer token: 1 to 4096 printable ASCII characters, no spaces.
pub fn valid_token(token: &str) -> bool {
    !token.is_empty() && token.len() <= 4096 && token.bytes().all(|b| b.is_ascii_graphic())
}

/// What a post to the collector may cost in memory, per byte of its body: the body itself,
/// its events as the producer's queue holds them, and the answer, with room to spare.
pub const POST_COST_PER_BODY_BYTE: usize = 4;
/// What a post may cost per event, on top: each event's fate and its result in the answer.
pub const POST_COST_PER_EVENT: usize = 1024;

/// The KiB of `[http] ingest_memory_mib` a post of `body` bytes and `events` events holds
/// while in flight (its body's share from before the body is read, its events' once they
/// are counted).
pub fn post_cost_kib(body: usize, events: usize) -> usize {
    (POST_COST_PER_BODY_BYTE * body + POST_COST_PER_EVENT * events).div_ceil(1024)
}

impl HttpConfig {
    /// The live-stream clients allowed at once: never all the connections, so that
    /// `/metrics` and `/healthz` always get one.
    pub fn stream_clients(&self) -> usize {
        self.stream_max_clients
            .min(self.max_connections.saturating_sub(1))
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            address: default_http_address(),
            max_connections: default_http_max_connections(),
            stream_max_clients: default_stream_max_clients(),
            stream_buffer: default_stream_buffer(),
            send_timeout_ms: default_send_timeout_ms(),
            head_timeout_ms: default_head_timeout_ms(),
            body_timeout_ms: default_body_timeout_ms(),
            max_body_kib: default_http_max_body_kib(),
            max_events_per_post: default_http_max_events_per_post(),
            ingest_memory_mib: default_http_ingest_memory_mib(),
            max_clock_skew_ms: default_http_max_clock_skew_ms(),
            ingest_timeout_ms: default_http_ingest_timeout_ms(),
            token: None,
            read_token: None,
            allowed_hosts: Vec::new(),
            cors_origins: Vec::new(),
        }
    }
}

fn default_stream_max_clients() -> usize {
    32
}

fn default_stream_buffer() -> usize {
    1024
}

fn default_head_timeout_ms() -> u64 {
    10_000
}

fn default_body_timeout_ms() -> u64 {
    30_000
}

fn default_send_timeout_ms() -> u64 {
    10_000
}

fn default_http_max_connections() -> usize {
    64
}
fn default_http_max_events_per_post() -> usize {
    1000
}
fn default_http_max_clock_skew_ms() -> u64 {
    300_000
}
fn default_http_ingest_memory_mib() -> usize {
    64
}
fn default_http_max_body_kib() -> usize {
    1024
}
fn default_http_ingest_timeout_ms() -> u64 {
    5000
}

/// `[generator]`: synthetic traffic produced by the host itself, so `run` shows live output
/// with no producer of your own. Off unless `rate` is set above 0.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GeneratorConfig {
    /// Events per second; 0 turns the generator off.
    #[serde(default)]
    pub rate: u32,
    /// Seed of the generator's random choices.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Inject a burst of fraud-like purchases every this many events; 0 for never.
    #[serde(default = "default_fraud_every")]
    pub fraud_every: u64,
    /// How many distinct users the traffic comes from.
    #[serde(default = "default_users")]
    pub users: u64,
    /// Mean events of a user's session (then another user's session starts).
    #[serde(default = "default_session_events")]
    pub session_events: u64,
    /// Event time between consecutive events, in milliseconds; `1000 / rate` (real time) by
    /// default. Larger, with `event_timestamps`, it simulates hours of traffic in minutes.
    #[serde(default)]
    pub spacing_ms: Option<u64>,
    /// Stamp each Kafka record with its event's time instead of the time it was produced:
    /// what the plugins' event clock (`[plugin.expire]`) then follows.
    #[serde(default)]
    pub event_timestamps: bool,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            rate: 0,
            seed: default_seed(),
            fraud_every: default_fraud_every(),
            users: default_users(),
            session_events: default_session_events(),
            spacing_ms: None,
            event_timestamps: false,
        }
    }
}

fn default_users() -> u64 {
    5000
}
fn default_session_events() -> u64 {
    30
}

/// `[state]`: where plugins' state lives.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Keep each plugin's state, with the offsets it reflects, in a file (`<dir>/<plugin>.redb`),
    /// committed atomically per batch: counts stay exact across crashes and restarts. With
    /// `false`, state lives in memory only and offsets in Kafka.
    #[serde(default = "default_durable")]
    pub durable: bool,
    /// Directory of the state files (relative to this file's directory).
    #[serde(default = "default_state_dir")]
    pub dir: PathBuf,
    /// Several hosts share the plugins' consumer groups (scale-out: each host gets some of
    /// the partitions). With durable state, a plugin's state is then kept per input
    /// partition (one sandbox instance and one file, `<dir>/<plugin>/p<N>.redb`, per
    /// partition the host holds), every commit goes first to the plugin's changelog topic
    /// (`<group>-changelog`, compacted, created by the host), and a host given a partition
    /// replays that partition's changelog from where its file is before handling its
    /// events: the state follows its partition from host to host, exactly. A partition
    /// starts after whatever the group already handled (the later of the offset its state
    /// reflects and the group's committed offset), so no event is counted by two hosts.
    #[serde(default)]
    pub shared_group: bool,
    /// With `shared_group`: a partition's file left behind when the partition went to
    /// another host is reused if it comes back within this many seconds (only the
    /// changelog records written since are replayed); an older one is dropped and the
    /// partition restored whole from the changelog.
    #[serde(default = "default_keep_revoked_s")]
    pub keep_revoked_s: u64,
    /// Each batch's state and offsets are committed together at once, and the commits of
    /// this interval reach the disk (fsync) together: a crash loses at most this much handled
    /// work, which is handled again from the offsets on disk, so counts stay exact. 0 syncs every batch.
    /// Kafka's committed offsets (lag tools, other hosts) follow what is on disk. With
    /// `shared_group`, every batch is synced (a partition handed to another host must leave
    /// nothing unsynced behind).
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
}

fn default_commit_interval_ms() -> u64 {
    100
}

fn default_keep_revoked_s() -> u64 {
    600
}

impl StateConfig {
    /// Where compiled plugins are kept, so an unchanged `.wasm` is never compiled twice
    /// (see `eddy compile`).
    pub fn compiled_dir(&self) -> PathBuf {
        self.dir.join("compiled")
    }
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            durable: default_durable(),
            commit_interval_ms: default_commit_interval_ms(),
            dir: default_state_dir(),
            shared_group: false,
            keep_revoked_s: default_keep_revoked_s(),
        }
    }
}

fn default_durable() -> bool {
    true
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("eddy-data")
}

/// `[reload]`: hot reload while the host runs.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadConfig {
    /// Watch `plugins.toml` and every plugin's `.wasm`, and apply changes while running.
    /// `SIGHUP` reloads whether or not this is on.
    #[serde(default = "default_watch")]
    pub watch: bool,
    /// Wait this long after the last change to a watched file before reloading: a build
    /// writes a file in several steps.
    #[serde(default = "default_debounce_ms")]
    pub debounce_ms: u64,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            watch: default_watch(),
            debounce_ms: default_debounce_ms(),
        }
    }
}

fn default_watch() -> bool {
    true
}
fn default_debounce_ms() -> u64 {
    200
}

fn default_topic() -> String {
    "user-activities".into()
}
fn default_partitions() -> i32 {
    6
}
fn default_http_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9464))
}
fn default_seed() -> u64 {
    42
}
fn default_fraud_every() -> u64 {
    500
}
/// Names must be usable in consumer groups, topics and metric labels.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl Config {
    /// Reads, parses and validates `path`, and checks that the plugin files exist.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Config::parse(&text, path)?;
        config.check_plugin_files()?;
        Ok(config)
    }

    /// Checks that every plugin's `path` is a file (the sandbox looks inside when it loads it).
    pub fn check_plugin_files(&self) -> Result<(), ConfigError> {
        for (i, p) in self.plugins.iter().enumerate() {
            if !p.path.is_file() {
                return Err(self.invalid(
                    format!("plugin[{i}].path (plugin `{}`)", p.name),
                    format!(
                        "no file at {} (build the plugins first: `make plugins`)",
                        p.path.display()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Parses and validates `text` as if read from `path`, without looking at the plugin
    /// files (see [`Config::check_plugin_files`]).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.source = path.to_path_buf();
        config.resolve_paths();
        config.validate()?;
        Ok(config)
    }

    fn resolve_paths(&mut self) {
        let base = self
            .source
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        for p in &mut self.plugins {
            if p.path.is_relative() {
                p.path = base.join(&p.path);
            }
        }
        if self.state.dir.is_relative() {
            self.state.dir = base.join(&self.state.dir);
        }
        for db in self.postgres.values_mut() {
            for path in [&mut db.migrations, &mut db.ca_file].into_iter().flatten() {
                if path.is_relative() {
                    *path = base.join(&*path);
                }
            }
        }
    }

    /// If records written to `topic` reach `from` again through the plugins that consume it
    /// (and those that consume their output topics...), the way they go, to say in an error.
    fn loop_through(&self, from: &PluginConfig, topic: &str) -> Option<String> {
        let input = |p: &PluginConfig| p.input_topic(&self.kafka.topic).to_string();
        let mut seen = std::collections::BTreeSet::new();
        // (a topic reached, the way there)
        let mut todo = vec![(topic.to_string(), format!("`{topic}`"))];
        while let Some((t, way)) = todo.pop() {
            if !seen.insert(t.clone()) {
                continue;
            }
            for p in self.plugins.iter().filter(|p| input(p) == t) {
                let way = format!("{way} → plugin `{}`", p.name);
                if p.name == from.name {
                    return Some(way);
                }
                for target in p.outputs.values() {
                    if let OutputTarget::Topic(next) = target {
                        todo.push((next.clone(), format!("{way} → `{next}`")));
                    }
                }
            }
        }
        None
    }

    fn invalid(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.source.clone(),
            key: key.into(),
            message: message.into(),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        for (name, db) in &self.postgres {
            let at = |key: &str| format!("postgres.{name}.{key}");
            if !valid_name(name) {
                return Err(self.invalid(
                    format!("postgres.{name}"),
                    "a name of letters, digits, `-` and `_`",
                ));
            }
            if db.url.trim().is_empty() {
                return Err(self.invalid(
                    at("url"),
                    "a libpq connection string, e.g. \"postgresql://user:pass@host:5432/db\"",
                ));
            }
            if let Some(why) = tls_refusal(&db.url) {
                return Err(self.invalid(at("url"), why));
            }
            if !(1..=1000).contains(&db.pool_size) {
                return Err(self.invalid(
                    at("pool_size"),
                    format!("must be 1 to 1000, not {}", db.pool_size),
                ));
            }
            if db.migrate_on_start && db.migrations.is_none() {
                return Err(self.invalid(
                    at("migrate_on_start"),
                    "needs `migrations`, the directory of .sql files to apply",
                ));
            }
        }
        let k = &self.kafka;
        if k.brokers.trim().is_empty() {
            return Err(self.invalid(
                "kafka.brokers",
                r#"must be "embedded" or a list like "host:9092""#,
            ));
        }
        if !valid_topic(&k.topic) {
            return Err(self.invalid(
                "kafka.topic",
                format!(
                    "`{}` is not a Kafka topic name (1-249 of letters, digits, '.', '_', '-')",
                    k.topic
                ),
            ));
        }
        if !(100..=600_000).contains(&k.connect_timeout_ms) {
            return Err(self.invalid(
                "kafka.connect_timeout_ms",
                format!("must be 100 to 600000 ms, not {}", k.connect_timeout_ms),
            ));
        }
        if k.shared_fetch_mib > 4096 {
            return Err(self.invalid(
                "kafka.shared_fetch_mib",
                format!("must be 0 (off) to 4096 MiB, not {}", k.shared_fetch_mib),
            ));
        }
        if !(1..=1024).contains(&k.partitions) {
            return Err(self.invalid(
                "kafka.partitions",
                format!("must be 1 to 1024, not {}", k.partitions),
            ));
        }
        if self.state.commit_interval_ms > 60_000 {
            return Err(self.invalid(
                "state.commit_interval_ms",
                format!(
                    "must be 0 to 60000 ms, not {}",
                    self.state.commit_interval_ms
                ),
            ));
        }
        if !(1..=10_000).contains(&self.http.max_connections) {
            return Err(self.invalid(
                "http.max_connections",
                format!("must be 1 to 10000, not {}", self.http.max_connections),
            ));
        }
        if self.http.stream_max_clients > 10_000 {
            return Err(self.invalid(
                "http.stream_max_clients",
                format!("must be 0 to 10000, not {}", self.http.stream_max_clients),
            ));
        }
        if !(1..=1_000_000).contains(&self.http.stream_buffer) {
            return Err(self.invalid(
                "http.stream_buffer",
                format!(
                    "must be 1 to 1000000 records, not {}",
                    self.http.stream_buffer
                ),
            ));
        }
        if !(100..=600_000).contains(&self.http.send_timeout_ms) {
            return Err(self.invalid(
                "http.send_timeout_ms",
                format!(
                    "must be 100 to 600000 ms, not {}",
                    self.http.send_timeout_ms
                ),
            ));
        }
        for (key, value) in [
            ("http.head_timeout_ms", self.http.head_timeout_ms),
            ("http.body_timeout_ms", self.http.body_timeout_ms),
        ] {
            if !(100..=600_000).contains(&value) {
                return Err(self.invalid(key, format!("must be 100 to 600000 ms, not {value}")));
            }
        }
        self.validate_collector()?;
        for reserved in ["group.id", "bootstrap.servers", "enable.auto.offset.store"] {
            if k.settings.contains_key(reserved) {
                return Err(self.invalid(
                    format!("kafka.settings.\"{reserved}\""),
                    "is set by the host (use kafka.brokers, or a plugin's `group`)",
                ));
            }
        }
        if self.plugins.is_empty() {
            return Err(self.invalid("plugin", "no [[plugin]] entries: nothing to run"));
        }
        for (i, p) in self.plugins.iter().enumerate() {
            let at = |key: &str| format!("plugin[{i}].{key} (plugin `{}`)", p.name);
            if !valid_name(&p.name) {
                return Err(self.invalid(
                    format!("plugin[{i}].name"),
                    format!(
                        "`{}` must be 1-64 characters of letters, digits, '-' and '_'",
                        p.name
                    ),
                ));
            }
            if self.plugins[..i].iter().any(|q| q.name == p.name) {
                return Err(self.invalid(
                    format!("plugin[{i}].name"),
                    format!("`{}` is used twice", p.name),
                ));
            }
            if p.group.as_deref() == Some("") {
                return Err(self.invalid(
                    at("group"),
                    "must not be empty (leave it out for the default)",
                ));
            }
            if let Some(q) = self.plugins[..i]
                .iter()
                .find(|q| q.group_id() == p.group_id())
            {
                return Err(self.invalid(
                    at("group"),
                    format!(
                        "`{}` is also plugin `{}`'s group: each plugin needs its own",
                        p.group_id(),
                        q.name
                    ),
                ));
            }
            if !(1..=100_000).contains(&p.max_batch) {
                return Err(self.invalid(
                    at("max_batch"),
                    format!("must be 1 to 100000, not {}", p.max_batch),
                ));
            }
            if p.batch_linger_ms > 60_000 {
                return Err(self.invalid(at("batch_linger_ms"), "must be at most 60000"));
            }
            let l = &p.limits;
            if !(1..=4096).contains(&l.memory_mib) {
                return Err(self.invalid(
                    at("limits.memory_mib"),
                    format!("must be 1 to 4096 MiB, not {}", l.memory_mib),
                ));
            }
            if !(1..=600_000).contains(&l.cpu_ms) {
                return Err(self.invalid(
                    at("limits.cpu_ms"),
                    format!("must be 1 to 600000 ms, not {}", l.cpu_ms),
                ));
            }
            if !(1..=65_536).contains(&l.state_mib) {
                return Err(self.invalid(
                    at("limits.state_mib"),
                    format!("must be 1 to 65536 MiB, not {}", l.state_mib),
                ));
            }
            if !(1..=10_000_000).contains(&l.output_records) {
                return Err(self.invalid(
                    at("limits.output_records"),
                    format!("must be 1 to 10000000 records, not {}", l.output_records),
                ));
            }
            if !(1..=4096).contains(&l.output_mib) {
                return Err(self.invalid(
                    at("limits.output_mib"),
                    format!("must be 1 to 4096 MiB, not {}", l.output_mib),
                ));
            }
            if l.max_retries > 100 {
                return Err(self.invalid(at("limits.max_retries"), "must be at most 100"));
            }
            if l.retry_backoff_ms > 60_000 {
                return Err(self.invalid(
                    at("limits.retry_backoff_ms"),
                    format!("must be at most 60000 ms, not {}", l.retry_backoff_ms),
                ));
            }
            // Retries wait inside the batch, holding its offsets (and with shared_group a
            // rebalance): their waits together stay far below Kafka's max.poll.interval.ms.
            let worst: Duration = (0..l.max_retries)
                .map(|k| {
                    Duration::from_millis(l.retry_backoff_ms.saturating_mul(1 << k.min(40)))
                        .min(MAX_RETRY_DELAY)
                })
                .sum();
            if worst > MAX_RETRY_WAIT {
                return Err(self.invalid(
                    at("limits.max_retries"),
                    format!(
                        "{} retries from limits.retry_backoff_ms = {} wait up to {} s in one batch (the backoff doubles, up to 10 s a wait); at most {} s, so lower one of them",
                        l.max_retries,
                        l.retry_backoff_ms,
                        worst.as_secs(),
                        MAX_RETRY_WAIT.as_secs()
                    ),
                ));
            }
            if let Err(message) = p.max_ahead_ms() {
                return Err(self.invalid(at("max_ahead"), message));
            }
            if let Err((prefix, message)) = p.expire.rules() {
                return Err(self.invalid(at(&format!("expire.after.\"{prefix}\"")), message));
            }
            let b = &p.breaker;
            if !(1..=100_000).contains(&b.window) {
                return Err(self.invalid(
                    at("breaker.window"),
                    format!("must be 1 to 100000 events, not {}", b.window),
                ));
            }
            if b.failures > b.window {
                return Err(self.invalid(
                    at("breaker.failures"),
                    format!(
                        "{} failures can never happen within breaker.window = {} events",
                        b.failures, b.window
                    ),
                ));
            }
            if b.pause_ms == 0 || b.pause_ms > b.max_pause_ms {
                return Err(self.invalid(
                    at("breaker.pause_ms"),
                    format!(
                        "must be 1 to breaker.max_pause_ms ({}), not {}",
                        b.max_pause_ms, b.pause_ms
                    ),
                ));
            }
            if b.max_pause_ms > MAX_BREAKER_PAUSE_MS {
                return Err(self.invalid(
                    at("breaker.max_pause_ms"),
                    format!("must be at most {MAX_BREAKER_PAUSE_MS} ms"),
                ));
            }
            if let Some(t) = &p.topic
                && !valid_topic(t)
            {
                return Err(self.invalid(
                    at("topic"),
                    format!(
                        "`{t}` is not a Kafka topic name (1-249 of letters, digits, '.', '_', '-')"
                    ),
                ));
            }
            if let Some(t) = &p.dead_letter_topic
                && (!valid_topic(t) || *t == k.topic || *t == p.input_topic(&k.topic))
            {
                return Err(self.invalid(
                    at("dead_letter_topic"),
                    format!("`{t}` must be a valid Kafka topic name other than kafka.topic"),
                ));
            }
            if let Some(t) = &p.dead_letter_table {
                if !self.postgres.contains_key(&t.postgres) {
                    return Err(self.invalid(
                        at("dead_letter_table.postgres"),
                        format!("no [postgres.{}] in this file", t.postgres),
                    ));
                }
                if !postgres::valid_table(&t.table) {
                    return Err(self.invalid(
                        at("dead_letter_table.table"),
                        format!("`{}` is not a table name", t.table),
                    ));
                }
            }
            for (name, target) in &p.outputs {
                if let OutputTarget::Postgres(t) = target
                    && !self.postgres.contains_key(&t.postgres)
                {
                    return Err(self.invalid(
                        at(&format!("outputs.{name}.postgres")),
                        format!("no [postgres.{}] in this file", t.postgres),
                    ));
                }
                if let OutputTarget::Topic(t) = target
                    && !valid_topic(t)
                {
                    return Err(self.invalid(
                        at(&format!("outputs.{name}")),
                        format!("`{t}` is not a Kafka topic name (1-249 of letters, digits, '.', '_', '-')"),
                    ));
                }
                if let OutputTarget::Topic(t) = target
                    && *t == k.topic
                {
                    return Err(self.invalid(
                        at(&format!("outputs.{name}")),
                        format!("writes to `{t}`, the topic the plugins consume: that would loop"),
                    ));
                }
                if let OutputTarget::Topic(t) = target
                    && let Some(path) = self.loop_through(p, t)
                {
                    return Err(self.invalid(
                        at(&format!("outputs.{name}")),
                        format!(
                            "writes to `{t}`, which leads back to its own input: {path}: that would loop"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// `[http]`'s keys for `POST /v1/events`.
    fn validate_collector(&self) -> Result<(), ConfigError> {
        let h = &self.http;
        if !(1..=65_536).contains(&h.max_body_kib) {
            return Err(self.invalid(
                "http.max_body_kib",
                format!("must be 1 to 65536 KiB, not {}", h.max_body_kib),
            ));
        }
        if !(1..=100_000).contains(&h.max_events_per_post) {
            return Err(self.invalid(
                "http.max_events_per_post",
                format!("must be 1 to 100000, not {}", h.max_events_per_post),
            ));
        }
        // The largest post must fit in the budget alone, or it could never be taken.
        let largest_kib = post_cost_kib(h.max_body_kib << 10, h.max_events_per_post);
        if !(1..=65_536).contains(&h.ingest_memory_mib) || h.ingest_memory_mib << 10 < largest_kib {
            return Err(self.invalid(
                "http.ingest_memory_mib",
                format!(
                    "must be {} to 65536 MiB (the largest post, of max_body_kib = {} with max_events_per_post = {}, holds {} MiB), not {}",
                    largest_kib.div_ceil(1024),
                    h.max_body_kib,
                    h.max_events_per_post,
                    largest_kib.div_ceil(1024),
                    h.ingest_memory_mib
                ),
            ));
        }
        if !(1_000..=31_536_000_000).contains(&h.max_clock_skew_ms) {
            return Err(self.invalid(
                "http.max_clock_skew_ms",
                format!(
                    "must be 1000 ms to a year (31536000000), not {}",
                    h.max_clock_skew_ms
                ),
            ));
        }
        if !(100..=300_000).contains(&h.ingest_timeout_ms) {
            return Err(self.invalid(
                "http.ingest_timeout_ms",
                format!("must be 100 to 300000 ms, not {}", h.ingest_timeout_ms),
            ));
        }
        if let Some(t) = &h.token
            && !valid_token(t)
        {
            return Err(self.invalid(
                "http.token",
                "must be 1 to 4096 printable ASCII characters without spaces (leave it out for no token)",
            ));
        }
        if let Some(t) = &h.read_token {
            if !valid_token(t) {
                return Err(self.invalid(
                    "http.read_token",
                    "must be 1 to 4096 printable ASCII characters without spaces (leave it out for no read token)",
                ));
            }
            if h.token.as_deref() == Some(t.as_str()) {
                return Err(self.invalid(
                    "http.read_token",
                    "must differ from http.token: the ingest token sits in public web pages, the read token guards every plugin's output",
                ));
            }
        }
        for (i, name) in h.allowed_hosts.iter().enumerate() {
            let ok = !name.is_empty()
                && name.len() <= 253
                && name.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':')
                });
            if !ok {
                return Err(self.invalid(
                    format!("http.allowed_hosts[{i}]"),
                    format!("`{name}` is not a host name like \"eddy.example\" (no scheme, port or path)"),
                ));
            }
        }
        for (i, origin) in h.cors_origins.iter().enumerate() {
            if origin == "*" {
                if h.cors_origins.len() > 1 {
                    return Err(self.invalid(
                        format!("http.cors_origins[{i}]"),
                        "`*` allows every origin: list it alone",
                    ));
                }
            } else if !valid_origin(origin) {
                return Err(self.invalid(
                    format!("http.cors_origins[{i}]"),
                    format!(
                        "`{origin}` is not an origin like \"https://shop.example\" or \"http://localhost:8080\" (scheme and host, no path or trailing slash), nor \"*\""
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Whether the host must start its own broker.
    pub fn embedded(&self) -> bool {
        self.kafka.brokers.trim() == "embedded"
    }
}

/// A browser origin: `http` or `https`, `://`, a host (letters, digits, `.`, `-`, or an
/// IPv6 address in brackets) and an optional port; what a browser sends in `Origin`.
fn valid_origin(origin: &str) -> bool {
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (h, Some(p)),
        _ => (rest, None),
    };
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        !v6.is_empty() && v6.bytes().all(|b| b.is_ascii_hexdigit() || b == b':')
    } else {
        !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    };
    matches!(scheme, "http" | "https")
        && host_ok
        && port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0))
}

/// Kafka's rule for topic names.
fn valid_topic(name: &str) -> bool {
    (1..=249).contains(&name.len())
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_wasm(text: &str) -> (tempfile::TempDir, Result<Config, ConfigError>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.wasm"), b"").unwrap();
        let path = dir.path().join("plugins.toml");
        let r = Config::parse(text, &path).and_then(|c| c.check_plugin_files().map(|()| c));
        (dir, r)
    }

    const MINIMAL: &str = r#"
[kafka]
brokers = "embedded"

[[plugin]]
name = "a"
path = "a.wasm"
"#;

    #[test]
    fn defaults_fill_in() {
        let (dir, c) = with_wasm(MINIMAL);
        let c = c.unwrap();
        assert!(c.embedded());
        assert_eq!(c.kafka.topic, "user-activities");
        assert_eq!(c.kafka.partitions, 6);
        let p = &c.plugins[0];
        assert_eq!(p.group_id(), "eddy-a");
        assert_eq!(p.dead_letter_topic(), "a-dlq");
        assert_eq!(p.path, dir.path().join("a.wasm"));
        assert_eq!(p.limits.memory_mib, 64);
        assert_eq!(p.config_json(), "{}");
    }

    #[test]
    fn outputs_and_plugin_config() {
        let (_d, c) = with_wasm(&format!(
            "{MINIMAL}\n[plugin.outputs]\nalerts = {{ topic = \"alerts\" }}\nlog = \"stdout\"\n[plugin.config]\nrules = [{{ name = \"x\", min_amount = 5.5 }}]\n"
        ));
        let c = c.unwrap();
        let p = &c.plugins[0];
        assert_eq!(p.outputs["alerts"], OutputTarget::Topic("alerts".into()));
        assert_eq!(p.outputs["log"], OutputTarget::Stdout);
        assert_eq!(
            p.config_json(),
            r#"{"rules":[{"min_amount":5.5,"name":"x"}]}"#
        );
    }

    fn error(text: &str) -> String {
        let (_d, r) = with_wasm(text);
        r.unwrap_err().to_string()
    }

    #[test]
    fn retries_that_would_wait_for_minutes_and_unbounded_outputs_are_refused() {
        let limits = |body: &str| format!("{MINIMAL}[plugin.limits]\n{body}\n");
        let e = error(&limits("retry_backoff_ms = 3600000"));
        assert!(e.contains("plugin[0].limits.retry_backoff_ms"), "{e}");
        assert!(e.contains("at most 60000 ms"), "{e}");
        // 100 retries: 12.7 s of doubling, then 93 waits of 10 s.
        let e = error(&limits("max_retries = 100"));
        assert!(e.contains("plugin[0].limits.max_retries"), "{e}");
        assert!(e.contains("wait up to 942 s in one batch"), "{e}");
        let (_d, c) = with_wasm(&limits("max_retries = 15\nretry_backoff_ms = 100"));
        assert_eq!(c.unwrap().plugins[0].limits.max_retries, 15);
        for (key, value) in [
            ("output_records", 0),
            ("output_mib", 0),
            ("output_mib", 5000),
        ] {
            let e = error(&limits(&format!("{key} = {value}")));
            assert!(e.contains(&format!("plugin[0].limits.{key}")), "{e}");
        }
    }

    #[test]
    fn expiry_rules_take_friendly_durations_and_name_a_bad_one() {
        let expire = |body: &str| format!("{MINIMAL}[plugin.expire]\n{body}\n");
        let (_d, c) = with_wasm(&expire(
            "clock = \"host\"\nafter = { \"user:\" = \"24h\", \"user:vip:\" = \"7d\", \"s:\" = \"1h 30m\" }",
        ));
        let p = &c.unwrap().plugins[0];
        assert_eq!(p.expire.clock, ExpireClock::Host);
        let rules: Vec<(String, i64)> = p
            .expire
            .rules()
            .unwrap()
            .into_iter()
            .map(|r| (r.prefix, r.after_ms))
            .collect();
        assert_eq!(
            rules,
            [
                ("user:vip:".to_string(), 7 * 86_400_000),
                ("user:".to_string(), 86_400_000),
                ("s:".to_string(), 5_400_000)
            ]
        );
        let e = error(&expire("after = { \"user:\" = \"a day\" }"));
        assert!(e.contains("plugin[0].expire.after.\"user:\""), "{e}");
        assert!(e.contains("is not a duration like"), "{e}");
        let e = error(&expire("after = { \"user:\" = \"500ms\" }"));
        assert!(e.contains("less than 1 s"), "{e}");
        let e = error(&expire("clock = \"wall\""));
        assert!(e.contains("wall"), "{e}");
    }

    #[test]
    fn unknown_keys_are_named_with_their_line() {
        let e = error(&MINIMAL.replace("name = \"a\"", "name = \"a\"\nmax_btach = 5"));
        assert!(e.contains("plugins.toml"), "{e}");
        assert!(e.contains("max_btach"), "{e}");
        assert!(e.contains("line 7"), "{e}");
        let e = error(&MINIMAL.replace("[kafka]", "[kafka]\nbroker = \"x\""));
        assert!(e.contains("broker"), "{e}");
    }

    #[test]
    fn postgres_outputs_and_their_mistakes() {
        let db = "[postgres.main]\nurl = \"postgresql://u@h/db\"\n";
        let good = format!(
            "{db}{MINIMAL}dead_letter_table = {{ postgres = \"main\" }}\n[plugin.outputs]\n\
             e = {{ postgres = \"main\", table = \"public.user_events\", mode = \"insert_if_absent\", key = [\"event_id\"] }}\n\
             a = {{ postgres = \"main\", table = \"raw\" }}\n"
        );
        let (_d, c) = with_wasm(&good);
        let c = c.unwrap();
        assert_eq!(c.postgres["main"].pool_size, 4);
        let p = &c.plugins[0];
        assert_eq!(
            p.dead_letter_table.as_ref().unwrap().table,
            "dead_letter_queue"
        );
        assert_eq!(
            p.outputs["e"],
            OutputTarget::Postgres(TableTarget {
                postgres: "main".into(),
                table: "public.user_events".into(),
                mode: WriteMode::InsertIfAbsent,
                key: vec!["event_id".into()],
            })
        );
        assert!(
            matches!(&p.outputs["a"], OutputTarget::Postgres(t) if t.mode == WriteMode::Append)
        );
        for (text, expected) in [
            (
                "{ postgres = \"other\", table = \"t\" }",
                "no [postgres.other]",
            ),
            ("{ postgres = \"main\" }", "needs `table`"),
            (
                "{ postgres = \"main\", table = \"t; drop\" }",
                "not a table name",
            ),
            (
                "{ postgres = \"main\", table = \"t\", mode = \"upsert\" }",
                "needs `key`",
            ),
            (
                "{ postgres = \"main\", table = \"t\", key = [\"id\"] }",
                "not \"append\"",
            ),
            (
                "{ postgres = \"main\", table = \"t\", mode = \"merge\" }",
                r#"mode = "append"|"insert_if_absent"|"upsert""#,
            ),
            ("{ topic = \"x\", table = \"t\" }", "for `postgres` outputs"),
        ] {
            let e = error(&format!("{db}{MINIMAL}[plugin.outputs]\nx = {text}\n"));
            assert!(e.contains(expected), "{text}: {e}");
        }
        let e = error(&format!(
            "[postgres.main]\nurl = \"host=h sslmode=verify-full\"\n{MINIMAL}"
        ));
        assert!(
            e.contains("postgres.main.url") && e.contains("use sslmode=require"),
            "{e}"
        );
        let e = error(&format!("{db}pool_size = 0\n{MINIMAL}"));
        assert!(e.contains("postgres.main.pool_size"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key_and_what_is_expected() {
        let e = error(&format!("{MINIMAL}[plugin.limits]\nmemory_mib = 0\n"));
        assert!(e.contains("plugin[0].limits.memory_mib"), "{e}");
        assert!(e.contains("1 to 4096"), "{e}");
        let e = error(&format!("{MINIMAL}[plugin.outputs]\nalerts = \"kafka\"\n"));
        assert!(
            e.contains(r#"expected "stdout", "discard", { topic = "name" } or { postgres"#),
            "{e}"
        );
        let e = error(&MINIMAL.replace("a.wasm", "missing.wasm"));
        assert!(
            e.contains("plugin[0].path") && e.contains("no file at") && e.contains("make plugins"),
            "{e}"
        );
        let e = error(&format!(
            "{MINIMAL}\n[[plugin]]\nname = \"a\"\npath = \"a.wasm\"\n"
        ));
        assert!(e.contains("`a` is used twice"), "{e}");
        let e = error(&MINIMAL.replace("name = \"a\"", "name = \"a b\""));
        assert!(e.contains("plugin[0].name"), "{e}");
        let e = error(&MINIMAL.replace("[kafka]", "[kafka]\nsettings = { \"group.id\" = \"x\" }"));
        assert!(e.contains("group.id"), "{e}");
        let e = error("[kafka]\nbrokers = \"embedded\"\n");
        assert!(e.contains("no [[plugin]] entries"), "{e}");
        let e = error(&MINIMAL.replace("[kafka]", "[kafka]\nshared_fetch_mib = 5000"));
        assert!(
            e.contains("kafka.shared_fetch_mib") && e.contains("0 (off) to 4096 MiB"),
            "{e}"
        );
        let e = error(&format!("{MINIMAL}start_from = \"middle\"\n"));
        assert!(e.contains("start_from") || e.contains("middle"), "{e}");
    }

    #[test]
    fn collector_keys_are_checked_and_named() {
        let http = |body: &str| format!("{MINIMAL}[http]\n{body}\n");
        let (_d, c) = with_wasm(MINIMAL);
        let h = c.unwrap().http;
        assert_eq!((h.max_body_kib, h.ingest_timeout_ms), (1024, 5000));
        assert_eq!((h.token, h.cors_origins.len()), (None, 0));
        let (_d, c) = with_wasm(&http(
            "token = \"s3cret\"\ncors_origins = [\"https://shop.example\", \"http://localhost:8080\", \"http://[::1]:3000\"]",
        ));
        assert_eq!(c.unwrap().http.cors_origins.len(), 3);
        for (body, key, said) in [
            ("max_body_kib = 0", "http.max_body_kib", "1 to 65536"),
            (
                "ingest_timeout_ms = 10",
                "http.ingest_timeout_ms",
                "100 to 300000",
            ),
            ("token = \"\"", "http.token", "printable"),
            ("token = \"a b\"", "http.token", "without spaces"),
            (
                "cors_origins = [\"https://shop.example/\"]",
                "http.cors_origins[0]",
                "no path",
            ),
            (
                "cors_origins = [\"shop.example\"]",
                "http.cors_origins[0]",
                "not an origin",
            ),
            (
                "cors_origins = [\"https://a.example\", \"*\"]",
                "http.cors_origins[1]",
                "alone",
            ),
            (
                "cors_origins = [\"http://h:99999\"]",
                "http.cors_origins[0]",
                "not an origin",
            ),
        ] {
            let e = error(&http(body));
            assert!(
                e.contains(&format!("`{key}`")) && e.contains(said),
                "{body}: {e}"
            );
        }
    }

    #[test]
    fn output_to_the_input_topic_is_refused() {
        let e = error(&format!(
            "{MINIMAL}[plugin.outputs]\nx = {{ topic = \"user-activities\" }}\n"
        ));
        assert!(e.contains("would loop"), "{e}");
    }

    /// A plugin may consume another's output topic; records that come back to where they
    /// started are refused, with the way they go.
    #[test]
    fn a_pipeline_of_plugins_is_taken_and_a_loop_through_one_refused() {
        let chain = "[[plugin]]\nname = \"b\"\npath = \"a.wasm\"\ntopic = \"stage-2\"\n";
        let (_d, ok) = with_wasm(&format!(
            "{MINIMAL}[plugin.outputs]\nout = {{ topic = \"stage-2\" }}\n{chain}"
        ));
        let config = ok.expect("a pipeline");
        assert_eq!(
            config.plugins[1].input_topic(&config.kafka.topic),
            "stage-2"
        );
        assert_eq!(
            config.plugins[0].input_topic(&config.kafka.topic),
            "user-activities"
        );
        let e = error(&format!(
            "{MINIMAL}topic = \"stage-1\"\n[plugin.outputs]\nout = {{ topic = \"stage-2\" }}\n\
             {chain}[plugin.outputs]\nback = {{ topic = \"stage-1\" }}\n"
        ));
        assert!(
            e.contains("`stage-2` → plugin `b` → `stage-1` → plugin `a`: that would loop"),
            "{e}"
        );
        let e = error(&format!("{MINIMAL}topic = \"not a topic\"\n"));
        assert!(
            e.contains("`plugin[0].topic`") || e.contains("topic"),
            "{e}"
        );
    }
}
