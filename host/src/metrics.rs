//! Counters and gauges per plugin, rendered in the Prometheus text format for `/metrics`.
//!
//! Plain atomics rather than a metrics crate: the hot path is a handful of relaxed adds per
//! batch, and the text format is a few lines of code.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What happened to one event, as counted in `eddy_events_total{verdict=…}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Skip,
    /// Dead-lettered: by the plugin's verdict, after retries ran out, or after a trap.
    DeadLetter,
}

impl Outcome {
    const ALL: [Outcome; 3] = [Outcome::Ok, Outcome::Skip, Outcome::DeadLetter];

    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Skip => "skip",
            Outcome::DeadLetter => "dead_letter",
        }
    }
}

/// Why a call into a plugin failed, as counted in `eddy_traps_total{kind=…}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrapKind {
    /// A panic, `unreachable`, out-of-bounds access, …
    Trap,
    /// The CPU deadline (`limits.cpu_ms`) was hit.
    Deadline,
    /// The memory cap (`limits.memory_mib`) was hit.
    Memory,
}

impl TrapKind {
    const ALL: [TrapKind; 3] = [TrapKind::Trap, TrapKind::Deadline, TrapKind::Memory];

    pub fn label(self) -> &'static str {
        match self {
            TrapKind::Trap => "trap",
            TrapKind::Deadline => "deadline",
            TrapKind::Memory => "memory",
        }
    }
}

/// Why an event was dead-lettered, as counted in `eddy_dead_letters_total{reason=…}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// The plugin answered `dead-letter` (e.g. a malformed event).
    Verdict,
    /// The plugin answered `retry` until `limits.max_retries` ran out.
    RetriesExhausted,
    /// The plugin failed on the event (isolated by re-running its batch in halves).
    Failed(TrapKind),
}

impl DeadLetterReason {
    const ALL: [DeadLetterReason; 5] = [
        DeadLetterReason::Verdict,
        DeadLetterReason::RetriesExhausted,
        DeadLetterReason::Failed(TrapKind::Trap),
        DeadLetterReason::Failed(TrapKind::Deadline),
        DeadLetterReason::Failed(TrapKind::Memory),
    ];

    pub fn label(self) -> &'static str {
        match self {
            DeadLetterReason::Verdict => "verdict",
            DeadLetterReason::RetriesExhausted => "retries_exhausted",
            DeadLetterReason::Failed(kind) => kind.label(),
        }
    }

    fn index(self) -> usize {
        match self {
            DeadLetterReason::Verdict => 0,
            DeadLetterReason::RetriesExhausted => 1,
            DeadLetterReason::Failed(kind) => 2 + kind as usize,
        }
    }
}

/// How a plugin reload ended, as counted in `eddy_plugin_reloads_total{outcome=…}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The new version (or config) runs.
    Ok,
    /// It did not compile, link, `init` or `migrate`: the old version kept running.
    Failed,
    /// It trapped on probation: the old version was restored.
    RolledBack,
}

impl ReloadOutcome {
    const ALL: [ReloadOutcome; 3] = [
        ReloadOutcome::Ok,
        ReloadOutcome::Failed,
        ReloadOutcome::RolledBack,
    ];

    fn label(self) -> &'static str {
        match self {
            ReloadOutcome::Ok => "ok",
            ReloadOutcome::Failed => "failed",
            ReloadOutcome::RolledBack => "rolled_back",
        }
    }
}

/// The version of a plugin that is running.
#[derive(Debug, Clone, Default)]
pub struct Version {
    /// `sha256:…` of the `.wasm` file.
    pub digest: String,
    pub path: String,
    /// When it started running, Unix seconds.
    pub loaded_at: f64,
    /// How long compiling (or loading precompiled code) and linking it took, seconds.
    pub compile_seconds: f64,
    /// Whether its code came from the compile cache.
    pub precompiled: bool,
    /// Whether its code is the baseline compiler's, until the optimized code is ready.
    pub baseline: bool,
}

