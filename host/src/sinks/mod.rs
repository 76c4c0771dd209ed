//! Where what plugins produce goes: each output `plugins.toml` maps is a [`Sink`] (standard
//! output, a Kafka topic, or nothing), and every plugin has a dead-letter topic.
//!
//! Delivery is at-least-once: the worker stores an event's offset only after everything the
//! event caused has been delivered, and retries a failed delivery rather than move on. A new
//! kind of destination is a new [`Sink`] and a new arm in [`sink_for`], nothing else.
//!
//! Except for what retrying cannot fix ([`is_permanent`]: a record larger than the producer
//! or the topic takes, a topic that does not exist, no right to write to it): such a record
//! is [`Undeliverable`], and the worker writes it to the plugin's dead-letter topic with the
//! reason instead of retrying forever (a plugin wedged on one record for good).

pub mod dead_letter;
pub mod postgres;
pub mod stdout;
pub mod topic;

pub use dead_letter::{DeadLetter, DeadLetters, Progress, Written, headers};
pub use postgres::Databases;

use crate::config::{OutputTarget, PluginConfig};
use crate::event::Event;
use crate::wasm::OutputRecord;
use rdkafka::producer::FutureProducer;
use rdkafka::types::RDKafkaErrorCode;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// How long one delivery may take before it counts as failed (and is retried).
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why records did not reach their destination. Every one is retried by the worker.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("output `{output}` → {destination}: {message}")]
    Refused {
        output: String,
        destination: String,
        message: String,
    },
    #[error("output `{output}` → {destination}: no answer within {DELIVERY_TIMEOUT:?}")]
    TimedOut { output: String, destination: String },
    #[error("output `{output}` → standard output: {source}")]
    Stdout {
        output: String,
        source: std::io::Error,
    },
}

/// Why records sent to Kafka were not acknowledged.
#[derive(Debug)]
pub(crate) enum Unacknowledged {
    /// The broker (or the producer) refused one, for now: why.
    Refused(String),
    /// No answer within [`DELIVERY_TIMEOUT`].
    TimedOut,
}

/// Whether a producer error is for good: retrying the same record cannot succeed.
pub fn is_permanent(code: Option<RDKafkaErrorCode>) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        Some(
            C::MessageSizeTooLarge
                | C::InvalidMessageSize
                | C::InvalidMessage
                | C::InvalidRecord
                | C::UnknownTopic
                | C::UnknownTopicOrPartition
                | C::InvalidTopic
                | C::TopicAuthorizationFailed
                | C::ClusterAuthorizationFailed
                | C::PolicyViolation
                | C::InvalidArgument
        )
    )
}

/// A record a destination refused for good: its index among the records sent, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undeliverable {
    pub index: usize,
    pub reason: String,
}

/// Sends one record: `Ok(None)` on its way, `Ok(Some(why))` refused for good at once (too
/// large, say), `Err(why)` refused for now.
pub(crate) fn send_one(
    producer: &FutureProducer,
    record: rdkafka::producer::FutureRecord<'_, [u8], [u8]>,
) -> Result<Result<rdkafka::producer::DeliveryFuture, String>, String> {
    match producer.send_result(record) {
        Ok(delivery) => Ok(Ok(delivery)),
        Err((e, _)) if is_permanent(e.rdkafka_error_code()) => Ok(Err(e.to_string())),
        Err((e, _)) => Err(e.to_string()),
    }
}

/// Waits until the broker has acknowledged every record of `pending` (sent together, so a
/// batch costs one round trip; each with its index). Returns the records refused for good,
/// or the first failure that may go away (the caller sends everything again).
pub(crate) async fn acknowledged(
    pending: Vec<(usize, rdkafka::producer::DeliveryFuture)>,
) -> Result<Vec<Undeliverable>, Unacknowledged> {
    let mut refused = Vec::new();
    for (index, delivery) in pending {
        match tokio::time::timeout(DELIVERY_TIMEOUT, delivery).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err((e, _)))) if is_permanent(e.rdkafka_error_code()) => {
                refused.push(Undeliverable {
                    index,
                    reason: e.to_string(),
                });
            }
            Ok(Ok(Err((e, _)))) => return Err(Unacknowledged::Refused(e.to_string())),
            Ok(Err(_)) => {
                return Err(Unacknowledged::Refused("the producer went away".into()));
            }
            Err(_) => return Err(Unacknowledged::TimedOut),
        }
    }
    Ok(refused)
}

/// Records on their way: resolves once every one of them is where it was sent, or refused
/// for good (those are returned, with their index among the records sent).
pub type Delivery =
    Pin<Box<dyn Future<Output = Result<Vec<Undeliverable>, SinkError>> + Send + 'static>>;

