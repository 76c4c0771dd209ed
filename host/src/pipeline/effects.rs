//! A batch's effects leaving the host: its outputs and dead letters delivered, then its state
//! committed with the offsets it advanced (on the disk at least every `commit_interval`), then
//! those offsets stored for Kafka once they are on the disk. Each step is retried on the
//! host's backoff policy until it goes through, or until the host shuts down (the batch is
//! then dropped, and its events are consumed again at the next start). Offsets are held back
//! meanwhile, so nothing is skipped.

use super::worker::Worker;
use crate::event::Event;
use crate::kafka::Offsets;
use crate::kafka::consumer::{Callbacks, store_offsets};
use crate::retry::{Policy, sleep_unless_stopping};
use crate::sinks::{DeadLetter, Progress, Written};
use crate::state::Durability;
use crate::wasm::OutputRecord;
use rdkafka::consumer::StreamConsumer;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;
use tracing::{error, warn};

impl Worker {
    /// Delivers outputs and dead letters. False if the host is stopping before they are
    /// through.
    pub(super) async fn deliver(
        &mut self,
        outputs: &[OutputRecord],
        events: &[Event],
        letters: &[DeadLetter],
        version: &str,
    ) -> bool {
        let mut backoff = Policy::DELIVERY.backoff();
        // Once the outputs are through, a retry only re-sends the dead letters (and the
        // output records refused for good, which go to the dead-letter topic too).
        let mut outputs_delivered = outputs.is_empty();
        let mut refused = Vec::new();
        // What of the dead letters is through: a retry writes only the rest.
        let (mut letters_done, mut refused_done) = (Progress::default(), Progress::default());
        loop {
            let result: anyhow::Result<Written> = async {
                if !outputs_delivered {
                    refused = self.outputs.deliver(outputs).await?;
                    outputs_delivered = true;
                }
                let mut written = self
                    .outputs
                    .dead_letter(events, letters, version, &mut letters_done)
                    .await?;
                if !refused.is_empty() {
                    let more = self
                        .outputs
                        .dead_letter_outputs(outputs, &refused, version, &mut refused_done)
                        .await?;
                    written.without_payload += more.without_payload;
                    written.lost += more.lost;
                }
                Ok(written)
            }
            .await;
            match result {
                Ok(written) => {
                    let m = &self.metrics;
                    if m.delivery_failing.swap(0, Relaxed) == 1 {
                        *m.delivery_error.lock().expect("metrics lock") = None;
                        tracing::info!("delivery goes through again");
                    }
                    if let Some(first) = refused.first() {
                        warn!(
                            records = refused.len(),
                            "output records refused for good went to the dead-letter topic instead: {}",
                            first.reason
                        );
                        m.outputs_undeliverable
                            .fetch_add(refused.len() as u64, Relaxed);
                    }
                    m.dead_letters_without_payload
                        .fetch_add(written.without_payload, Relaxed);
                    m.dead_letters_lost.fetch_add(written.lost, Relaxed);
                    return true;
                }
                Err(e) => {
                    self.metrics.output_failures.fetch_add(1, Relaxed);
                    self.metrics.delivery_failing.store(1, Relaxed);
                    *self.metrics.delivery_error.lock().expect("metrics lock") =
                        Some(format!("{e:#}"));
                    let delay = backoff.next_delay();
                    error!(
                        "delivery failed, retrying in {delay:?} (offsets are held back meanwhile): {e:#}"
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

    /// Sets the state gauges from the committed state and counts the keys that expired.
    fn count_state(&mut self) {
        let expired = self.sandbox().take_expired_keys();
        let (keys, bytes, expiring) = self.state_figures();
        let m = &self.metrics;
        let limit = m.state_limit_bytes.load(Relaxed);
        let was_full = crate::http::health::state_full(m.state_bytes.load(Relaxed), limit);
        let full = crate::http::health::state_full(bytes as i64, limit);
        if full && !was_full {
            warn!(
                state_mib = bytes as f64 / (1 << 20) as f64,
                limit_mib = limit >> 20,
                "state is nearly full: writes past limits.state_mib will fail and their events be dead-lettered (expire keys with [plugin.expire], or raise the limit); /healthz says degraded meanwhile"
            );
        } else if was_full && !full {
            tracing::info!("state has room again");
        }
        m.state_keys.store(keys as i64, Relaxed);
        m.state_bytes.store(bytes as i64, Relaxed);
        m.state_expiring_keys.store(expiring as i64, Relaxed);
        m.state_keys_expired.fetch_add(expired, Relaxed);
    }

    /// Commits the batch's state with `offsets` (one transaction when state is durable), on
    /// the disk at once if `sync` or if the last sync is `commit_interval` old, else with a
    /// later sync (see [`Durability`]). Returns the offsets that are on the disk now (this
    /// commit's and earlier deferred ones: the caller stores them in the consumer), or
    /// `None` if the host is stopping before the commit went through (the batch is dropped).
    pub(super) async fn commit(&mut self, offsets: &Offsets, sync: bool) -> Option<Offsets> {
        let durability = if sync
            || self.saved.is_none()
            || self.shared_group
            || self.commit_interval.is_zero()
            || self
                .unsynced
                .as_ref()
                .is_some_and(|(since, _)| since.elapsed() >= self.commit_interval)
        {
            Durability::Immediate
        } else {
            Durability::Deferred
        };
        let mut backoff = Policy::DELIVERY.backoff();
        loop {
            let started = Instant::now();
            let result = match durability {
                // On the blocking pool: an immediate commit writes the state file and waits
                // for the disk (fsync).
                Durability::Immediate => {
                    let batch_offsets = offsets.clone();
                    self.in_sandbox(Vec::new(), move |sandbox, _, _, _| {
                        sandbox.commit_batch(&batch_offsets, durability)
                    })
                    .await
                    .1
                }
                // Only memory: not worth a trip to another thread.
                Durability::Deferred => self.sandbox().commit_batch(offsets, durability),
            };
            match result {
                Ok(()) => {
                    self.metrics.observe_commit(started.elapsed());
                    self.count_state();
                    if let Some(saved) = &self.saved {
                        saved
                            .lock()
                            .expect("offsets lock")
                            .extend(offsets.iter().map(|(k, v)| (k.clone(), *v)));
                    }
                    return Some(match durability {
                        Durability::Immediate => {
                            let mut synced = self
                                .unsynced
                                .take()
                                .map(|(_, offsets)| offsets)
                                .unwrap_or_default();
                            synced.extend(offsets.iter().map(|(k, v)| (k.clone(), *v)));
                            synced
                        }
                        Durability::Deferred => {
                            let (_, unsynced) = self
                                .unsynced
                                .get_or_insert_with(|| (Instant::now(), Offsets::new()));
                            unsynced.extend(offsets.iter().map(|(k, v)| (k.clone(), *v)));
                            Offsets::new()
                        }
                    });
                }
                Err(e) => {
                    self.metrics.output_failures.fetch_add(1, Relaxed);
                    let delay = backoff.next_delay();
                    error!(
                        "cannot commit state, retrying in {delay:?} (offsets are held back meanwhile): {e}"
                    );
                    if sleep_unless_stopping(delay, &mut self.shutdown)
                        .await
                        .is_err()
                    {
                        self.sandbox().abort_batch();
                        return None;
                    }
                }
            }
        }
    }

    /// `outputs` were just committed: they go to the live feed once they are on the disk
    /// (at once, unless this commit was deferred: then with the sync that takes it there).
    pub(super) fn committed(&mut self, outputs: Vec<OutputRecord>) {
        if self.live.is_none() || outputs.is_empty() {
            return;
        }
        if self.live_held.is_empty() {
            self.live_held = outputs;
        } else {
            self.live_held.extend(outputs);
        }
        if self.unsynced.is_none() {
            self.publish_held();
        }
    }

    /// Hands the records held for the disk to the live feed.
    fn publish_held(&mut self) {
        if let Some(live) = &self.live
            && !self.live_held.is_empty()
        {
            live.publish(&self.plugin.name, &self.live_held, crate::clock::now_ms());
            self.live_held.clear();
        }
    }

    /// The plugin's output names, for the live feed's watchers to choose from.
    pub(super) fn announce_outputs(&self) {
        if let Some(live) = &self.live {
            live.set_outputs(&self.plugin.name, self.plugin.outputs.keys().cloned());
        }
    }

    /// Puts deferred commits on the disk and stores their offsets in the consumer. False if
    /// the host is stopping before that went through (they are handled again at the next
    /// start, from what is on the disk).
    pub(super) async fn sync(&mut self, consumer: &StreamConsumer<Callbacks>) -> bool {
        if self.unsynced.is_none() {
            return true;
        }
        match self.commit(&Offsets::new(), true).await {
            Some(synced) => {
                store_offsets(consumer, &synced);
                self.publish_held();
                true
            }
            None => false,
        }
    }
}
