//! Where one plugin's events come from: its own consumer (its group: membership, commits,
//! lag), and for the partitions where the shared fetch holds the plugin's position, the
//! shared fetch ([`crate::kafka::shared_fetch`]), with those partitions paused in the
//! plugin's consumer.
//!
//! Each event of a partition is handed over once and in order, whichever path it came by:
//! the source keeps each partition's next offset and drops anything below it. That is also
//! what makes switching paths safe: a partition leaving the shared fetch resumes in the
//! plugin's consumer where the consumer last handed an event over (librdkafka resumes a
//! paused partition there), which is at or before the next offset, and is moved to the
//! next offset.
//!
//! While the worker waits (a batch in the sandbox, its retries' backoff, its delivery and
//! commit, an open breaker), [`Source::keep_polled`] keeps the consumer polled, so that
//! librdkafka serves rebalances meanwhile and the member is not thrown out of its group
//! after `max.poll.interval.ms`: from the wait's first second on, the partitions it fetches
//! are paused (those the shared fetch reads are paused already, and stay so), and what
//! still arrives is kept and handed over after it.

use crate::event::Event;
use crate::kafka::consumer::{Callbacks, to_event};
use crate::kafka::ready_now;
use crate::kafka::shared_fetch::Reader;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tracing::debug;

/// How often a waiting plugin tries again to read its partitions from the shared fetch.
const RETRY_SHARING: Duration = Duration::from_millis(500);

/// How long a wait runs before [`Source::keep_polled`] pauses the partitions and polls: a
/// paused partition drops what librdkafka fetched ahead and fetches it again on resume,
/// which costs every batch a second or so (measured on the embedded broker), while a
/// batch takes milliseconds. Far below any `max.poll.interval.ms`, and a rebalance waits
/// no longer than that.
const POLL_AFTER: Duration = Duration::from_secs(1);

/// How often a waiting worker polls its consumer afresh: librdkafka's poll timer
/// (`max.poll.interval.ms`) is reset only by a poll, and a waiting `recv` polls only when
/// something arrives.
const POLL_WHILE_WAITING: Duration = Duration::from_millis(200);

/// What woke [`Source::recv`].
enum Woke {
    Consumed(Event),
    Appended,
    RetrySharing,
}

/// A batch being filled, and its limits.
pub(super) struct Batch {
    pub events: Vec<Event>,
    pub bytes: usize,
    pub max_events: usize,
    pub max_bytes: usize,
}

impl Batch {
    pub fn new(max_events: usize, max_bytes: usize) -> Batch {
        Batch {
            events: Vec::with_capacity(max_events),
            bytes: 0,
            max_events,
            max_bytes,
        }
    }

    pub fn is_full(&self) -> bool {
        self.events.len() >= self.max_events || self.bytes >= self.max_bytes
    }

    fn push(&mut self, e: Event) {
        self.bytes += e.size();
        self.events.push(e);
    }
}

/// One plugin's events: its consumer, and its reader of the shared fetch, if any.
pub(super) struct Source {
    pub consumer: StreamConsumer<Callbacks>,
    shared: Option<Reader>,
    topic: Arc<str>,
    /// The next offset to hand over, per partition, once known.
    next: HashMap<i32, i64>,
    /// Partitions read from the shared fetch (paused in `consumer`).
    attached: BTreeSet<i32>,
    /// The partitions `consumer` holds, kept by its rebalance callback.
    assigned: Arc<std::sync::Mutex<BTreeSet<i32>>>,
    rebalances: Arc<AtomicU64>,
    rebalances_seen: u64,
    /// Partitions paused for a wait (see [`Source::keep_polled`]), resumed after it.
    paused: BTreeSet<i32>,
    /// What the consumer handed over during a wait, in order, handed over after it.
    kept: VecDeque<Event>,
}

impl Source {
    pub fn new(consumer: StreamConsumer<Callbacks>, shared: Option<Reader>, topic: &str) -> Source {
        let callbacks = consumer.context();
        let (assigned, rebalances) = (callbacks.assigned.clone(), callbacks.rebalances.clone());
        Source {
            consumer,
            shared,
            topic: topic.into(),
            next: HashMap::new(),
            attached: BTreeSet::new(),
            assigned,
            rebalances,
            rebalances_seen: 0,
            paused: BTreeSet::new(),
            kept: VecDeque::new(),
        }
    }

