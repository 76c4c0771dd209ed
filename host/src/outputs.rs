//! Delivering what plugins produce: emitted records to their mapped destination, and
//! dead-lettered events to the plugin's dead-letter topic.
//!
//! Delivery is at-least-once: the worker stores an event's offset only after everything the
//! event caused has been delivered, and retries a failed delivery rather than move on.

use crate::config::{OutputTarget, PluginConfig};
use crate::sandbox::{Event, OutputRecord};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

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
    pub index: usize,
    pub reason: String,
    pub attempts: u32,
}

/// Where one plugin's records go.
pub struct Outputs {
    plugin: String,
    routes: BTreeMap<String, OutputTarget>,
    dead_letter_topic: String,
    producer: FutureProducer,
}

/// How long one delivery may take before it counts as failed (and is retried).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

impl Outputs {
    pub fn new(plugin: &PluginConfig, producer: FutureProducer) -> Outputs {
        Outputs {
            plugin: plugin.name.clone(),
            routes: plugin.outputs.clone(),
            dead_letter_topic: plugin.dead_letter_topic(),
            producer,
        }
    }

    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    pub fn dead_letter_topic(&self) -> &str {
        &self.dead_letter_topic
    }

    /// Delivers `records` (all of them, or an error naming the first failure). Records to
    /// Kafka are sent together and then awaited, so a batch costs one round trip.
    pub async fn deliver(&self, records: &[OutputRecord]) -> anyhow::Result<()> {
        let mut pending = Vec::new();
        let mut stdout = String::new();
        for r in records {
            // The sandbox refuses unmapped names at `emit`, so every record has a route.
            match self.routes.get(&r.output) {
                Some(OutputTarget::Topic(topic)) => {
                    let mut record = FutureRecord::to(topic).payload(&r.payload);
                    if let Some(k) = &r.key {
                        record = record.key(k);
                    }
                    let delivery = self.producer.send_result(record).map_err(|(e, _)| {
                        anyhow::anyhow!("output `{}` → topic `{topic}`: {e}", r.output)
                    })?;
                    pending.push((topic, delivery));
                }
                Some(OutputTarget::Stdout) => {
                    let payload = String::from_utf8_lossy(&r.payload);
                    stdout.push_str(&format!("[{}/{}] {}\n", self.plugin, r.output, payload));
                }
                Some(OutputTarget::Discard) | None => {}
            }
        }
        if !stdout.is_empty() {
            // One write per batch, so lines of different plugins do not interleave.
            let mut out = std::io::stdout().lock();
            out.write_all(stdout.as_bytes())?;
            out.flush()?;
        }
        for (topic, delivery) in pending {
            match tokio::time::timeout(DELIVERY_TIMEOUT, delivery).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err((e, _)))) => anyhow::bail!("delivering to topic `{topic}`: {e}"),
                Ok(Err(_)) => {
                    anyhow::bail!("delivering to topic `{topic}`: the producer went away")
                }
                Err(_) => anyhow::bail!(
                    "delivering to topic `{topic}`: no answer within {DELIVERY_TIMEOUT:?}"
                ),
            }
        }
        Ok(())
    }

    /// Writes dead-lettered events to the dead-letter topic with their original key,
    /// payload and headers, plus headers saying where they came from and why.
    pub async fn dead_letter(
        &self,
        events: &[Event],
        letters: &[DeadLetter],
        version: &str,
    ) -> anyhow::Result<()> {
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
            h = h
                .insert(Header {
                    key: headers::SOURCE_TOPIC,
                    value: Some(e.topic.as_str()),
                })
                .insert(Header {
                    key: headers::SOURCE_PARTITION,
                    value: Some(partition.as_str()),
                })
                .insert(Header {
                    key: headers::SOURCE_OFFSET,
                    value: Some(offset.as_str()),
                })
                .insert(Header {
                    key: headers::PLUGIN,
                    value: Some(self.plugin.as_str()),
                })
                .insert(Header {
                    key: headers::PLUGIN_VERSION,
                    value: Some(version),
                })
                .insert(Header {
                    key: headers::REASON,
                    value: Some(letter.reason.as_str()),
                })
                .insert(Header {
                    key: headers::ATTEMPTS,
                    value: Some(attempts.as_str()),
                });
            let mut record = FutureRecord::to(&self.dead_letter_topic)
                .payload(&e.payload)
                .headers(h);
            if let Some(k) = &e.key {
                record = record.key(k);
            }
            let delivery = self.producer.send_result(record).map_err(|(err, _)| {
                anyhow::anyhow!("dead-letter topic `{}`: {err}", self.dead_letter_topic)
            })?;
            pending.push(delivery);
        }
        for delivery in pending {
            match tokio::time::timeout(DELIVERY_TIMEOUT, delivery).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err((e, _)))) => {
                    anyhow::bail!("dead-letter topic `{}`: {e}", self.dead_letter_topic)
                }
                Ok(Err(_)) => anyhow::bail!(
                    "dead-letter topic `{}`: the producer went away",
                    self.dead_letter_topic
                ),
                Err(_) => anyhow::bail!(
                    "dead-letter topic `{}`: no answer within {DELIVERY_TIMEOUT:?}",
                    self.dead_letter_topic
                ),
            }
        }
        Ok(())
    }
}
