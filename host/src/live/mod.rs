//! The live feed: the records plugins emit, handed to whoever watches (`GET /v1/stream`,
//! `/v1/ws`: see [`crate::http::stream`]) once the batch that produced them is committed to
//! the disk, so a watcher never sees a record that a crash would take back.
//!
//! Each watcher has an inbox of at most `[http] stream_buffer` records (and
//! [`INBOX_MAX_BYTES`]) of the outputs it asked for: publishing never waits for a watcher,
//! each watcher reads its inbox at its own pace, and a burst on an output it did not ask for
//! costs it nothing (a page watching a quiet output is never behind because another plugin
//! emits thousands of records a second). One that falls further behind than its inbox holds
//! on what it asked for is told how many records it missed ([`Next::Missed`]) and goes on
//! from the oldest record still held: it keeps its connection. A watcher that stops reading
//! altogether is not this module's business: the connection's send timeout closes it
//! ([`crate::http::listener`]). A record is rendered to JSON once, when published, and only
//! if a watcher wants it or it is among its output's latest. At most `[http]
//! stream_max_clients` watch at once (a [`Watcher`] holds one place).
//!
//! The last [`RECENT_PER_OUTPUT`] records of each output are kept, and a new watcher gets
//! those of the outputs it asked for first (oldest first), so a page that opens shows the
//! latest figures and alerts at once rather than after the next tick. A record is either in
//! that backlog or arrives live, never both (both are taken under one lock). Every record has
//! an id ([`RecordId`]: this run of the host, and its place in the order of publication): a
//! watcher that reconnects with the last id it got ([`Live::watch`]'s `after`) gets only the
//! newer ones of the backlog, so a page that reconnects shows each record once.

use crate::metrics::Metrics;
use crate::wasm::OutputRecord;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// How many of each output's latest records a new watcher gets first.
pub const RECENT_PER_OUTPUT: usize = 20;

/// The most bytes of records one watcher's inbox holds (besides `stream_buffer` records):
/// past it, the oldest are dropped and counted as missed, as past `stream_buffer`.
pub const INBOX_MAX_BYTES: usize = 8 << 20;

/// One output record as watchers receive it.
#[derive(Debug)]
pub struct LiveRecord {
    /// Its place in the order of publication.
    seq: u64,
    /// `plugin/output`, what a watcher filters on.
    pub output: String,
    /// The record as a JSON object: `{"plugin","output","key","time_ms"}` and its payload as
    /// `"value"` (if it is JSON) or `"text"` (if it is not).
    pub json: String,
}

/// A record's id as watchers see it: `<run>-<seq>`, this run of the host (its start time in
/// milliseconds) and the record's place in the order of publication. A watcher hands back
/// the last one it got to resume after it; one of another run (the host restarted) is
/// ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordId {
    pub run: u64,
    pub seq: u64,
}

impl std::fmt::Display for RecordId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.run, self.seq)
    }
}

