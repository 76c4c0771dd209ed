//! One fetch of the topic, shared by every plugin that is at the same place in it.
//!
//! Without it, each plugin's consumer fetches, copies and parses the same records: four
//! plugins, four fetches (and on the embedded broker, four times the serving). Here one
//! consumer (assign mode, no group) fetches a partition once, from the position of the first
//! plugin that asks for it, into a window of recent events that every plugin reading it (a
//! [`Reader`]) takes from. Each plugin keeps its own consumer group: its consumer still holds
//! the membership, commits the plugin's offsets and tells its lag; it only pauses the
//! partitions it reads from here (see `pipeline::source`).
//!
//! A reader attaches per partition, and only where the window holds its next offset: a plugin
//! far behind the others (one added from the earliest offset, a replay) fetches for itself
//! until it has caught up, then attaches. The window is bounded (`kafka.shared_fetch_mib`):
//! when it is full, fetching waits for the slowest reader. A reader that takes nothing for
//! [`SharedFetch::stall`] while the window is full (a plugin paused by its breaker, say) is
//! detached: its plugin fetches for itself again from where it is, and rejoins later. So is,
//! at once, a reader that holds the full window with events the others have taken already
//! (a plugin slower than the others): one slow plugin never sets the others' pace.

use crate::event::Event;
use crate::kafka::consumer::to_event;
use crate::metrics::PluginMetrics;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, ClientContext, Offset, Statistics, TopicPartitionList};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc, watch};
use tracing::{debug, info, warn};

/// What an event costs in the window beyond its bytes (the `Event` itself, its topic name).
const EVENT_OVERHEAD: usize = 128;

/// Most events the fetch task moves into the window per lock.
const APPEND_CHUNK: usize = 2048;

/// The shared fetch of one topic, and its window.
pub struct SharedFetch {
    topic: Arc<str>,
    /// Bytes the window may hold before fetching waits for its readers.
    budget: usize,
    /// How long a reader may take nothing while the window is full before it is detached.
    stall: Duration,
    window: Mutex<Window>,
    /// Bumped when events are appended; readers wait on it.
    appended: watch::Sender<u64>,
    /// Signalled when events leave the window; the fetch task waits on it while full.
    space: Notify,
    commands: mpsc::UnboundedSender<Command>,
    /// Each partition's log end offset, from the fetch consumer's statistics: the plugins'
    /// own consumers do not fetch the partitions they read from here, so theirs go stale.
    high_watermarks: Arc<Mutex<BTreeMap<i32, i64>>>,
}

/// A partition to start or stop fetching.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Open { partition: i32, offset: i64 },
    Close { partition: i32 },
}

/// The events fetched and not yet taken by every reader, and who reads where.
#[derive(Default)]
struct Window {
    logs: BTreeMap<i32, PartitionLog>,
    readers: BTreeMap<u64, ReaderState>,
    next_reader: u64,
    bytes: usize,
    /// Since when the window has been full.
    full_since: Option<Instant>,
}

/// One partition's events in the window.
struct PartitionLog {
    /// In offset order.
    events: VecDeque<Event>,
    /// Every record at or above `low` is in `events` or not fetched yet.
    low: i64,
    /// One past the last fetched offset (where fetching started, before the first).
    end: i64,
}

struct ReaderState {
    /// The next offset this reader takes, per attached partition.
    cursors: BTreeMap<i32, i64>,
    /// Partitions taken away from a stalled reader, for it to fetch itself.
    lost: Vec<i32>,
    last_take: Instant,
    /// Where `take` starts looking, so every partition gets its turn.
    turn: usize,
    name: String,
    /// Where the plugin's `eddy_shared_fetch_partitions` is kept up to date.
    metrics: Option<Arc<PluginMetrics>>,
}

impl ReaderState {
    /// Publishes how many partitions this reader reads here now.
    fn publish(&self) {
        if let Some(m) = &self.metrics {
            m.shared_partitions
                .store(self.cursors.len() as i64, Relaxed);
        }
    }
}

/// What [`Reader::take`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Taken {
    pub events: usize,
    pub bytes: usize,
    /// Partitions this reader was detached from (it stalled while the window was full):
    /// its plugin fetches them for itself from now on.
    pub lost: Vec<i32>,
}

