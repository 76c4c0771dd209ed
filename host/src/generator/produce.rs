//! Writing generated events to a Kafka topic, at a given rate or as fast as the broker takes
//! them, counting exactly what reached the topic.
//!
//! The producer is idempotent, so librdkafka's retries never write an event twice. An event
//! whose delivery failed while its request was in flight (the broker stalled past
//! `message.timeout.ms`) may still have been written: librdkafka reports it "possibly
//! persisted". Those are looked up in the topic after the run, so the count of undelivered
//! events is what is missing from the topic, not a guess.

use super::{Generator, GeneratorOptions};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What `produce` writes, and how fast.
#[derive(Debug, Clone)]
pub struct ProduceOptions {
    pub topic: String,
    /// Stop after this many events; `None` runs until `stop` is set.
    pub events: Option<u64>,
    /// Events per second; 0 for as fast as the broker takes them.
    pub rate: u32,
    pub generator: GeneratorOptions,
}

/// Events that are not in the topic although `produce` sent them: the error
/// [`produce_blocking`] returns (inside its `anyhow::Error`) when any delivery failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Undelivered {
    pub topic: String,
    /// Events handed to the producer.
    pub sent: u64,
    /// Events that are not in the topic (checked there when librdkafka could not tell).
    pub missing: u64,
    /// Events whose fate is unknown: their delivery timed out in flight and the topic could
    /// not be read back to check. 0 unless the broker stayed unreachable.
    pub unknown: u64,
    /// The first delivery error librdkafka reported.
    pub first_error: String,
}

impl std::fmt::Display for Undelivered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} events were not delivered to `{}`",
            self.missing, self.sent, self.topic
        )?;
        if self.unknown > 0 {
            write!(
                f,
                " and {} more may or may not have been (their delivery timed out and the topic \
                 could not be read back to check)",
                self.unknown
            )?;
        }
        write!(f, ": {}", self.first_error)
    }
}

impl std::error::Error for Undelivered {}

/// What the delivery reports said, gathered for the end of the run.
#[derive(Default)]
struct Failures {
    /// Failed and certainly not written.
    not_persisted: u64,
    /// Failed in flight: written or not. Their payloads, per partition, to look for.
    possibly_persisted: BTreeMap<i32, Vec<Vec<u8>>>,
    first_error: Option<String>,
}

struct DeliveryCounter {
    failures: Arc<Mutex<Failures>>,
}

impl rdkafka::ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let Err((e, message)) = result else { return };
        // SAFETY: the message is alive for the whole callback; rd_kafka_message_status only
        // reads it.
        let status = unsafe { rdkafka::bindings::rd_kafka_message_status(message.ptr()) };
        let mut failures = self.failures.lock().expect("lock");
        failures.first_error.get_or_insert_with(|| e.to_string());
        match status {
            rdkafka::bindings::rd_kafka_msg_status_t::RD_KAFKA_MSG_STATUS_NOT_PERSISTED => {
                failures.not_persisted += 1;
            }
            _ => failures
                .possibly_persisted
                .entry(message.partition())
                .or_default()
                .push(message.payload().unwrap_or_default().to_vec()),
        }
    }
}

