//! Packing events into the contract's `batch`, column by column (see `batch` in
//! `wit/eddy.wit`), into buffers reused from call to call.

use super::bindings::eddy::plugin::types::{Batch, Header};
use crate::event::Event;

pub(crate) fn empty_batch() -> Batch {
    Batch {
        topic: String::new(),
        partitions: Vec::new(),
        offsets: Vec::new(),
        timestamps_ms: Vec::new(),
        host_time_ms: 0,
        max_ahead_ms: 0,
        key_lens: Vec::new(),
        payload_lens: Vec::new(),
        header_counts: Vec::new(),
        data: Vec::new(),
        headers: Vec::new(),
    }
}

/// Packs `events` (all of one topic) into `batch`, column by column (see `batch` in
/// `wit/eddy.wit`), reusing its buffers: after the first few calls, packing allocates
/// nothing. `host_time_ms` and `max_ahead_ms` tell the plugin how far ahead of the host's
/// clock an event's time is believed.
pub(crate) fn pack(batch: &mut Batch, events: &[Event], host_time_ms: i64, max_ahead_ms: i64) {
    batch.host_time_ms = host_time_ms;
    batch.max_ahead_ms = max_ahead_ms;
    let topic = events.first().map_or("", |e| &*e.topic);
    if batch.topic != topic {
        batch.topic = topic.to_string();
    }
    batch.partitions.clear();
    batch.offsets.clear();
    batch.timestamps_ms.clear();
    batch.key_lens.clear();
    batch.payload_lens.clear();
    batch.header_counts.clear();
    batch.data.clear();
    batch.headers.clear();
    // Lengths are 32-bit: a batch is cut well below 4 GiB (`max_batch_bytes`), and the
    // guest's memory cap is lower still, so these conversions cannot truncate a batch that
    // fits. -1 is Kafka's own "none" for a timestamp and a key.
    for e in events {
        batch.partitions.push(e.partition);
        batch.offsets.push(e.offset);
        batch.timestamps_ms.push(e.timestamp_ms.unwrap_or(-1));
        match &e.key {
            Some(key) => {
                batch.key_lens.push(key.len() as i32);
                batch.data.extend_from_slice(key);
            }
            None => batch.key_lens.push(-1),
        }
        batch.payload_lens.push(e.payload.len() as u32);
        batch.data.extend_from_slice(&e.payload);
        batch.header_counts.push(e.headers.len() as u32);
        batch.headers.extend(e.headers.iter().map(|h| Header {
            key: h.key.clone(),
            value: h.value.clone(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event;

    #[test]
    fn packing_keeps_each_events_bytes_and_reuses_the_buffers() {
        let event = |offset: i64, key: Option<&[u8]>, payload: &[u8], headers: usize| Event {
            topic: "t".into(),
            partition: 2,
            offset,
            timestamp_ms: Some(offset * 10),
            key: key.map(bytes::Bytes::copy_from_slice),
            headers: (0..headers)
                .map(|i| event::Header {
                    key: format!("h{i}"),
                    value: (i % 2 == 0).then(|| vec![i as u8]),
                })
                .collect(),
            payload: payload.to_vec().into(),
        };
        let events = [
            event(7, Some(b"k1"), b"{\"a\":1}", 0),
            event(8, None, b"", 2),
            event(9, Some(b""), b"xyz", 1),
        ];
        let mut batch = empty_batch();
        for _ in 0..2 {
            pack(&mut batch, &events, 1_000, 300_000);
            assert_eq!(batch.topic, "t");
            assert_eq!(batch.partitions, [2, 2, 2]);
            assert_eq!(batch.offsets, [7, 8, 9]);
            assert_eq!(batch.timestamps_ms, [70, 80, 90]);
            // No key is -1, an empty key 0.
            assert_eq!(batch.key_lens, [2, -1, 0]);
            assert_eq!(batch.payload_lens, [7, 0, 3]);
            assert_eq!(batch.data, b"k1{\"a\":1}xyz");
            assert_eq!(batch.header_counts, [0, 2, 1]);
            let headers: Vec<_> = events.iter().flat_map(|e| e.headers.clone()).collect();
            assert_eq!(
                batch
                    .headers
                    .iter()
                    .map(|h| (&h.key, &h.value))
                    .collect::<Vec<_>>(),
                headers
                    .iter()
                    .map(|h| (&h.key, &h.value))
                    .collect::<Vec<_>>()
            );
        }
        // A record without a timestamp is -1, Kafka's own encoding.
        let mut untimed = events[0].clone();
        untimed.timestamp_ms = None;
        pack(&mut batch, &[untimed], 1_000, 300_000);
        assert_eq!(batch.timestamps_ms, [-1]);
    }
}
