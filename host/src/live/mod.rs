//! The live feed: the records plugins emit, handed to whoever watches (`GET /v1/stream`,
//! `/v1/ws`: see [`crate::http::stream`]) once the batch that produced them is committed to
//! the disk, so a watcher never sees a record that a crash would take back.
//!
//! One broadcast ring of `[http] stream_buffer` records: publishing never waits for a
//! watcher, and each watcher reads the ring at its own pace, so a slow watcher never slows a
//! plugin or another watcher. One that falls further behind than the ring holds (a reader
//! slower than a burst) is told how many records it missed ([`Next::Missed`]) and goes on
//! from the oldest record the ring still holds: it keeps its connection, because a page that
//! reconnected would only get the latest records again, and a reader that keeps up after the
//! burst gets everything again. A watcher that stops reading altogether is not this module's
//! business: the connection's send timeout closes it ([`crate::http::listener`]). Records are
//! rendered to JSON once, when published. At most `[http] stream_max_clients` watch at once
//! (a [`Watcher`] holds one place).
//!
//! The last [`RECENT_PER_OUTPUT`] records of each output are kept, and a new watcher gets
//! those of the outputs it asked for first (oldest first), so a page that opens shows the
//! latest figures and alerts at once rather than after the next tick. A record is either in
//! that backlog or arrives live, never both (both are taken under one lock).

use crate::metrics::Metrics;
use crate::wasm::OutputRecord;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast};

/// How many of each output's latest records a new watcher gets first.
pub const RECENT_PER_OUTPUT: usize = 20;

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

/// The feed: plugins' workers publish, watchers subscribe.
#[derive(Debug)]
pub struct Live {
    sender: broadcast::Sender<Arc<LiveRecord>>,
    /// Each running plugin's output names (what a watcher may ask for).
    outputs: Mutex<BTreeMap<String, Vec<String>>>,
    recent: Mutex<Recent>,
    places: Arc<Semaphore>,
    max_clients: usize,
    /// How many records one watcher may fall behind before it is disconnected.
    pub buffer: usize,
    /// Where clients, records and slow clients are counted.
    metrics: Arc<Metrics>,
}

impl Live {
    pub fn new(buffer: usize, max_clients: usize, metrics: Arc<Metrics>) -> Live {
        let (sender, _) = broadcast::channel(buffer.max(1));
        Live {
            sender,
            outputs: Mutex::default(),
            recent: Mutex::default(),
            places: Arc::new(Semaphore::new(max_clients)),
            max_clients,
            buffer: buffer.max(1),
            metrics,
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

    /// Hands committed records of `plugin` to the watchers, and keeps each output's latest.
    /// With nobody watching, only those are rendered.
    pub fn publish(&self, plugin: &str, records: &[OutputRecord], time_ms: i64) {
        let watched = self.sender.receiver_count() > 0;
        let mut recent = self.recent.lock().expect("recent lock");
        let Recent { latest, published } = &mut *recent;
        // Without watchers, a record older than the last RECENT_PER_OUTPUT of its output in
        // this batch would be rendered only to be dropped.
        let mut kept: BTreeMap<&str, usize> = BTreeMap::new();
        let mut skip = vec![false; records.len()];
        if !watched {
            for (i, r) in records.iter().enumerate().rev() {
                let n = kept.entry(r.output.as_str()).or_default();
                *n += 1;
                skip[i] = *n > RECENT_PER_OUTPUT;
            }
        }
        for (r, _) in records.iter().zip(skip).filter(|(_, skip)| !skip) {
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
            if watched && self.sender.send(record).is_ok() {
                self.metrics.stream_records.fetch_add(1, Relaxed);
            }
        }
    }

    /// Starts watching `filter` (`plugin/output`, or `plugin` for all its outputs; empty:
    /// everything). Refused past `stream_max_clients` or for an output that does not exist.
    pub fn watch(&self, filter: Vec<String>) -> Result<Watcher, WatchError> {
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
        let recent = self.recent.lock().expect("recent lock");
        let mut watcher = Watcher {
            backlog: VecDeque::new(),
            receiver: self.sender.subscribe(),
            filter,
            metrics: self.metrics.clone(),
            _place: place,
        };
        let mut backlog: Vec<Arc<LiveRecord>> = recent
            .latest
            .iter()
            .filter(|(output, _)| watcher.wants(output))
            .flat_map(|(_, records)| records.iter().cloned())
            .collect();
        drop(recent);
        backlog.sort_by_key(|r| r.seq);
        watcher.backlog = backlog.into();
        Ok(watcher)
    }
}

/// What a watcher gets next.
#[derive(Debug)]
pub enum Next {
    Record(Arc<LiveRecord>),
    /// It fell behind by more than the ring holds: `missed` records (of every output, not
    /// only those it asked for) are gone. The next call goes on from the oldest one held.
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
    receiver: broadcast::Receiver<Arc<LiveRecord>>,
    filter: Vec<String>,
    metrics: Arc<Metrics>,
    _place: OwnedSemaphorePermit,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.metrics.stream_clients.fetch_sub(1, Relaxed);
    }
}

impl Watcher {
    /// The next record this watcher asked for.
    pub async fn next(&mut self) -> Next {
        if let Some(record) = self.backlog.pop_front() {
            return Next::Record(record);
        }
        loop {
            match self.receiver.recv().await {
                Ok(record) if self.wants(&record.output) => return Next::Record(record),
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    self.metrics.stream_missed.fetch_add(missed, Relaxed);
                    return Next::Missed { missed };
                }
                Err(broadcast::error::RecvError::Closed) => return Next::Closed,
            }
        }
    }

    fn wants(&self, output: &str) -> bool {
        self.filter.is_empty()
            || self.filter.iter().any(|f| {
                f == output
                    || output
                        .split_once('/')
                        .is_some_and(|(plugin, _)| plugin == f)
            })
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
        let mut summary = live.watch(vec!["dashboard/summary".into()]).unwrap();
        let mut everything = live.watch(vec![]).unwrap();
        assert_eq!(live.watch(vec![]).unwrap_err(), WatchError::Full(2));
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
        let mut late = live.watch(vec!["alert".into()]).unwrap();
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
        let mut w = live.watch(vec!["dashboard/summary".into()]).unwrap();
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

    #[test]
    fn an_unknown_output_is_refused_with_the_known_ones() {
        let live = Live::new(4, 2, Default::default());
        live.set_outputs("dashboard", ["summary".to_string()]);
        let e = live.watch(vec!["dashbord/summary".into()]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no output `dashbord/summary`; outputs are: dashboard/summary"
        );
        assert!(live.watch(vec!["dashboard".into()]).is_ok());
        live.forget("dashboard");
        assert!(live.watch(vec!["dashboard".into()]).is_err());
    }
}