/// A destination for one output's records.
pub trait Sink: Send + Sync {
    /// Hands `records` (all emitted to `output`, in order) to the destination and returns
    /// the wait for its acknowledgement. Sending is not waiting: the caller starts every
    /// output's delivery, then waits for them together, so a batch costs one round trip.
    fn send(&self, output: &str, records: &[&OutputRecord]) -> Result<Delivery, SinkError>;
}

/// The sink for one `[plugin.outputs]` entry of `plugin`.
pub fn sink_for(
    plugin: &str,
    target: &OutputTarget,
    producer: &FutureProducer,
    databases: &Databases,
) -> Arc<dyn Sink> {
    match target {
        OutputTarget::Postgres(table) => Arc::new(postgres::Table::new(databases, table)),
        OutputTarget::Stdout => Arc::new(stdout::Stdout::new(plugin)),
        OutputTarget::Discard => Arc::new(Discard),
        OutputTarget::Topic(topic) => Arc::new(topic::Topic::new(topic, producer.clone())),
    }
}

/// `"discard"`: records are dropped (and counted, as every output record is).
struct Discard;

impl Sink for Discard {
    fn send(&self, _: &str, _: &[&OutputRecord]) -> Result<Delivery, SinkError> {
        Ok(Box::pin(async { Ok(Vec::new()) }))
    }
}

/// Where one plugin's records go: a sink per output name, and its dead-letter topic.
pub struct Outputs {
    routes: BTreeMap<String, Arc<dyn Sink>>,
    dead_letters: DeadLetters,
    producer: FutureProducer,
    databases: Databases,
}

impl Outputs {
    pub fn new(plugin: &PluginConfig, producer: FutureProducer, databases: Databases) -> Outputs {
        Outputs {
            routes: plugin
                .outputs
                .iter()
                .map(|(name, target)| {
                    (
                        name.clone(),
                        sink_for(&plugin.name, target, &producer, &databases),
                    )
                })
                .collect(),
            dead_letters: DeadLetters::new(
                &plugin.name,
                plugin.dead_letter_topic(),
                producer.clone(),
            )
            .with_table(plugin.dead_letter_table.as_ref().map(|t| {
                postgres::TableWriter::new(
                    &databases,
                    &crate::config::TableTarget {
                        postgres: t.postgres.clone(),
                        table: t.table.clone(),
                        mode: crate::config::WriteMode::InsertIfAbsent,
                        key: vec!["dedup_key".into()],
                    },
                )
            })),
            producer,
            databases,
        }
    }

    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    pub fn databases(&self) -> &Databases {
        &self.databases
    }

    /// Delivers `records` (all of them, or an error naming the first failure that may go
    /// away): each output's records go to its sink together, and the deliveries are awaited
    /// together. Returns the records refused for good (index into `records`, and why).
    pub async fn deliver(&self, records: &[OutputRecord]) -> Result<Vec<Undeliverable>, SinkError> {
        let mut by_output: BTreeMap<&str, (Vec<usize>, Vec<&OutputRecord>)> = BTreeMap::new();
        for (i, r) in records.iter().enumerate() {
            let (indexes, records) = by_output.entry(r.output.as_str()).or_default();
            indexes.push(i);
            records.push(r);
        }
        let mut pending = Vec::with_capacity(by_output.len());
        for (output, (indexes, records)) in by_output {
            // The sandbox refuses unmapped names at `emit`, so every record has a route.
            if let Some(sink) = self.routes.get(output) {
                pending.push((indexes, sink.send(output, &records)?));
            }
        }
        let mut refused = Vec::new();
        for (indexes, delivery) in pending {
            for u in delivery.await? {
                refused.push(Undeliverable {
                    index: indexes[u.index],
                    reason: u.reason,
                });
            }
        }
        Ok(refused)
    }

    /// Writes output records their destination refused for good to the dead-letter topic
    /// (`progress`: what earlier tries of them got through, see [`Progress`]).
    pub async fn dead_letter_outputs(
        &self,
        records: &[OutputRecord],
        refused: &[Undeliverable],
        version: &str,
        progress: &mut Progress,
    ) -> Result<dead_letter::Written, dead_letter::DeadLetterError> {
        self.dead_letters
            .send_outputs(records, refused, version, progress)
            .await
    }

    /// Writes dead-lettered events to the plugin's dead-letter topic (see [`DeadLetters`];
    /// `progress` as for [`Outputs::dead_letter_outputs`]).
    pub async fn dead_letter(
        &self,
        events: &[Event],
        letters: &[DeadLetter],
        version: &str,
        progress: &mut Progress,
    ) -> Result<dead_letter::Written, dead_letter::DeadLetterError> {
        self.dead_letters
            .send(events, letters, version, progress)
            .await
    }
}