fn cost(e: &Event) -> usize {
    e.size() + EVENT_OVERHEAD
}

impl Window {
    fn add_reader(&mut self, name: &str, metrics: Option<Arc<PluginMetrics>>) -> u64 {
        let id = self.next_reader;
        self.next_reader += 1;
        self.readers.insert(
            id,
            ReaderState {
                cursors: BTreeMap::new(),
                lost: Vec::new(),
                last_take: Instant::now(),
                turn: 0,
                name: name.to_string(),
                metrics,
            },
        );
        id
    }

    /// Attaches `reader` to `partition` at `next` if the window holds that offset (or will:
    /// nothing at or above it was dropped); opens the partition there if nobody reads it.
    /// Returns whether it attached, and the command for the fetch task, if any.
    fn attach(&mut self, reader: u64, partition: i32, next: i64) -> (bool, Option<Command>) {
        let command = match self.logs.get(&partition) {
            Some(log) if log.low <= next && next <= log.end => None,
            Some(_) => return (false, None),
            None => {
                self.logs.insert(
                    partition,
                    PartitionLog {
                        events: VecDeque::new(),
                        low: next,
                        end: next,
                    },
                );
                Some(Command::Open {
                    partition,
                    offset: next,
                })
            }
        };
        let state = self.readers.get_mut(&reader).expect("a live reader");
        state.cursors.insert(partition, next);
        state.last_take = Instant::now();
        state.publish();
        (true, command)
    }

    /// Takes what `reader` has not taken yet, up to `max_events` and `max_bytes`, into `out`.
    fn take(
        &mut self,
        reader: u64,
        out: &mut Vec<Event>,
        max_events: usize,
        max_bytes: usize,
    ) -> Taken {
        let Window { logs, readers, .. } = self;
        let state = readers.get_mut(&reader).expect("a live reader");
        let mut taken = Taken {
            lost: std::mem::take(&mut state.lost),
            ..Taken::default()
        };
        let partitions: Vec<i32> = state.cursors.keys().copied().collect();
        if partitions.is_empty() {
            return taken;
        }
        state.turn = state.turn.wrapping_add(1);
        let mut touched = Vec::new();
        for i in 0..partitions.len() {
            if taken.events >= max_events || taken.bytes >= max_bytes {
                break;
            }
            let partition = partitions[(state.turn + i) % partitions.len()];
            let Some(log) = logs.get(&partition) else {
                continue;
            };
            let cursor = state.cursors.get_mut(&partition).expect("listed");
            let from = log.events.partition_point(|e| e.offset < *cursor);
            for e in log.events.range(from..) {
                if taken.events >= max_events || taken.bytes >= max_bytes {
                    break;
                }
                taken.events += 1;
                taken.bytes += e.size();
                *cursor = e.offset + 1;
                out.push(e.clone());
            }
            if from < log.events.len() {
                touched.push(partition);
            }
        }
        if taken.events > 0 {
            state.last_take = Instant::now();
        }
        for partition in touched {
            self.evict(partition);
        }
        taken
    }

    /// Drops the events of `partition` every reader has taken; stops fetching it if nobody
    /// reads it any more.
    fn evict(&mut self, partition: i32) -> Option<Command> {
        let slowest = self
            .readers
            .values()
            .filter_map(|r| r.cursors.get(&partition))
            .min()
            .copied();
        let Some(slowest) = slowest else {
            let log = self.logs.remove(&partition)?;
            self.bytes -= log.events.iter().map(cost).sum::<usize>();
            return Some(Command::Close { partition });
        };
        let log = self.logs.get_mut(&partition)?;
        while log.events.front().is_some_and(|e| e.offset < slowest) {
            let e = log.events.pop_front().expect("checked");
            self.bytes -= cost(&e);
        }
        log.low = log.low.max(slowest);
        None
    }

    /// Detaches `reader` from `partitions` (all of them if `None`); returns the commands for
    /// the fetch task.
    fn detach(&mut self, reader: u64, partitions: Option<&[i32]>) -> Vec<Command> {
        let Some(state) = self.readers.get_mut(&reader) else {
            return Vec::new();
        };
        let gone: Vec<i32> = match partitions {
            None => std::mem::take(&mut state.cursors).into_keys().collect(),
            Some(ps) => ps
                .iter()
                .filter(|p| state.cursors.remove(p).is_some())
                .copied()
                .collect(),
        };
        state.publish();
        gone.into_iter().filter_map(|p| self.evict(p)).collect()
    }