/// Writes generated events to Kafka. Blocking: call it from a thread of its own (or
/// `spawn_blocking`). Returns how many events were delivered; if any was not, the error
/// holds an [`Undelivered`] with the exact count.
pub fn produce_blocking(
    client: &ClientConfig,
    opts: &ProduceOptions,
    stop: &AtomicBool,
    produced: &AtomicU64,
) -> anyhow::Result<u64> {
    let failures = Arc::new(Mutex::new(Failures::default()));
    let mut config = client.clone();
    if config.get("linger.ms").is_none() {
        config.set("linger.ms", "5");
    }
    if config.get("message.timeout.ms").is_none() {
        config.set("message.timeout.ms", "30000");
    }
    // Retries after a lost acknowledgement must not write an event twice.
    config.set("enable.idempotence", "true");
    let producer: BaseProducer<DeliveryCounter> = config
        .create_with_context(DeliveryCounter {
            failures: failures.clone(),
        })
        .map_err(|e| anyhow::anyhow!("cannot create a Kafka producer: {e}"))?;
    // Where this run's events start in each partition, to look for the doubtful ones.
    let starts = end_offsets(producer.client(), &opts.topic);
    let started = Instant::now();
    let mut sent = 0u64;
    for event in Generator::new(opts.generator.clone()) {
        if opts.events.is_some_and(|n| sent >= n) || stop.load(Ordering::Relaxed) {
            break;
        }
        if opts.rate > 0 {
            let due = started + Duration::from_secs_f64(sent as f64 / f64::from(opts.rate));
            let now = Instant::now();
            if due > now {
                producer.poll(Duration::ZERO);
                std::thread::sleep(due - now);
            }
        }
        let mut record = BaseRecord::to(&opts.topic)
            .key(event.key.as_bytes())
            .payload(&event.payload);
        if opts.generator.event_timestamps {
            record = record.timestamp(event.time_ms);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((e, r))
                    if e.rdkafka_error_code()
                        == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                {
                    record = r;
                    producer.poll(Duration::from_millis(20));
                }
                Err((e, _)) => anyhow::bail!("cannot produce to `{}`: {e}", opts.topic),
            }
        }
        sent += 1;
        produced.fetch_add(1, Ordering::Relaxed);
        producer.poll(Duration::ZERO);
    }
    producer
        .flush(Duration::from_secs(60))
        .map_err(|e| anyhow::anyhow!("flushing produced events: {e}"))?;
    drop(producer);
    let failures = std::mem::take(&mut *failures.lock().expect("lock"));
    let Some(first_error) = failures.first_error else {
        return Ok(sent);
    };
    let doubtful: u64 = failures
        .possibly_persisted
        .values()
        .map(|p| p.len() as u64)
        .sum();
    let (missing, unknown) = if doubtful == 0 {
        (0, 0)
    } else {
        match find_in_topic(client, &opts.topic, &starts, failures.possibly_persisted) {
            Ok(absent) => (absent, 0),
            Err(e) => {
                tracing::warn!(
                    "cannot read `{}` back to check deliveries: {e:#}",
                    opts.topic
                );
                (0, doubtful)
            }
        }
    };
    let missing = failures.not_persisted + missing;
    if missing + unknown == 0 {
        return Ok(sent);
    }
    Err(Undelivered {
        topic: opts.topic.clone(),
        sent,
        missing,
        unknown,
        first_error,
    }
    .into())
}

/// Each partition's end offset now; empty when the topic cannot be seen (it does not exist
/// yet, or the broker is unreachable): then every partition is read from its start.
fn end_offsets<C: rdkafka::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
) -> HashMap<i32, i64> {
    let timeout = Duration::from_secs(5);
    let Ok(metadata) = client.fetch_metadata(Some(topic), timeout) else {
        return HashMap::new();
    };
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    partitions
        .into_iter()
        .filter_map(|p| {
            let (_, high) = client.fetch_watermarks(topic, p, timeout).ok()?;
            Some((p, high))
        })
        .collect()
}

/// Reads each partition that has doubtful events, from where this run started to its end,
/// and returns how many of those events are not there.
fn find_in_topic(
    client: &ClientConfig,
    topic: &str,
    starts: &HashMap<i32, i64>,
    mut doubtful: BTreeMap<i32, Vec<Vec<u8>>>,
) -> anyhow::Result<u64> {
    let timeout = Duration::from_secs(10);
    let consumer: BaseConsumer = client
        .clone()
        .set("group.id", "eddy-produce-check")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()?;
    let mut assignment = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for &partition in doubtful.keys() {
        let (low, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
        let start = starts.get(&partition).copied().unwrap_or(low).max(low);
        if start < high {
            assignment.add_partition_offset(topic, partition, Offset::Offset(start))?;
            ends.insert(partition, high);
        }
    }
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ends.is_empty() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "reading back took longer than a minute"
        );
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let message = message?;
            if let (Some(payloads), Some(payload)) =
                (doubtful.get_mut(&message.partition()), message.payload())
                && let Some(i) = payloads.iter().position(|p| p == payload)
            {
                payloads.swap_remove(i);
            }
        }
        // Done with a partition once its end is reached or nothing is left to look for.
        let positions = consumer.position()?;
        ends.retain(|partition, end| {
            let at = positions
                .find_partition(topic, *partition)
                .and_then(|e| e.offset().to_raw())
                .unwrap_or(-1);
            at < *end && doubtful.get(partition).is_some_and(|p| !p.is_empty())
        });
    }
    Ok(doubtful.values().map(|p| p.len() as u64).sum())
}
