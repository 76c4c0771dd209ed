//! Asking the cluster where a topic's partitions begin and end, which offset a time falls
//! on, and setting a group's committed offsets: what `eddy replay` needs. Blocking.

use super::Offsets;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(10);

/// One partition's first and next offsets (its low and high watermarks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub partition: i32,
    pub low: i64,
    pub high: i64,
}

/// Every partition of `topic` with its extent (none if the topic does not exist).
pub fn extents(client: &ClientConfig, topic: &str) -> Result<Vec<Extent>, KafkaError> {
    let consumer: BaseConsumer = client.create()?;
    let md = consumer.fetch_metadata(Some(topic), TIMEOUT)?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    drop(md);
    partitions
        .into_iter()
        .map(|partition| {
            let (low, high) = consumer.fetch_watermarks(topic, partition, TIMEOUT)?;
            Ok(Extent {
                partition,
                low,
                high,
            })
        })
        .collect()
}

/// The first offset at or after `time_ms` on each of `partitions`; absent for a partition
/// with no event that late.
pub fn offsets_for_time(
    client: &ClientConfig,
    topic: &str,
    partitions: &[i32],
    time_ms: i64,
) -> Result<BTreeMap<i32, i64>, KafkaError> {
    let consumer: BaseConsumer = client.create()?;
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition_offset(topic, *p, Offset::Offset(time_ms))?;
    }
    let found = consumer.offsets_for_times(tpl, TIMEOUT)?;
    let offsets = found
        .elements()
        .iter()
        .filter_map(|e| Some((e.partition(), e.offset().to_raw().filter(|o| *o >= 0)?)))
        .collect();
    // (The list is dropped before the consumer: librdkafka 2.12 can hang otherwise.)
    drop(found);
    Ok(offsets)
}

/// Sets consumer group `group`'s committed offsets to `offsets`. Every member of the group
/// must be stopped, or it overwrites them.
pub fn commit_group_offsets(
    client: &ClientConfig,
    group: &str,
    offsets: &Offsets,
) -> Result<(), KafkaError> {
    let consumer: BaseConsumer = client.clone().set("group.id", group).create()?;
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), next) in offsets {
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*next))?;
    }
    consumer.commit(&tpl, CommitMode::Sync)
}
