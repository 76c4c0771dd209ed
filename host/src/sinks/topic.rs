//! `{ topic = "name" }`: records produced to a Kafka topic with their key.

use super::{Delivery, Sink, SinkError, Unacknowledged, acknowledged};
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
        for r in records {
            let mut record = FutureRecord::to(&self.topic).payload(&r.payload);
            if let Some(k) = &r.key {
                record = record.key(k);
            }
            let delivery = self
                .producer
                .send_result(record)
                .map_err(|(e, _)| refused(e.to_string()))?;
            pending.push(delivery);
        }
        let output = output.to_string();
        Ok(Box::pin(async move {
            acknowledged(pending).await.map_err(|e| match e {
                Unacknowledged::Refused(message) => SinkError::Refused {
                    output,
                    destination,
                    message,
                },
                Unacknowledged::TimedOut => SinkError::TimedOut {
                    output,
                    destination,
                },
            })
        }))
    }
}
