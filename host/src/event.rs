//! One Kafka record as the host holds it between consuming it and storing its offset: what
//! the consumer produces, the sandbox packs into a plugin call, and a dead letter copies.

use bytes::Bytes;
use std::sync::Arc;

/// A consumed record. Cheap to clone: its topic name and bytes are shared, so the shared
/// fetch hands one copy of an event to every plugin that reads it.
#[derive(Debug, Clone)]
pub struct Event {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// Kafka's record timestamp in milliseconds since the Unix epoch, if it has one.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Bytes>,
    pub headers: Vec<Header>,
    pub payload: Bytes,
}

/// A Kafka record header; `None` is a header with no value (not an empty one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub key: String,
    pub value: Option<Vec<u8>>,
}

impl Event {
    /// Roughly the bytes the event takes in a plugin's memory.
    pub fn size(&self) -> usize {
        self.payload.len()
            + self.key.as_ref().map_or(0, Bytes::len)
            + self
                .headers
                .iter()
                .map(|h| h.key.len() + h.value.as_ref().map_or(0, Vec::len))
                .sum::<usize>()
    }
}
