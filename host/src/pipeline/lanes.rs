//! Partition-scoped state (`[state] shared_group` with durable state): one sandbox
//! instance, on its own state file, per input partition the plugin holds on this host (a
//! *lane*), so that a partition's state can move to another host on its own.
//!
//! Every call into an instance is about its partition: a batch is split by partition and
//! each part runs on its lane with the usual isolation, delivery and commit (`worker.rs`,
//! `effects.rs`); a tick runs on each lane; a hot swap swaps each lane. So the partition a
//! state write belongs to is never ambiguous, and neither the WIT contract nor the SDK know
//! about it: a plugin's cache and its `on-tick` writes are its partition's.
//!
//! A lane opens when its partition's first events come: its file is brought up to the end
//! of the partition's changelog first ([`crate::state::changelog::restore`]), and events the
//! restored state already reflects are skipped. A lane closes when its partition is revoked;
//! its file stays, for a quick return to replay only what was written meanwhile.
//!
//! The worker's own sandbox (loaded by the supervisor on empty in-memory state) is the
//! *template*: it checks a new version or config first on a swap and gives each new lane
//! its program; it never handles events. While a lane runs, it sits in the worker's
//! `sandbox` slot and the template waits in [`Lanes::parked`].

use super::worker::Worker;
use crate::config::PluginConfig;
use crate::event::Event;
use crate::kafka::Offsets;
use crate::metrics::PluginMetrics;
use crate::retry::{Policy, sleep_unless_stopping};
use crate::state::changelog::{self, ChangelogStore};
use crate::state::{PluginState, StateStore};
use crate::wasm::{Program, Sandbox};
use rdkafka::ClientConfig;
use rdkafka::producer::FutureProducer;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tracing::{error, info, warn};

/// What opening a lane needs.
#[derive(Clone)]
pub struct LaneOpener {
    /// `[state] dir`.
    pub state_dir: PathBuf,
    /// Client settings for the restore reader (no group: it is assigned its partition).
    pub client: ClientConfig,
    /// The producer the changelog is written with.
    pub producer: FutureProducer,
    /// `[state] keep_revoked_s`.
    pub keep_revoked: Duration,
}

/// A plugin's open lanes.
pub struct Lanes {
    pub(super) opener: LaneOpener,
    /// Open lanes by partition, except the one running (in the worker's `sandbox` slot).
    pub(super) open: BTreeMap<i32, Sandbox>,
    /// The template while a lane runs.
    pub(super) parked: Option<Sandbox>,
    /// The lane running, if any.
    pub(super) running: Option<i32>,
}