    /// Runs `wait` (which does not use this source) to its end while keeping the consumer
    /// polled: once it has run for [`POLL_AFTER`], every partition the consumer fetches is
    /// paused for the rest of it (and so is every partition a rebalance assigns meanwhile),
    /// and the consumer is polled at least every [`POLL_WHILE_WAITING`], so its rebalance
    /// callback runs and librdkafka's poll timer is reset. A message that still arrives is
    /// kept, and handed over after the wait (through [`Source::ready`], which drops what was
    /// handed over already). The paused partitions are resumed at the end.
    pub async fn keep_polled<T>(&mut self, wait: impl std::future::Future<Output = T>) -> T {
        let mut wait = std::pin::pin!(wait);
        tokio::select! {
            biased;
            out = &mut wait => return out,
            _ = tokio::time::sleep(POLL_AFTER) => {}
        }
        let mut rebalances = self.rebalances.load(Relaxed);
        self.pause_for_wait(false);
        let out = loop {
            // A fresh `recv` each time round: it polls librdkafka when first polled, and again
            // whenever something arrives.
            tokio::select! {
                biased;
                out = &mut wait => break out,
                m = self.consumer.recv() => match m {
                    Ok(m) => self.kept.push_back(to_event(&m, &self.topic)),
                    Err(e) => debug!("consume error while waiting: {e}"),
                },
                _ = tokio::time::sleep(POLL_WHILE_WAITING) => {}
            }
            let now = self.rebalances.load(Relaxed);
            if now != rebalances {
                rebalances = now;
                self.pause_for_wait(true);
            }
        };
        // Revoked ones too: librdkafka keeps a partition paused through a later assignment.
        // It fetches on from the last message it handed over.
        let paused = std::mem::take(&mut self.paused);
        if !paused.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for p in &paused {
                tpl.add_partition(&self.topic, *p);
            }
            if let Err(e) = self.consumer.resume(&tpl) {
                debug!("resume after the wait: {e}");
            }
        }
        out
    }

    /// Pauses the assigned partitions that the consumer fetches, for a wait. After a
    /// rebalance (`rebalanced`), every assigned partition: the rebalance callback resumes
    /// those it assigns where the shared fetch is on, including ones still attached to it
    /// (which [`Source::notice_rebalance`] sorts out after the wait).
    fn pause_for_wait(&mut self, rebalanced: bool) {
        let assigned = self.assigned.lock().expect("assigned lock").clone();
        let mut tpl = TopicPartitionList::new();
        for p in &assigned {
            if rebalanced || !self.attached.contains(p) {
                tpl.add_partition(&self.topic, *p);
            }
        }
        if tpl.count() == 0 {
            return;
        }
        match self.consumer.pause(&tpl) {
            Ok(()) => self.paused.extend(
                assigned
                    .iter()
                    .copied()
                    .filter(|p| !self.attached.contains(p)),
            ),
            Err(e) => debug!("pause for the wait: {e}"),
        }
    }

    /// Waits until at least one more event is ready and moves what is ready into `batch`.
    /// Cancel-safe: nothing is taken unless it is in `batch` when this returns.
    pub async fn recv(&mut self, batch: &mut Batch) -> KafkaResult<()> {
        let before = batch.events.len();
        loop {
            self.ready(batch);
            if batch.events.len() > before || batch.is_full() {
                return Ok(());
            }
            // While some partitions are fetched here, try now and then whether the shared
            // fetch has reached them (a plugin that caught up and then waits has no batch
            // after which to try).
            let retry_sharing = self.shared.is_some()
                && self.attached.len() < self.assigned.lock().expect("assigned lock").len();
            let shared = self.shared.as_mut().filter(|_| !self.attached.is_empty());
            let woke = tokio::select! {
                m = self.consumer.recv() => Woke::Consumed(m.map(|m| to_event(&m, &self.topic))?),
                _ = async { shared.expect("guarded").appended().await }, if shared.is_some() => Woke::Appended,
                _ = tokio::time::sleep(RETRY_SHARING), if retry_sharing => Woke::RetrySharing,
            };
            match woke {
                Woke::Consumed(e) => {
                    // The poll may have run a rebalance: see it before judging the event.
                    self.notice_rebalance();
                    if self.accept(&e) {
                        batch.push(e);
                        // More may be ready; the caller fills on with `ready`.
                        return Ok(());
                    }
                }
                Woke::Appended => {}
                Woke::RetrySharing => self.share_where_possible(),
            }
        }
    }

    /// Moves what is ready now into `batch`, without waiting.
    pub fn ready(&mut self, batch: &mut Batch) {
        self.notice_rebalance();
        while !batch.is_full()
            && let Some(e) = self.kept.pop_front()
        {
            if self.accept(&e) {
                batch.push(e);
            }
        }
        if let Some(reader) = self.shared.as_mut().filter(|_| !self.attached.is_empty()) {
            let from = batch.events.len();
            let taken = reader.take(
                &mut batch.events,
                batch.max_events.saturating_sub(from),
                batch.max_bytes.saturating_sub(batch.bytes),
            );
            batch.bytes += taken.bytes;
            for e in &batch.events[from..] {
                self.next.insert(e.partition, e.offset + 1);
            }
            if !taken.lost.is_empty() {
                self.fetch_again(&taken.lost);
            }
        }
        while !batch.is_full() {
            let e = match ready_now(self.consumer.recv()) {
                Some(Ok(m)) => to_event(&m, &self.topic),
                // An error is seen by the next `recv`.
                _ => break,
            };
            self.notice_rebalance();
            if self.accept(&e) {
                batch.push(e);
            }
        }
    }

    /// Whether the consumer's event is to be handed over: not if its partition is read from
    /// the shared fetch, or if it was handed over already.
    fn accept(&mut self, e: &Event) -> bool {
        if self.attached.contains(&e.partition) {
            return false;
        }
        if self.next.get(&e.partition).is_some_and(|n| e.offset < *n) {
            debug!(
                partition = e.partition,
                offset = e.offset,
                "dropped: handed over already"
            );
            return false;
        }
        self.next.insert(e.partition, e.offset + 1);
        true
    }

    /// After a batch: attaches the partitions the plugin fetches itself to the shared fetch
    /// where it holds their next offset.
    pub fn share_where_possible(&mut self) {
        self.notice_rebalance();
        let Some(reader) = self.shared.as_mut() else {
            return;
        };
        let assigned: Vec<i32> = self
            .assigned
            .lock()
            .expect("assigned lock")
            .iter()
            .copied()
            .filter(|p| !self.attached.contains(p))
            .collect();
        for p in assigned {
            let Some(next) = self.next.get(&p).copied() else {
                continue;
            };
            if reader.attach(p, next) {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(&self.topic, p);
                match self.consumer.pause(&tpl) {
                    Ok(()) => {
                        debug!(partition = p, next, "reading from the shared fetch");
                        self.attached.insert(p);
                    }
                    Err(e) => {
                        debug!(partition = p, "cannot pause, fetching for itself: {e}");
                        reader.detach(&[p]);
                    }
                }
            }
        }
    }

    /// A rebalance resets what the consumer fetches: partitions are fetched by the
    /// consumer again (and shared again after the next batch); revoked ones are forgotten.
    fn notice_rebalance(&mut self) {
        let now = self.rebalances.load(Relaxed);
        if now == self.rebalances_seen {
            return;
        }
        self.rebalances_seen = now;
        let attached: Vec<i32> = std::mem::take(&mut self.attached).into_iter().collect();
        if let Some(reader) = self.shared.as_mut() {
            reader.detach(&attached);
        }
        let assigned = self.assigned.lock().expect("assigned lock").clone();
        self.next.retain(|p, _| assigned.contains(p));
        let still: Vec<i32> = attached
            .into_iter()
            .filter(|p| assigned.contains(p))
            .collect();
        self.resume(&still);
    }

    /// Partitions the shared fetch gave up on: the consumer fetches them again.
    fn fetch_again(&mut self, partitions: &[i32]) {
        for p in partitions {
            self.attached.remove(p);
        }
        self.resume(partitions);
    }

    /// Resumes `partitions` in the consumer, from their next offset.
    fn resume(&mut self, partitions: &[i32]) {
        if partitions.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            tpl.add_partition(&self.topic, *p);
        }
        if let Err(e) = self.consumer.resume(&tpl) {
            debug!("resume: {e}");
        }
        for p in partitions {
            // librdkafka resumes where the consumer last handed an event over; skip what the
            // shared fetch handed over since (anything below `next` is dropped anyway).
            if let Some(next) = self.next.get(p)
                && let Err(e) =
                    self.consumer
                        .seek(&self.topic, *p, Offset::Offset(*next), Duration::ZERO)
            {
                debug!(partition = p, next, "seek: {e}");
            }
        }
    }
}
