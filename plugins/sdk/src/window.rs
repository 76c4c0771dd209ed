//! Event-time windows kept in [`State`]: tumbling, hopping and session windows, per key (a
//! user, a page) or global (the key `""`), with an allowed lateness.
//!
//! Windows are per partition, each with its own clock (see [`Windows::add`]). A window
//! closes when its partition's event time (the latest it has seen) passes its end plus the
//! lateness, or, on a partition gone quiet, on a tick once nothing has arrived from it for
//! [`Windows::close_when_idle`] of host time (also while other partitions flow): then every
//! open window of the partition closes, so the last figures come out although no later event
//! pushes them (an event arriving after that starts a new window). A batch reads only the
//! windows of the partitions with one due.
//! Everything lives in host-side state (under `__eddy.win.<name>`), so windows are exact
//! across instance restarts, hot swaps and `kill -9`, and a closed window is deleted.
//!
//! ```ignore
//! const ACTIVE: Windows<u64> = Windows::tumbling("active", 60_000);
//! // on_event:
//! ACTIVE.add(&mut ctx.state, event.partition, &a.user_id, t, |n| *n += 1);
//! // on_batch_end and on_tick:
//! for w in ACTIVE.close_due(&mut ctx.state) { /* emit w.key, w.start, w.agg */ }
//! for w in ACTIVE.tick(&mut ctx.state, now_ms) { /* the same, on a quiet stream */ }
//! ```

use crate::State;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How events are grouped into windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Back-to-back windows of `size_ms`, aligned on the Unix epoch: each event in one.
    Tumbling { size_ms: i64 },
    /// Windows of `size_ms` starting every `step_ms` (aligned on the epoch): each event in
    /// `size_ms / step_ms` of them ("the last 5 minutes, every minute").
    Hopping { size_ms: i64, step_ms: i64 },
    /// Per key, events closer than `gap_ms` to each other: a session ends `gap_ms` after its
    /// last event. A late event that bridges two sessions merges them.
    Session { gap_ms: i64 },
}

/// A set of windows with one shape, named (the name keys its state), over aggregates `A`.
#[derive(Debug, Clone, Copy)]
pub struct Windows<A> {
    name: &'static str,
    shape: Shape,
    lateness_ms: i64,
    idle_ms: i64,
    /// Combines two sessions' aggregates when an event bridges them.
    merge: Option<fn(&mut A, A)>,
}

/// What [`Windows::add`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// Counted in its window(s).
    Counted,
    /// Too late: every window it belongs to had closed (past its end plus the lateness).
    /// Not counted; the caller decides (skip it, count it, dead-letter it).
    TooLate,
}

/// A window that closed, with its figures.
#[derive(Debug, Clone, PartialEq)]
pub struct Closed<A> {
    /// The partition whose events it holds (windows are per partition: see [`Windows::add`]).
    pub partition: i32,
    pub key: String,
    /// The window's span in event time: `[start, end)`.
    pub start: i64,
    pub end: i64,
    pub agg: A,
}

#[derive(Debug, Serialize, Deserialize)]
struct Open<A> {
    start: i64,
    end: i64,
    agg: A,
}

/// The window set's clocks, in state: one per partition.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Clock {
    #[serde(default)]
    partitions: BTreeMap<i32, PartitionClock>,
    /// How SDKs before per-partition closing kept the clock: a watermark per partition, the
    /// rest shared. Read from older state once, then moved into `partitions`.
    #[serde(default, skip_serializing)]
    watermarks: BTreeMap<i32, i64>,
    #[serde(default, skip_serializing)]
    next_close: Option<i64>,
}

/// One partition's clock.
#[derive(Debug, Serialize, Deserialize)]
struct PartitionClock {
    /// The latest event time seen.
    watermark: i64,
    /// The earliest time (end + lateness) at which one of the partition's open windows
    /// closes: nothing to scan for before its watermark reaches it (`i64::MAX`: none open).
    next_close: i64,
    /// Whether the partition's events arrived since the last tick.
    active: bool,
    /// Host time of the first tick that found the partition quiet.
    quiet_since: Option<i64>,
}