    /// Appends fetched events (those of partitions nobody reads any more, or from before
    /// where a partition was opened, are dropped).
    fn append(&mut self, events: Vec<Event>) {
        for e in events {
            let Some(log) = self.logs.get_mut(&e.partition) else {
                continue;
            };
            if e.offset < log.end {
                continue;
            }
            log.end = e.offset + 1;
            self.bytes += cost(&e);
            log.events.push_back(e);
        }
    }

    /// Whether the window is full; notes since when.
    fn is_full(&mut self, budget: usize, now: Instant) -> bool {
        if self.bytes >= budget {
            self.full_since.get_or_insert(now);
            true
        } else {
            self.full_since = None;
            false
        }
    }

    /// Detaches every reader from every partition, telling each what it lost. Returns the
    /// names of those that were attached, and the commands.
    fn detach_everyone(&mut self) -> (Vec<String>, Vec<Command>) {
        let ids: Vec<u64> = self.readers.keys().copied().collect();
        let mut names = Vec::new();
        let mut commands = Vec::new();
        for id in ids {
            let state = self.readers.get_mut(&id).expect("listed");
            let partitions: Vec<i32> = state.cursors.keys().copied().collect();
            if partitions.is_empty() {
                continue;
            }
            names.push(state.name.clone());
            state.lost.extend(&partitions);
            commands.extend(self.detach(id, Some(&partitions)));
        }
        (names, commands)
    }

    /// Detaches the readers that took nothing for `stall` while the window was full and
    /// events were waiting for them. Returns their names and the commands.
    fn detach_stalled(&mut self, stall: Duration, now: Instant) -> (Vec<String>, Vec<Command>) {
        let full_for = self.full_since.map_or(Duration::ZERO, |t| now - t);
        if full_for < stall {
            return (Vec::new(), Vec::new());
        }
        let stalled: Vec<u64> = self
            .readers
            .iter()
            .filter(|(_, r)| now - r.last_take >= stall)
            .filter(|(_, r)| {
                r.cursors.iter().any(|(p, c)| {
                    self.logs
                        .get(p)
                        .and_then(|l| l.events.back())
                        .is_some_and(|e| e.offset >= *c)
                })
            })
            .map(|(id, _)| *id)
            .collect();
        self.let_go(stalled)
    }

    /// Detaches the readers that set everyone's pace: while the window is full, a reader
    /// that still has to take at least half of the window's events that another reader has
    /// taken already (a plugin slower than the others, which still takes events, so it never
    /// stalls) fetches for itself from where it is, and the others go on at their own pace.
    /// Readers at about the same place (each a batch or so apart) are never detached: none
    /// of them holds half the window. Returns their names and the commands.
    fn detach_laggards(&mut self) -> (Vec<String>, Vec<Command>) {
        let total: usize = self.logs.values().map(|l| l.events.len()).sum();
        if total == 0 || self.readers.len() < 2 {
            return (Vec::new(), Vec::new());
        }
        let mut furthest: BTreeMap<i32, i64> = BTreeMap::new();
        for r in self.readers.values() {
            for (p, c) in &r.cursors {
                let f = furthest.entry(*p).or_insert(*c);
                *f = (*f).max(*c);
            }
        }
        let behind = |r: &ReaderState| -> usize {
            r.cursors
                .iter()
                .filter_map(|(p, c)| {
                    let log = self.logs.get(p)?;
                    let from = log.events.partition_point(|e| e.offset < *c);
                    let to = log.events.partition_point(|e| e.offset < furthest[p]);
                    Some(to.saturating_sub(from))
                })
                .sum()
        };
        let laggards: Vec<u64> = self
            .readers
            .iter()
            .filter(|(_, r)| behind(r) * 2 >= total)
            .map(|(id, _)| *id)
            .collect();
        self.let_go(laggards)
    }

    /// Detaches `readers` from every partition they read, telling each what it lost (its
    /// plugin fetches those itself from where it is). Returns their names and the commands.
    fn let_go(&mut self, readers: Vec<u64>) -> (Vec<String>, Vec<Command>) {
        let mut names = Vec::new();
        let mut commands = Vec::new();
        for id in readers {
            let state = self.readers.get_mut(&id).expect("listed");
            names.push(state.name.clone());
            let partitions: Vec<i32> = state.cursors.keys().copied().collect();
            state.lost.extend(&partitions);
            commands.extend(self.detach(id, Some(&partitions)));
        }
        (names, commands)
    }
}

