//! `{ topic = "name" }`: records produced to a Kafka topic with their key.

use super::{Delivery, Sink, SinkError, Unacknowledged, Undeliverable, acknowledged, send_one};
use crate::wasm::OutputRecord;
use rdkafka::producer::{FutureProducer, FutureRecord};

pub struct Topic {
    topic: String,
    producer: FutureProducer,
}

impl Topic {
    pub fn new(topic: &str, producer: FutureProducer) -> Topic {
        Topic {
            topic: topic.to_string(),
            producer,
        }
    }
}

impl Sink for Topic {
    fn send(&self, output: &str, records: &[&OutputRecord]) -> Result<Delivery, SinkError> {
        let destination = format!("topic `{}`", self.topic);
        let refused = |message: String| SinkError::Refused {
            output: output.to_string(),
            destination: destination.clone(),
            message,
        };
        let mut pending = Vec::with_capacity(records.len());
        // Refused for good when sent (larger than the producer takes, say).
        let mut undeliverable = Vec::new();
        for (index, r) in records.iter().enumerate() {
            let mut record = FutureRecord::to(&self.topic).payload(&r.payload[..]);
            if let Some(k) = &r.key {
                record = record.key(&k[..]);
            }
            match send_one(&self.producer, record).map_err(refused)? {
                Ok(delivery) => pending.push((index, delivery)),
                Err(reason) => undeliverable.push(Undeliverable { index, reason }),
            }
        }
        let output = output.to_string();
        Ok(Box::pin(async move {
            let mut later = acknowledged(pending).await.map_err(|e| match e {
                Unacknowledged::Refused(message) => SinkError::Refused {
                    output,
                    destination,
                    message,
                },
                Unacknowledged::TimedOut => SinkError::TimedOut {
                    output,
                    destination,
                },
            })?;
            undeliverable.append(&mut later);
            Ok(undeliverable)
        }))
    }
}
