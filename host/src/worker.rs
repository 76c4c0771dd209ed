//! One plugin's consume loop: its own consumer group, batches, verdicts, offsets.
//!
//! For each batch: run it through the sandbox (on a blocking thread, the plugin's CPU time
//! must not stall the async runtime), handle traps and retries, deliver the outputs and dead
//! letters, commit the plugin's state, and only then store the events' offsets. So an offset
//! never passes an event whose effects are not delivered: a crash or a failed delivery means
//! the events are consumed again (at-least-once), never skipped.
//!
//! Hot reload: the supervisor sends a [`Control::Swap`] with a new version (compiled off the
//! event path) or config; the worker applies it between two batches, so every event is
//! handled by exactly one version and the state carries over. Closing the control channel
//! stops the worker: it finishes its batch, commits and leaves its group.
//!
//! Failures: when a call traps (panic, CPU deadline, memory cap), its effects are discarded,
//! the instance is rebuilt, and the batch is run again in smaller pieces, recursively, until
//! the events the plugin fails on are alone: they are dead-lettered with the trap as the
//! reason, the others get their verdicts (see [`piece_size`] for how small). A poison event
//! never blocks its partition. A plugin that fails on most events trips its [`Breaker`].
//!
//! Order: events of a partition reach the plugin in order. An event the plugin answers
//! `retry` is handed again after the rest of its batch, so within one batch it can be
//! overtaken by later events.

use crate::breaker::{Breaker, BreakerState};
use crate::config::PluginConfig;
use crate::metrics::{DeadLetterReason, Outcome, PluginMetrics, ReloadOutcome, Version};
use crate::outputs::{DeadLetter, Outputs};
use crate::sandbox::{Event, Header, Program, Sandbox, Trap, Verdict};
use crate::store::Offsets;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientConfig, ClientContext, Statistics, TopicPartitionList};
use std::collections::BTreeSet;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, instrument, warn};

/// Consumer callbacks: where assigned partitions start, lag from librdkafka's statistics,
/// rebalances to the log.
struct Callbacks {
    plugin: String,
    topic: String,
    metrics: Arc<PluginMetrics>,
    /// With durable state: the offsets saved with it, where assigned partitions start (not
    /// where Kafka's committed offsets say). `None`: state is not durable, Kafka's committed
    /// offsets rule.
    saved: Option<Arc<std::sync::Mutex<Offsets>>>,
    /// `[state] shared_group`: other hosts may have handled partitions this one is assigned.
    shared_group: bool,
    /// The partitions of `topic` this consumer holds now, kept by the rebalance callback.
    assigned: Arc<std::sync::Mutex<BTreeSet<i32>>>,
    start_from: crate::config::StartFrom,
    /// When the consumer lost its last broker connection, for the log line when it is back.
    kafka_down_since: std::sync::Mutex<Option<Instant>>,
}

impl ClientContext for Callbacks {
    fn stats(&self, stats: Statistics) {
        self.note_kafka_connection(&stats);
        let Some(topic) = stats.topics.get(&self.topic) else {
            return;
        };
        // Lag = log end - the position of the plugin: what this process handled (stored),
        // else what is committed in Kafka, else where fetching resumed (e.g. the offsets
        // saved with durable state, when there was nothing new to handle).
        // Only the partitions held now: librdkafka keeps reporting partitions a rebalance
        // took away, with the position they had then.
        let assigned = self.assigned.lock().expect("assigned lock");
        let lags: Vec<i64> = topic
            .partitions
            .values()
            .filter(|p| p.partition >= 0 && p.hi_offset >= 0)
            .filter(|p| assigned.contains(&p.partition))
            .filter_map(|p| {
                let position = [p.stored_offset, p.committed_offset, p.next_offset]
                    .into_iter()
                    .find(|o| *o >= 0)?;
                Some((p.hi_offset - position).max(0))
            })
            .collect();
        let lag = if lags.is_empty() {
            -1
        } else {
            lags.iter().sum()
        };
        self.metrics.consumer_lag.store(lag, Relaxed);
    }
}

