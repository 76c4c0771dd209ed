//! Everything counted for one plugin.

use super::{DeadLetterReason, Outcome, ReloadOutcome, TrapKind, Version};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// How many versions [`PluginMetrics::version_history`] keeps.
pub const VERSION_HISTORY: usize = 16;

/// Upper bounds of the batch-latency histogram buckets, in seconds.
pub(crate) const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// Counts one observation of `took` in a [`LATENCY_BUCKETS`] histogram.
pub(crate) fn observe_latency(
    buckets: &[AtomicU64; LATENCY_BUCKETS.len()],
    count: &AtomicU64,
    nanos: &AtomicU64,
    took: Duration,
) {
    let secs = took.as_secs_f64();
    if let Some(i) = LATENCY_BUCKETS.iter().position(|b| secs <= *b) {
        buckets[i].fetch_add(1, Relaxed);
    }
    count.fetch_add(1, Relaxed);
    nanos.fetch_add(took.as_nanos() as u64, Relaxed);
}

/// Everything counted for one plugin.
#[derive(Debug, Default)]
pub struct PluginMetrics {
    pub(crate) events: [AtomicU64; 3],
    /// `retry` verdicts received (each retry attempt counts).
    pub retries: AtomicU64,
    pub(crate) traps: [AtomicU64; 5],
    pub instance_restarts: AtomicU64,
    pub output_records: AtomicU64,
    pub output_failures: AtomicU64,
    pub ticks: AtomicU64,
    /// Plugin log lines dropped by `limits.log_lines_per_s`.
    pub log_lines_dropped: AtomicU64,
    /// The committed state: keys, bytes (keys + values, what `limits.state_mib` caps), and
    /// how many keys carry an expiry; set after each commit.
    pub state_keys: AtomicI64,
    pub state_bytes: AtomicI64,
    pub state_expiring_keys: AtomicI64,
    /// `limits.state_mib` in bytes.
    pub state_limit_bytes: AtomicI64,
    /// Output records their destination refused for good (too large, no such topic, not
    /// allowed), written to the dead-letter topic instead.
    pub outputs_undeliverable: AtomicU64,
    /// Dead letters the dead-letter topic refused whole for good, written without payload.
    pub dead_letters_without_payload: AtomicU64,
    /// Dead letters refused for good even without payload: logged, not written.
    pub dead_letters_lost: AtomicU64,
    /// State keys deleted by `[plugin.expire]`.
    pub state_keys_expired: AtomicU64,
    /// Events consumed but not yet handled, summed over the plugin's partitions (-1: unknown).
    pub consumer_lag: AtomicI64,
    /// 1 while the plugin is loaded and consuming.
    pub up: AtomicI64,
    /// Partitions the plugin reads from the shared fetch (the others it fetches itself).
    pub shared_partitions: AtomicI64,
    /// Partitions of the topic the plugin's consumer holds: none from the moment its group
    /// takes them away in a rebalance until it hands them out again.
    pub assigned_partitions: AtomicI64,
    /// With partition-scoped state (`[state] shared_group`): changelog records replayed into
    /// partitions' state, the partitions restoring now, and the partitions with an open
    /// lane (an instance and a state file) on this host.
    pub state_restore_records: AtomicU64,
    pub(crate) restoring_partitions: Mutex<std::collections::BTreeSet<i32>>,
    pub state_lanes: AtomicI64,
    /// Whether the plugin's consumer has a connection to a Kafka broker: 1 yes, 2 no (all
    /// brokers down: it reconnects meanwhile), 0 not known yet. From librdkafka's
    /// statistics, once a second.
    pub kafka: AtomicI64,
    /// 0 closed, 1 open (paused), 2 half-open (on trial after a pause).
    pub breaker_state: AtomicI64,
    /// Times the breaker opened.
    pub breaker_trips: AtomicU64,
    /// 1 while the last delivery of outputs or dead letters failed (it is being retried,
    /// the offsets wait), 0 once one went through.
    pub delivery_failing: AtomicI64,
    /// Why the last delivery failed, while `delivery_failing`.
    pub delivery_error: Mutex<Option<String>>,
    pub(crate) dead_letters: [AtomicU64; 7],
    pub(crate) reloads: [AtomicU64; 3],
    pub(crate) version: Mutex<Version>,
    /// The last [`VERSION_HISTORY`] versions run, oldest first (the current one last).
    history: Mutex<std::collections::VecDeque<Version>>,
    pub(crate) batch_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    pub(crate) batch_count: AtomicU64,
    pub(crate) batch_nanos: AtomicU64,
    pub(crate) commit_count: AtomicU64,
    pub(crate) commit_nanos: AtomicU64,
}

impl PluginMetrics {
    /// Marks partition `p` as restoring its state from the changelog, or done.
    pub fn restoring(&self, p: i32, now: bool) {
        let mut r = self.restoring_partitions.lock().expect("metrics lock");
        if now {
            r.insert(p);
        } else {
            r.remove(&p);
        }
    }

    /// The partitions restoring their state now.
    pub fn restoring_now(&self) -> Vec<i32> {
        let r = self.restoring_partitions.lock().expect("metrics lock");
        r.iter().copied().collect()
    }

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

    /// The breaker's state as its gauge: 0 closed, 1 open, 2 half-open.
    pub fn set_breaker(&self, state: impl Into<i64>) {
        self.breaker_state.store(state.into(), Relaxed);
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
        let mut history = self.history.lock().expect("metrics lock");
        if history.len() == VERSION_HISTORY {
            history.pop_front();
        }
        history.push_back(version.clone());
        *self.version.lock().expect("metrics lock") = version;
    }

    /// The versions this plugin ran, oldest first, the current one last (at most
    /// [`VERSION_HISTORY`]): what ran between two looks at [`PluginMetrics::version`].
    pub fn version_history(&self) -> Vec<Version> {
        self.history
            .lock()
            .expect("metrics lock")
            .iter()
            .cloned()
            .collect()
    }

    pub fn version(&self) -> Version {
        self.version.lock().expect("metrics lock").clone()
    }

    pub fn observe_batch(&self, took: Duration) {
        observe_latency(
            &self.batch_buckets,
            &self.batch_count,
            &self.batch_nanos,
            took,
        );
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
