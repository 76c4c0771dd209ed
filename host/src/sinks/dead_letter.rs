//! A plugin's dead-letter topic: events it gave up on, with their original key, payload and
//! headers, plus headers saying where they came from and why; and output records their
//! destination refused for good ([`super::Undeliverable`]), with the output named.
//!
//! A dead letter the topic refuses for good (a ~1 MB event plus its `eddy.*` headers can be
//! over the producer's `message.max.bytes`) is written again without its payload and original
//! headers, with `eddy.payload.dropped` saying why; one refused even so is logged and
//! counted as lost ([`Written`]). Never a wedge.
//!
//! With a dead-letter table, a dead letter goes to the topic, then to the table; a retry
//! after the table failed writes only the table ([`Progress`]): one letter in the topic and
//! one row, however long the table is down.

use super::postgres::TableWriter;
use super::{DELIVERY_TIMEOUT, Unacknowledged, Undeliverable, acknowledged, send_one};
use crate::event::Event;
use crate::wasm::OutputRecord;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sha2::Digest as _;

/// Kafka headers added to a dead-lettered record, next to the original ones.
pub mod headers {
    pub const SOURCE_TOPIC: &str = "eddy.source.topic";
    pub const SOURCE_PARTITION: &str = "eddy.source.partition";
    pub const SOURCE_OFFSET: &str = "eddy.source.offset";
    pub const PLUGIN: &str = "eddy.plugin";
    /// The content digest (`sha256:…`) of the plugin version that gave up on the event.
    pub const PLUGIN_VERSION: &str = "eddy.plugin.version";
    pub const REASON: &str = "eddy.reason";
    pub const ATTEMPTS: &str = "eddy.attempts";
    /// On an output record its destination refused for good: the output's name.
    pub const OUTPUT: &str = "eddy.output";
    /// On a dead letter written without its payload and original headers: why.
    pub const PAYLOAD_DROPPED: &str = "eddy.payload.dropped";
}

/// What a write of dead letters came to, beyond the letters written whole.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Written without payload and original headers (refused whole for good).
    pub without_payload: u64,
    /// Not written at all: refused for good even without payload (logged).
    pub lost: u64,
}

/// One dead letter before it is sent.
struct Letter<'a> {
    key: Option<&'a [u8]>,
    payload: &'a [u8],
    /// The record's own headers.
    original: Vec<(&'a str, Option<&'a [u8]>)>,
    /// The `eddy.*` headers.
    eddy: Vec<(&'static str, String)>,
}

/// How far one batch's dead letters got, kept by the caller across its retries of the
/// batch's delivery: a retry writes only what is not written yet, so each dead letter
/// reaches the topic once and the table once, however long the table (or its database) is
/// down. (A batch dropped because the host stops is consumed again at the next start, and
/// its dead letters written again: at least once, as for outputs.)
#[derive(Debug, Default)]
pub struct Progress {
    /// In the topic, and what that came to.
    topic: Option<Written>,
    /// In the table too (or there is none).
    table: bool,
}

/// An event to dead-letter, with why.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Its index in the batch's events.
    pub index: usize,
    pub reason: String,
    pub attempts: u32,
    /// What gave up on it, as in `eddy_dead_letters_total{reason}`: `verdict`, `trap`, …
    pub cause: &'static str,
}

/// Why dead letters did not reach their topic (retried by the worker).
#[derive(Debug, thiserror::Error)]
#[error("dead-letter topic `{topic}`: {message}")]
pub struct DeadLetterError {
    topic: String,
    message: String,
}

/// One plugin's dead-letter topic.
pub struct DeadLetters {
    plugin: String,
    topic: String,
    producer: FutureProducer,
    /// `dead_letter_table`: each dead letter is a row there too.
    table: Option<TableWriter>,
}

/// A row of a dead-letter table (seed 004's `dead_letter_queue`, see `migrations/`).
#[derive(serde::Serialize)]
struct DeadLetterRow<'a> {
    /// What makes a replayed dead letter the same row: the plugin and the event's source
    /// coordinates, or for an output record its output and the digest of its payload.
    dedup_key: String,
    event_id: Option<String>,
    event_data: serde_json::Value,
    error_type: &'a str,
    error_message: &'a str,
    retry_count: u32,
    status: &'static str,
    plugin: &'a str,
    plugin_version: &'a str,
    output: Option<&'a str>,
    source_topic: Option<&'a str>,
    source_partition: Option<i32>,
    source_offset: Option<i64>,
}

/// A payload as JSON: itself if it is JSON, else its text as a JSON string.
fn as_json(payload: &[u8]) -> serde_json::Value {
    serde_json::from_slice(payload)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(payload).into()))
}