impl Clock {
    /// Moves a clock of an older SDK into per-partition clocks (each partition then scans
    /// once, which sets its own `next_close`).
    fn upgrade(&mut self) {
        let next_close = self.next_close.take().unwrap_or(i64::MIN);
        for (partition, watermark) in std::mem::take(&mut self.watermarks) {
            self.partitions.insert(
                partition,
                PartitionClock {
                    watermark,
                    next_close,
                    active: true,
                    quiet_since: None,
                },
            );
        }
    }
}

impl<A> Windows<A>
where
    A: Serialize + DeserializeOwned + Default + 'static,
{
    /// Back-to-back windows of `size_ms`.
    pub const fn tumbling(name: &'static str, size_ms: i64) -> Self {
        Self::new(name, Shape::Tumbling { size_ms })
    }

    /// Windows of `size_ms` every `step_ms` (`step_ms` divides `size_ms`).
    pub const fn hopping(name: &'static str, size_ms: i64, step_ms: i64) -> Self {
        Self::new(name, Shape::Hopping { size_ms, step_ms })
    }

    /// Sessions per key that end `gap_ms` after their last event; `merge` combines two
    /// sessions a late event joins.
    pub const fn session(name: &'static str, gap_ms: i64, merge: fn(&mut A, A)) -> Self {
        let mut w = Self::new(name, Shape::Session { gap_ms });
        w.merge = Some(merge);
        w
    }

    const fn new(name: &'static str, shape: Shape) -> Self {
        Windows {
            name,
            shape,
            lateness_ms: 0,
            idle_ms: 0,
            merge: None,
        }
    }

    /// Events up to `ms` behind the latest event time still count in their windows (which
    /// close that much later).
    pub const fn allowed_lateness(mut self, ms: i64) -> Self {
        self.lateness_ms = ms;
        self
    }

    /// On a tick, once nothing has arrived for `ms` of host time, every open window closes
    /// (0: never).
    pub const fn close_when_idle(mut self, ms: i64) -> Self {
        self.idle_ms = ms;
        self
    }

    fn clock_key(&self) -> String {
        format!("__eddy.win.{}.clock", self.name)
    }

    fn prefix(&self) -> String {
        format!("__eddy.win.{}/", self.name)
    }

    /// The windows an event at `t` belongs to: `(start, end)`.
    fn spans(&self, t: i64) -> Vec<(i64, i64)> {
        match self.shape {
            Shape::Tumbling { size_ms } => {
                let start = t.div_euclid(size_ms) * size_ms;
                vec![(start, start + size_ms)]
            }
            Shape::Hopping { size_ms, step_ms } => {
                let last = t.div_euclid(step_ms) * step_ms;
                let mut spans = Vec::new();
                let mut start = last;
                while start > t - size_ms {
                    spans.push((start, start + size_ms));
                    start -= step_ms;
                }
                spans.reverse();
                spans
            }
            Shape::Session { gap_ms } => vec![(t, t + gap_ms)],
        }
    }

    /// Counts an event of `partition` at event time `t` under `key` ("" for a global
    /// window): `update` runs on the aggregate of each window it belongs to (a new one starts
    /// from `A::default()`).
    ///
    /// Windows and their clocks are per partition, as Kafka Streams' are per task: a key's
    /// events are in one partition when the topic is keyed by it (the generator and the
    /// collector key by user), and a partition behind the others (a backlog, a rebalance) is
    /// measured by its own event time, so its events are not "late" because another partition
    /// is ahead. A global window therefore closes once per partition.
    pub fn add(
        &self,
        state: &mut State,
        partition: i32,
        key: &str,
        t: i64,
        mut update: impl FnMut(&mut A),
    ) -> Added {
        let clock: &mut Clock = state.json_mut(self.clock_key().as_str());
        clock.upgrade();
        let own = clock.partitions.entry(partition).or_insert(PartitionClock {
            watermark: t,
            next_close: i64::MAX,
            active: true,
            quiet_since: None,
        });
        own.watermark = own.watermark.max(t);
        own.active = true;
        own.quiet_since = None;
        let watermark = own.watermark;
        let lateness = self.lateness_ms;
        let open_spans: Vec<(i64, i64)> = self
            .spans(t)
            .into_iter()
            .filter(|(_, end)| end.saturating_add(lateness) > watermark)
            .collect();
        if open_spans.is_empty() {
            return Added::TooLate;
        }
        let prefix = format!("{}{partition}/", self.prefix());
        let windows: &mut Vec<Open<A>> = state.json_mut((prefix.as_str(), key));
        let mut earliest = i64::MAX;
        match self.shape {
            Shape::Session { .. } => {
                let (start, end) = open_spans[0];
                // Every session this event touches (its span overlaps) becomes one, built
                // on the earliest of them (so `merge` always joins two real sessions).
                let mut merged: Option<Open<A>> = None;
                let mut rest = Vec::with_capacity(windows.len());
                for w in windows.drain(..) {
                    if w.start <= end && start <= w.end {
                        merged = Some(match merged {
                            None => w,
                            Some(mut m) => {
                                m.start = m.start.min(w.start);
                                m.end = m.end.max(w.end);
                                let merge = self.merge.expect("sessions have a merge");
                                merge(&mut m.agg, w.agg);
                                m
                            }
                        });
                    } else {
                        rest.push(w);
                    }
                }
                let mut merged = merged.unwrap_or(Open {
                    start,
                    end,
                    agg: A::default(),
                });
                merged.start = merged.start.min(start);
                merged.end = merged.end.max(end);
                update(&mut merged.agg);
                earliest = merged.end;
                rest.push(merged);
                rest.sort_by_key(|w| w.start);
                *windows = rest;
            }
            _ => {
                for (start, end) in open_spans {
                    let i = match windows.iter().position(|w| w.start == start) {
                        Some(i) => i,
                        None => {
                            windows.push(Open {
                                start,
                                end,
                                agg: A::default(),
                            });
                            windows.len() - 1
                        }
                    };
                    update(&mut windows[i].agg);
                    earliest = earliest.min(end);
                }
                windows.sort_by_key(|w| w.start);
            }
        }
        let clock: &mut Clock = state.json_mut(self.clock_key().as_str());
        if let Some(own) = clock.partitions.get_mut(&partition) {
            own.next_close = own.next_close.min(earliest.saturating_add(lateness));
        }
        Added::Counted
    }

    /// The windows whose end plus the lateness their partition's event time has passed,
    /// closed and deleted from state, in order of end then key. Call it after each batch
    /// (`on_batch_end`). Only the partitions with a window due are read.
    pub fn close_due(&self, state: &mut State) -> Vec<Closed<A>> {
        let Some(mut clock) = state.get_json::<Clock>(self.clock_key().as_str()) else {
            return Vec::new();
        };
        clock.upgrade();
        let due: Vec<i32> = clock
            .partitions
            .iter()
            .filter(|(_, c)| c.next_close <= c.watermark)
            .map(|(p, _)| *p)
            .collect();
        if due.is_empty() {
            return Vec::new();
        }
        let mut closed = Vec::new();
        for partition in due {
            self.close_partition(state, &mut clock, partition, false, &mut closed);
        }
        state.set_json(self.clock_key().as_str(), &clock);
        sort(&mut closed);
        closed
    }

    /// On a tick at host time `now_ms`: closes every open window of each partition from
    /// which no event arrived for [`Self::close_when_idle`] of host time, also while other
    /// partitions flow. Call it from `on_tick`.
    pub fn tick(&self, state: &mut State, now_ms: i64) -> Vec<Closed<A>> {
        if self.idle_ms <= 0 {
            return Vec::new();
        }
        let Some(mut clock) = state.get_json::<Clock>(self.clock_key().as_str()) else {
            return Vec::new();
        };
        clock.upgrade();
        let mut quiet = Vec::new();
        for (partition, c) in clock.partitions.iter_mut() {
            if c.active {
                c.active = false;
                c.quiet_since = None;
            } else if c.quiet_since.is_none() {
                c.quiet_since = Some(now_ms);
            }
            let quiet_for = c.quiet_since.map_or(0, |since| now_ms - since);
            if c.quiet_since.is_some() && quiet_for >= self.idle_ms && c.next_close != i64::MAX {
                quiet.push(*partition);
            }
        }
        let mut closed = Vec::new();
        for partition in quiet {
            // Quiet long enough: its open windows have their final figures.
            self.close_partition(state, &mut clock, partition, true, &mut closed);
        }
        state.set_json(self.clock_key().as_str(), &clock);
        sort(&mut closed);
        closed
    }

    /// Closes every window of `partition` whose end + lateness the partition's event time
    /// has reached (or every one, if `all`), into `closed`, and sets when the next is due.
    fn close_partition(
        &self,
        state: &mut State,
        clock: &mut Clock,
        partition: i32,
        all: bool,
        closed: &mut Vec<Closed<A>>,
    ) {
        let Some(own) = clock.partitions.get_mut(&partition) else {
            return;
        };
        let time = if all { i64::MAX } else { own.watermark };
        let prefix = format!("{}{partition}/", self.prefix());
        let mut next_close = i64::MAX;
        for (state_key, bytes) in state.scan_prefix(&prefix, u32::MAX) {
            let Ok(windows) = serde_json::from_slice::<Vec<Open<A>>>(&bytes) else {
                continue;
            };
            let key = &state_key[prefix.len()..];
            let (done, open): (Vec<Open<A>>, Vec<Open<A>>) = windows
                .into_iter()
                .partition(|w| w.end.saturating_add(self.lateness_ms) <= time);
            for w in &open {
                next_close = next_close.min(w.end.saturating_add(self.lateness_ms));
            }
            if done.is_empty() {
                continue;
            }
            for w in done {
                closed.push(Closed {
                    partition,
                    key: key.to_string(),
                    start: w.start,
                    end: w.end,
                    agg: w.agg,
                });
            }
            if open.is_empty() {
                state.delete(state_key.as_str());
            } else {
                state.set_json(state_key.as_str(), &open);
            }
        }
        own.next_close = next_close;
    }
}

