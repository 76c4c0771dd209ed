//! One plugin's Kafka consumer: its settings, and the callbacks librdkafka runs inside its
//! poll: where assigned partitions start (the offsets saved with durable state), lag from
//! librdkafka's statistics, broker connectivity, and the hand-over on revoke.
//!
//! The consumer is polled by its plugin's worker, an async task, so these callbacks run on
//! an async runtime thread, which every other plugin's task shares: they make no broker
//! round trip there. On revoke, librdkafka itself commits the stored offsets of the
//! partitions that go, and the group waits for that commit; the one round trip left, the
//! group's committed offsets on assignment with `[state] shared_group`, is made with the
//! thread's other tasks moved elsewhere (`kafka::blocking`).
//!
//! The worker keeps polling while a batch is in flight (see `pipeline::source`), so a
//! revocation can come in the middle of a batch. With `[state] shared_group`, the next owner
//! (another host) starts at the committed offset, so the partitions go only once the
//! batch's offsets are stored: the worker holds revocations meanwhile
//! ([`Callbacks::hold_revocations`], [`release_revocations`]).

use super::Offsets;
use crate::config::{PluginConfig, StartFrom};
use crate::event::{Event, Header};
use crate::metrics::PluginMetrics;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientConfig, ClientContext, Statistics, TopicPartitionList};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};

/// Consumer callbacks: where assigned partitions start, lag from librdkafka's statistics,
/// rebalances to the log.
pub struct Callbacks {
    pub plugin: String,
    pub topic: String,
    pub metrics: Arc<PluginMetrics>,
    /// With durable state: the offsets saved with it, where assigned partitions start (not
    /// where Kafka's committed offsets say). `None`: state is not durable, Kafka's committed
    /// offsets rule.
    pub saved: Option<Arc<std::sync::Mutex<Offsets>>>,
    /// `[state] shared_group`: other hosts may have handled partitions this one is assigned.
    pub shared_group: bool,
    /// The partitions of `topic` this consumer holds now, kept by the rebalance callback.
    pub assigned: Arc<std::sync::Mutex<BTreeSet<i32>>>,
    pub start_from: StartFrom,
    /// When the consumer lost its last broker connection, for the log line when it is back.
    pub kafka_down_since: std::sync::Mutex<Option<Instant>>,
    /// Bumped by every assignment and revocation, for the worker to notice them.
    pub rebalances: Arc<std::sync::atomic::AtomicU64>,
    /// The shared fetch, if the plugin reads from it: its partitions are paused in this
    /// consumer, whose own log end offsets for them go stale.
    pub shared_fetch: Option<Arc<super::shared_fetch::SharedFetch>>,
    /// Revocations put off while a batch is in flight.
    pub held: std::sync::Mutex<HeldRevocations>,
    /// Partitions revoked since the worker last asked ([`Callbacks::take_revoked`]): with
    /// partition-scoped state, their instances close (another host may change their state
    /// before they come back).
    pub revoked: std::sync::Mutex<BTreeSet<i32>>,
}

/// Revocations the worker holds while a batch is in flight (with `[state] shared_group`).
#[derive(Debug, Default)]
pub struct HeldRevocations {
    holding: bool,
    /// The partitions revoked meanwhile, and whether the group rebalances cooperatively.
    revoked: Option<(Vec<(String, i32)>, bool)>,
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
                let shared_hi = self
                    .shared_fetch
                    .as_ref()
                    .and_then(|s| s.high_watermark(p.partition))
                    .unwrap_or(-1);
                Some((p.hi_offset.max(shared_hi) - position).max(0))
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
    /// From now until [`release_revocations`], a revocation takes the partitions out of
    /// [`Callbacks::assigned`] at once but leaves librdkafka's assignment alone: the group
    /// waits (up to its rebalance timeout, `max.poll.interval.ms`; the member is polled
    /// meanwhile, so librdkafka does not leave the group), and the batch in flight can
    /// still store its offsets, which go with the partitions.
    pub fn hold_revocations(&self) {
        self.held.lock().expect("held lock").holding = true;
    }