/// The `event_id` of a JSON object payload (a string, or a number as text), if it has one.
fn event_id(data: &serde_json::Value) -> Option<String> {
    match data.get("event_id")? {
        serde_json::Value::String(s) => Some(s.chars().take(100).collect()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl DeadLetters {
    pub fn new(plugin: &str, topic: String, producer: FutureProducer) -> DeadLetters {
        DeadLetters {
            plugin: plugin.to_string(),
            topic,
            producer,
            table: None,
        }
    }

    /// Dead letters go to `table` as well as to the topic.
    pub fn with_table(mut self, table: Option<TableWriter>) -> DeadLetters {
        self.table = table;
        self
    }

    /// Writes `rows` to the dead-letter table, if there is one. A row it refuses for good is
    /// logged (the topic has the dead letter).
    async fn write_rows(&self, rows: &[DeadLetterRow<'_>]) -> Result<(), DeadLetterError> {
        let Some(table) = &self.table else {
            return Ok(());
        };
        if rows.is_empty() {
            return Ok(());
        }
        let json: Vec<Vec<u8>> = rows
            .iter()
            .map(|r| serde_json::to_vec(r).expect("a row is JSON"))
            .collect();
        let slices: Vec<&[u8]> = json.iter().map(Vec::as_slice).collect();
        let refused = table.write(&slices).await.map_err(|e| DeadLetterError {
            topic: format!("{} (and its dead-letter table)", self.topic),
            message: e.to_string(),
        })?;
        for u in refused {
            tracing::error!(
                dedup_key = %rows[u.index].dedup_key,
                "the dead-letter table refused a dead letter (it is in the dead-letter topic): {}",
                u.reason
            );
        }
        Ok(())
    }

    fn error(&self, message: impl Into<String>) -> DeadLetterError {
        DeadLetterError {
            topic: self.topic.clone(),
            message: message.into(),
        }
    }

    /// Writes the `letters` (indexes into `events`) to the topic, and waits until the
    /// broker has them all.
    /// `progress`: what earlier tries of the same letters got through (see [`Progress`]).
    pub async fn send(
        &self,
        events: &[Event],
        letters: &[DeadLetter],
        version: &str,
        progress: &mut Progress,
    ) -> Result<Written, DeadLetterError> {
        let letters_in = letters;
        let letters: Vec<Letter<'_>> = letters
            .iter()
            .map(|letter| {
                let e = &events[letter.index];
                Letter {
                    key: e.key.as_deref(),
                    payload: &e.payload[..],
                    original: e
                        .headers
                        .iter()
                        .map(|h| (h.key.as_str(), h.value.as_deref()))
                        .collect(),
                    eddy: vec![
                        (headers::SOURCE_TOPIC, e.topic.to_string()),
                        (headers::SOURCE_PARTITION, e.partition.to_string()),
                        (headers::SOURCE_OFFSET, e.offset.to_string()),
                        (headers::PLUGIN, self.plugin.clone()),
                        (headers::PLUGIN_VERSION, version.to_string()),
                        (headers::REASON, letter.reason.clone()),
                        (headers::ATTEMPTS, letter.attempts.to_string()),
                    ],
                }
            })
            .collect();
        let written = match progress.topic {
            Some(written) => written,
            None => *progress.topic.insert(self.write(&letters).await?),
        };
        if self.table.is_some() && !progress.table {
            let rows: Vec<DeadLetterRow<'_>> = letters_in
                .iter()
                .map(|letter| {
                    let e = &events[letter.index];
                    let data = as_json(&e.payload);
                    DeadLetterRow {
                        dedup_key: format!(
                            "{}/{}/{}/{}",
                            self.plugin, e.topic, e.partition, e.offset
                        ),
                        event_id: event_id(&data),
                        event_data: data,
                        error_type: letter.cause,
                        error_message: &letter.reason,
                        retry_count: letter.attempts,
                        status: "dead",
                        plugin: &self.plugin,
                        plugin_version: version,
                        output: None,
                        source_topic: Some(&e.topic),
                        source_partition: Some(e.partition),
                        source_offset: Some(e.offset),
                    }
                })
                .collect();
            self.write_rows(&rows).await?;
        }
        progress.table = true;
        Ok(written)
    }

    /// Writes output `records` their destination refused for good (`refused`: indexes into
    /// `records`, with why) to the topic (`progress` as for [`DeadLetters::send`]).
    pub async fn send_outputs(
        &self,
        records: &[OutputRecord],
        refused: &[Undeliverable],
        version: &str,
        progress: &mut Progress,
    ) -> Result<Written, DeadLetterError> {
        let letters: Vec<Letter<'_>> = refused
            .iter()
            .map(|u| {
                let r = &records[u.index];
                Letter {
                    key: r.key.as_deref(),
                    payload: &r.payload,
                    original: Vec::new(),
                    eddy: vec![
                        (headers::PLUGIN, self.plugin.clone()),
                        (headers::PLUGIN_VERSION, version.to_string()),
                        (headers::OUTPUT, r.output.clone()),
                        (
                            headers::REASON,
                            format!("output `{}` cannot be delivered: {}", r.output, u.reason),
                        ),
                    ],
                }
            })
            .collect();
        let written = match progress.topic {
            Some(written) => written,
            None => *progress.topic.insert(self.write(&letters).await?),
        };
        if self.table.is_some() && !progress.table {
            let reasons: Vec<String> = refused
                .iter()
                .map(|u| {
                    format!(
                        "output `{}` cannot be delivered: {}",
                        records[u.index].output, u.reason
                    )
                })
                .collect();
            let rows: Vec<DeadLetterRow<'_>> = refused
                .iter()
                .zip(&reasons)
                .map(|(u, reason)| {
                    let r = &records[u.index];
                    let data = as_json(&r.payload);
                    let digest = sha2::Sha256::digest(&r.payload);
                    DeadLetterRow {
                        dedup_key: format!(
                            "{}/output/{}/{}",
                            self.plugin,
                            r.output,
                            digest.iter().fold(String::with_capacity(64), |mut s, b| {
                                let _ = std::fmt::Write::write_fmt(&mut s, format_args!("{b:02x}"));
                                s
                            })
                        ),
                        event_id: event_id(&data),
                        event_data: data,
                        error_type: "output",
                        error_message: reason,
                        retry_count: 0,
                        status: "dead",
                        plugin: &self.plugin,
                        plugin_version: version,
                        output: Some(&r.output),
                        source_topic: None,
                        source_partition: None,
                        source_offset: None,
                    }
                })
                .collect();
            self.write_rows(&rows).await?;
        }
        progress.table = true;
        Ok(written)
    }

    /// Sends `letters` (whole, or stripped when refused whole for good) and waits for them.
    async fn write(&self, letters: &[Letter<'_>]) -> Result<Written, DeadLetterError> {
        let mut written = Written::default();
        let mut pending = Vec::with_capacity(letters.len());
        let mut strip = Vec::new();
        for (i, letter) in letters.iter().enumerate() {
            match send_one(&self.producer, self.record(letter, None)).map_err(|m| self.error(m))? {
                Ok(delivery) => pending.push((i, delivery)),
                Err(reason) => strip.push(Undeliverable { index: i, reason }),
            }
        }
        strip.extend(
            acknowledged(pending)
                .await
                .map_err(|e| self.unacknowledged(e))?,
        );
        if strip.is_empty() {
            return Ok(written);
        }
        let mut pending = Vec::with_capacity(strip.len());
        for u in &strip {
            let letter = &letters[u.index];
            let why = format!(
                "the dead letter ({} bytes of payload) was refused: {}",
                letter.payload.len(),
                u.reason
            );
            match send_one(&self.producer, self.record(letter, Some(&why)))
                .map_err(|m| self.error(m))?
            {
                Ok(delivery) => pending.push((u.index, delivery)),
                Err(reason) => self.lost(letter, &reason, &mut written),
            }
        }
        let sent = pending.len() as u64;
        let refused = acknowledged(pending)
            .await
            .map_err(|e| self.unacknowledged(e))?;
        written.without_payload += sent - refused.len() as u64;
        for u in refused {
            self.lost(&letters[u.index], &u.reason, &mut written);
        }
        Ok(written)
    }

    /// The record of `letter`; without payload and original headers if `dropped` says why.
    fn record<'a>(
        &'a self,
        letter: &'a Letter<'a>,
        dropped: Option<&'a str>,
    ) -> FutureRecord<'a, [u8], [u8]> {
        let mut h = OwnedHeaders::new_with_capacity(letter.original.len() + letter.eddy.len() + 1);
        if dropped.is_none() {
            for (key, value) in &letter.original {
                h = h.insert(Header { key, value: *value });
            }
        }
        for (key, value) in &letter.eddy {
            h = h.insert(Header {
                key,
                value: Some(value.as_str()),
            });
        }
        if let Some(why) = dropped {
            h = h.insert(Header {
                key: headers::PAYLOAD_DROPPED,
                value: Some(why),
            });
        }
        let mut record = FutureRecord::to(&self.topic).headers(h);
        if dropped.is_none() {
            record = record.payload(letter.payload);
        }
        if let Some(k) = letter.key {
            record = record.key(k);
        }
        record
    }

    fn lost(&self, letter: &Letter<'_>, reason: &str, written: &mut Written) {
        written.lost += 1;
        let header = |name: &str| {
            letter
                .eddy
                .iter()
                .find(|(k, _)| *k == name)
                .map_or("", |(_, v)| v.as_str())
        };
        tracing::error!(
            topic = %self.topic,
            source.partition = header(headers::SOURCE_PARTITION),
            source.offset = header(headers::SOURCE_OFFSET),
            output = header(headers::OUTPUT),
            dead_letter_reason = header(headers::REASON),
            "a dead letter cannot be written, even without its payload, and is lost: {reason}"
        );
    }

    fn unacknowledged(&self, e: Unacknowledged) -> DeadLetterError {
        match e {
            Unacknowledged::Refused(message) => self.error(message),
            Unacknowledged::TimedOut => {
                self.error(format!("no answer within {DELIVERY_TIMEOUT:?}"))
            }
        }
    }
}
