//! Writing generated events to a Kafka topic, at a given rate or as fast as the broker takes
//! them, counting what the broker acknowledged.

use super::{Generator, GeneratorOptions};
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// Counts failed deliveries, which `produce` reports as an error.
struct DeliveryCounter {
    failed: Arc<AtomicU64>,
    first_error: Arc<std::sync::Mutex<Option<String>>>,
}

impl rdkafka::ClientContext for DeliveryCounter {}

impl ProducerContext for DeliveryCounter {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            self.first_error
                .lock()
                .expect("lock")
                .get_or_insert_with(|| e.to_string());
        }
    }
}

/// Writes generated events to Kafka. Blocking: call it from a thread of its own (or
/// `spawn_blocking`). Returns how many events were delivered.
pub fn produce_blocking(
    client: &ClientConfig,
    opts: &ProduceOptions,
    stop: &AtomicBool,
    produced: &AtomicU64,
) -> anyhow::Result<u64> {
    let failed = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None));
    let mut client = client.clone();
    if client.get("linger.ms").is_none() {
        client.set("linger.ms", "5");
    }
    client.set("message.timeout.ms", "30000");
    let producer: BaseProducer<DeliveryCounter> = client
        .create_with_context(DeliveryCounter {
            failed: failed.clone(),
            first_error: first_error.clone(),
        })
        .map_err(|e| anyhow::anyhow!("cannot create a Kafka producer: {e}"))?;
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
    let failed = failed.load(Ordering::Relaxed);
    if failed > 0 {
        let first = first_error
            .lock()
            .expect("lock")
            .clone()
            .unwrap_or_default();
        anyhow::bail!(
            "{failed} of {sent} events were not delivered to `{}`: {first}",
            opts.topic
        );
    }
    Ok(sent)
}