/// Upper bounds of the batch-latency histogram buckets, in seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Everything counted for one plugin.
#[derive(Debug, Default)]
pub struct PluginMetrics {
    events: [AtomicU64; 3],
    /// `retry` verdicts received (each retry attempt counts).
    pub retries: AtomicU64,
    traps: [AtomicU64; 3],
    pub instance_restarts: AtomicU64,
    pub output_records: AtomicU64,
    pub output_failures: AtomicU64,
    pub ticks: AtomicU64,
    /// Events consumed but not yet handled, summed over the plugin's partitions (-1: unknown).
    pub consumer_lag: AtomicI64,
    /// 1 while the plugin is loaded and consuming.
    pub up: AtomicI64,
    /// Whether the plugin's consumer has a connection to a Kafka broker: 1 yes, 2 no (all
    /// brokers down: it reconnects meanwhile), 0 not known yet. From librdkafka's
    /// statistics, once a second.
    pub kafka: AtomicI64,
    /// 0 closed, 1 open (paused), 2 half-open (on trial after a pause).
    pub breaker_state: AtomicI64,
    /// Times the breaker opened.
    pub breaker_trips: AtomicU64,
    dead_letters: [AtomicU64; 5],
    reloads: [AtomicU64; 3],
    version: Mutex<Version>,
    batch_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    batch_count: AtomicU64,
    batch_nanos: AtomicU64,
    commit_count: AtomicU64,
    commit_nanos: AtomicU64,
}

impl PluginMetrics {
    pub fn count(&self, outcome: Outcome, n: u64) {
        self.events[outcome as usize].fetch_add(n, Relaxed);
    }

    pub fn events(&self, outcome: Outcome) -> u64 {
        self.events[outcome as usize].load(Relaxed)
    }

    /// All events that got a final outcome.
    pub fn events_handled(&self) -> u64 {
        Outcome::ALL.iter().map(|o| self.events(*o)).sum()
    }

    pub fn dead_lettered(&self, reason: DeadLetterReason) {
        self.dead_letters[reason.index()].fetch_add(1, Relaxed);
    }

    pub fn dead_letters(&self, reason: DeadLetterReason) -> u64 {
        self.dead_letters[reason.index()].load(Relaxed)
    }

    pub fn set_breaker(&self, state: crate::breaker::BreakerState) {
        use crate::breaker::BreakerState::*;
        let v = match state {
            Closed => 0,
            Open => 1,
            HalfOpen => 2,
        };
        self.breaker_state.store(v, Relaxed);
    }

    pub fn trap(&self, kind: TrapKind) {
        self.traps[kind as usize].fetch_add(1, Relaxed);
    }

    pub fn traps(&self, kind: TrapKind) -> u64 {
        self.traps[kind as usize].load(Relaxed)
    }

    pub fn reload(&self, outcome: ReloadOutcome) {
        self.reloads[outcome as usize].fetch_add(1, Relaxed);
    }

    pub fn reloads(&self, outcome: ReloadOutcome) -> u64 {
        self.reloads[outcome as usize].load(Relaxed)
    }

    pub fn set_version(&self, version: Version) {
        *self.version.lock().expect("metrics lock") = version;
    }

    pub fn version(&self) -> Version {
        self.version.lock().expect("metrics lock").clone()
    }

    pub fn observe_batch(&self, took: Duration) {
        let secs = took.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
            self.batch_buckets[i].fetch_add(1, Relaxed);
        }
        self.batch_count.fetch_add(1, Relaxed);
        self.batch_nanos.fetch_add(took.as_nanos() as u64, Relaxed);
    }

    /// Counts one state commit (with its offsets) and how long it took.
    pub fn observe_commit(&self, took: Duration) {
        self.commit_count.fetch_add(1, Relaxed);
        self.commit_nanos.fetch_add(took.as_nanos() as u64, Relaxed);
    }

    /// Mean time of a state commit so far.
    pub fn mean_commit(&self) -> Duration {
        let n = self.commit_count.load(Relaxed).max(1);
        Duration::from_nanos(self.commit_nanos.load(Relaxed) / n)
    }

    pub fn batches(&self) -> u64 {
        self.batch_count.load(Relaxed)
    }
}