/// Closed windows in order of end, then key, then partition.
fn sort<A>(closed: &mut [Closed<A>]) {
    closed.sort_by(|a, b| (a.end, &a.key, a.partition).cmp(&(b.end, &b.key, b.partition)));
}

/// Deduplication by id: whether `id` is seen for the first time within `ttl_ms` of event
/// time (`t`), remembered in state under `__eddy.seen.<namespace>/<id>`. Exact within the
/// ttl; to keep state bounded, let the host delete old ids with
/// `[plugin.expire] after = { "__eddy.seen." = "<at least the ttl>" }` in `plugins.toml`.
pub fn first_seen(state: &mut State, namespace: &str, id: &str, t: i64, ttl_ms: i64) -> bool {
    let key = format!("__eddy.seen.{namespace}/{id}");
    match state.get_json::<i64>(key.as_str()) {
        Some(expires) if expires > t => false,
        _ => {
            state.set_json(key.as_str(), &t.saturating_add(ttl_ms));
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::Harness;
    use crate::{Context, Event, NoConfig, Plugin, Verdict};

    /// Counts events per user in 10 s windows (5 s lateness, closed after 30 s of quiet),
    /// per user in sessions with a 30 s gap (30 s lateness), and globally in 10 s windows every 5 s; emits
    /// every closed window as `{"set","key","start","end","n"}`.
    struct Counts;

    const TUMBLING: Windows<u64> = Windows::tumbling("t", 10_000)
        .allowed_lateness(5_000)
        .close_when_idle(30_000);
    const SESSIONS: Windows<u64> =
        Windows::session("s", 30_000, |a, b| *a += b).allowed_lateness(30_000);
    const HOPPING: Windows<u64> = Windows::hopping("h", 10_000, 5_000);

    fn emit(ctx: &mut Context, set: &str, closed: Vec<Closed<u64>>) {
        for w in closed {
            ctx.emit_json(
                "closed",
                None,
                &serde_json::json!({"set": set, "key": w.key, "start": w.start, "end": w.end, "n": w.agg}),
            );
        }
    }

    impl Plugin for Counts {
        type Config = NoConfig;
        fn init(_: NoConfig, _: &mut Context) -> Result<Self, String> {
            Ok(Counts)
        }
        fn on_event(&mut self, event: &Event, ctx: &mut Context) -> Verdict {
            let (Ok(a), Some(t)) = (event.activity(), event.timestamp_ms) else {
                return Verdict::DeadLetter("no user or time".into());
            };
            let user = a.user_id.to_string();
            let p = event.partition;
            SESSIONS.add(&mut ctx.state, p, &user, t, |n| *n += 1);
            HOPPING.add(&mut ctx.state, p, "", t, |n| *n += 1);
            match TUMBLING.add(&mut ctx.state, p, &user, t, |n| *n += 1) {
                Added::Counted => Verdict::Ok,
                Added::TooLate => Verdict::Skip,
            }
        }
        fn on_batch_end(&mut self, ctx: &mut Context) {
            let closed = TUMBLING.close_due(&mut ctx.state);
            emit(ctx, "t", closed);
            let closed = SESSIONS.close_due(&mut ctx.state);
            emit(ctx, "s", closed);
            let closed = HOPPING.close_due(&mut ctx.state);
            emit(ctx, "h", closed);
        }
        fn on_tick(&mut self, now_ms: i64, ctx: &mut Context) {
            let closed = TUMBLING.tick(&mut ctx.state, now_ms);
            emit(ctx, "t", closed);
        }
    }

    /// Runs one batch of `(user, event time in s)`.
    fn batch(h: &mut Harness<Counts>, events: &[(&str, i64)]) -> Vec<Verdict> {
        let payloads: Vec<Vec<u8>> = events
            .iter()
            .map(|(u, _)| format!(r#"{{"user_id":"{u}","event_type":"click"}}"#).into_bytes())
            .collect();
        let mut batch: Vec<Event> = payloads.iter().map(|p| h.event(p)).collect();
        for (e, (_, t)) in batch.iter_mut().zip(events) {
            e.timestamp_ms = Some(t * 1000);
        }
        h.run(&batch)
    }

    /// The closed windows of `set` emitted so far: (key, start s, end s, n).
    fn closed(h: &Harness<Counts>, set: &str) -> Vec<(String, i64, i64, u64)> {
        h.outputs_json("closed")
            .into_iter()
            .filter(|w| w["set"] == set)
            .map(|w| {
                (
                    w["key"].as_str().unwrap().to_string(),
                    w["start"].as_i64().unwrap() / 1000,
                    w["end"].as_i64().unwrap() / 1000,
                    w["n"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    fn w(key: &str, start: i64, end: i64, n: u64) -> (String, i64, i64, u64) {
        (key.to_string(), start, end, n)
    }

    #[test]
    fn tumbling_windows_close_on_time_take_late_events_within_lateness_and_refuse_later_ones() {
        let mut h = Harness::<Counts>::new("{}").unwrap();
        batch(&mut h, &[("a", 1), ("a", 2), ("b", 3), ("a", 11)]);
        // 11 s is past [0, 10) but not past its lateness (15 s): still open.
        assert_eq!(closed(&h, "t"), []);
        // Late by 4 s: within the lateness, counted in [0, 10).
        assert_eq!(batch(&mut h, &[("a", 7)]), [Verdict::Ok]);
        batch(&mut h, &[("b", 16)]);
        assert_eq!(closed(&h, "t"), [w("a", 0, 10, 3), w("b", 0, 10, 1)]);
        // Late by 9 s (its window closed): not counted.
        assert_eq!(batch(&mut h, &[("a", 7)]), [Verdict::Skip]);
        // The instance is recreated (a trap, a swap): the open windows are in state.
        h.restart("{}").unwrap();
        batch(&mut h, &[("a", 31)]);
        assert_eq!(closed(&h, "t")[2..], [w("a", 10, 20, 1), w("b", 10, 20, 1)]);
        // Closed windows are gone from state: only a's [30, 40) is left.
        let open: Vec<String> = h
            .recorded()
            .state
            .keys()
            .filter(|k| k.starts_with("__eddy.win.t/"))
            .cloned()
            .collect();
        assert_eq!(open, ["__eddy.win.t/0/a"]);
    }

    #[test]
    fn a_partition_behind_the_others_keeps_its_own_event_time() {
        let mut h = Harness::<Counts>::new("{}").unwrap();
        let payload = br#"{"user_id":"b","event_type":"click"}"#;
        // Partition 0 is at 100 s; partition 1, catching up, at 5 s.
        batch(&mut h, &[("a", 100)]);
        let mut e = h.event(payload);
        e.partition = 1;
        e.timestamp_ms = Some(5_000);
        assert_eq!(
            h.run(&[e]),
            [Verdict::Ok],
            "not late: its partition is at 5 s"
        );
        assert_eq!(closed(&h, "t"), [], "partition 1's [0, 10) is still open");
        let mut e = h.event(payload);
        e.partition = 1;
        e.timestamp_ms = Some(16_000);
        h.run(&[e]);
        assert_eq!(closed(&h, "t"), [w("b", 0, 10, 1)]);
    }

    #[test]
    fn a_quiet_stream_closes_its_windows_on_ticks() {
        let mut h = Harness::<Counts>::new("{}").unwrap();
        batch(&mut h, &[("a", 100), ("a", 101)]);
        h.set_time(5_000_000);
        // Events arrived since the last tick: not quiet yet.
        h.advance(10_000);
        assert_eq!(closed(&h, "t"), []);
        // Quiet from this tick on.
        h.advance(10_000);
        h.advance(10_000);
        assert_eq!(closed(&h, "t"), [], "quiet for 10 s of the 30 s");
        h.advance(20_000);
        // Quiet for 30 s: every open window closes.
        assert_eq!(closed(&h, "t"), [w("a", 100, 110, 2)]);
        // A new event starts the clock again.
        batch(&mut h, &[("a", 200)]);
        h.advance(10_000);
        h.advance(10_000);
        assert_eq!(closed(&h, "t").len(), 1);
    }

    /// Runs one batch of `(user, event time in s)` on `partition`.
    fn batch_on(h: &mut Harness<Counts>, partition: i32, events: &[(&str, i64)]) {
        let payloads: Vec<Vec<u8>> = events
            .iter()
            .map(|(u, _)| format!(r#"{{"user_id":"{u}","event_type":"click"}}"#).into_bytes())
            .collect();
        let mut batch: Vec<Event> = payloads.iter().map(|p| h.event(p)).collect();
        for (e, (_, t)) in batch.iter_mut().zip(events) {
            e.partition = partition;
            e.timestamp_ms = Some(t * 1000);
        }
        h.run(&batch);
    }

    /// A partition that stopped closes its windows on ticks while another keeps flowing
    /// (issue 27: before, one partition's events kept the whole stream "active", and the
    /// quiet partition's windows stayed open for as long as the other flowed).
    #[test]
    fn a_quiet_partition_closes_its_windows_on_ticks_while_another_flows() {
        let mut h = Harness::<Counts>::new("{}").unwrap();
        batch_on(&mut h, 1, &[("b", 100), ("b", 101)]);
        h.set_time(5_000_000);
        let mut t = 100;
        for _ in 0..6 {
            // Partition 0 flows, slowly: none of its own windows is due yet.
            t += 1;
            batch_on(&mut h, 0, &[("a", t)]);
            h.advance(10_000);
        }
        assert_eq!(
            closed(&h, "t"),
            [w("b", 100, 110, 2)],
            "partition 1 has been quiet for 50 s"
        );
        // Partition 0's window is still open: it is not quiet.
        assert!(h.recorded().state.contains_key("__eddy.win.t/0/a"));
    }

    /// A batch reads only the windows of the partitions with one due (issue 27: before, a
    /// window of any partition due by the latest event time of all made every batch read
    /// every window: a partition behind the others made every batch a full scan).
    #[test]
    fn a_batch_reads_only_the_windows_of_partitions_with_one_due() {
        let mut h = Harness::<Counts>::new("{}").unwrap();
        // Partition 1 is behind, at 5 s, with [0, 10) open; partition 0 is at 100 s.
        batch_on(&mut h, 1, &[("b", 5)]);
        batch_on(&mut h, 0, &[("a", 100)]);
        h.clear_scans();
        for t in 101..105 {
            batch_on(&mut h, 0, &[("a", t)]);
        }
        assert_eq!(h.recorded().scans, Vec::<String>::new(), "nothing was due");
        // Partition 0's [100, 110) is due at 115 s: only its windows are read.
        batch_on(&mut h, 0, &[("a", 116)]);
        let scanned = h.recorded().scans.clone();
        assert!(
            !scanned.is_empty() && scanned.iter().all(|p| p.ends_with("/0/")),
            "{scanned:?}"
        );
        assert_eq!(closed(&h, "t"), [w("a", 100, 110, 5)]);
    }

    /// State written by an SDK before per-partition clocks (one shared `next_close` and
    /// quiet flag) goes on where it was.
    #[test]
    fn a_clock_of_an_older_sdk_is_taken_over() {
        let mut h = Harness::<Counts>::new("{}").unwrap();
        batch(&mut h, &[("a", 1)]);
        let old =
            br#"{"watermarks":{"0":1000},"next_close":15000,"active":true,"quiet_since":null}"#;
        h.put_state("__eddy.win.t.clock", old);
        h.restart("{}").unwrap();
        batch(&mut h, &[("a", 16)]);
        assert_eq!(closed(&h, "t"), [w("a", 0, 10, 1)]);
    }

    #[test]
    fn sessions_end_after_the_gap_and_a_late_event_merges_two() {
        let mut h = Harness::<Counts>::new("{}").unwrap();
        batch(&mut h, &[("a", 0), ("a", 5), ("a", 40)]);
        // [0, 35) ended at 35 s, but may still take events up to 30 s late.
        assert_eq!(closed(&h, "s"), []);
        // 20 s is within 30 s of both 5 s and 40 s: one session from 0 to 40 + 30.
        batch(&mut h, &[("a", 20)]);
        batch(&mut h, &[("b", 100)]);
        assert_eq!(closed(&h, "s"), [w("a", 0, 70, 4)]);
    }

    #[test]
    fn hopping_windows_count_each_event_in_every_window_it_falls_in() {
        let mut h = Harness::<Counts>::new("{}").unwrap();
        batch(&mut h, &[("a", 7), ("b", 12), ("a", 31)]);
        assert_eq!(
            closed(&h, "h"),
            [w("", 0, 10, 1), w("", 5, 15, 2), w("", 10, 20, 1)]
        );
    }

    #[test]
    fn first_seen_is_true_once_per_id_within_its_ttl() {
        struct Dedup;
        impl Plugin for Dedup {
            type Config = NoConfig;
            fn init(_: NoConfig, _: &mut Context) -> Result<Self, String> {
                Ok(Dedup)
            }
            fn on_event(&mut self, event: &Event, ctx: &mut Context) -> Verdict {
                let id = event.payload_str().unwrap().to_string();
                let t = event.timestamp_ms.unwrap();
                if first_seen(&mut ctx.state, "ids", &id, t, 60_000) {
                    Verdict::Ok
                } else {
                    Verdict::Skip
                }
            }
        }
        let mut h = Harness::<Dedup>::new("{}").unwrap();
        let mut run = |id: &'static str, t: i64| {
            let mut e = h.event(id.as_bytes());
            e.timestamp_ms = Some(t);
            h.run(&[e])[0].clone()
        };
        assert_eq!(run("e1", 0), Verdict::Ok);
        assert_eq!(run("e1", 59_999), Verdict::Skip);
        assert_eq!(run("e2", 1_000), Verdict::Ok);
        assert_eq!(run("e1", 60_000), Verdict::Ok, "the ttl has passed");
    }
}
