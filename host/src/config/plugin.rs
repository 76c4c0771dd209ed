//! One `[[plugin]]` entry of `plugins.toml`: which `.wasm`, its consumer group, batching,
//! its sandbox limits, its breaker and where its outputs go.

use super::{DeadLetterTable, OutputTarget};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// One `[[plugin]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// Unique name: labels its metrics and logs, and derives its defaults.
    pub name: String,
    /// The plugin's `.wasm` component.
    pub path: PathBuf,
    /// Kafka consumer group; `eddy-<name>` by default. Each plugin has its own group, so each
    /// sees every event with its own offsets.
    #[serde(default)]
    pub group: Option<String>,
    /// The topic the plugin consumes; `kafka.topic` by default. Another plugin's output
    /// topic makes a pipeline: one plugin's records are the next one's events.
    #[serde(default)]
    pub topic: Option<String>,
    /// With the embedded broker, which creates `topic` at start: its partition count
    /// (`kafka.partitions` by default). 1 for a topic of partials that one reducer sums.
    #[serde(default)]
    pub topic_partitions: Option<i32>,
    /// Where a group with no committed offset starts: `"earliest"` or `"latest"`.
    #[serde(default)]
    pub start_from: StartFrom,
    /// Most events handed to the plugin in one call.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// How long to wait for more events before handing over a partial batch. What
    /// librdkafka already holds is taken without waiting; the linger only adds latency when
    /// events trickle in, so it is short: every event of a batch waits for its last.
    #[serde(default = "default_batch_linger_ms")]
    pub batch_linger_ms: u64,
    /// How often the plugin's `on-tick` is called; 0 for never.
    #[serde(default = "default_tick_interval_ms")]
    pub tick_interval_ms: u64,
    /// Topic that dead-lettered events go to; `<name>-dlq` by default.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// Dead letters also go to this PostgreSQL table (as well as to the topic).
    #[serde(default)]
    pub dead_letter_table: Option<DeadLetterTable>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub breaker: BreakerPolicy,
    #[serde(default)]
    pub expire: Expire,
    /// How far ahead of the host's clock an event's time is believed (`"5m"` if not set).
    /// A later one is not: the SDK's `Event::time` says so (the shipped plugins dead-letter
    /// it with the reason), and `[plugin.expire]`'s event clock stops there. One event
    /// stamped in 2999 or in microseconds would otherwise move the plugin's clocks for good.
    #[serde(default)]
    pub max_ahead: Option<String>,
    /// Output name (as the plugin emits it) → destination.
    #[serde(default)]
    pub outputs: BTreeMap<String, OutputTarget>,
    /// Handed to the plugin's `init` as JSON. Its keys are the plugin's business.
    #[serde(default)]
    pub config: toml::Table,
}

/// `[plugin.limits]`: the sandbox.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Linear memory cap of one instance, in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// CPU deadline of one call (a batch, a tick, init), in milliseconds. A plugin that runs
    /// longer is interrupted and its events are isolated and dead-lettered.
    #[serde(default = "default_cpu_ms")]
    pub cpu_ms: u64,
    /// How many times an event the plugin answered `retry` is handed again before it is
    /// dead-lettered.
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    /// First retry delay; doubled on each further attempt.
    #[serde(default = "default_retry_backoff_ms")]
    pub retry_backoff_ms: u64,
    /// Most state the plugin may keep (keys + values), in MiB. A write past it fails the
    /// call, and its events are dead-lettered with the reason.
    #[serde(default = "default_state_mib")]
    pub state_mib: u64,
    /// Most output records one call (a batch, a tick) may emit. A call past it fails like a
    /// trap (`kind="output"`): its events are isolated and the one that floods is
    /// dead-lettered with a reason naming this limit.
    #[serde(default = "default_output_records")]
    pub output_records: u64,
    /// Most output bytes (payloads, keys and output names) one call may emit, in MiB; past
    /// it, as for `output_records`.
    #[serde(default = "default_output_mib")]
    pub output_mib: u64,
    /// Most log lines the plugin may write per second (a burst of this many, refilled
    /// continuously); lines past it are dropped and counted in
    /// `eddy_plugin_log_lines_dropped_total`. A line is cut at 4 KiB.
    #[serde(default = "default_log_lines_per_s")]
    pub log_lines_per_s: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_mib: default_memory_mib(),
            cpu_ms: default_cpu_ms(),
            max_retries: default_max_retries(),
            retry_backoff_ms: default_retry_backoff_ms(),
            state_mib: default_state_mib(),
            output_records: default_output_records(),
            output_mib: default_output_mib(),
            log_lines_per_s: default_log_lines_per_s(),
        }
    }
}

/// `[plugin.expire]`: state keys that go away on their own, so that state kept per user (or
/// per anything unbounded) stays bounded. The host deletes them; a plugin cannot forget to.
///
/// A key under a prefix of `after` expires that long after its last write (the longest
/// matching prefix decides; a key under none never expires). It is deleted with the first
/// batch committed once its time has passed (in the same transaction as that batch), so it
/// is never gone early and never more than a batch late. A plugin that needs exact window
/// edges compares event times itself; expiry is what keeps the state from growing.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Expire {
    #[serde(default)]
    pub clock: ExpireClock,
    /// Key prefix → how long after its last write a key under it expires: `"90s"`, `"10m"`,
    /// `"24h"`, `"7d"` (at least 1 s).
    #[serde(default)]
    pub after: BTreeMap<String, String>,
}

/// How far ahead of the host's clock an event's time is believed unless `max_ahead` says.
pub const DEFAULT_MAX_AHEAD_MS: i64 = 5 * 60_000;