impl Callbacks {
    /// Records whether any broker connection is up, and says so in the log when that
    /// changes: while Kafka is unreachable the consumer only waits and reconnects, so this
    /// is the line that tells the user why nothing moves.
    fn note_kafka_connection(&self, stats: &Statistics) {
        let up = stats.brokers.values().any(|b| b.state == "UP");
        let was = self.metrics.kafka.swap(if up { 1 } else { 2 }, Relaxed);
        let mut down_since = self.kafka_down_since.lock().expect("down-since lock");
        match (was, up) {
            (2, true) => {
                let down_for = down_since.take().map(|t| t.elapsed());
                info!(plugin = %self.plugin, ?down_for, "Kafka is reachable again: consuming resumes");
            }
            (1 | 0, false) => {
                *down_since = Some(Instant::now());
                let brokers = stats
                    .brokers
                    .values()
                    .map(|b| format!("{} {}", b.name, b.state))
                    .collect::<Vec<_>>()
                    .join(", ");
                warn!(plugin = %self.plugin, %brokers, "no Kafka broker reachable: the plugin waits (nothing is lost) and reconnects; /healthz says kafka \"down\" meanwhile");
            }
            _ => {}
        }
    }
}

impl Callbacks {
    /// The group's committed offsets for the partitions of `tpl` (those that have one). On
    /// error, none: the saved offsets alone decide, as with one host.
    fn committed(
        &self,
        base: &rdkafka::consumer::BaseConsumer<Self>,
        tpl: &TopicPartitionList,
    ) -> Offsets {
        match base.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
            Ok(list) => list
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    rdkafka::Offset::Offset(o) if o >= 0 => {
                        Some(((e.topic().to_string(), e.partition()), o))
                    }
                    _ => None,
                })
                .collect(),
            Err(e) => {
                warn!(plugin = %self.plugin, "cannot read the group's committed offsets ({e}): starting from the offsets saved with the state");
                Offsets::new()
            }
        }
    }
}

impl ConsumerContext for Callbacks {
    /// librdkafka's default rebalance, except that with durable state an assigned partition
    /// starts at the offset saved with the state (or at `start_from` if none is saved); with
    /// `shared_group`, at the later of that and the group's committed offset.
    fn rebalance(
        &self,
        base: &rdkafka::consumer::BaseConsumer<Self>,
        err: rdkafka::types::RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        use rdkafka::consumer::RebalanceProtocol;
        use rdkafka::types::RDKafkaRespErr::*;
        let cooperative = matches!(base.rebalance_protocol(), RebalanceProtocol::Cooperative);
        match err {
            RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                if let Some(saved) = &self.saved {
                    // One host: its saved offsets are the truth (Kafka's committed ones
                    // trail them). Sharing the group: another host may be further.
                    let committed = if self.shared_group {
                        self.committed(base, tpl)
                    } else {
                        Offsets::new()
                    };
                    let saved = saved.lock().expect("offsets lock");
                    let assigned: Vec<(String, i32)> = tpl
                        .elements()
                        .iter()
                        .map(|e| (e.topic().to_string(), e.partition()))
                        .collect();
                    for (topic, partition) in assigned {
                        let key = (topic.clone(), partition);
                        let start = match (saved.get(&key), committed.get(&key)) {
                            // The state saw up to `s`; another host sharing the group may
                            // have gone further (it had the partition meanwhile): continue
                            // after what either handled, so no event is counted twice.
                            (Some(s), Some(c)) => rdkafka::Offset::Offset((*s).max(*c)),
                            (Some(s), None) => rdkafka::Offset::Offset(*s),
                            (None, Some(c)) => rdkafka::Offset::Offset(*c),
                            (None, None) => match self.start_from {
                                crate::config::StartFrom::Earliest => rdkafka::Offset::Beginning,
                                crate::config::StartFrom::Latest => rdkafka::Offset::End,
                            },
                        };
                        let _ = tpl.set_partition_offset(&topic, partition, start);
                    }
                }
                self.assigned.lock().expect("assigned lock").extend(
                    tpl.elements()
                        .iter()
                        .filter(|e| e.topic() == self.topic)
                        .map(|e| e.partition()),
                );
                info!(plugin = %self.plugin, partitions = %partitions(tpl), "partitions assigned");
                let result = if cooperative {
                    base.incremental_assign(tpl)
                } else {
                    base.assign(tpl)
                };
                if let Err(e) = result {
                    error!(plugin = %self.plugin, "cannot take the assigned partitions: {e}");
                }
            }
            RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                info!(plugin = %self.plugin, partitions = %partitions(tpl), "partitions revoked");
                {
                    let mut assigned = self.assigned.lock().expect("assigned lock");
                    for e in tpl.elements().iter().filter(|e| e.topic() == self.topic) {
                        assigned.remove(&e.partition());
                    }
                }
                // Hand over exactly: the offsets of everything handled so far are committed
                // before the partitions go (callbacks run only between batches, so nothing
                // of these partitions is in flight). The next owner starts there.
                match base.commit_consumer_state(CommitMode::Sync) {
                    Ok(())
                    | Err(rdkafka::error::KafkaError::ConsumerCommit(
                        rdkafka::types::RDKafkaErrorCode::NoOffset,
                    )) => {}
                    Err(e) => {
                        warn!(plugin = %self.plugin, "committing before the partitions go: {e}")
                    }
                }
                let result = if cooperative {
                    base.incremental_unassign(tpl)
                } else {
                    base.unassign()
                };
                if let Err(e) = result {
                    warn!(plugin = %self.plugin, "unassign: {e}");
                }
            }
            other => {
                warn!(plugin = %self.plugin, "rebalance error: {other:?}");
                let _ = base.unassign();
            }
        }
    }
}