/// The fetch consumer's statistics: log end offsets per partition.
struct FetchStats {
    topic: String,
    high_watermarks: Arc<Mutex<BTreeMap<i32, i64>>>,
}

impl ClientContext for FetchStats {
    fn stats(&self, stats: Statistics) {
        let Some(topic) = stats.topics.get(&self.topic) else {
            return;
        };
        let mut hw = self.high_watermarks.lock().expect("watermarks lock");
        for p in topic.partitions.values() {
            if p.partition >= 0 && p.hi_offset >= 0 {
                hw.insert(p.partition, p.hi_offset);
            }
        }
    }
}

impl rdkafka::consumer::ConsumerContext for FetchStats {}

impl SharedFetch {
    /// Starts the shared fetch of `topic` with a window of `budget` bytes; it stops when
    /// `shutdown` turns true.
    pub fn start(
        client: &ClientConfig,
        topic: &str,
        budget: usize,
        shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<Arc<SharedFetch>> {
        let high_watermarks = Arc::new(Mutex::new(BTreeMap::new()));
        let mut c = client.clone();
        // A group id librdkafka wants for offset bookkeeping; this consumer never joins a
        // group (it assigns partitions itself) and never commits.
        c.set(
            "group.id",
            format!("eddy-shared-fetch-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("statistics.interval.ms", "1000");
        let consumer: StreamConsumer<FetchStats> = c
            .create_with_context(FetchStats {
                topic: topic.to_string(),
                high_watermarks: high_watermarks.clone(),
            })
            .map_err(|e| anyhow::anyhow!("cannot create the shared fetch consumer: {e}"))?;
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let fetch = Arc::new(SharedFetch {
            topic: topic.into(),
            budget,
            stall: Duration::from_secs(2),
            window: Mutex::new(Window::default()),
            appended: watch::Sender::new(0),
            space: Notify::new(),
            commands,
            high_watermarks,
        });
        tokio::spawn(fetch.clone().run(consumer, commands_rx, shutdown));
        Ok(fetch)
    }

    /// A reader for the plugin `name`, which keeps its `eddy_shared_fetch_partitions`.
    pub fn reader(self: &Arc<Self>, name: &str, metrics: Arc<PluginMetrics>) -> Reader {
        let id = self.lock().add_reader(name, Some(metrics));
        Reader {
            fetch: self.clone(),
            id,
            appended: self.appended.subscribe(),
        }
    }

    /// `partition`'s log end offset as the shared fetch last saw it.
    pub fn high_watermark(&self, partition: i32) -> Option<i64> {
        self.high_watermarks
            .lock()
            .expect("watermarks lock")
            .get(&partition)
            .copied()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().expect("window lock")
    }

    fn send(&self, commands: Vec<Command>) {
        for c in commands {
            let _ = self.commands.send(c);
        }
    }

    /// Fetches into the window until shutdown.
    async fn run(
        self: Arc<Self>,
        consumer: StreamConsumer<FetchStats>,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut fetched = Vec::with_capacity(APPEND_CHUNK);
        let mut errors = crate::retry::Policy::CONSUME.backoff();
        loop {
            let mut full = self.lock().is_full(self.budget, Instant::now());
            if full {
                let (names, commands) = self.lock().detach_laggards();
                if !names.is_empty() {
                    for name in names {
                        info!(plugin = %name, "plugin slower than the others held the shared fetch window full: it fetches for itself until it catches up");
                    }
                    self.send(commands);
                    full = self.lock().is_full(self.budget, Instant::now());
                }
            }
            tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                command = commands.recv() => match command {
                    Some(command) => self.apply(&consumer, command),
                    None => break,
                },
                _ = self.space.notified(), if full => {}
                _ = tokio::time::sleep(self.stall / 4), if full => {
                    let (names, commands) = self.lock().detach_stalled(self.stall, Instant::now());
                    for name in names {
                        info!(plugin = %name, stall = ?self.stall, "plugin took nothing while the shared fetch window was full: it fetches for itself until it catches up");
                    }
                    self.send(commands);
                }
                m = consumer.recv(), if !full => match m {
                    Ok(m) => {
                        errors.reset();
                        fetched.push(to_event(&m, &self.topic));
                        drop(m);
                        while fetched.len() < APPEND_CHUNK {
                            match super::ready_now(consumer.recv()) {
                                Some(Ok(m)) => fetched.push(to_event(&m, &self.topic)),
                                _ => break,
                            }
                        }
                        self.lock().append(std::mem::take(&mut fetched));
                        self.appended.send_modify(|n| *n += 1);
                    }
                    Err(e) => {
                        // Whatever went wrong (a broker gone, a position out of range), the
                        // plugins' own consumers know how to recover from it with their
                        // group: hand every partition back to them. They rejoin after
                        // their next batch, which reopens the partitions where they are.
                        let (names, commands) = self.lock().detach_everyone();
                        if !names.is_empty() {
                            warn!(plugins = ?names, "shared fetch: {e}; the plugins fetch for themselves until they can share again");
                        }
                        self.send(commands);
                        self.appended.send_modify(|n| *n += 1);
                        let delay = errors.next_delay();
                        debug!("shared fetch: polling again in {delay:?}");
                        tokio::time::sleep(delay).await;
                    }
                },
            }
        }
    }

    /// Starts or stops fetching a partition.
    fn apply(&self, consumer: &StreamConsumer<FetchStats>, command: Command) {
        let mut tpl = TopicPartitionList::new();
        let result = match command {
            Command::Open { partition, offset } => {
                debug!(partition, offset, "shared fetch: partition opened");
                let _ = tpl.add_partition_offset(&self.topic, partition, Offset::Offset(offset));
                consumer.incremental_assign(&tpl)
            }
            Command::Close { partition } => {
                debug!(partition, "shared fetch: partition closed");
                tpl.add_partition(&self.topic, partition);
                consumer.incremental_unassign(&tpl)
            }
        };
        if let Err(e) = result {
            warn!(
                "shared fetch: cannot change what it fetches ({}): {e}",
                describe(&tpl)
            );
        }
    }
}

fn describe(tpl: &TopicPartitionList) -> String {
    tpl.elements()
        .iter()
        .map(|e| format!("{} [{}] at {:?}", e.topic(), e.partition(), e.offset()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A plugin's place in the shared fetch. Dropping it detaches it from every partition.
pub struct Reader {
    fetch: Arc<SharedFetch>,
    id: u64,
    appended: watch::Receiver<u64>,
}

impl Reader {
    /// Attaches to `partition` at `next`, if the window holds it (see [`Window::attach`]).
    pub fn attach(&mut self, partition: i32, next: i64) -> bool {
        let (attached, command) = self.fetch.lock().attach(self.id, partition, next);
        self.fetch.send(command.into_iter().collect());
        attached
    }

    /// Stops reading `partitions` here.
    pub fn detach(&mut self, partitions: &[i32]) {
        let commands = self.fetch.lock().detach(self.id, Some(partitions));
        self.fetch.send(commands);
        self.fetch.space.notify_one();
    }

    /// Moves the events this reader has not taken yet into `out`, up to the limits.
    pub fn take(&mut self, out: &mut Vec<Event>, max_events: usize, max_bytes: usize) -> Taken {
        self.appended.borrow_and_update();
        let mut window = self.fetch.lock();
        let before = window.bytes;
        let taken = window.take(self.id, out, max_events, max_bytes);
        let freed = window.bytes < before;
        drop(window);
        if freed {
            self.fetch.space.notify_one();
        }
        taken
    }

    /// Waits until events were appended since the last [`Reader::take`].
    pub async fn appended(&mut self) {
        if self.appended.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let mut window = self.fetch.lock();
        let commands = window.detach(self.id, None);
        window.readers.remove(&self.id);
        drop(window);
        self.fetch.send(commands);
        self.fetch.space.notify_one();
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
            payload: vec![0; 72].into(),
        }
    }

    fn offsets(events: &[Event]) -> Vec<(i32, i64)> {
        events.iter().map(|e| (e.partition, e.offset)).collect()
    }

    #[test]
    fn readers_at_the_same_place_share_one_copy_and_the_slowest_keeps_it() {
        let mut w = Window::default();
        let (a, b) = (w.add_reader("a", None), w.add_reader("b", None));
        assert_eq!(
            w.attach(a, 0, 10),
            (
                true,
                Some(Command::Open {
                    partition: 0,
                    offset: 10
                })
            )
        );
        assert_eq!(w.attach(b, 0, 10), (true, None));
        w.append((10..20).map(|o| event(0, o)).collect());
        let mut got = Vec::new();
        assert_eq!(w.take(a, &mut got, 4, usize::MAX).events, 4);
        assert_eq!(offsets(&got), (10..14).map(|o| (0, o)).collect::<Vec<_>>());
        // b has taken nothing: the window keeps everything for it.
        assert_eq!(w.logs[&0].events.len(), 10);
        let mut got = Vec::new();
        w.take(b, &mut got, 100, usize::MAX);
        assert_eq!(got.len(), 10);
        // Now a is the slowest: what it took goes, the rest stays.
        assert_eq!(w.logs[&0].events.front().unwrap().offset, 14);
        assert_eq!(w.logs[&0].low, 14);
        assert_eq!(w.bytes, 6 * (72 + EVENT_OVERHEAD));
    }

    #[test]
    fn a_reader_attaches_only_where_the_window_holds_its_next_offset() {
        let mut w = Window::default();
        let (a, late, ahead) = (
            w.add_reader("a", None),
            w.add_reader("late", None),
            w.add_reader("ahead", None),
        );
        w.attach(a, 0, 100);
        w.append((100..110).map(|o| event(0, o)).collect());
        let mut got = Vec::new();
        w.take(a, &mut got, 5, usize::MAX);
        // Events below 105 are gone: a reader at 103 must fetch for itself.
        assert_eq!(w.attach(late, 0, 103), (false, None));
        assert_eq!(w.attach(late, 0, 105), (true, None));
        // Beyond what was fetched: not yet.
        assert_eq!(w.attach(ahead, 0, 111), (false, None));
        assert_eq!(w.attach(ahead, 0, 110), (true, None));
        let mut got = Vec::new();
        w.take(late, &mut got, 100, usize::MAX);
        assert_eq!(
            offsets(&got),
            (105..110).map(|o| (0, o)).collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_last_reader_leaving_closes_the_partition_and_frees_its_bytes() {
        let mut w = Window::default();
        let (a, b) = (w.add_reader("a", None), w.add_reader("b", None));
        w.attach(a, 3, 0);
        w.attach(b, 3, 0);
        w.append((0..5).map(|o| event(3, o)).collect());
        assert!(w.detach(a, None).is_empty());
        assert_eq!(
            w.detach(b, Some(&[3])),
            vec![Command::Close { partition: 3 }]
        );
        assert_eq!(w.bytes, 0);
        assert!(w.logs.is_empty());
        // Fetched after the close: dropped.
        w.append(vec![event(3, 5)]);
        assert_eq!(w.bytes, 0);
    }

    #[test]
    fn a_reader_that_stalls_while_the_window_is_full_is_detached_and_told_so() {
        let mut w = Window::default();
        let (fast, stuck) = (w.add_reader("fast", None), w.add_reader("stuck", None));
        w.attach(fast, 0, 0);
        w.attach(stuck, 0, 0);
        w.attach(fast, 1, 0);
        w.append((0..10).map(|o| event(0, o)).collect());
        let budget = 5 * (72 + EVENT_OVERHEAD);
        let start = Instant::now();
        assert!(w.is_full(budget, start));
        let mut got = Vec::new();
        w.take(fast, &mut got, 100, usize::MAX);
        let stall = Duration::from_secs(2);
        // Not yet: the window has not been full for `stall`.
        assert_eq!(
            w.detach_stalled(stall, start + Duration::from_secs(1))
                .0
                .len(),
            0
        );
        let later = start + Duration::from_secs(3);
        // `fast` took its events (and has nothing waiting on partition 1): only `stuck` goes.
        w.readers.get_mut(&fast).unwrap().last_take = later;
        let (names, commands) = w.detach_stalled(stall, later);
        assert_eq!(names, vec!["stuck".to_string()]);
        assert!(commands.is_empty(), "fast still reads both partitions");
        assert_eq!(w.bytes, 0, "nobody needs the events any more");
        assert!(!w.is_full(budget, later));
        let taken = w.take(stuck, &mut Vec::new(), 100, usize::MAX);
        assert_eq!(taken.lost, vec![0]);
        assert_eq!(taken.events, 0);
    }

    /// A reader that still takes events, but slower than the others, is detached once the
    /// window is full with what only it still needs (issue 27: before, only a reader that
    /// took nothing for `stall` was, so a slow one set everyone's pace); readers a batch
    /// apart are not.
    #[test]
    fn a_reader_slower_than_the_others_is_detached_when_it_holds_the_window() {
        let mut w = Window::default();
        let (fast, close, slow) = (
            w.add_reader("fast", None),
            w.add_reader("close", None),
            w.add_reader("slow", None),
        );
        for r in [fast, close, slow] {
            w.attach(r, 0, 0);
        }
        w.append((0..10).map(|o| event(0, o)).collect());
        let mut got = Vec::new();
        w.take(fast, &mut got, 4, usize::MAX);
        w.take(close, &mut got, 3, usize::MAX);
        w.take(slow, &mut got, 1, usize::MAX);
        // `slow` is 3 events behind `fast` of the 9 held: nobody holds half of the window.
        assert_eq!(w.detach_laggards().0, Vec::<String>::new());
        w.take(fast, &mut got, 4, usize::MAX);
        w.take(close, &mut got, 4, usize::MAX);
        // Now `slow` has 7 of the 9 to take that `fast` took: it goes.
        let (names, commands) = w.detach_laggards();
        assert_eq!(names, vec!["slow".to_string()]);
        assert!(commands.is_empty(), "the others still read partition 0");
        assert_eq!(
            w.bytes,
            3 * (72 + EVENT_OVERHEAD),
            "held now for `close` only"
        );
        assert_eq!(w.take(slow, &mut Vec::new(), 10, usize::MAX).lost, vec![0]);
        // It cannot attach where the window no longer holds its place: it fetches itself.
        assert_eq!(w.attach(slow, 0, 1), (false, None));
    }

    #[test]
    fn a_fetch_error_hands_every_partition_back_to_every_reader() {
        let mut w = Window::default();
        let (a, b, idle) = (
            w.add_reader("a", None),
            w.add_reader("b", None),
            w.add_reader("idle", None),
        );
        w.attach(a, 0, 0);
        w.attach(a, 1, 0);
        w.attach(b, 1, 0);
        w.append((0..3).map(|o| event(1, o)).collect());
        let (names, mut commands) = w.detach_everyone();
        assert_eq!(names, vec!["a".to_string(), "b".to_string()]);
        commands.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(
            commands,
            vec![
                Command::Close { partition: 0 },
                Command::Close { partition: 1 }
            ]
        );
        assert_eq!(w.bytes, 0);
        assert_eq!(w.take(a, &mut Vec::new(), 10, usize::MAX).lost, vec![0, 1]);
        assert_eq!(w.take(b, &mut Vec::new(), 10, usize::MAX).lost, vec![1]);
        assert!(
            w.take(idle, &mut Vec::new(), 10, usize::MAX)
                .lost
                .is_empty()
        );
        // Reattaching reopens the partition where the reader is.
        assert_eq!(
            w.attach(a, 1, 3),
            (
                true,
                Some(Command::Open {
                    partition: 1,
                    offset: 3
                })
            )
        );
    }

    #[test]
    fn take_respects_its_limits_and_gives_every_partition_a_turn() {
        let mut w = Window::default();
        let a = w.add_reader("a", None);
        for p in 0..3 {
            w.attach(a, p, 0);
            w.append((0..10).map(|o| event(p, o)).collect());
        }
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..3 {
            let mut got = Vec::new();
            let taken = w.take(a, &mut got, 4, usize::MAX);
            assert_eq!(taken.events, 4);
            seen.insert(got[0].partition);
            // In order within a partition.
            assert!(
                got.windows(2)
                    .all(|p| p[0].partition != p[1].partition || p[0].offset + 1 == p[1].offset)
            );
        }
        assert_eq!(seen.len(), 3, "each partition came first once");
        let mut got = Vec::new();
        assert_eq!(
            w.take(a, &mut got, 100, 100).events,
            2,
            "bytes cut it once past the limit, as a batch is cut"
        );
    }
}