/// Why a lane could not be opened (retried until it can, or the host stops).
#[derive(Debug, thiserror::Error)]
pub enum LaneError {
    #[error(transparent)]
    Changelog(#[from] changelog::ChangelogError),
    #[error(transparent)]
    Store(#[from] crate::state::StoreError),
    #[error(transparent)]
    Load(#[from] crate::wasm::LoadError),
}

impl LaneOpener {
    /// Opens partition `partition`'s lane: its file, restored from the changelog, and an
    /// instance of `program` on it. Blocking.
    fn open(
        &self,
        program: Arc<Program>,
        plugin: &PluginConfig,
        topic: &str,
        partition: i32,
        metrics: &PluginMetrics,
    ) -> Result<Sandbox, LaneError> {
        let path = changelog::path_for(&self.state_dir, &plugin.name, partition);
        let store = StateStore::open(&path, &plugin.name)?;
        let changelog_topic = changelog::topic_for(&plugin.group_id());
        let source = (topic.to_string(), partition);
        metrics.restoring(partition, true);
        let restored = changelog::restore(
            &self.client,
            &store,
            &changelog_topic,
            &source,
            self.keep_revoked,
            &std::sync::atomic::AtomicBool::new(false),
            &mut |done, total| {
                info!(
                    partition,
                    percent = (done * 100).checked_div(total).unwrap_or(100),
                    records = done,
                    of = total,
                    "restoring the partition's state from {changelog_topic}"
                );
            },
        );
        metrics.restoring(partition, false);
        let restored = restored?;
        metrics
            .state_restore_records
            .fetch_add(restored.records, Relaxed);
        if let Some(why) = &restored.wiped {
            warn!(partition, path = %path.display(), "dropped the partition's local state ({why}); restoring it whole from {changelog_topic}");
        }
        if restored.records > 0 || restored.wiped.is_some() {
            let secs = restored.took.as_secs_f64();
            info!(
                partition,
                records = restored.records,
                from = restored.from,
                to = restored.to,
                took_ms = restored.took.as_millis() as u64,
                records_per_s = (restored.records as f64 / secs.max(1e-3)) as u64,
                resumes_at = restored.source_next.unwrap_or(-1),
                "restored the partition's state from {changelog_topic}"
            );
        }
        let store = ChangelogStore::new(store, self.producer.clone(), changelog_topic, source)?;
        let state = PluginState::durable(store, plugin.limits.state_mib << 20)?;
        Ok(Sandbox::start(program, plugin, state)?)
    }
}

impl Lanes {
    pub fn new(opener: LaneOpener) -> Lanes {
        Lanes {
            opener,
            open: BTreeMap::new(),
            parked: None,
            running: None,
        }
    }
}

/// Splits `events` by partition, each partition's events in their order, partitions in
/// the order they first come.
fn by_partition(events: Vec<Event>) -> Vec<(i32, Vec<Event>)> {
    let mut parts: Vec<(i32, Vec<Event>)> = Vec::new();
    for e in events {
        match parts.iter_mut().find(|(p, _)| *p == e.partition) {
            Some((_, part)) => part.push(e),
            None => parts.push((e.partition, vec![e])),
        }
    }
    parts
}

/// What a partitioned batch's parts came to.
pub(super) enum LaneRun {
    /// The part's events, minus those its state already reflects; their offsets if none
    /// are left.
    Run(Vec<Event>),
    Done(Offsets),
}

impl Worker {
    pub(super) fn partitioned(&self) -> bool {
        self.lanes.is_some()
    }

    /// Puts partition `p`'s lane in the worker's sandbox slot, opening it if need be
    /// (retrying until it opens). False if the host stops first.
    pub(super) async fn enter_lane(&mut self, p: i32) -> bool {
        let lanes = self.lanes.as_mut().expect("partitioned");
        debug_assert!(lanes.running.is_none());
        if let Some(lane) = lanes.open.remove(&p) {
            lanes.parked = self.sandbox.replace(lane);
            lanes.running = Some(p);
            return true;
        }
        let opener = lanes.opener.clone();
        let mut backoff = Policy::DELIVERY.backoff();
        loop {
            let opener = opener.clone();
            let program = self.sandbox().program().clone();
            let (plugin, topic, metrics) = (
                self.plugin.clone(),
                self.topic.clone(),
                self.metrics.clone(),
            );
            let opened = tokio::task::spawn_blocking(move || {
                opener.open(program, &plugin, &topic, p, &metrics)
            })
            .await
            .expect("opening a lane does not panic");
            match opened {
                Ok(lane) => {
                    let lanes = self.lanes.as_mut().expect("partitioned");
                    lanes.parked = self.sandbox.replace(lane);
                    lanes.running = Some(p);
                    self.metrics
                        .state_lanes
                        .store(lanes.open.len() as i64 + 1, Relaxed);
                    return true;
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    error!(
                        partition = p,
                        "cannot open the partition's state, retrying in {delay:?} (its events wait): {e}"
                    );
                    if sleep_unless_stopping(delay, &mut self.shutdown)
                        .await
                        .is_err()
                    {
                        return false;
                    }
                }
            }
        }
    }

    /// Puts the running lane back with the others, and the template in the slot.
    pub(super) fn leave_lane(&mut self) {
        let lanes = self.lanes.as_mut().expect("partitioned");
        let Some(p) = lanes.running.take() else {
            return;
        };
        let lane = std::mem::replace(&mut self.sandbox, lanes.parked.take());
        if let Some(lane) = lane {
            lanes.open.insert(p, lane);
        }
    }

    /// Drops the running lane (its state is committed in its file): it opens again from
    /// there, on the template's version, with the partition's next events.
    pub(super) fn drop_lane(&mut self) {
        let lanes = self.lanes.as_mut().expect("partitioned");
        if lanes.running.take().is_some() {
            self.sandbox = lanes.parked.take();
        }
    }

    /// Closes the lanes of partitions this host no longer holds, or that went away and came
    /// back since (another host may have changed their state meanwhile: they reopen from
    /// the changelog).
    pub(super) fn close_revoked_lanes(&mut self, revoked: std::collections::BTreeSet<i32>) {
        let assigned = self.assigned.lock().expect("assigned lock").clone();
        let Some(lanes) = self.lanes.as_mut() else {
            return;
        };
        let gone: Vec<i32> = lanes
            .open
            .keys()
            .copied()
            .filter(|p| revoked.contains(p) || !assigned.contains(p))
            .collect();
        for p in gone {
            lanes.open.remove(&p);
            info!(
                partition = p,
                "partition gone: its state stays on the disk and in the changelog"
            );
        }
        self.metrics
            .state_lanes
            .store(lanes.open.len() as i64, Relaxed);
    }

    /// The partitions with an open lane.
    pub(super) fn lane_partitions(&self) -> Vec<i32> {
        self.lanes
            .as_ref()
            .map(|l| l.open.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Keys, bytes and expiring keys of the committed state: the sandbox's, or with lanes
    /// the sum over every open lane.
    pub(super) fn state_figures(&self) -> (usize, u64, usize) {
        let one = |s: &Sandbox| {
            let st = s.state();
            (st.len(), st.bytes(), st.expiring_keys())
        };
        let mut total = match (&self.lanes, &self.sandbox) {
            (Some(l), Some(s)) if l.running.is_some() => one(s),
            (None, Some(s)) => one(s),
            _ => (0, 0, 0),
        };
        if let Some(lanes) = &self.lanes {
            for lane in lanes.open.values() {
                let (k, b, e) = one(lane);
                total = (total.0 + k, total.1 + b, total.2 + e);
            }
        }
        total
    }

    /// Splits `events` by partition.
    pub(super) fn split_by_partition(events: Vec<Event>) -> Vec<(i32, Vec<Event>)> {
        by_partition(events)
    }

    /// Drops the events the running lane's state already reflects (handled by the host
    /// that had the partition before, whose changelog this lane restored).
    pub(super) fn skip_reflected(&mut self, p: i32, mut events: Vec<Event>) -> LaneRun {
        let key = (self.topic.clone(), p);
        let Some(next) = self.sandbox().state().offsets().get(&key).copied() else {
            return LaneRun::Run(events);
        };
        let before = events.len();
        events.retain(|e| e.offset >= next);
        if events.len() < before {
            tracing::debug!(
                partition = p,
                skipped = before - events.len(),
                next,
                "events already in the restored state skipped"
            );
        }
        if events.is_empty() {
            LaneRun::Done([(key, next)].into_iter().collect())
        } else {
            LaneRun::Run(events)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(partition: i32, offset: i64) -> Event {
        Event {
            topic: "t".into(),
            partition,
            offset,
            timestamp_ms: None,
            key: None,
            headers: Vec::new(),
            payload: Default::default(),
        }
    }

    #[test]
    fn a_batch_splits_by_partition_keeping_each_partitions_order() {
        let events: Vec<Event> = [(0, 5), (2, 10), (0, 6), (1, 3), (2, 11), (0, 7)]
            .into_iter()
            .map(|(p, o)| event(p, o))
            .collect();
        let parts: Vec<(i32, Vec<i64>)> = by_partition(events)
            .into_iter()
            .map(|(p, es)| (p, es.iter().map(|e| e.offset).collect()))
            .collect();
        assert_eq!(parts, [(0, vec![5, 6, 7]), (2, vec![10, 11]), (1, vec![3])]);
    }
}
