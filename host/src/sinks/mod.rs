//! Where what plugins produce goes: each output `plugins.toml` maps is a [`Sink`] (standard
//! output, a Kafka topic, or nothing), and every plugin has a dead-letter topic.
//!
//! Delivery is at-least-once: the worker stores an event's offset only after everything the
//! event caused has been delivered, and retries a failed delivery rather than move on. A new
//! kind of destination is a new [`Sink`] and a new arm in [`sink_for`], nothing else.

pub mod dead_letter;
pub mod stdout;
pub mod topic;

pub use dead_letter::{DeadLetter, DeadLetters, headers};

use crate::config::{OutputTarget, PluginConfig};
use crate::event::Event;
use crate::wasm::OutputRecord;
use rdkafka::producer::FutureProducer;
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
    /// The broker (or the producer) refused one: why.
    Refused(String),
    /// No answer within [`DELIVERY_TIMEOUT`].
    TimedOut,
}

/// Waits until the broker has acknowledged every record of `pending` (sent together, so a
/// batch costs one round trip); the first that was not.
pub(crate) async fn acknowledged(
    pending: Vec<rdkafka::producer::DeliveryFuture>,
) -> Result<(), Unacknowledged> {
    for delivery in pending {
        match tokio::time::timeout(DELIVERY_TIMEOUT, delivery).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err((e, _)))) => return Err(Unacknowledged::Refused(e.to_string())),
            Ok(Err(_)) => {
                return Err(Unacknowledged::Refused("the producer went away".into()));
            }
            Err(_) => return Err(Unacknowledged::TimedOut),
        }
    }
    Ok(())
}

/// Records on their way: resolves once every one of them is where it was sent.
pub type Delivery = Pin<Box<dyn Future<Output = Result<(), SinkError>> + Send + 'static>>;

/// A destination for one output's records.
pub trait Sink: Send + Sync {
    /// Hands `records` (all emitted to `output`, in order) to the destination and returns
    /// the wait for its acknowledgement. Sending is not waiting: the caller starts every
    /// output's delivery, then waits for them together, so a batch costs one round trip.
    fn send(&self, output: &str, records: &[&OutputRecord]) -> Result<Delivery, SinkError>;
}

/// The sink for one `[plugin.outputs]` entry of `plugin`.
pub fn sink_for(plugin: &str, target: &OutputTarget, producer: &FutureProducer) -> Arc<dyn Sink> {
    match target {
        OutputTarget::Stdout => Arc::new(stdout::Stdout::new(plugin)),
        OutputTarget::Discard => Arc::new(Discard),
        OutputTarget::Topic(topic) => Arc::new(topic::Topic::new(topic, producer.clone())),
    }
}

/// `"discard"`: records are dropped (and counted, as every output record is).
struct Discard;

impl Sink for Discard {
    fn send(&self, _: &str, _: &[&OutputRecord]) -> Result<Delivery, SinkError> {
        Ok(Box::pin(async { Ok(()) }))
    }
}

/// Where one plugin's records go: a sink per output name, and its dead-letter topic.
pub struct Outputs {
    routes: BTreeMap<String, Arc<dyn Sink>>,
    dead_letters: DeadLetters,
    producer: FutureProducer,
}

impl Outputs {
    pub fn new(plugin: &PluginConfig, producer: FutureProducer) -> Outputs {
        Outputs {
            routes: plugin
                .outputs
                .iter()
                .map(|(name, target)| (name.clone(), sink_for(&plugin.name, target, &producer)))
                .collect(),
            dead_letters: DeadLetters::new(
                &plugin.name,
                plugin.dead_letter_topic(),
                producer.clone(),
            ),
            producer,
        }
    }

    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }

    /// Delivers `records` (all of them, or an error naming the first failure): each output's
    /// records go to its sink together, and the deliveries are awaited together.
    pub async fn deliver(&self, records: &[OutputRecord]) -> Result<(), SinkError> {
        let mut by_output: BTreeMap<&str, Vec<&OutputRecord>> = BTreeMap::new();
        for r in records {
            by_output.entry(r.output.as_str()).or_default().push(r);
        }
        let mut pending = Vec::with_capacity(by_output.len());
        for (output, records) in by_output {
            // The sandbox refuses unmapped names at `emit`, so every record has a route.
            if let Some(sink) = self.routes.get(output) {
                pending.push(sink.send(output, &records)?);
            }
        }
        for delivery in pending {
            delivery.await?;
        }
        Ok(())
    }

    /// Writes dead-lettered events to the plugin's dead-letter topic (see [`DeadLetters`]).
    pub async fn dead_letter(
        &self,
        events: &[Event],
        letters: &[DeadLetter],
        version: &str,
    ) -> Result<(), dead_letter::DeadLetterError> {
        self.dead_letters.send(events, letters, version).await
    }
}