impl std::str::FromStr for RecordId {
    type Err = String;
    fn from_str(s: &str) -> Result<RecordId, String> {
        let bad = || format!("`{s}` is not a record id (`<run>-<seq>`, as the records carry)");
        let (run, seq) = s.split_once('-').ok_or_else(bad)?;
        Ok(RecordId {
            run: run.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

/// Why a watcher could not start watching.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WatchError {
    #[error("{0} live clients already watch ([http] stream_max_clients); try again later")]
    Full(usize),
    #[error("the live stream is off ([http] stream_max_clients = 0)")]
    Off,
    #[error("no output `{unknown}`; outputs are: {known}")]
    UnknownOutput { unknown: String, known: String },
}

/// The latest records of each `plugin/output`, and how many were published in all.
#[derive(Debug, Default)]
struct Recent {
    latest: BTreeMap<String, VecDeque<Arc<LiveRecord>>>,
    published: u64,
}

/// The watchers' inboxes, by watcher.
#[derive(Debug, Default)]
struct Inboxes {
    by_id: BTreeMap<u64, Arc<Inbox>>,
    next_id: u64,
}

/// One watcher's records not yet taken.
#[derive(Debug)]
struct Inbox {
    filter: Vec<String>,
    held: Mutex<Held>,
    arrived: Notify,
}

#[derive(Debug, Default)]
struct Held {
    records: VecDeque<Arc<LiveRecord>>,
    bytes: usize,
    /// Records dropped since the watcher last heard of it.
    missed: u64,
    closed: bool,
}

/// Whether a watcher of `filter` wants `output` (an empty filter wants everything).
fn wants(filter: &[String], output: &str) -> bool {
    filter.is_empty()
        || filter.iter().any(|f| {
            f == output
                || output
                    .split_once('/')
                    .is_some_and(|(plugin, _)| plugin == f)
        })
}

/// The feed: plugins' workers publish, watchers subscribe.
#[derive(Debug)]
pub struct Live {
    /// This run of the host, in record ids.
    run: u64,
    inboxes: Arc<Mutex<Inboxes>>,
    /// Each running plugin's output names (what a watcher may ask for).
    outputs: Mutex<BTreeMap<String, Vec<String>>>,
    recent: Mutex<Recent>,
    places: Arc<Semaphore>,
    max_clients: usize,
    /// How many records of what it asked for one watcher may fall behind.
    pub buffer: usize,
    /// Where clients, records and missed records are counted.
    metrics: Arc<Metrics>,
}

impl Drop for Live {
    fn drop(&mut self) {
        let inboxes = self.inboxes.lock().expect("inboxes lock");
        for inbox in inboxes.by_id.values() {
            inbox.held.lock().expect("inbox lock").closed = true;
            inbox.arrived.notify_one();
        }
    }
}

impl Live {
    pub fn new(buffer: usize, max_clients: usize, metrics: Arc<Metrics>) -> Live {
        Live {
            run: crate::clock::now_ms().max(0) as u64,
            inboxes: Arc::default(),
            outputs: Mutex::default(),
            recent: Mutex::default(),
            places: Arc::new(Semaphore::new(max_clients)),
            max_clients,
            buffer: buffer.max(1),
            metrics,
        }
    }

    /// The id watchers see for the record published `seq`-th.
    pub fn id(&self, record: &LiveRecord) -> RecordId {
        RecordId {
            run: self.run,
            seq: record.seq,
        }
    }

    /// `plugin` runs with these outputs (at its start, and after each reload).
    pub fn set_outputs(&self, plugin: &str, outputs: impl IntoIterator<Item = String>) {
        let mut all = self.outputs.lock().expect("outputs lock");
        all.insert(plugin.to_string(), outputs.into_iter().collect());
    }

    /// `plugin` stopped: it emits nothing more.
    pub fn forget(&self, plugin: &str) {
        self.outputs.lock().expect("outputs lock").remove(plugin);
        let prefix = format!("{plugin}/");
        let mut recent = self.recent.lock().expect("recent lock");
        recent
            .latest
            .retain(|output, _| !output.starts_with(&prefix));
    }

    /// Every `plugin/output` that exists now.
    pub fn known_outputs(&self) -> Vec<String> {
        let all = self.outputs.lock().expect("outputs lock");
        all.iter()
            .flat_map(|(p, outputs)| outputs.iter().map(move |o| format!("{p}/{o}")))
            .collect()
    }

    /// How many watch now.
    pub fn clients(&self) -> usize {
        self.max_clients - self.places.available_permits()
    }

    /// Hands committed records of `plugin` to the watchers that want them, and keeps each
    /// output's latest. A record nobody wants is rendered only if it is among its output's
    /// latest [`RECENT_PER_OUTPUT`] of the batch.
    pub fn publish(&self, plugin: &str, records: &[OutputRecord], time_ms: i64) {
        let inboxes = self.inboxes.lock().expect("inboxes lock");
        let mut recent = self.recent.lock().expect("recent lock");
        let Recent { latest, published } = &mut *recent;
        // Per output of the batch: the inboxes that want it, and how many of its records
        // are still to come (only the last RECENT_PER_OUTPUT are kept for new watchers).
        let mut outputs: BTreeMap<&str, (Vec<&Arc<Inbox>>, usize)> = BTreeMap::new();
        for r in records {
            outputs
                .entry(r.output.as_str())
                .or_insert_with(|| {
                    let name = format!("{plugin}/{}", r.output);
                    let wanting = inboxes
                        .by_id
                        .values()
                        .filter(|i| wants(&i.filter, &name))
                        .collect();
                    (wanting, 0)
                })
                .1 += 1;
        }
        for r in records {
            let (wanting, left) = outputs.get_mut(r.output.as_str()).expect("counted");
            *left -= 1;
            if wanting.is_empty() && *left >= RECENT_PER_OUTPUT {
                continue;
            }
            *published += 1;
            let record = Arc::new(LiveRecord {
                seq: *published,
                output: format!("{plugin}/{}", r.output),
                json: render(plugin, r, time_ms),
            });
            let queue = latest.entry(record.output.clone()).or_default();
            if queue.len() == RECENT_PER_OUTPUT {
                queue.pop_front();
            }
            queue.push_back(record.clone());
            if wanting.is_empty() {
                continue;
            }
            self.metrics.stream_records.fetch_add(1, Relaxed);
            for inbox in wanting.iter() {
                let mut held = inbox.held.lock().expect("inbox lock");
                held.bytes += record.json.len();
                held.records.push_back(record.clone());
                while held.records.len() > self.buffer || held.bytes > INBOX_MAX_BYTES {
                    let Some(old) = held.records.pop_front() else {
                        break;
                    };
                    held.bytes -= old.json.len();
                    held.missed += 1;
                }
                drop(held);
                inbox.arrived.notify_one();
            }
        }
    }

    /// Starts watching `filter` (`plugin/output`, or `plugin` for all its outputs; empty:
    /// everything), after the record `after` if given (a reconnecting watcher's last one: the
    /// backlog then holds only newer records). Refused past `stream_max_clients` or for an
    /// output that does not exist.
    pub fn watch(
        &self,
        filter: Vec<String>,
        after: Option<RecordId>,
    ) -> Result<Watcher, WatchError> {
        let known = self.known_outputs();
        for f in &filter {
            let exists = known
                .iter()
                .any(|k| k == f || k.split_once('/').is_some_and(|(p, _)| p == f));
            if !exists {
                return Err(WatchError::UnknownOutput {
                    unknown: f.clone(),
                    known: known.join(", "),
                });
            }
        }
        if self.max_clients == 0 {
            return Err(WatchError::Off);
        }
        let place = self
            .places
            .clone()
            .try_acquire_owned()
            .map_err(|_| WatchError::Full(self.max_clients))?;
        self.metrics.stream_clients.fetch_add(1, Relaxed);
        let after = after.filter(|a| a.run == self.run).map_or(0, |a| a.seq);
        let inbox = Arc::new(Inbox {
            filter,
            held: Mutex::default(),
            arrived: Notify::new(),
        });
        let mut inboxes = self.inboxes.lock().expect("inboxes lock");
        let recent = self.recent.lock().expect("recent lock");
        let id = inboxes.next_id;
        inboxes.next_id += 1;
        inboxes.by_id.insert(id, inbox.clone());
        let mut backlog: Vec<Arc<LiveRecord>> = recent
            .latest
            .iter()
            .filter(|(output, _)| wants(&inbox.filter, output))
            .flat_map(|(_, records)| records.iter().filter(|r| r.seq > after).cloned())
            .collect();
        drop(recent);
        drop(inboxes);
        backlog.sort_by_key(|r| r.seq);
        Ok(Watcher {
            backlog: backlog.into(),
            inbox,
            id,
            inboxes: self.inboxes.clone(),
            metrics: self.metrics.clone(),
            _place: place,
        })
    }
}

/// What a watcher gets next.
#[derive(Debug)]
pub enum Next {
    Record(Arc<LiveRecord>),
    /// It fell behind on what it asked for by more than its inbox holds: `missed` of those
    /// records are gone. The next call goes on from the oldest one held.
    Missed {
        missed: u64,
    },
    /// The host is stopping.
    Closed,
}

/// One watcher's place in the feed. Dropping it frees the place.
#[derive(Debug)]
pub struct Watcher {
    /// The latest records from before it started, handed out first.
    backlog: VecDeque<Arc<LiveRecord>>,
    inbox: Arc<Inbox>,
    id: u64,
    inboxes: Arc<Mutex<Inboxes>>,
    metrics: Arc<Metrics>,
    _place: OwnedSemaphorePermit,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.inboxes
            .lock()
            .expect("inboxes lock")
            .by_id
            .remove(&self.id);
        self.metrics.stream_clients.fetch_sub(1, Relaxed);
    }
}

impl Watcher {
    /// The next record this watcher asked for. Cancel-safe: a record is taken only when
    /// it is returned.
    pub async fn next(&mut self) -> Next {
        if let Some(record) = self.backlog.pop_front() {
            return Next::Record(record);
        }
        loop {
            {
                let mut held = self.inbox.held.lock().expect("inbox lock");
                if held.missed > 0 {
                    let missed = std::mem::take(&mut held.missed);
                    self.metrics.stream_missed.fetch_add(missed, Relaxed);
                    return Next::Missed { missed };
                }
                if let Some(record) = held.records.pop_front() {
                    held.bytes -= record.json.len();
                    return Next::Record(record);
                }
                if held.closed {
                    return Next::Closed;
                }
            }
            self.inbox.arrived.notified().await;
        }
    }
}

/// The JSON object of one record: its payload embedded as is when it is JSON.
fn render(plugin: &str, record: &OutputRecord, time_ms: i64) -> String {
    let quote = |s: &str| serde_json::Value::from(s).to_string();
    let key = match &record.key {
        Some(k) => quote(&String::from_utf8_lossy(k)),
        None => "null".to_string(),
    };
    let payload = match std::str::from_utf8(&record.payload) {
        // Valid JSON text can go in verbatim: no parse into a tree and back.
        Ok(text) if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() => {
            format!(r#""value":{}"#, text.trim())
        }
        _ => format!(
            r#""text":{}"#,
            quote(&String::from_utf8_lossy(&record.payload))
        ),
    };
    format!(
        r#"{{"plugin":{},"output":{},"key":{key},"time_ms":{time_ms},{payload}}}"#,
        quote(plugin),
        quote(&record.output),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(output: &str, payload: &[u8]) -> OutputRecord {
        OutputRecord {
            output: output.into(),
            key: Some(b"u1".to_vec()),
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn a_json_payload_is_embedded_and_text_is_quoted() {
        let json = render("dashboard", &record("summary", br#" {"a":[1,2]} "#), 7);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["plugin"], "dashboard");
        assert_eq!(v["output"], "summary");
        assert_eq!(v["key"], "u1");
        assert_eq!(v["time_ms"], 7);
        assert_eq!(v["value"]["a"][1], 2);
        let text = render("logger", &record("log", b"user \"x\" {not json"), 7);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["text"], "user \"x\" {not json");
        assert!(v.get("value").is_none());
    }

    #[tokio::test]
    async fn watchers_get_what_they_asked_for_and_the_slow_one_is_told_then_goes_on() {
        let live = Live::new(4, 2, Default::default());
        live.set_outputs("dashboard", ["summary".to_string(), "text".to_string()]);
        live.set_outputs("alert", ["alerts".to_string()]);
        let mut summary = live.watch(vec!["dashboard/summary".into()], None).unwrap();
        let mut everything = live.watch(vec![], None).unwrap();
        assert_eq!(live.watch(vec![], None).unwrap_err(), WatchError::Full(2));
        live.publish("alert", &[record("alerts", b"{}")], 1);
        live.publish("dashboard", &[record("summary", b"{}")], 1);
        let Next::Record(r) = summary.next().await else {
            panic!("a record")
        };
        assert_eq!(r.output, "dashboard/summary");
        // `everything` gets both, in order.
        for expected in ["alert/alerts", "dashboard/summary"] {
            assert!(matches!(everything.next().await, Next::Record(r) if r.output == expected));
        }
        drop(summary);
        assert_eq!(live.clients(), 1);
        let mut late = live.watch(vec!["alert".into()], None).unwrap();
        live.publish("alert", &[record("alerts", b"{}")], 3);
        assert!(matches!(late.next().await, Next::Record(r) if r.output == "alert/alerts"));
        for _ in 0..10 {
            live.publish("dashboard", &[record("text", b"x")], 4);
        }
        // The ring holds 4: of the 11 records since its last read, 7 are gone.
        assert!(matches!(
            everything.next().await,
            Next::Missed { missed: 7 }
        ));
        // It goes on with the oldest record still held, and then live ones.
        assert!(matches!(everything.next().await, Next::Record(r) if r.output == "dashboard/text"));
        for _ in 0..3 {
            assert!(matches!(everything.next().await, Next::Record(_)));
        }
        live.publish("alert", &[record("alerts", b"{}")], 5);
        assert!(matches!(everything.next().await, Next::Record(r) if r.output == "alert/alerts"));
    }

    #[tokio::test]
    async fn a_new_watcher_gets_the_latest_records_of_its_outputs_first_then_live_ones() {
        let live = Live::new(64, 2, Default::default());
        live.set_outputs("dashboard", ["summary".to_string(), "text".to_string()]);
        // Nobody watches: 25 summaries in one batch, then 3 in another, and some text.
        let batch: Vec<_> = (0..25)
            .map(|i| record("summary", format!("{{\"n\":{i}}}").as_bytes()))
            .collect();
        live.publish("dashboard", &batch, 1);
        live.publish("dashboard", &[record("text", b"t")], 1);
        let batch: Vec<_> = (25..28)
            .map(|i| record("summary", format!("{{\"n\":{i}}}").as_bytes()))
            .collect();
        live.publish("dashboard", &batch, 2);
        let mut w = live.watch(vec!["dashboard/summary".into()], None).unwrap();
        live.publish("dashboard", &[record("summary", br#"{"n":28}"#)], 3);
        let mut seen = Vec::new();
        for _ in 0..(RECENT_PER_OUTPUT + 1) {
            let Next::Record(r) = w.next().await else {
                panic!("a record")
            };
            let v: serde_json::Value = serde_json::from_str(&r.json).unwrap();
            seen.push(v["value"]["n"].as_i64().unwrap());
        }
        let expected: Vec<i64> = (28 - RECENT_PER_OUTPUT as i64..=28).collect();
        assert_eq!(
            seen, expected,
            "the latest 20, oldest first, then the live one, once"
        );
    }

    /// A watcher is behind only on what it asked for (issue 27: before, one ring carried
    /// every output, and a burst on another output cut off a page watching a quiet one), and
    /// a burst nobody watches is not rendered beyond what new watchers get.
    #[tokio::test]
    async fn a_burst_on_another_output_leaves_a_watcher_of_a_quiet_one_whole() {
        let live = Live::new(4, 2, Default::default());
        live.set_outputs("dashboard", ["summary".to_string()]);
        live.set_outputs("logger", ["log".to_string()]);
        let mut quiet = live.watch(vec!["dashboard/summary".into()], None).unwrap();
        let burst: Vec<_> = (0..100).map(|_| record("log", b"x")).collect();
        live.publish("logger", &burst, 1);
        live.publish("dashboard", &[record("summary", b"{}")], 2);
        live.publish("logger", &burst, 3);
        assert!(matches!(quiet.next().await, Next::Record(r) if r.output == "dashboard/summary"));
        assert_eq!(live.metrics.stream_missed.load(Relaxed), 0);
        assert_eq!(
            live.recent.lock().unwrap().published,
            2 * RECENT_PER_OUTPUT as u64 + 1,
            "only the latest of the bursts were rendered"
        );
        assert_eq!(live.metrics.stream_records.load(Relaxed), 1);
    }

    /// A watcher that reconnects with the id of the last record it got gets only newer ones
    /// from the backlog, then live ones: each record once. An id of another run (the host
    /// restarted) is ignored.
    #[tokio::test]
    async fn a_reconnecting_watcher_gets_each_record_once() {
        let live = Live::new(64, 2, Default::default());
        live.set_outputs("alert", ["alerts".to_string()]);
        let alerts = |from: i64, to: i64| -> Vec<OutputRecord> {
            (from..to)
                .map(|i| record("alerts", format!("{{\"n\":{i}}}").as_bytes()))
                .collect()
        };
        live.publish("alert", &alerts(0, 5), 1);
        let n = |r: &LiveRecord| -> i64 {
            serde_json::from_str::<serde_json::Value>(&r.json).unwrap()["value"]["n"]
                .as_i64()
                .unwrap()
        };
        let mut first = live.watch(vec!["alert".into()], None).unwrap();
        let mut last = None;
        for expected in 0..5 {
            let Next::Record(r) = first.next().await else {
                panic!("a record")
            };
            assert_eq!(n(&r), expected);
            last = Some(live.id(&r));
        }
        drop(first);
        live.publish("alert", &alerts(5, 8), 2);
        let last = last.unwrap();
        assert_eq!(last.to_string().parse::<RecordId>(), Ok(last));
        let mut again = live.watch(vec!["alert".into()], Some(last)).unwrap();
        live.publish("alert", &alerts(8, 9), 3);
        for expected in 5..9 {
            let Next::Record(r) = again.next().await else {
                panic!("a record")
            };
            assert_eq!(n(&r), expected, "the ones it did not have, once");
        }
        // An id of another run: the whole backlog.
        let other = RecordId {
            run: last.run + 1,
            seq: 3,
        };
        let mut fresh = live.watch(vec!["alert".into()], Some(other)).unwrap();
        let Next::Record(r) = fresh.next().await else {
            panic!("a record")
        };
        assert_eq!(n(&r), 0);
        assert!("12".parse::<RecordId>().is_err());
    }

    #[test]
    fn an_unknown_output_is_refused_with_the_known_ones() {
        let live = Live::new(4, 2, Default::default());
        live.set_outputs("dashboard", ["summary".to_string()]);
        let e = live
            .watch(vec!["dashbord/summary".into()], None)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "no output `dashbord/summary`; outputs are: dashboard/summary"
        );
        assert!(live.watch(vec!["dashboard".into()], None).is_ok());
        live.forget("dashboard");
        assert!(live.watch(vec!["dashboard".into()], None).is_err());
    }
}
