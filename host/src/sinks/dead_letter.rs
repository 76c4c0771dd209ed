//! A plugin's dead-letter topic: events it gave up on, with their original key, payload and
//! headers, plus headers saying where they came from and why.

use super::{DELIVERY_TIMEOUT, Unacknowledged, acknowledged};
use crate::event::Event;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

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
}

/// An event to dead-letter, with why.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Its index in the batch's events.
    pub index: usize,
    pub reason: String,
    pub attempts: u32,
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
}

impl DeadLetters {
    pub fn new(plugin: &str, topic: String, producer: FutureProducer) -> DeadLetters {
        DeadLetters {
            plugin: plugin.to_string(),
            topic,
            producer,
        }
    }

    fn error(&self, message: impl Into<String>) -> DeadLetterError {
        DeadLetterError {
            topic: self.topic.clone(),
            message: message.into(),
        }
    }

    /// Writes the `letters` (indexes into `events`) to the topic, and waits until the
    /// broker has them all.
    pub async fn send(
        &self,
        events: &[Event],
        letters: &[DeadLetter],
        version: &str,
    ) -> Result<(), DeadLetterError> {
        let mut pending = Vec::new();
        for letter in letters {
            let e = &events[letter.index];
            let mut h = OwnedHeaders::new_with_capacity(e.headers.len() + 7);
            for original in &e.headers {
                h = h.insert(Header {
                    key: &original.key,
                    value: original.value.as_deref(),
                });
            }
            let (partition, offset, attempts) = (
                e.partition.to_string(),
                e.offset.to_string(),
                letter.attempts.to_string(),
            );
            for (key, value) in [
                (headers::SOURCE_TOPIC, &*e.topic),
                (headers::SOURCE_PARTITION, partition.as_str()),
                (headers::SOURCE_OFFSET, offset.as_str()),
                (headers::PLUGIN, self.plugin.as_str()),
                (headers::PLUGIN_VERSION, version),
                (headers::REASON, letter.reason.as_str()),
                (headers::ATTEMPTS, attempts.as_str()),
            ] {
                h = h.insert(Header {
                    key,
                    value: Some(value),
                });
            }
            let mut record = FutureRecord::to(&self.topic)
                .payload(&e.payload[..])
                .headers(h);
            if let Some(k) = &e.key {
                record = record.key(&k[..]);
            }
            let delivery = self
                .producer
                .send_result(record)
                .map_err(|(err, _)| self.error(err.to_string()))?;
            pending.push(delivery);
        }
        acknowledged(pending).await.map_err(|e| match e {
            Unacknowledged::Refused(message) => self.error(message),
            Unacknowledged::TimedOut => {
                self.error(format!("no answer within {DELIVERY_TIMEOUT:?}"))
            }
        })
    }
}
