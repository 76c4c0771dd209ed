//! What the host counts: per plugin ([`PluginMetrics`]) and host-wide ([`Metrics`]), with the
//! labels they are counted under. [`exposition`] renders them for `/metrics`.
//!
//! Plain atomics on the hot path (a handful of relaxed adds per batch), read at scrape time
//! by a collector of the `prometheus` crate, which owns the text format.

pub mod collector;
pub mod exposition;
mod plugin;

pub use collector::CollectorMetrics;
pub use plugin::PluginMetrics;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// What happened to one event, as counted in `eddy_events_total{verdict=…}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Skip,
    /// Dead-lettered: by the plugin's verdict, after retries ran out, or after a trap.
    DeadLetter,
}

impl Outcome {
    pub const ALL: [Outcome; 3] = [Outcome::Ok, Outcome::Skip, Outcome::DeadLetter];

    pub fn label(self) -> &'static str {
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
    /// One call emitted more than `limits.output_records` records or `limits.output_mib`.
    Output,
    /// A state write would have taken the plugin's state past `limits.state_mib`.
    StateQuota,
}

impl TrapKind {
    pub const ALL: [TrapKind; 5] = [
        TrapKind::Trap,
        TrapKind::Deadline,
        TrapKind::Memory,
        TrapKind::Output,
        TrapKind::StateQuota,
    ];

    pub fn label(self) -> &'static str {
        match self {
            TrapKind::Trap => "trap",
            TrapKind::Deadline => "deadline",
            TrapKind::Memory => "memory",
            TrapKind::Output => "output",
            TrapKind::StateQuota => "state_quota",
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
    pub const ALL: [DeadLetterReason; 7] = [
        DeadLetterReason::Verdict,
        DeadLetterReason::RetriesExhausted,
        DeadLetterReason::Failed(TrapKind::Trap),
        DeadLetterReason::Failed(TrapKind::Deadline),
        DeadLetterReason::Failed(TrapKind::Memory),
        DeadLetterReason::Failed(TrapKind::Output),
        DeadLetterReason::Failed(TrapKind::StateQuota),
    ];

    pub fn label(self) -> &'static str {
        match self {
            DeadLetterReason::Verdict => "verdict",
            DeadLetterReason::RetriesExhausted => "retries_exhausted",
            DeadLetterReason::Failed(kind) => kind.label(),
        }
    }

    pub(crate) fn index(self) -> usize {
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
    pub const ALL: [ReloadOutcome; 3] = [
        ReloadOutcome::Ok,
        ReloadOutcome::Failed,
        ReloadOutcome::RolledBack,
    ];

    pub fn label(self) -> &'static str {
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

/// All plugins' metrics, plus host-wide ones.
#[derive(Debug, Default)]
pub struct Metrics {
    plugins: Mutex<BTreeMap<String, Arc<PluginMetrics>>>,
    /// Events the in-process generator produced.
    pub generated: AtomicU64,
    /// Re-reads of `plugins.toml` that were applied / refused as invalid.
    pub config_reloads_ok: AtomicU64,
    pub config_reloads_failed: AtomicU64,
    /// Clients of the live stream now (`/v1/stream`, `/v1/ws`).
    pub stream_clients: AtomicI64,
    /// Records handed to the live stream's clients (each record once, however many watch).
    pub stream_records: AtomicU64,
    /// Records live-stream clients missed by falling more than `[http] stream_buffer`
    /// behind, summed over clients.
    pub stream_missed: AtomicU64,
    /// Connections closed because the peer took nothing for `[http] send_timeout_ms`.
    pub http_send_timeouts: Arc<AtomicU64>,
    /// Silent connections closed to make room for a new one (`[http] max_connections`).
    pub http_evicted: AtomicU64,
    /// The HTTP collector's (`POST /v1/events`).
    pub collector: CollectorMetrics,
}

impl Metrics {
    /// The metrics of `plugin`, created on first use (and kept across reloads).
    pub fn plugin(&self, plugin: &str) -> Arc<PluginMetrics> {
        let mut plugins = self.plugins.lock().expect("metrics lock");
        plugins
            .entry(plugin.to_string())
            .or_insert_with(|| {
                // Lag is unknown (-1) until the plugin's consumer has partitions, not 0:
                // a plugin whose worker has not started yet is not caught up.
                let metrics = PluginMetrics::default();
                metrics.consumer_lag.store(-1, Relaxed);
                Arc::new(metrics)
            })
            .clone()
    }

    /// The plugins with metrics, in name order.
    pub fn plugin_names(&self) -> Vec<String> {
        let plugins = self.plugins.lock().expect("metrics lock");
        plugins.keys().cloned().collect()
    }

    /// Forgets `plugin`: it was removed from `plugins.toml`, so its series leave `/metrics`
    /// and its entry leaves `/healthz`. A worker still finishing keeps its own handle.
    pub fn remove_plugin(&self, plugin: &str) {
        self.plugins.lock().expect("metrics lock").remove(plugin);
    }

    /// The Prometheus text exposition of everything (see [`exposition`]).
    pub fn render(&self) -> String {
        exposition::render(self)
    }

    /// Every plugin's metrics, in name order.
    pub fn plugins(&self) -> Vec<(String, Arc<PluginMetrics>)> {
        let plugins = self.plugins.lock().expect("metrics lock");
        plugins
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_plugin_whose_consumer_has_no_partitions_yet_has_unknown_lag() {
        let m = Metrics::default();
        let p = m.plugin("analytics");
        assert_eq!(
            p.consumer_lag.load(Relaxed),
            -1,
            "not 0: nothing says it caught up"
        );
        assert!(
            m.render()
                .contains("eddy_consumer_lag{plugin=\"analytics\"} -1")
        );
    }

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

    #[test]
    fn label_values_are_escaped() {
        let m = Metrics::default();
        m.plugin("odd").set_version(Version {
            digest: "sha256:00".into(),
            path: "/plugins/a \"quoted\" \\dir\nnext/p.wasm".into(),
            ..Version::default()
        });
        let text = m.render();
        assert!(
            text.contains(r#"path="/plugins/a \"quoted\" \\dir\nnext/p.wasm""#),
            "{text}"
        );
        // Every sample is one line: the newline in the path did not end one early.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("eddy_"), "{line:?} in\n{text}");
        }
    }

    #[test]
    fn a_removed_plugins_series_are_gone() {
        let m = Metrics::default();
        m.plugin("kept").count(Outcome::Ok, 1);
        m.plugin("removed").count(Outcome::Ok, 2);
        assert!(m.render().contains(r#"plugin="removed""#));
        m.remove_plugin("removed");
        let text = m.render();
        assert!(!text.contains("removed"), "{text}");
        assert!(
            text.contains(r#"eddy_events_total{plugin="kept",verdict="ok"} 1"#),
            "{text}"
        );
    }
}