    /// The partitions revoked since the last call.
    pub fn take_revoked(&self) -> BTreeSet<i32> {
        std::mem::take(&mut *self.revoked.lock().expect("revoked lock"))
    }

    /// Publishes how many partitions the consumer holds (`eddy_assigned_partitions`).
    fn publish_assigned(&self, assigned: &BTreeSet<i32>) {
        self.metrics
            .assigned_partitions
            .store(assigned.len() as i64, Relaxed);
    }

    /// The group's committed offsets for the partitions of `tpl` (those that have one). On
    /// error, none: the saved offsets alone decide, as with one host. Waits for the group's
    /// coordinator (up to 10 s), with the runtime thread's other tasks moved elsewhere.
    fn committed(
        &self,
        base: &rdkafka::consumer::BaseConsumer<Self>,
        tpl: &TopicPartitionList,
    ) -> Offsets {
        match super::blocking(|| base.committed_offsets(tpl.clone(), Duration::from_secs(10))) {
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
                                StartFrom::Earliest => rdkafka::Offset::Beginning,
                                StartFrom::Latest => rdkafka::Offset::End,
                            },
                        };
                        let _ = tpl.set_partition_offset(&topic, partition, start);
                    }
                }
                {
                    let mut assigned = self.assigned.lock().expect("assigned lock");
                    assigned.extend(
                        tpl.elements()
                            .iter()
                            .filter(|e| e.topic() == self.topic)
                            .map(|e| e.partition()),
                    );
                    self.publish_assigned(&assigned);
                }
                self.rebalances.fetch_add(1, Relaxed);
                info!(plugin = %self.plugin, partitions = %partitions(tpl), "partitions assigned");
                let result = if cooperative {
                    base.incremental_assign(tpl)
                } else {
                    base.assign(tpl)
                };
                if let Err(e) = result {
                    error!(plugin = %self.plugin, "cannot take the assigned partitions: {e}");
                }
                // A partition the worker paused (it read it from the shared fetch) stays
                // paused through a new assignment in librdkafka; the worker sees the
                // rebalance only when the consumer hands it something, so the partition
                // must fetch again here.
                if self.shared_fetch.is_some()
                    && let Err(e) = base.resume(tpl)
                {
                    warn!(plugin = %self.plugin, "cannot resume the assigned partitions: {e}");
                }
            }
            RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.rebalances.fetch_add(1, Relaxed);
                info!(plugin = %self.plugin, partitions = %partitions(tpl), "partitions revoked");
                {
                    let mut assigned = self.assigned.lock().expect("assigned lock");
                    let mut revoked = self.revoked.lock().expect("revoked lock");
                    for e in tpl.elements().iter().filter(|e| e.topic() == self.topic) {
                        assigned.remove(&e.partition());
                        revoked.insert(e.partition());
                    }
                    self.publish_assigned(&assigned);
                }
                {
                    let mut held = self.held.lock().expect("held lock");
                    if held.holding {
                        let (revoked, _) = held.revoked.get_or_insert((Vec::new(), cooperative));
                        revoked.extend(
                            tpl.elements()
                                .iter()
                                .map(|e| (e.topic().to_string(), e.partition())),
                        );
                        info!(plugin = %self.plugin, "the partitions go once the batch in flight is committed");
                        return;
                    }
                }
                // Hand over exactly, without waiting here for the broker (this runs on a
                // runtime thread every plugin shares): with `enable.auto.commit` (see
                // `subscribe`), unassigning makes librdkafka commit the stored offsets of the
                // partitions that go, and the group rejoins, so the next owner gets them,
                // only once that commit is answered. The next owner starts there. Events
                // taken but not yet handled have no stored offset: the next owner handles
                // them (with `shared_group` the worker drops them).
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

/// The shortest `session.timeout.ms` with which consumers are static group members.
pub const MIN_STATIC_SESSION_MS: u64 = 6000;