fn partitions(tpl: &TopicPartitionList) -> String {
    tpl.elements()
        .iter()
        .map(|e| e.partition().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Instructions from the supervisor, applied between batches.
pub enum Control {
    /// Run `program` with `plugin`'s config from now on, keeping the state. The answer says
    /// whether the switch happened (if not, the old version still runs).
    Swap {
        program: Arc<Program>,
        plugin: Box<PluginConfig>,
        done: oneshot::Sender<Result<(), String>>,
    },
}

/// What the worker decided for one event after verdicts, retries and traps.
#[derive(Debug, Clone, PartialEq)]
enum Disposition {
    Ok,
    Skip,
    DeadLetter {
        reason: String,
        attempts: u32,
        cause: DeadLetterReason,
    },
}

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
        loaded_at: crate::generator::now_ms() as f64 / 1000.0,
        compile_seconds: program.compile_time.as_secs_f64(),
        precompiled: program.precompiled,
        baseline: program.baseline,
    }
}

/// Everything one plugin's loop needs.
pub struct Worker {
    plugin: PluginConfig,
    topic: String,
    client: ClientConfig,
    /// `None` only while a call runs on a blocking thread.
    sandbox: Option<Sandbox>,
    outputs: Outputs,
    metrics: Arc<PluginMetrics>,
    shutdown: watch::Receiver<bool>,
    control: mpsc::Receiver<Control>,
    /// The offsets saved with durable state, shared with the rebalance callback.
    saved: Option<Arc<std::sync::Mutex<Offsets>>>,
    /// `[state] shared_group`.
    shared_group: bool,
    /// The partitions the consumer holds now (see [`Callbacks::assigned`]).
    assigned: Arc<std::sync::Mutex<BTreeSet<i32>>>,
    breaker: Breaker,
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
            assigned: Default::default(),
            breaker: Breaker::new(plugin_breaker),
        }
    }

    /// `[state] shared_group`: other hosts share this plugin's consumer group.
    pub fn sharing_the_group(mut self, shared: bool) -> Worker {
        self.shared_group = shared;
        self
    }

    fn sandbox(&mut self) -> &mut Sandbox {
        self.sandbox
            .as_mut()
            .expect("the sandbox is back after every call")
    }

    fn consumer(&self) -> anyhow::Result<StreamConsumer<Callbacks>> {
        let mut c = self.client.clone();
        c.set("group.id", self.plugin.group_id())
            .set("enable.auto.commit", "true")
            // Offsets are stored by us, after the plugin's verdict and the delivery of its outputs.
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", self.plugin.start_from.as_kafka())
            .set("statistics.interval.ms", "1000");
        for (k, v) in [
            ("session.timeout.ms", "10000"),
            ("heartbeat.interval.ms", "1000"),
        ] {
            if c.get(k).is_none() {
                c.set(k, v);
            }
        }
        let callbacks = Callbacks {
            plugin: self.plugin.name.clone(),
            topic: self.topic.clone(),
            metrics: self.metrics.clone(),
            saved: self.saved.clone(),
            shared_group: self.shared_group,
            assigned: self.assigned.clone(),
            start_from: self.plugin.start_from,
            kafka_down_since: Default::default(),
        };
        let consumer: StreamConsumer<Callbacks> =
            c.create_with_context(callbacks).map_err(|e| {
                anyhow::anyhow!(
                    "plugin `{}`: cannot create a Kafka consumer: {e}",
                    self.plugin.name
                )
            })?;
        consumer.subscribe(&[&self.topic]).map_err(|e| {
            anyhow::anyhow!(
                "plugin `{}`: cannot subscribe to `{}`: {e}",
                self.plugin.name,
                self.topic
            )
        })?;
        Ok(consumer)
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
        let consumer = self.consumer()?;
        self.metrics.consumer_lag.store(-1, Relaxed);
        self.metrics.up.store(1, Relaxed);
        let program = self.sandbox().program().clone();
        info!(group = %self.plugin.group_id(), digest = %program.digest(), precompiled = program.precompiled,
            load_ms = program.compile_time.as_millis() as u64, "consuming");
        let mut tick = self.tick_interval();
        let mut tick_ms = self.plugin.tick_interval_ms;
        'consume: loop {
            if self.plugin.tick_interval_ms != tick_ms {
                tick_ms = self.plugin.tick_interval_ms;
                tick = self.tick_interval();
            }
            let first = tokio::select! {
                biased;
                _ = self.shutdown.changed() => break,
                control = self.control.recv() => match control {
                    Some(Control::Swap { program, plugin, done }) => {
                        let _ = done.send(self.swap(program, *plugin).await);
                        continue;
                    }
                    None => break,
                },
                _ = async { tick.as_mut().expect("guarded").tick().await }, if tick.is_some() => {
                    self.tick().await;
                    continue;
                }
                m = consumer.recv() => m,
            };
            let mut events = Vec::with_capacity(self.plugin.max_batch);
            let mut bytes = 0;
            match first {
                Ok(m) => {
                    let e = to_event(&m);
                    bytes += event_size(&e);
                    events.push(e);
                }
                Err(e) => {
                    warn!("consume error: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            }
            // A batch is copied into the plugin's memory: cut it by size too, so a run of
            // big payloads does not hit the memory cap just by being many.
            let max_bytes = self.plugin.max_batch_bytes();
            let deadline =
                tokio::time::Instant::now() + Duration::from_millis(self.plugin.batch_linger_ms);
            // A swap (or removal) that arrives while the batch fills cuts it short: the new
            // version should not wait for the linger deadline and a batch of the old one.
            let mut control = None;
            while events.len() < self.plugin.max_batch && bytes < max_bytes {
                // Take what librdkafka already holds without arming a timer per event; wait
                // (up to the linger deadline) only when it has nothing.
                let next = match ready_now(consumer.recv()) {
                    Some(m) => Ok(m),
                    None => tokio::select! {
                        biased;
                        c = self.control.recv() => {
                            control = Some(c);
                            break;
                        }
                        next = tokio::time::timeout_at(deadline, consumer.recv()) => next,
                    },
                };
                match next {
                    Ok(Ok(m)) => {
                        let e = to_event(&m);
                        bytes += event_size(&e);
                        events.push(e);
                    }
                    Ok(Err(e)) => {
                        warn!("consume error: {e}");
                        break;
                    }
                    Err(_) => break,
                }
            }
            if self.shared_group {
                // Taken before a rebalance moved their partition to another host, which
                // starts at the offset committed on revoke: they are its to handle now.
                let assigned = self.assigned.lock().expect("assigned lock");
                events.retain(|e| assigned.contains(&e.partition));
            }
            match control {
                // The events already taken go to the new version.
                Some(Some(Control::Swap {
                    program,
                    plugin,
                    done,
                })) => {
                    let _ = done.send(self.swap(program, *plugin).await);
                }
                // Removed: this batch is still handled and committed; the loop ends after it
                // (the closed channel is seen again at the top).
                Some(None) | None => {}
            }
            let mut batch = events;
            loop {
                match self.handle_batch(batch, &consumer).await {
                    Handled::All => break,
                    Handled::Stopping => break 'consume,
                    Handled::Tripped { held, pause } => {
                        if !self.wait_out_breaker(pause).await {
                            break 'consume;
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
        Ok(())
    }

    /// Switches version and/or config between two batches.
    async fn swap(&mut self, program: Arc<Program>, plugin: PluginConfig) -> Result<(), String> {
        let from = self.sandbox().program().digest().to_string();
        let to = program.digest().to_string();
        // The same version and settings on optimized code instead of baseline code: not a
        // reload, so not counted as one.
        let tier_up = from == to && self.sandbox().program().baseline && !program.baseline;
        let path = program.path().display().to_string();
        let started = Instant::now();
        let target = plugin.clone();
        let (_, result) = self
            .in_sandbox(Vec::new(), move |sandbox, _, _, _| {
                sandbox.swap(program, &target)
            })
            .await;
        match result {
            Ok(()) => {
                self.outputs = Outputs::new(&plugin, self.outputs.producer().clone());
                // A new version or config deserves a fresh start, not the old one's pause.
                self.breaker = Breaker::new(plugin.breaker.clone());
                self.metrics.set_breaker(BreakerState::Closed);
                self.plugin = plugin;
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

    /// Runs, delivers, commits and stores offsets for one batch (or, if the breaker opens
    /// part-way, for the events decided before it did).
    async fn handle_batch(
        &mut self,
        events: Vec<Event>,
        consumer: &StreamConsumer<Callbacks>,
    ) -> Handled {
        let started = Instant::now();
        let mut breaker = std::mem::replace(&mut self.breaker, Breaker::new(Default::default()));
        let (mut events, (ran, breaker)) = self
            .in_sandbox(events, move |sandbox, events, plugin, metrics| {
                let ran = run_events(sandbox, events, plugin, metrics, &mut breaker);
                (ran, breaker)
            })
            .await;
        self.breaker = breaker;
        let Ran {
            dispositions,
            trapped,
            tripped,
        } = ran;
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
                    reason, attempts, ..
                } => Some(DeadLetter {
                    index,
                    reason: reason.clone(),
                    attempts: *attempts,
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
            return Handled::Stopping;
        }
        let offsets = next_offsets(&events);
        if !self.commit(&offsets).await {
            return Handled::Stopping;
        }
        store_offsets(consumer, &offsets);
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
            .fetch_add(outputs.len() as u64, Relaxed);
        self.metrics.observe_batch(started.elapsed());
        debug!(
            events = events.len(),
            outputs = outputs.len(),
            dead_letters = letters.len(),
            "batch done"
        );
        match tripped {
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
        }
    }

    /// Waits out an open breaker: consumes nothing, runs no ticks. A hot swap ends the pause
    /// at once (a fix should not wait). Returns false if the host stops, or the plugin is
    /// removed, meanwhile.
    async fn wait_out_breaker(&mut self, pause: Duration) -> bool {
        let until = tokio::time::Instant::now() + pause;
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.changed() => return false,
                control = self.control.recv() => match control {
                    Some(Control::Swap { program, plugin, done }) => {
                        let result = self.swap(program, *plugin).await;
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
    async fn in_sandbox<T, F>(&mut self, events: Vec<Event>, f: F) -> (Vec<Event>, T)
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

    /// Delivers outputs and dead letters, retrying with backoff until they are through or
    /// the host shuts down.
    async fn deliver(
        &mut self,
        outputs: &[crate::sandbox::OutputRecord],
        events: &[Event],
        letters: &[DeadLetter],
        version: &str,
    ) -> bool {
        let mut backoff = Duration::from_millis(100);
        // Once the outputs are through, a retry only re-sends the dead letters.
        let mut outputs_delivered = outputs.is_empty();
        loop {
            let result = async {
                if !outputs_delivered {
                    self.outputs.deliver(outputs).await?;
                    outputs_delivered = true;
                }
                self.outputs.dead_letter(events, letters, version).await
            }
            .await;
            match result {
                Ok(()) => return true,
                Err(e) => {
                    self.metrics.output_failures.fetch_add(1, Relaxed);
                    error!(
                        "delivery failed, retrying in {backoff:?} (offsets are held back meanwhile): {e:#}"
                    );
                }
            }
            tokio::select! {
                _ = self.shutdown.changed() => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    /// Commits the batch's state with `offsets` (one transaction when state is durable),
    /// retrying with backoff until it goes through or the host shuts down; then the batch is
    /// dropped and its events are consumed again at the next start.
    async fn commit(&mut self, offsets: &Offsets) -> bool {
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            // On the blocking pool: a durable commit waits for the disk (fsync).
            let batch_offsets = offsets.clone();
            let (_, result) = self
                .in_sandbox(Vec::new(), move |sandbox, _, _, _| {
                    sandbox.commit_batch(&batch_offsets)
                })
                .await;
            match result {
                Ok(()) => {
                    self.metrics.observe_commit(started.elapsed());
                    if let Some(saved) = &self.saved {
                        saved
                            .lock()
                            .expect("offsets lock")
                            .extend(offsets.iter().map(|(k, v)| (k.clone(), *v)));
                    }
                    return true;
                }
                Err(e) => {
                    self.metrics.output_failures.fetch_add(1, Relaxed);
                    error!(
                        "cannot commit state, retrying in {backoff:?} (offsets are held back meanwhile): {e}"
                    );
                }
            }
            tokio::select! {
                _ = self.shutdown.changed() => {
                    self.sandbox().abort_batch();
                    return false;
                }
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn tick(&mut self) {
        let now = crate::generator::now_ms();
        let (_, result) = self
            .in_sandbox(Vec::new(), move |sandbox, _, _, metrics| {
                let r = sandbox.call_tick(now);
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
        if self.deliver(&outputs, &[], &[], "").await && self.commit(&Offsets::new()).await {
            self.metrics
                .output_records
                .fetch_add(outputs.len() as u64, Relaxed);
        } else {
            self.sandbox().abort_batch();
        }
    }
}

/// The verdicts for a batch, or for the part of it decided before the breaker opened.
struct Ran {
    /// One per event of a prefix of the batch: all of it, unless the breaker opened.
    dispositions: Vec<Disposition>,
    /// Whether any call failed.
    trapped: bool,
    /// Why the breaker opened, if it did.
    tripped: Option<String>,
}

/// Runs a batch through the sandbox and turns verdicts, traps and retries into one
/// disposition per event. Blocking: runs on a blocking thread.
fn run_events(
    sandbox: &mut Sandbox,
    events: &[Event],
    plugin: &PluginConfig,
    metrics: &PluginMetrics,
    breaker: &mut Breaker,
) -> Ran {
    let mut isolation = Isolation {
        sandbox,
        events,
        metrics,
        breaker,
        verdicts: (0..events.len()).map(|_| None).collect(),
        trapped: false,
        tripped: None,
    };
    isolation.run(0..events.len());
    let Isolation {
        sandbox,
        breaker,
        verdicts,
        trapped,
        mut tripped,
        ..
    } = isolation;
    // The decided events: all of them, or those before the breaker opened.
    let mut verdicts: Vec<Result<Verdict, Trap>> = verdicts.into_iter().map_while(|v| v).collect();

    let mut attempts = vec![1u32; verdicts.len()];
    let limits = &plugin.limits;
    let mut backoff = Duration::from_millis(limits.retry_backoff_ms);
    let mut trapped = trapped;
    for _ in 0..limits.max_retries {
        let again: Vec<usize> = (0..verdicts.len())
            .filter(|i| matches!(verdicts[*i], Ok(Verdict::Retry(_))))
            .collect();
        if again.is_empty() {
            break;
        }
        metrics.retries.fetch_add(again.len() as u64, Relaxed);
        std::thread::sleep(backoff);
        backoff *= 2;
        for i in again {
            attempts[i] += 1;
            verdicts[i] =
                call(sandbox, std::slice::from_ref(&events[i]), metrics).map(|mut v| v.remove(0));
            trapped |= verdicts[i].is_err();
        }
    }
    let dispositions = verdicts
        .into_iter()
        .zip(attempts)
        .map(|(v, attempts)| match v {
            Ok(Verdict::Ok) => Disposition::Ok,
            Ok(Verdict::Skip) => Disposition::Skip,
            Ok(Verdict::DeadLetter(reason)) => Disposition::DeadLetter {
                reason,
                attempts,
                cause: DeadLetterReason::Verdict,
            },
            Ok(Verdict::Retry(reason)) => {
                if breaker.failed() && tripped.is_none() {
                    tripped = Some(format!(
                        "{} of the last {} events failed (the last ran out of retries: {reason})",
                        breaker.recent_failures(),
                        plugin.breaker.window
                    ));
                }
                Disposition::DeadLetter {
                    reason: format!("still failing after {attempts} attempts: {reason}"),
                    attempts,
                    cause: DeadLetterReason::RetriesExhausted,
                }
            }
            Err(trap) => Disposition::DeadLetter {
                reason: format!("plugin failed: {trap}"),
                attempts,
                cause: DeadLetterReason::Failed(trap.kind),
            },
        })
        .collect();
    Ran {
        dispositions,
        trapped,
        tripped,
    }
}

/// Runs events through the plugin, isolating the ones it fails on.
struct Isolation<'a> {
    sandbox: &'a mut Sandbox,
    events: &'a [Event],
    metrics: &'a PluginMetrics,
    breaker: &'a mut Breaker,
    /// `None` until the event is decided.
    verdicts: Vec<Option<Result<Verdict, Trap>>>,
    trapped: bool,
    tripped: Option<String>,
}

impl Isolation<'_> {
    /// Runs `range` in one call; if that fails, runs it again in smaller pieces the same way,
    /// so the events the plugin fails on end up alone (and dead-lettered with the trap) while
    /// the others get their verdicts, in order. The failed call's state and outputs were
    /// discarded (and a version on probation was replaced by the previous one, which runs the
    /// pieces). Stops, leaving the later events undecided, when the breaker opens.
    fn run(&mut self, range: Range<usize>) {
        if self.tripped.is_some() || range.is_empty() {
            return;
        }
        match call(self.sandbox, &self.events[range.clone()], self.metrics) {
            Ok(verdicts) => {
                self.breaker.succeeded(range.len());
                for (slot, v) in self.verdicts[range].iter_mut().zip(verdicts) {
                    *slot = Some(Ok(v));
                }
            }
            Err(trap) if range.len() == 1 => {
                self.trapped = true;
                if self.breaker.failed() {
                    self.tripped = Some(format!(
                        "{} of the last events failed (the last: {trap})",
                        self.breaker.recent_failures()
                    ));
                }
                self.verdicts[range.start] = Some(Err(trap));
            }
            Err(trap) => {
                self.trapped = true;
                let piece = piece_size(range.len(), trap.kind);
                if range.len() == self.events.len() {
                    warn!(
                        events = range.len(),
                        "batch failed ({trap}); isolating the failing events (pieces of {piece})"
                    );
                }
                let mut start = range.start;
                while start < range.end {
                    let end = (start + piece).min(range.end);
                    self.run(start..end);
                    start = end;
                }
            }
        }
    }
}

/// How big the pieces are when a failed call of `n` events is run again. What a failure
/// costs decides: after a CPU-deadline or memory-cap hit, every failed call costs a full
/// deadline (or a memory's worth of growth), so the events are run one at a time (two
/// failures for one poison event, whatever the batch size). After a panic, failing is cheap
/// and calls are what cost: pieces of about √n events find one poison event in about 2√n
/// calls (45 for a batch of 500) with three failures. Halving would take 2·log2(n) calls
/// and log2(n) failures.
fn piece_size(n: usize, kind: crate::metrics::TrapKind) -> usize {
    use crate::metrics::TrapKind;
    match kind {
        TrapKind::Deadline | TrapKind::Memory => 1,
        // Always smaller than `n` (which is at least 2 here), or it would never end.
        TrapKind::Trap => ((n as f64).sqrt().ceil() as usize).clamp(1, n - 1),
    }
}

fn call(
    sandbox: &mut Sandbox,
    events: &[Event],
    metrics: &PluginMetrics,
) -> Result<Vec<Verdict>, Trap> {
    let result = sandbox.call_batch(events);
    if let Err(trap) = &result {
        metrics.trap(trap.kind);
        metrics.instance_restarts.fetch_add(1, Relaxed);
    }
    result
}

/// The next offset to consume of each partition in `events`.
fn next_offsets(events: &[Event]) -> Offsets {
    let mut next = Offsets::new();
    for e in events {
        let o = next
            .entry((e.topic.clone(), e.partition))
            .or_insert(e.offset + 1);
        *o = (*o).max(e.offset + 1);
    }
    next
}

/// Stores the offsets in the consumer, for librdkafka to commit to Kafka (every 5 s and on
/// shutdown): lag tools and, without durable state, the next start use them.
fn store_offsets(consumer: &StreamConsumer<Callbacks>, offsets: &Offsets) {
    for ((topic, partition), next) in offsets {
        // The legacy store call stores `offset + 1`.
        if let Err(e) = consumer.store_offset(topic, *partition, next - 1) {
            // The partition was revoked meanwhile: its new owner consumes from the last commit.
            debug!(partition, next, "offset not stored: {e}");
        }
    }
}

/// Roughly the bytes an event takes in the plugin's memory.
fn event_size(e: &Event) -> usize {
    e.payload.len()
        + e.key.as_ref().map_or(0, Vec::len)
        + e.headers
            .iter()
            .map(|h| h.key.len() + h.value.as_ref().map_or(0, Vec::len))
            .sum::<usize>()
}

/// `future`'s output if it is ready at the first poll.
fn ready_now<F: std::future::Future>(future: F) -> Option<F::Output> {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(output) => Some(output),
        std::task::Poll::Pending => None,
    }
}

fn to_event(m: &BorrowedMessage<'_>) -> Event {
    let headers = m
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| Header {
                    key: h.key.to_string(),
                    value: h.value.map(<[u8]>::to_vec),
                })
                .collect()
        })
        .unwrap_or_default();
    Event {
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis(),
        key: m.key().map(<[u8]>::to_vec),
        headers,
        payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::TrapKind;

    #[test]
    fn isolation_pieces_always_shrink() {
        for n in 2..2_000 {
            for kind in [TrapKind::Trap, TrapKind::Deadline, TrapKind::Memory] {
                let piece = piece_size(n, kind);
                assert!((1..n).contains(&piece), "n = {n}, {kind:?}: {piece}");
            }
        }
        assert_eq!(piece_size(500, TrapKind::Trap), 23);
        assert_eq!(piece_size(500, TrapKind::Deadline), 1);
    }
}
