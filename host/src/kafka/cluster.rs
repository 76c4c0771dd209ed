//! What the host knows of the Kafka cluster it is connected to: its id and the log ends of
//! the input topic, which saved offsets are checked against, and whether a consumer group
//! has committed offsets.

use super::Offsets;

/// Cluster ids the host gives its own embedded broker start with this.
pub const EMBEDDED_PREFIX: &str = "embedded:";

/// A cluster id for an embedded broker started now: unique per start, because its topics
/// and offsets do not outlive the process (librdkafka's mock cluster reports the same id
/// every time).
pub fn embedded_cluster_id() -> String {
    format!(
        "{EMBEDDED_PREFIX}{}-{}",
        std::process::id(),
        crate::clock::now_ms()
    )
}

/// What the host knows of the Kafka cluster it is connected to, to check saved offsets
/// against.
#[derive(Debug, Default, Clone)]
pub struct ClusterView {
    /// The cluster id, if the broker could be asked.
    pub id: Option<String>,
    /// High watermark (log end) of each partition of the input topic.
    pub log_ends: Offsets,
    /// Client settings, to ask about consumer groups.
    client: Option<rdkafka::ClientConfig>,
}

impl ClusterView {
    /// Asks the cluster (blocking; a few round trips) for its id and the log ends of
    /// `topics`.
    pub fn probe(client: &rdkafka::ClientConfig, topics: &[String]) -> ClusterView {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let timeout = std::time::Duration::from_secs(5);
        let consumer: BaseConsumer = match client.create() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(
                    "cannot ask the Kafka cluster for its id ({e}): saved offsets are not checked"
                );
                return ClusterView::default();
            }
        };
        let id = consumer.client().fetch_cluster_id(timeout);
        let mut log_ends = Offsets::new();
        for topic in topics {
            let Ok(md) = consumer.fetch_metadata(Some(topic), timeout) else {
                continue;
            };
            let partitions: Vec<i32> = md
                .topics()
                .iter()
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            for p in partitions {
                if let Ok((_, high)) = consumer.fetch_watermarks(topic, p, timeout) {
                    log_ends.insert((topic.to_string(), p), high);
                }
            }
        }
        if id.is_none() {
            tracing::warn!(
                "the Kafka cluster did not say its id: saved offsets are checked against log ends only"
            );
        }
        ClusterView {
            id,
            log_ends,
            client: Some(client.clone()),
        }
    }

    /// Whether consumer group `group` has committed offsets on the input topic (blocking).
    pub fn group_has_committed(&self, group: &str) -> bool {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let Some(client) = &self.client else {
            return false;
        };
        let Ok(consumer) = client
            .clone()
            .set("group.id", group)
            .create::<BaseConsumer>()
        else {
            return false;
        };
        let mut tpl = rdkafka::TopicPartitionList::new();
        for (topic, partition) in self.log_ends.keys() {
            tpl.add_partition(topic, *partition);
        }
        let committed = match consumer.committed_offsets(tpl, std::time::Duration::from_secs(5)) {
            Ok(c) => c
                .elements()
                .iter()
                .any(|e| e.offset().to_raw().is_some_and(|o| o >= 0)),
            Err(_) => false,
        };
        // (The list is dropped before the consumer: librdkafka 2.12 can hang otherwise.)
        drop(consumer);
        committed
    }

    /// Why `offsets`, saved against the cluster with id `saved_cluster`, cannot belong to
    /// this cluster, if they cannot.
    pub fn mismatch(&self, saved_cluster: Option<&str>, offsets: &Offsets) -> Option<String> {
        if let (Some(saved), Some(now)) = (saved_cluster, &self.id)
            && saved != now
        {
            return Some(format!(
                "it was written against Kafka cluster `{saved}`, and the broker now is cluster `{now}`"
            ));
        }
        offsets.iter().find_map(|((topic, partition), next)| {
            let end = self.log_ends.get(&(topic.clone(), *partition))?;
            (next > end).then(|| {
                format!("its saved offset {next} for {topic}/{partition} is past the end of that partition's log ({end})")
            })
        })
    }
}
