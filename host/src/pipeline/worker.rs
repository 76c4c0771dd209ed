//! One plugin's consume loop: its own consumer group, batches, verdicts, offsets.
//!
//! For each batch: run it through the sandbox (on a blocking thread, the plugin's CPU time
//! must not stall the async runtime), handle traps and retries, deliver the outputs and dead
//! letters, commit the plugin's state, and only then store the events' offsets. So an offset
//! never passes an event whose effects are not delivered: a crash or a failed delivery means
//! the events are consumed again (at-least-once), never skipped. Whatever else waits (a
//! commit to the disk, the final commit to Kafka, leaving the group) is done on a blocking
//! thread too: every plugin's worker shares the runtime's few threads.
//!
//! Meanwhile (a batch in the sandbox, waiting for its retries, being delivered and
//! committed; an open breaker's pause) the consumer stays polled, from the wait's first
//! second on, with its partitions paused ([`Source::keep_polled`]): the group can
//! rebalance, and the member is not thrown out of it after `max.poll.interval.ms`. A
//! partition revoked then is handed over at once (the offsets saved with the state decide
//! where it starts when it comes back), except with `[state] shared_group`, where it goes
//! once the batch's offsets are stored.
//!
//! Hot reload: the supervisor sends a [`Control::Swap`] with a new version (compiled off the
//! event path) or config; the worker applies it between two batches, so every event is
//! handled by exactly one version and the state carries over. Closing the control channel
//! stops the worker: it finishes its batch, commits and leaves its group.
//!
//! Failures: traps are isolated event by event (see [`super::isolation`]); a plugin that
//! fails on most events trips its [`Breaker`], which pauses it.
//!
//! Order: events of a partition reach the plugin in order. An event the plugin answers
//! `retry` is handed again after the rest of its batch, so within one batch it can be
//! overtaken by later events.

use super::breaker::{Breaker, BreakerState};
use super::control::Control;
use super::fill::{Filled, fill};
use super::isolation::{Disposition, Ran, run_events};
use super::lanes::{LaneOpener, LaneRun, Lanes};
use super::source::{Batch, Source};
use crate::config::PluginConfig;
use crate::event::Event;
use crate::kafka::Offsets;
use crate::kafka::consumer::{self, Callbacks, release_revocations, store_offsets};
use crate::kafka::shared_fetch::SharedFetch;
use crate::live::Live;
use crate::metrics::{Outcome, PluginMetrics, ReloadOutcome, Version};
use crate::retry::{Policy, sleep_unless_stopping};
use crate::sinks::{DeadLetter, Outputs};
use crate::wasm::{OutputRecord, Program, Sandbox};
use rdkafka::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, instrument, warn};

/// How handling a batch ended.
enum Handled {
    /// Every event is accounted for.
    All,
    /// The breaker opened. The events before `held` are accounted for; `held` were not run
    /// to a verdict and must be handled after the pause (their offsets are not stored).
    Tripped { held: Vec<Event>, pause: Duration },
    /// The host is stopping before the batch's effects were delivered: its offsets are not
    /// stored, and its events are consumed again at the next start.
    Stopping,
}

/// The metrics' view of a running version.
pub fn version_of(program: &Program) -> Version {
    Version {
        digest: program.digest().to_string(),
        path: program.path().display().to_string(),
        loaded_at: crate::clock::now_ms() as f64 / 1000.0,
        compile_seconds: program.compile_time.as_secs_f64(),
        precompiled: program.precompiled,
        baseline: program.baseline,
    }
}