/// All plugins' metrics, plus host-wide ones.
#[derive(Debug, Default)]
pub struct Metrics {
    plugins: Mutex<BTreeMap<String, Arc<PluginMetrics>>>,
    /// Events the in-process generator produced.
    pub generated: AtomicU64,
    /// Re-reads of `plugins.toml` that were applied / refused as invalid.
    pub config_reloads_ok: AtomicU64,
    pub config_reloads_failed: AtomicU64,
}

impl Metrics {
    /// The metrics of `plugin`, created on first use (and kept across reloads).
    pub fn plugin(&self, plugin: &str) -> Arc<PluginMetrics> {
        let mut plugins = self.plugins.lock().expect("metrics lock");
        plugins.entry(plugin.to_string()).or_default().clone()
    }

    /// The plugins with metrics, in name order.
    pub fn plugin_names(&self) -> Vec<String> {
        let plugins = self.plugins.lock().expect("metrics lock");
        plugins.keys().cloned().collect()
    }

    /// `/healthz`: `{"status":"ok"|"degraded","kafka":"up"|"down"|"unknown","plugins":{"name":{"up":true,…}}}`.
    /// Degraded when a plugin is not consuming, its breaker is open, or Kafka is unreachable.
    pub fn health_json(&self) -> String {
        let plugins = self.plugins.lock().expect("metrics lock");
        let mut all_up = true;
        let mut kafka = "unknown";
        let entries: serde_json::Map<String, serde_json::Value> = plugins
            .iter()
            .map(|(name, m)| {
                let up = m.up.load(Relaxed) == 1;
                let breaker = match m.breaker_state.load(Relaxed) {
                    1 => "open",
                    2 => "half_open",
                    _ => "closed",
                };
                all_up &= up && breaker != "open";
                let plugin_kafka = match m.kafka.load(Relaxed) {
                    1 => "up",
                    2 => "down",
                    _ => "unknown",
                };
                // Down if any consumer lost it; up if one has it and none lost it.
                kafka = match (kafka, plugin_kafka) {
                    ("down", _) | (_, "down") => "down",
                    ("up", _) | (_, "up") => "up",
                    _ => "unknown",
                };
                let v = serde_json::json!({
                    "up": up,
                    "kafka": plugin_kafka,
                    "breaker": breaker,
                    "events": m.events_handled(),
                    "consumer_lag": m.consumer_lag.load(Relaxed),
                });
                (name.clone(), v)
            })
            .collect();
        let status = if all_up && kafka != "down" {
            "ok"
        } else {
            "degraded"
        };
        serde_json::json!({ "status": status, "kafka": kafka, "plugins": entries }).to_string()
            + "\n"
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self) -> String {
        let plugins: Vec<(String, Arc<PluginMetrics>)> = self
            .plugins
            .lock()
            .expect("metrics lock")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut out = String::new();
        let header = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        // The common case: one sample per plugin.
        let per_plugin = |out: &mut String,
                          name: &str,
                          kind: &str,
                          help: &str,
                          value: &dyn Fn(&PluginMetrics) -> String| {
            header(out, name, kind, help);
            for (plugin, m) in &plugins {
                let _ = writeln!(out, "{name}{{plugin=\"{plugin}\"}} {}", value(m));
            }
        };

        header(
            &mut out,
            "eddy_events_total",
            "counter",
            "Events handled, per plugin and final verdict.",
        );
        for (plugin, m) in &plugins {
            for outcome in Outcome::ALL {
                let (verdict, n) = (outcome.label(), m.events(outcome));
                let _ = writeln!(
                    out,
                    "eddy_events_total{{plugin=\"{plugin}\",verdict=\"{verdict}\"}} {n}"
                );
            }
        }
        header(
            &mut out,
            "eddy_traps_total",
            "counter",
            "Calls into a plugin that failed, per cause.",
        );
        for (plugin, m) in &plugins {
            for kind in TrapKind::ALL {
                let _ = writeln!(
                    out,
                    "eddy_traps_total{{plugin=\"{plugin}\",kind=\"{}\"}} {}",
                    kind.label(),
                    m.traps(kind)
                );
            }
        }
        header(
            &mut out,
            "eddy_dead_letters_total",
            "counter",
            "Events written to a plugin's dead-letter topic, per reason.",
        );
        for (plugin, m) in &plugins {
            for reason in DeadLetterReason::ALL {
                let _ = writeln!(
                    out,
                    "eddy_dead_letters_total{{plugin=\"{plugin}\",reason=\"{}\"}} {}",
                    reason.label(),
                    m.dead_letters(reason)
                );
            }
        }
        let counter = |a: &AtomicU64| a.load(Relaxed).to_string();
        per_plugin(
            &mut out,
            "eddy_breaker_state",
            "gauge",
            "A plugin's breaker: 0 closed, 1 open (paused after repeated failures), 2 half-open.",
            &|m| m.breaker_state.load(Relaxed).to_string(),
        );
        per_plugin(
            &mut out,
            "eddy_breaker_trips_total",
            "counter",
            "Times a plugin's breaker opened.",
            &|m| counter(&m.breaker_trips),
        );
        per_plugin(
            &mut out,
            "eddy_retries_total",
            "counter",
            "Retry verdicts received (each attempt).",
            &|m| counter(&m.retries),
        );
        per_plugin(
            &mut out,
            "eddy_instance_restarts_total",
            "counter",
            "Plugin instances recreated after a failure.",
            &|m| counter(&m.instance_restarts),
        );
        per_plugin(
            &mut out,
            "eddy_output_records_total",
            "counter",
            "Records plugins emitted and the host delivered.",
            &|m| counter(&m.output_records),
        );
        per_plugin(
            &mut out,
            "eddy_output_failures_total",
            "counter",
            "Failed deliveries of outputs or dead letters, and failed state commits (all retried).",
            &|m| counter(&m.output_failures),
        );
        per_plugin(
            &mut out,
            "eddy_ticks_total",
            "counter",
            "on-tick calls.",
            &|m| counter(&m.ticks),
        );
        per_plugin(
            &mut out,
            "eddy_consumer_lag",
            "gauge",
            "Events not yet handled, summed over partitions (-1: unknown).",
            &|m| m.consumer_lag.load(Relaxed).to_string(),
        );
        per_plugin(
            &mut out,
            "eddy_plugin_up",
            "gauge",
            "1 while the plugin is loaded and consuming.",
            &|m| m.up.load(Relaxed).to_string(),
        );
        per_plugin(
            &mut out,
            "eddy_kafka_connected",
            "gauge",
            "1 while the plugin's consumer is connected to a Kafka broker, 0 while no broker is reachable (-1: not known yet).",
            &|m| {
                match m.kafka.load(Relaxed) {
                    1 => "1",
                    2 => "0",
                    _ => "-1",
                }
                .to_string()
            },
        );

        header(
            &mut out,
            "eddy_batch_duration_seconds",
            "histogram",
            "Time to run one batch through a plugin.",
        );
        for (plugin, m) in &plugins {
            let mut cumulative = 0;
            for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
                cumulative += m.batch_buckets[i].load(Relaxed);
                let _ = writeln!(
                    out,
                    "eddy_batch_duration_seconds_bucket{{plugin=\"{plugin}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            let count = m.batch_count.load(Relaxed);
            let sum = m.batch_nanos.load(Relaxed) as f64 / 1e9;
            let _ = writeln!(
                out,
                "eddy_batch_duration_seconds_bucket{{plugin=\"{plugin}\",le=\"+Inf\"}} {count}"
            );
            let _ = writeln!(
                out,
                "eddy_batch_duration_seconds_sum{{plugin=\"{plugin}\"}} {sum}"
            );
            let _ = writeln!(
                out,
                "eddy_batch_duration_seconds_count{{plugin=\"{plugin}\"}} {count}"
            );
        }
        header(
            &mut out,
            "eddy_state_commit_seconds",
            "summary",
            "Time to commit a batch's state and offsets.",
        );
        for (plugin, m) in &plugins {
            let sum = m.commit_nanos.load(Relaxed) as f64 / 1e9;
            let _ = writeln!(
                out,
                "eddy_state_commit_seconds_sum{{plugin=\"{plugin}\"}} {sum}"
            );
            let _ = writeln!(
                out,
                "eddy_state_commit_seconds_count{{plugin=\"{plugin}\"}} {}",
                m.commit_count.load(Relaxed)
            );
        }

        header(
            &mut out,
            "eddy_plugin_info",
            "gauge",
            "The running version of each plugin (content digest of its .wasm; code compiled at load, precompiled, or baseline code until the optimized compile is done).",
        );
        for (plugin, m) in &plugins {
            let v = m.version();
            let path = v.path.replace('"', "'");
            let _ = writeln!(
                out,
                "eddy_plugin_info{{plugin=\"{plugin}\",digest=\"{}\",path=\"{path}\",code=\"{}\"}} 1",
                v.digest,
                if v.baseline {
                    "baseline"
                } else if v.precompiled {
                    "precompiled"
                } else {
                    "compiled"
                }
            );
        }
        per_plugin(
            &mut out,
            "eddy_plugin_loaded_timestamp_seconds",
            "gauge",
            "When the running version started running.",
            &|m| m.version().loaded_at.to_string(),
        );
        per_plugin(
            &mut out,
            "eddy_plugin_compile_seconds",
            "gauge",
            "How long compiling the running version took.",
            &|m| m.version().compile_seconds.to_string(),
        );
        header(
            &mut out,
            "eddy_plugin_reloads_total",
            "counter",
            "Hot reloads of a plugin, per outcome.",
        );
        for (plugin, m) in &plugins {
            for outcome in ReloadOutcome::ALL {
                let (label, n) = (outcome.label(), m.reloads(outcome));
                let _ = writeln!(
                    out,
                    "eddy_plugin_reloads_total{{plugin=\"{plugin}\",outcome=\"{label}\"}} {n}"
                );
            }
        }

        header(
            &mut out,
            "eddy_config_reloads_total",
            "counter",
            "Re-reads of plugins.toml: applied, or refused as invalid.",
        );
        let _ = writeln!(
            out,
            "eddy_config_reloads_total{{outcome=\"ok\"}} {}",
            self.config_reloads_ok.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "eddy_config_reloads_total{{outcome=\"error\"}} {}",
            self.config_reloads_failed.load(Relaxed)
        );
        header(
            &mut out,
            "eddy_generated_events_total",
            "counter",
            "Events the in-process generator produced.",
        );
        let _ = writeln!(
            out,
            "eddy_generated_events_total {}",
            self.generated.load(Relaxed)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_a_cumulative_histogram() {
        let m = Metrics::default();
        let p = m.plugin("analytics");
        p.count(Outcome::Ok, 7);
        p.count(Outcome::DeadLetter, 1);
        p.trap(TrapKind::Deadline);
        p.observe_batch(Duration::from_micros(800));
        p.observe_batch(Duration::from_millis(30));
        let text = m.render();
        assert!(
            text.contains("eddy_events_total{plugin=\"analytics\",verdict=\"ok\"} 7"),
            "{text}"
        );
        assert!(text.contains("eddy_events_total{plugin=\"analytics\",verdict=\"dead_letter\"} 1"));
        assert!(text.contains("eddy_traps_total{plugin=\"analytics\",kind=\"deadline\"} 1"));
        assert!(
            text.contains(
                "eddy_batch_duration_seconds_bucket{plugin=\"analytics\",le=\"0.001\"} 1"
            )
        );
        assert!(
            text.contains("eddy_batch_duration_seconds_bucket{plugin=\"analytics\",le=\"0.05\"} 2")
        );
        assert!(text.contains("eddy_batch_duration_seconds_count{plugin=\"analytics\"} 2"));
        assert_eq!(p.events_handled(), 8);
    }
}