/// The clock `[plugin.expire]` measures by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpireClock {
    /// Event time: the latest Kafka record timestamp the plugin has been handed. A replay of
    /// last week's events expires keys as it did then, and a quiet stream expires nothing.
    #[default]
    Event,
    /// The host's wall clock, also while the stream is quiet (checked on every tick).
    Host,
}

/// One `[plugin.expire]` entry, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpireRule {
    pub prefix: String,
    pub after_ms: i64,
}

impl PluginConfig {
    /// `max_ahead` in milliseconds, or what is wrong with it.
    pub fn max_ahead_ms(&self) -> Result<i64, String> {
        self.max_ahead
            .as_deref()
            .map_or(Ok(DEFAULT_MAX_AHEAD_MS), parse_duration)
    }
}

impl Expire {
    /// The rules, longest prefix first (the first that matches a key decides), or what is
    /// wrong with one: `(prefix, message)`.
    pub fn rules(&self) -> Result<Vec<ExpireRule>, (String, String)> {
        let mut rules = Vec::with_capacity(self.after.len());
        for (prefix, text) in &self.after {
            let after = parse_duration(text).map_err(|m| (prefix.clone(), m))?;
            rules.push(ExpireRule {
                prefix: prefix.clone(),
                after_ms: after,
            });
        }
        rules.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Ok(rules)
    }
}

/// `"90s"`, `"10m"`, `"24h"`, `"7d"`, `"1h 30m"` → milliseconds (jiff's friendly format; a
/// day is 24 hours, months and years are refused).
fn parse_duration(text: &str) -> Result<i64, String> {
    let not_one = |e: jiff::Error| {
        format!("`{text}` is not a duration like \"90s\", \"10m\", \"24h\" or \"7d\" ({e})")
    };
    let span: jiff::Span = text.parse().map_err(not_one)?;
    let d = span
        .to_duration(jiff::SpanRelativeTo::days_are_24_hours())
        .map_err(not_one)?;
    let ms = d.as_millis();
    if ms < 1_000 {
        return Err(format!("`{text}` is less than 1 s"));
    }
    if ms > 3_650 * 86_400_000 {
        return Err(format!("`{text}` is more than 10 years"));
    }
    Ok(ms as i64)
}

/// `[plugin.breaker]`: when a plugin keeps failing, stop feeding it for a while (see
/// `breaker.rs` for the whole story).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerPolicy {
    /// Open the breaker when this many of the last `window` events failed (trapped, hit a
    /// limit or ran out of retries; a `dead-letter` verdict is a decision, not a failure).
    /// 0 turns the breaker off: every failing event is dead-lettered and the plugin goes on.
    #[serde(default = "default_breaker_failures")]
    pub failures: u32,
    /// How many recent events `failures` is counted over.
    #[serde(default = "default_breaker_window")]
    pub window: u32,
    /// The first pause, in milliseconds; doubled each time the plugin fails again right
    /// after a pause.
    #[serde(default = "default_breaker_pause_ms")]
    pub pause_ms: u64,
    /// The longest pause (at most [`MAX_BREAKER_PAUSE_MS`]). The plugin's consumer stays
    /// polled meanwhile, its partitions paused.
    #[serde(default = "default_breaker_max_pause_ms")]
    pub max_pause_ms: u64,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            failures: default_breaker_failures(),
            window: default_breaker_window(),
            pause_ms: default_breaker_pause_ms(),
            max_pause_ms: default_breaker_max_pause_ms(),
        }
    }
}

fn default_breaker_failures() -> u32 {
    5
}
fn default_breaker_window() -> u32 {
    100
}
fn default_breaker_pause_ms() -> u64 {
    1_000
}
fn default_breaker_max_pause_ms() -> u64 {
    60_000
}

/// The longest breaker pause allowed. Set below librdkafka's default
/// `max.poll.interval.ms` (300 s) when a paused plugin's consumer was not polled; it is now
/// (see `pipeline::source`), and the bound stays.
pub const MAX_BREAKER_PAUSE_MS: u64 = 240_000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    #[default]
    Earliest,
    Latest,
}

impl StartFrom {
    pub fn as_kafka(self) -> &'static str {
        match self {
            StartFrom::Earliest => "earliest",
            StartFrom::Latest => "latest",
        }
    }
}

fn default_max_batch() -> usize {
    500
}
fn default_batch_linger_ms() -> u64 {
    5
}
fn default_tick_interval_ms() -> u64 {
    10_000
}
fn default_memory_mib() -> u64 {
    64
}
fn default_cpu_ms() -> u64 {
    500
}
fn default_max_retries() -> u32 {
    3
}
fn default_retry_backoff_ms() -> u64 {
    100
}
fn default_state_mib() -> u64 {
    64
}
fn default_output_records() -> u64 {
    100_000
}
fn default_output_mib() -> u64 {
    32
}
fn default_log_lines_per_s() -> u32 {
    100
}

impl PluginConfig {
    /// The topic the plugin consumes: its own `topic`, else `default` (`kafka.topic`).
    pub fn input_topic<'a>(&'a self, default: &'a str) -> &'a str {
        self.topic.as_deref().unwrap_or(default)
    }

    pub fn group_id(&self) -> String {
        self.group
            .clone()
            .unwrap_or_else(|| format!("eddy-{}", self.name))
    }

    /// A batch is cut when its events' bytes reach a quarter of the memory cap: the batch is
    /// copied into the plugin's memory and parsed there.
    pub fn max_batch_bytes(&self) -> usize {
        ((self.limits.memory_mib as usize) << 20) / 4
    }

    pub fn dead_letter_topic(&self) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{}-dlq", self.name))
    }

    /// The plugin's `config` table as the JSON text `init` receives.
    pub fn config_json(&self) -> String {
        serde_json::to_string(&self.config).expect("a TOML table is valid JSON")
    }
}