/// Everything one plugin's loop needs.
pub struct Worker {
    pub(super) plugin: PluginConfig,
    pub(super) topic: String,
    pub(super) client: ClientConfig,
    /// `None` only while a call runs on a blocking thread.
    pub(super) sandbox: Option<Sandbox>,
    pub(super) outputs: Outputs,
    pub(super) metrics: Arc<PluginMetrics>,
    pub(super) shutdown: watch::Receiver<bool>,
    pub(super) control: mpsc::Receiver<Control>,
    /// The offsets saved with durable state, shared with the rebalance callback.
    pub(super) saved: Option<Arc<std::sync::Mutex<Offsets>>>,
    /// `[state] shared_group`.
    pub(super) shared_group: bool,
    /// `[state] commit_interval_ms`: how long a commit may stay off the disk.
    pub(super) commit_interval: Duration,
    /// Commits not on the disk yet: since when, and the offsets they advanced, which are
    /// stored in the consumer (for Kafka's committed offsets) once they are.
    pub(super) unsynced: Option<(Instant, Offsets)>,
    /// The partitions the consumer holds now (see [`Callbacks::assigned`]).
    pub(super) assigned: Arc<std::sync::Mutex<BTreeSet<i32>>>,
    pub(super) breaker: Breaker,
    /// The topic's shared fetch, read where it holds the plugin's position.
    pub(super) shared_fetch: Option<Arc<SharedFetch>>,
    /// The live feed the plugin's committed records go to (`/v1/stream`).
    pub(super) live: Option<Arc<Live>>,
    /// Records of commits not on the disk yet: they go to the live feed once they are.
    pub(super) live_held: Vec<OutputRecord>,
    /// Partition-scoped state: an instance and a state file per partition (see `lanes.rs`).
    pub(super) lanes: Option<Lanes>,
}

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        plugin: PluginConfig,
        topic: String,
        client: ClientConfig,
        sandbox: Sandbox,
        outputs: Outputs,
        metrics: Arc<PluginMetrics>,
        shutdown: watch::Receiver<bool>,
        control: mpsc::Receiver<Control>,
    ) -> Worker {
        metrics.set_version(version_of(sandbox.program()));
        metrics.set_breaker(BreakerState::Closed);
        let loaded = sandbox.state();
        metrics.state_keys.store(loaded.len() as i64, Relaxed);
        metrics.state_bytes.store(loaded.bytes() as i64, Relaxed);
        metrics
            .state_expiring_keys
            .store(loaded.expiring_keys() as i64, Relaxed);
        metrics
            .state_limit_bytes
            .store((plugin.limits.state_mib << 20) as i64, Relaxed);
        let plugin_breaker = plugin.breaker.clone();
        let saved = sandbox
            .state()
            .is_durable()
            .then(|| Arc::new(std::sync::Mutex::new(sandbox.state().offsets().clone())));
        Worker {
            plugin,
            topic,
            client,
            sandbox: Some(sandbox),
            outputs,
            metrics,
            shutdown,
            control,
            saved,
            shared_group: false,
            commit_interval: Duration::ZERO,
            unsynced: None,
            assigned: Default::default(),
            breaker: Breaker::new(plugin_breaker),
            shared_fetch: None,
            live: None,
            live_held: Vec::new(),
            lanes: None,
        }
    }

    /// Partition-scoped state (`[state] shared_group` with durable state): the sandbox
    /// given to [`Worker::new`] becomes the template of one instance per partition.
    pub fn partition_scoped(mut self, opener: Option<LaneOpener>) -> Worker {
        self.lanes = opener.map(Lanes::new);
        self
    }

    /// `[state] shared_group`: other hosts share this plugin's consumer group.
    pub fn sharing_the_group(mut self, shared: bool) -> Worker {
        self.shared_group = shared;
        self
    }

    /// Reads from the topic's shared fetch where it can (not with `shared_group`: other
    /// hosts hold some partitions, so positions are per host).
    pub fn sharing_the_fetch(mut self, shared: Option<Arc<SharedFetch>>) -> Worker {
        self.shared_fetch = shared;
        self
    }

    /// Hands the plugin's committed records to `live`, the feed of `/v1/stream`.
    pub fn watched_by(mut self, live: Arc<Live>) -> Worker {
        self.live = Some(live);
        self
    }

    /// `[state] commit_interval_ms`: commits reach the disk at least this often (every
    /// batch if zero, if state is not durable, or if the group is shared).
    pub fn syncing_every(mut self, interval: Duration) -> Worker {
        self.commit_interval = interval;
        self
    }

    pub(super) fn sandbox(&mut self) -> &mut Sandbox {
        self.sandbox
            .as_mut()
            .expect("the sandbox is back after every call")
    }

    fn source(&self) -> anyhow::Result<Source> {
        let shared_fetch = self.shared_fetch.clone().filter(|_| !self.shared_group);
        let reader = shared_fetch
            .as_ref()
            .map(|s| s.reader(&self.plugin.name, self.metrics.clone()));
        let callbacks = Callbacks {
            plugin: self.plugin.name.clone(),
            topic: self.topic.clone(),
            metrics: self.metrics.clone(),
            saved: self.saved.clone(),
            shared_group: self.shared_group,
            assigned: self.assigned.clone(),
            start_from: self.plugin.start_from,
            kafka_down_since: Default::default(),
            rebalances: Default::default(),
            shared_fetch,
            held: Default::default(),
            revoked: Default::default(),
        };
        let consumer = consumer::subscribe(&self.client, &self.plugin, &self.topic, callbacks)?;
        Ok(Source::new(consumer, reader, &self.topic))
    }

    fn tick_interval(&self) -> Option<tokio::time::Interval> {
        (self.plugin.tick_interval_ms > 0).then(|| {
            let every = Duration::from_millis(self.plugin.tick_interval_ms);
            tokio::time::interval_at(tokio::time::Instant::now() + every, every)
        })
    }

    /// Consumes until shutdown (or until the supervisor closes the control channel), then
    /// finishes the batch in flight and commits.
    #[instrument(name = "plugin", skip_all, fields(plugin = %self.plugin.name, messaging.destination.name = %self.topic, messaging.consumer.group.name = %self.plugin.group_id()))]
    pub async fn run(mut self) -> anyhow::Result<()> {
        let mut source = self.source()?;
        self.metrics.consumer_lag.store(-1, Relaxed);
        self.metrics.up.store(1, Relaxed);
        let program = self.sandbox().program().clone();
        info!(group = %self.plugin.group_id(), digest = %program.digest(), precompiled = program.precompiled,
            load_ms = program.compile_time.as_millis() as u64, "consuming");
        let mut tick = self.tick_interval();
        let mut tick_ms = self.plugin.tick_interval_ms;
        let mut consume_errors = Policy::CONSUME.backoff();
        'consume: loop {
            if self.plugin.tick_interval_ms != tick_ms {
                tick_ms = self.plugin.tick_interval_ms;
                tick = self.tick_interval();
            }
            // Deferred commits go to the disk `commit_interval` after the first of them, also
            // when no more events come.
            let sync_at = self
                .unsynced
                .as_ref()
                .map(|(since, _)| tokio::time::Instant::from_std(*since + self.commit_interval));
            let mut batch = Batch::new(self.plugin.max_batch, self.plugin.max_batch_bytes());
            let first = tokio::select! {
                biased;
                _ = self.shutdown.changed() => break,
                control = self.control.recv() => match control {
                    Some(Control::Swap { program, plugin, tier_up, done }) => {
                        let _ = done.send(self.swap(program, *plugin, tier_up).await);
                        continue;
                    }
                    None => break,
                },
                _ = async { tick.as_mut().expect("guarded").tick().await }, if tick.is_some() => {
                    if self.partitioned() {
                        // A lane's tick commits to its partition's changelog: its partition
                        // must not go to another host meanwhile.
                        source.consumer.context().hold_revocations();
                        let revoked = source.consumer.context().take_revoked();
                        self.close_revoked_lanes(revoked);
                        for p in self.lane_partitions() {
                            if !self.enter_lane(p).await {
                                break;
                            }
                            self.tick(&source.consumer).await;
                            self.leave_lane();
                        }
                        release_revocations(&source.consumer);
                    } else {
                        self.tick(&source.consumer).await;
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(sync_at.unwrap_or_else(tokio::time::Instant::now)), if sync_at.is_some() => {
                    if !self.sync(&source.consumer).await {
                        break;
                    }
                    continue;
                }
                r = source.recv(&mut batch) => r,
            };
            match first {
                Ok(()) => consume_errors.reset(),
                Err(e) if crate::kafka::is_connectivity_error(&e) => {
                    // Reported (and counted in eddy_kafka_connected) by the consumer's
                    // callbacks; librdkafka reconnects by itself: poll on at once.
                    debug!("consumer: {e}");
                    continue;
                }
                Err(e) => {
                    let delay = consume_errors.next_delay();
                    warn!("consume error, polling again in {delay:?}: {e}");
                    if sleep_unless_stopping(delay, &mut self.shutdown)
                        .await
                        .is_err()
                    {
                        break;
                    }
                    continue;
                }
            }
            let Filled {
                mut events,
                control,
            } = fill(batch, &mut source, &mut self.control, &self.plugin).await;
            source.share_where_possible();
            if self.shared_group {
                // Taken before a rebalance moved their partition to another host, which
                // starts at the offset committed on revoke: they are its to handle now.
                let assigned = self.assigned.lock().expect("assigned lock");
                events.retain(|e| assigned.contains(&e.partition));
            }
            if self.partitioned() {
                let revoked = source.consumer.context().take_revoked();
                self.close_revoked_lanes(revoked);
            }
            match control {
                // The events already taken go to the new version.
                Some(Some(Control::Swap {
                    program,
                    plugin,
                    tier_up,
                    done,
                })) => {
                    let _ = done.send(self.swap(program, *plugin, tier_up).await);
                }
                // Removed: this batch is still handled and committed; the loop ends after it
                // (the closed channel is seen again at the top).
                Some(None) | None => {}
            }
            let mut batch = events;
            loop {
                // The consumer stays polled while the batch is in flight (see
                // `Source::keep_polled`). With `shared_group`, partitions revoked meanwhile
                // go only once its offsets are stored: the next owner starts after it.
                if self.shared_group {
                    source.consumer.context().hold_revocations();
                }
                let (handled, synced) = source.keep_polled(self.handle_batch(batch)).await;
                store_offsets(&source.consumer, &synced);
                release_revocations(&source.consumer);
                match handled {
                    Handled::All => break,
                    Handled::Stopping => break 'consume,
                    Handled::Tripped { mut held, pause } => {
                        // Nothing handled waits off the disk through the pause.
                        if !self.sync(&source.consumer).await
                            || !source.keep_polled(self.wait_out_breaker(pause)).await
                        {
                            break 'consume;
                        }
                        if self.shared_group {
                            // As after filling a batch: a partition revoked during the pause
                            // is another host's now, from its committed offset.
                            let assigned = self.assigned.lock().expect("assigned lock");
                            held.retain(|e| assigned.contains(&e.partition));
                        }
                        if held.is_empty() {
                            break;
                        }
                        batch = held;
                    }
                }
            }
        }
        self.metrics.up.store(0, Relaxed);
        self.sync(&source.consumer).await;
        // The final commit and leaving the group wait for the broker: on a thread of their
        // own, so that a slow broker holds up no other plugin's task meanwhile, and for at
        // most LEAVE_DEADLINE: with the broker gone, closing a consumer never ends
        // (fede1024/rust-rdkafka#509, #611). Nothing is lost then: the offsets are in the
        // state store, and the broker drops the member after its session timeout.
        let Source { consumer, .. } = source;
        let span = tracing::Span::current();
        let (left_tx, left) = oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("eddy-leave".into())
            .spawn(move || {
                span.in_scope(|| leave(consumer));
                let _ = left_tx.send(());
            });
        if spawned.is_ok() && tokio::time::timeout(LEAVE_DEADLINE, left).await.is_err() {
            warn!(
                "the broker did not let this plugin leave its group within {LEAVE_DEADLINE:?}: stopping without it (the offsets are in the state store)"
            );
        }
        Ok(())
    }

    /// Switches version and/or config between two batches.
    /// `tier_up_only`: only if it replaces baseline code of the same version.
    async fn swap(
        &mut self,
        program: Arc<Program>,
        plugin: PluginConfig,
        tier_up_only: bool,
    ) -> Result<(), String> {
        let from = self.sandbox().program().digest().to_string();
        let to = program.digest().to_string();
        // The same version and settings on optimized code instead of baseline code: not a
        // reload, so not counted as one.
        let tier_up = from == to && self.sandbox().program().baseline && !program.baseline;
        if tier_up_only && !tier_up {
            debug!(running = %from, optimized = %to, "optimized code no longer wanted: the plugin runs another version");
            return Err("the plugin runs another version by now".into());
        }
        let path = program.path().display().to_string();
        let started = Instant::now();
        let target = plugin.clone();
        let (_, result) = self
            .in_sandbox(Vec::new(), move |sandbox, _, _, _| {
                sandbox.swap(program, &target)
            })
            .await;
        if result.is_ok() && self.partitioned() {
            self.swap_lanes(&plugin).await;
        }
        match result {
            Ok(()) => {
                self.outputs = Outputs::new(
                    &plugin,
                    self.outputs.producer().clone(),
                    self.outputs.databases().clone(),
                );
                // A new version or config deserves a fresh start, not the old one's pause.
                self.breaker = Breaker::new(plugin.breaker.clone());
                self.metrics.set_breaker(BreakerState::Closed);
                self.metrics
                    .state_limit_bytes
                    .store((plugin.limits.state_mib << 20) as i64, Relaxed);
                self.plugin = plugin;
                self.announce_outputs();
                let version = version_of(self.sandbox().program());
                self.metrics.set_version(version);
                if tier_up {
                    info!(digest = %to, took = ?started.elapsed(), "now on optimized code");
                    return Ok(());
                }
                self.metrics.reload(ReloadOutcome::Ok);
                if from == to {
                    info!(digest = %to, took = ?started.elapsed(), "applied new settings");
                } else {
                    info!(from = %from, to = %to, took = ?started.elapsed(), "switched to a new version (on probation for the next batches)");
                }
                Ok(())
            }
            Err(e) => {
                self.metrics.reload(ReloadOutcome::Failed);
                error!(path = %path, digest = %to, "change refused, the plugin keeps running as before: {e}");
                Err(e.to_string())
            }
        }
    }

    /// Swaps every open lane to the template's new version and config. A lane that refuses
    /// is closed (its state is committed): it reopens on the new version with its
    /// partition's next events.
    async fn swap_lanes(&mut self, plugin: &PluginConfig) {
        let program = self.sandbox().program().clone();
        for p in self.lane_partitions() {
            if !self.enter_lane(p).await {
                return;
            }
            let (program, target) = (program.clone(), plugin.clone());
            let (_, result) = self
                .in_sandbox(Vec::new(), move |sandbox, _, _, _| {
                    sandbox.swap(program, &target)
                })
                .await;
            match result {
                Ok(()) => self.leave_lane(),
                Err(e) => {
                    warn!(
                        partition = p,
                        "the partition's instance refused the change ({e}); it restarts on it from its committed state"
                    );
                    self.drop_lane();
                }
            }
        }
    }

    /// Runs, delivers and commits one batch (or, if the breaker opens part-way, the events
    /// decided before it did). Returns the offsets that are on the disk now, for the caller
    /// to store in the consumer. With partition-scoped state, each partition's events run
    /// on its own instance, one partition after the other.
    async fn handle_batch(&mut self, events: Vec<Event>) -> (Handled, Offsets) {
        if !self.partitioned() {
            return self.handle_part(events).await;
        }
        let mut synced = Offsets::new();
        let mut parts = Self::split_by_partition(events).into_iter();
        while let Some((p, events)) = parts.next() {
            if !self.enter_lane(p).await {
                return (Handled::Stopping, synced);
            }
            let (handled, part_synced) = match self.skip_reflected(p, events) {
                LaneRun::Done(offsets) => (Handled::All, offsets),
                LaneRun::Run(events) => self.handle_part(events).await,
            };
            self.leave_lane();
            synced.extend(part_synced);
            match handled {
                Handled::All => {}
                Handled::Stopping => return (Handled::Stopping, synced),
                Handled::Tripped { mut held, pause } => {
                    held.extend(parts.flat_map(|(_, events)| events));
                    return (Handled::Tripped { held, pause }, synced);
                }
            }
        }
        (Handled::All, synced)
    }

    /// [`Worker::handle_batch`] on the sandbox in the slot.
    async fn handle_part(&mut self, events: Vec<Event>) -> (Handled, Offsets) {
        let started = Instant::now();
        let mut breaker = std::mem::replace(&mut self.breaker, Breaker::new(Default::default()));
        let shutdown = self.shutdown.clone();
        let (mut events, (ran, breaker)) = self
            .in_sandbox(events, move |sandbox, events, plugin, metrics| {
                let ran = run_events(sandbox, events, plugin, metrics, &mut breaker, &shutdown);
                (ran, breaker)
            })
            .await;
        self.breaker = breaker;
        let Ran {
            dispositions,
            trapped,
            tripped,
            stopping,
        } = ran;
        if stopping {
            // Retried events were still waiting: nothing of the batch is kept, and it is
            // consumed again at the next start.
            self.sandbox().abort_batch();
            return (Handled::Stopping, Offsets::new());
        }
        let held = events.split_off(dispositions.len());
        if let Some(rb) = self.sandbox().take_rolled_back() {
            self.metrics.reload(ReloadOutcome::RolledBack);
            let version = version_of(self.sandbox().program());
            self.metrics.set_version(version);
            error!(path = %rb.path.display(), digest = %rb.digest, restored = %rb.restored_digest,
                "new version trapped on probation ({}); the previous version is back", rb.trap);
        } else if !trapped {
            self.sandbox().batch_succeeded();
        }
        let outputs = self.sandbox().take_outputs();
        let version = self.sandbox().program().digest().to_string();
        let letters: Vec<DeadLetter> = dispositions
            .iter()
            .enumerate()
            .filter_map(|(index, d)| match d {
                Disposition::DeadLetter {
                    reason,
                    attempts,
                    cause,
                } => Some(DeadLetter {
                    index,
                    reason: reason.clone(),
                    attempts: *attempts,
                    cause: cause.label(),
                }),
                _ => None,
            })
            .collect();
        for (e, d) in events.iter().zip(&dispositions) {
            if let Disposition::DeadLetter {
                reason,
                attempts,
                cause,
            } = d
            {
                warn!(
                    messaging.kafka.partition = e.partition,
                    messaging.kafka.offset = e.offset,
                    reason = cause.label(),
                    attempts,
                    version = %version,
                    "dead-lettered: {reason}"
                );
            }
        }
        if !self.deliver(&outputs, &events, &letters, &version).await {
            self.sandbox().abort_batch();
            return (Handled::Stopping, Offsets::new());
        }
        let offsets = next_offsets(&events);
        let Some(synced) = self.commit(&offsets, false).await else {
            return (Handled::Stopping, Offsets::new());
        };
        let output_records = outputs.len();
        self.committed(outputs);
        for d in &dispositions {
            match d {
                Disposition::Ok => self.metrics.count(Outcome::Ok, 1),
                Disposition::Skip => self.metrics.count(Outcome::Skip, 1),
                Disposition::DeadLetter { cause, .. } => {
                    self.metrics.count(Outcome::DeadLetter, 1);
                    self.metrics.dead_lettered(*cause);
                }
            }
        }
        self.metrics
            .output_records
            .fetch_add(output_records as u64, Relaxed);
        self.metrics.observe_batch(started.elapsed());
        debug!(
            events = events.len(),
            outputs = output_records,
            dead_letters = letters.len(),
            "batch done"
        );
        let handled = match tripped {
            None => Handled::All,
            Some(why) => {
                let pause = self.breaker.open();
                self.metrics.breaker_trips.fetch_add(1, Relaxed);
                self.metrics.set_breaker(BreakerState::Open);
                error!(
                    held = held.len(),
                    pause_ms = pause.as_millis() as u64,
                    "breaker open: {why}; pausing the plugin (the held events are handled after the pause, or by a fixed version as soon as it is swapped in)"
                );
                Handled::Tripped { held, pause }
            }
        };
        (handled, synced)
    }

    /// Waits out an open breaker: consumes nothing (the caller keeps the consumer polled,
    /// its partitions paused), runs no ticks. A hot swap ends the pause
    /// at once (a fix should not wait). Returns false if the host stops, or the plugin is
    /// removed, meanwhile.
    async fn wait_out_breaker(&mut self, pause: Duration) -> bool {
        let until = tokio::time::Instant::now() + pause;
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.changed() => return false,
                control = self.control.recv() => match control {
                    Some(Control::Swap { program, plugin, tier_up, done }) => {
                        let result = self.swap(program, *plugin, tier_up).await;
                        let swapped = result.is_ok();
                        let _ = done.send(result);
                        if swapped {
                            info!("breaker closed by the swap; resuming");
                            return true;
                        }
                    }
                    None => return false,
                },
                _ = tokio::time::sleep_until(until) => {
                    self.breaker.resume();
                    self.metrics.set_breaker(BreakerState::HalfOpen);
                    info!("breaker half-open: handing the plugin events again, on trial");
                    return true;
                }
            }
        }
    }

    /// Runs `f` on the sandbox on a blocking thread.
    pub(super) async fn in_sandbox<T, F>(&mut self, events: Vec<Event>, f: F) -> (Vec<Event>, T)
    where
        T: Send + 'static,
        F: FnOnce(&mut Sandbox, &[Event], &PluginConfig, &PluginMetrics) -> T + Send + 'static,
    {
        let mut sandbox = self.sandbox.take().expect("one call at a time");
        let plugin = self.plugin.clone();
        let metrics = self.metrics.clone();
        let (sandbox, events, result) = tokio::task::spawn_blocking(move || {
            let result = f(&mut sandbox, &events, &plugin, &metrics);
            (sandbox, events, result)
        })
        .await
        .expect("the sandbox thread does not panic");
        self.sandbox = Some(sandbox);
        (events, result)
    }

    async fn tick(&mut self, consumer: &StreamConsumer<Callbacks>) {
        let now = crate::clock::now_ms();
        let (_, result) = self
            .in_sandbox(Vec::new(), move |sandbox, _, _, metrics| {
                let r = sandbox.call_tick(now);
                metrics
                    .log_lines_dropped
                    .fetch_add(sandbox.take_log_lines_dropped(), Relaxed);
                if let Err(trap) = &r {
                    metrics.trap(trap.kind);
                    metrics.instance_restarts.fetch_add(1, Relaxed);
                }
                r
            })
            .await;
        self.metrics.ticks.fetch_add(1, Relaxed);
        if let Err(trap) = result {
            warn!("on-tick failed: {trap}");
        }
        let outputs = self.sandbox().take_outputs();
        if !self.deliver(&outputs, &[], &[], "").await {
            self.sandbox().abort_batch();
            return;
        }
        // A failed commit has dropped the tick's effects already.
        if let Some(synced) = self.commit(&Offsets::new(), false).await {
            // This commit may have been the one that put earlier ones on the disk.
            store_offsets(consumer, &synced);
            self.metrics
                .output_records
                .fetch_add(outputs.len() as u64, Relaxed);
            self.committed(outputs);
        }
    }
}