/// Creates `plugin`'s consumer (its own group; offsets stored by the worker once an event's
/// effects are delivered, committed by librdkafka every 5 s) and subscribes it to `topic`.
/// A `group.instance.id` in `client` is the host's: the consumer's is it and the plugin's
/// name, a static member of the group (with a session of [`MIN_STATIC_SESSION_MS`] or more).
pub fn subscribe(
    client: &ClientConfig,
    plugin: &PluginConfig,
    topic: &str,
    callbacks: Callbacks,
) -> anyhow::Result<StreamConsumer<Callbacks>> {
    let mut c = client.clone();
    c.set("group.id", plugin.group_id())
        .set("enable.auto.commit", "true")
        // Offsets are stored by us, after the plugin's verdict and the delivery of its outputs.
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", plugin.start_from.as_kafka())
        .set("statistics.interval.ms", "1000");
    for (k, v) in [
        ("session.timeout.ms", "10000"),
        ("heartbeat.interval.ms", "1000"),
    ] {
        if c.get(k).is_none() {
            c.set(k, v);
        }
    }
    // Static membership: the host's id (see `host_instance_id`, or `[kafka.settings]`),
    // made this plugin's own. Not below Apache Kafka's minimum session (6 s, which it
    // refuses anyway): tansu 0.6.0 holds each static join for 3 s and each sync for 3 s, so
    // a shorter session expires while joining and the group rebalances in a loop (measured).
    let session_ms: u64 = c
        .get("session.timeout.ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    match c.get("group.instance.id").map(str::to_string) {
        Some(host) if session_ms >= MIN_STATIC_SESSION_MS => {
            c.set("group.instance.id", format!("{host}-{}", plugin.name));
        }
        Some(_) => {
            c.remove("group.instance.id");
        }
        None => {}
    }
    let consumer: StreamConsumer<Callbacks> = c.create_with_context(callbacks).map_err(|e| {
        anyhow::anyhow!(
            "plugin `{}`: cannot create a Kafka consumer: {e}",
            plugin.name
        )
    })?;
    consumer.subscribe(&[topic]).map_err(|e| {
        anyhow::anyhow!(
            "plugin `{}`: cannot subscribe to `{topic}`: {e}",
            plugin.name
        )
    })?;
    Ok(consumer)
}

/// Ends [`Callbacks::hold_revocations`]: the partitions revoked meanwhile go now, with the
/// offsets stored since (librdkafka commits them as they go).
pub fn release_revocations(consumer: &StreamConsumer<Callbacks>) {
    let revoked = {
        let mut held = consumer.context().held.lock().expect("held lock");
        held.holding = false;
        held.revoked.take()
    };
    let Some((revoked, cooperative)) = revoked else {
        return;
    };
    let result = if cooperative {
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in &revoked {
            tpl.add_partition(topic, *partition);
        }
        consumer.incremental_unassign(&tpl)
    } else {
        consumer.unassign()
    };
    match result {
        Ok(()) => {
            info!(plugin = %consumer.context().plugin, "revoked partitions released after the batch in flight")
        }
        Err(e) => warn!(plugin = %consumer.context().plugin, "unassign: {e}"),
    }
}

/// Stores the offsets in the consumer, for librdkafka to commit to Kafka (every 5 s and on
/// shutdown): lag tools and, without durable state, the next start use them.
pub fn store_offsets(consumer: &StreamConsumer<Callbacks>, offsets: &Offsets) {
    for ((topic, partition), next) in offsets {
        // The legacy store call stores `offset + 1`.
        if let Err(e) = consumer.store_offset(topic, *partition, next - 1) {
            // The partition was revoked meanwhile: its new owner consumes from the last commit.
            debug!(partition, next, "offset not stored: {e}");
        }
    }
}

/// The host's copy of a consumed message, with `topic` as its topic name if it is that
/// topic (one name shared by every event, not a copy each).
pub fn to_event(m: &BorrowedMessage<'_>, topic: &Arc<str>) -> Event {
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
        topic: if m.topic() == &**topic {
            topic.clone()
        } else {
            m.topic().into()
        },
        partition: m.partition(),
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis(),
        key: m.key().map(bytes::Bytes::copy_from_slice),
        headers,
        payload: m
            .payload()
            .map(bytes::Bytes::copy_from_slice)
            .unwrap_or_default(),
    }
}