/// How long a stopping worker waits for its final commit and for leaving its group.
const LEAVE_DEADLINE: Duration = Duration::from_secs(15);

/// Commits the offsets stored in `consumer` and leaves its group (dropping the consumer
/// closes it). Blocking: each waits for the group's coordinator.
fn leave(consumer: StreamConsumer<Callbacks>) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) => info!("stopped; offsets committed"),
        // Nothing stored yet, or a rebalance in progress: nothing is lost, the events
        // are consumed again.
        Err(rdkafka::error::KafkaError::ConsumerCommit(
            rdkafka::types::RDKafkaErrorCode::NoOffset,
        )) => {
            info!("stopped; offsets were already committed")
        }
        Err(e) => info!("stopped; final commit: {e}"),
    }
    consumer.unsubscribe();
    drop(consumer);
}

/// The next offset to consume of each partition in `events`.
fn next_offsets(events: &[Event]) -> Offsets {
    let mut next = Offsets::new();
    // A batch holds runs of one partition: its key (a `String`) is made once per run, not
    // once per event.
    for run in events.chunk_by(|a, b| a.partition == b.partition && a.topic == b.topic) {
        let end = run.iter().map(|e| e.offset + 1).max().unwrap_or(0);
        let o = next
            .entry((run[0].topic.to_string(), run[0].partition))
            .or_insert(end);
        *o = (*o).max(end);
    }
    next
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
    fn next_offsets_are_one_past_the_highest_of_each_partition() {
        // Runs of partitions, a partition coming back, and a retried event handed in late.
        let events: Vec<Event> = [(0, 5), (0, 6), (2, 10), (0, 7), (1, 3), (2, 9), (0, 4)]
            .into_iter()
            .map(|(p, o)| event(p, o))
            .collect();
        let next = next_offsets(&events);
        let expected: Offsets = [(0, 8), (1, 4), (2, 11)]
            .into_iter()
            .map(|(p, o)| (("t".to_string(), p), o))
            .collect();
        assert_eq!(next, expected);
        assert!(next_offsets(&[]).is_empty());
    }
}
