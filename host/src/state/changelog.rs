//! Partition-scoped state that follows its partition from host to host: every commit of a
//! partition's state goes first to that partition of the plugin's changelog topic, then to
//! the local file with the changelog offset it reached; a host given the partition replays
//! the changelog from its file's offset to the log end ([`restore`]) before it handles the
//! partition's events.
//!
//! Why this order (Quix Streams' rule, see `docs/scale-out-design.md`): the changelog is
//! never behind the local file, and the local commit comes before the source offsets are
//! stored for Kafka's group commit, so the changelog is never behind the group's committed
//! offset either. Each changelog record carries, in its `eddy-source-offset` header, the
//! next source offset the state reflects: after a restore the partition resumes there, and
//! the events before it (already in the state) are skipped. So a partition's state is
//! exact after any crash and any move, without Kafka transactions. Outputs stay
//! at-least-once, as on one host.
//!
//! Layout on disk: `<state dir>/<plugin>/p<N>.redb`, a [`StateStore`] per partition. Its
//! metadata holds the changelog offset it reflects ([`META_CHANGELOG_NEXT`]) and when it
//! was last committed ([`META_COMMITTED_AT`]): a file older than `[state] keep_revoked_s`
//! is dropped and the partition restored whole (a compacted changelog forgets deletions
//! after a day, so an old file could bring deleted keys back).

use super::store::StateStore;
use super::{Change, DurableStore, ExpiryChange, Offsets, Snapshot, StoreError};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The next changelog offset the file reflects.
pub const META_CHANGELOG_NEXT: &str = "changelog.next_offset";
/// When the file was last committed (host clock, ms).
pub const META_COMMITTED_AT: &str = "changelog.committed_at_ms";
/// Header: the next source offset the state reflects after this record.
pub const HEADER_SOURCE_OFFSET: &str = "eddy-source-offset";
/// Header: when the key expires (ms on the plugin's `[plugin.expire]` clock).
pub const HEADER_EXPIRES: &str = "eddy-expires";

/// How long a restore waits for the broker to hand it the next records.
const RESTORE_STALL: Duration = Duration::from_secs(30);
/// Records applied per commit of a restore.
const RESTORE_CHUNK: usize = 20_000;

/// The changelog topic of a plugin's consumer group.
pub fn topic_for(group: &str) -> String {
    format!("{group}-changelog")
}

/// The directory of a plugin's partition files.
pub fn dir_for(state_dir: &Path, plugin: &str) -> PathBuf {
    state_dir.join(plugin)
}

/// The file of one partition's state.
pub fn path_for(state_dir: &Path, plugin: &str, partition: i32) -> PathBuf {
    dir_for(state_dir, plugin).join(format!("p{partition}.redb"))
}

/// The partition files of a plugin in `state_dir`, by partition.
pub fn partition_files(state_dir: &Path, plugin: &str) -> Vec<(i32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir_for(state_dir, plugin)) else {
        return Vec::new();
    };
    let mut files: Vec<(i32, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let p = name
                .strip_prefix('p')?
                .strip_suffix(".redb")?
                .parse()
                .ok()?;
            Some((p, e.path()))
        })
        .collect();
    files.sort();
    files
}

/// Why a changelog could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum ChangelogError {
    #[error("changelog {topic} partition {partition}: {source}")]
    Kafka {
        topic: String,
        partition: i32,
        source: rdkafka::error::KafkaError,
    },
    #[error(
        "changelog {topic} partition {partition}: no record came for {stalled:?} before its end \
         ({at} of {end}); what was read is kept, the rest is read at the next try"
    )]
    Stalled {
        topic: String,
        partition: i32,
        at: i64,
        end: i64,
        stalled: Duration,
    },
    #[error("changelog {topic} partition {partition}: the restore was called off")]
    Cancelled { topic: String, partition: i32 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A partition's state file that sends every commit to the changelog first.
pub struct ChangelogStore {
    inner: StateStore,
    producer: FutureProducer,
    topic: String,
    partition: i32,
    /// The source partition, and the next source offset the committed state reflects
    /// (-1: none yet), which every changelog record carries.
    source: (String, i32),
    source_next: std::sync::atomic::AtomicI64,
}

impl std::fmt::Debug for ChangelogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangelogStore")
            .field("path", &self.inner.path())
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .finish()
    }
}

impl ChangelogStore {
    /// `inner`, restored (see [`restore`]), written through to changelog `topic`'s
    /// partition of the same number as `source`'s.
    pub fn new(
        inner: StateStore,
        producer: FutureProducer,
        topic: String,
        source: (String, i32),
    ) -> Result<ChangelogStore, StoreError> {
        let source_next = inner.load()?.offsets.get(&source).copied().unwrap_or(-1);
        Ok(ChangelogStore {
            inner,
            producer,
            partition: source.1,
            topic,
            source,
            source_next: source_next.into(),
        })
    }

    /// Produces `changes` to the changelog and waits for every acknowledgement. Returns the
    /// next changelog offset (`None` if nothing was produced). Blocking: call it off the
    /// async runtime.
    fn produce(
        &self,
        changes: &[(String, Option<Vec<u8>>)],
        expiries: &std::collections::BTreeMap<String, Option<i64>>,
        source_next: i64,
    ) -> Result<Option<i64>, StoreError> {
        if changes.is_empty() {
            return Ok(None);
        }
        let source_next = source_next.to_string();
        let handle = tokio::runtime::Handle::try_current();
        let sends: Vec<_> = changes
            .iter()
            .map(|(key, value)| {
                let mut headers = OwnedHeaders::new().insert(Header {
                    key: HEADER_SOURCE_OFFSET,
                    value: Some(source_next.as_bytes()),
                });
                let expires = expiries
                    .get(key)
                    .copied()
                    .flatten()
                    .map(|at| at.to_string());
                if let Some(at) = &expires {
                    headers = headers.insert(Header {
                        key: HEADER_EXPIRES,
                        value: Some(at.as_bytes()),
                    });
                }
                let mut record = FutureRecord::<str, [u8]>::to(&self.topic)
                    .partition(self.partition)
                    .key(key.as_str())
                    .headers(headers);
                if let Some(v) = value {
                    record = record.payload(v.as_slice());
                }
                self.producer.send_result(record).map_err(|(e, _)| e)
            })
            .collect();
        let mut next = None;
        for send in sends {
            let delivery = match send {
                Ok(future) => match &handle {
                    Ok(h) => h.block_on(future),
                    Err(_) => futures_executor_block_on(future),
                },
                Err(e) => return Err(self.error(e)),
            };
            match delivery {
                Ok(Ok(delivered)) => {
                    next = Some(next.unwrap_or(0i64).max(delivered.offset + 1));
                }
                Ok(Err((e, _))) => return Err(self.error(e)),
                Err(_) => {
                    return Err(self.error(rdkafka::error::KafkaError::Canceled));
                }
            }
        }
        Ok(next)
    }

    fn error(&self, e: rdkafka::error::KafkaError) -> StoreError {
        StoreError::Io {
            path: self.inner.path().to_path_buf(),
            source: Box::new(redb::Error::Io(std::io::Error::other(format!(
                "changelog {} partition {}: {e}",
                self.topic, self.partition
            )))),
        }
    }
}

/// Polls a future to completion on this thread (no runtime here, e.g. in unit tests).
fn futures_executor_block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime")
        .block_on(future)
}

impl DurableStore for ChangelogStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        self.inner.load()
    }

    /// To the changelog (acknowledged), then to the file with the changelog offset reached.
    fn commit(
        &self,
        changes: &mut dyn Iterator<Item = Change<'_>>,
        expiries: &mut dyn Iterator<Item = ExpiryChange<'_>>,
        offsets: &Offsets,
        meta: &[(&str, &str)],
    ) -> Result<(), StoreError> {
        let changes: Vec<(String, Option<Vec<u8>>)> = changes
            .map(|(k, v)| (k.to_string(), v.map(<[u8]>::to_vec)))
            .collect();
        let expiries: std::collections::BTreeMap<String, Option<i64>> =
            expiries.map(|(k, at)| (k.to_string(), at)).collect();
        // The source offset the records carry: this commit's, else the state's so far.
        use std::sync::atomic::Ordering::Relaxed;
        let source_next = offsets
            .get(&self.source)
            .copied()
            .unwrap_or(self.source_next.load(Relaxed));
        let next = self.produce(&changes, &expiries, source_next)?;
        let next_text = next.map(|n| n.to_string());
        let now = crate::clock::now_ms().to_string();
        let mut meta = meta.to_vec();
        meta.push((META_COMMITTED_AT, &now));
        if let Some(n) = &next_text {
            meta.push((META_CHANGELOG_NEXT, n));
        }
        self.inner.commit(
            &mut changes.iter().map(|(k, v)| (k.as_str(), v.as_deref())),
            &mut expiries.iter().map(|(k, at)| (k.as_str(), *at)),
            offsets,
            &meta,
        )?;
        self.source_next.store(source_next, Relaxed);
        Ok(())
    }

    fn path(&self) -> &Path {
        self.inner.path()
    }
}

/// Changelog records read and not applied yet: key, value (`None`: deleted), expiry.
type Chunk = Vec<(String, Option<Vec<u8>>, Option<i64>)>;

/// What a partition's restore did.
#[derive(Debug, Default, Clone)]
pub struct Restored {
    /// Changelog records applied.
    pub records: u64,
    /// The changelog range replayed: from, to (its end when the restore began).
    pub from: i64,
    pub to: i64,
    /// Whether the file was dropped first (too old, or not of this changelog).
    pub wiped: Option<String>,
    pub took: Duration,
    /// The next source offset the state reflects after the restore.
    pub source_next: Option<i64>,
}

/// Brings `store` (the file of `source`'s partition) up to the end of changelog `topic`'s
/// partition of the same number. Blocking. `keep_for`: a file last committed longer ago is
/// dropped and the partition restored whole. `progress` is called every few seconds with
/// the records applied so far and the total to apply. Setting `cancel` stops it (what was
/// read is applied).
pub fn restore(
    client: &ClientConfig,
    store: &StateStore,
    topic: &str,
    source: &(String, i32),
    keep_for: Duration,
    cancel: &std::sync::atomic::AtomicBool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Restored, ChangelogError> {
    let started = Instant::now();
    let partition = source.1;
    let kafka = |e| ChangelogError::Kafka {
        topic: topic.to_string(),
        partition,
        source: e,
    };
    let consumer: BaseConsumer = client.create().map_err(kafka)?;
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .map_err(kafka)?;
    // What a record's source offset may claim: not past the source partition's end (a
    // record claiming more, damaged or written by someone else, would make the partition
    // skip every event to come).
    let (_, source_end) = consumer
        .fetch_watermarks(&source.0, partition, Duration::from_secs(10))
        .map_err(kafka)?;
    let snapshot = store.load()?;
    let saved_next: Option<i64> = snapshot
        .meta
        .get(META_CHANGELOG_NEXT)
        .and_then(|v| v.parse().ok());
    let committed_at: Option<i64> = snapshot
        .meta
        .get(META_COMMITTED_AT)
        .and_then(|v| v.parse().ok());
    let has_data = !snapshot.state.is_empty() || !snapshot.offsets.is_empty();
    let age_ms = committed_at.map(|at| crate::clock::now_ms().saturating_sub(at));
    let wiped = match saved_next {
        _ if !has_data => None,
        None => Some("it holds state that is not from the changelog".to_string()),
        Some(n) if n > high => Some(format!(
            "it reflects changelog offset {n}, past the changelog's end ({high}): the topic was re-created, or its broker forgot it"
        )),
        Some(n) if n < low => Some(format!(
            "it reflects changelog offset {n}, before the changelog's first record ({low}): retention deleted what came between"
        )),
        Some(_) if age_ms.is_some_and(|a| a > keep_for.as_millis() as i64) => Some(format!(
            "it was last written {}s ago, more than [state] keep_revoked_s",
            age_ms.unwrap_or(0) / 1000
        )),
        Some(_) => None,
    };
    if wiped.is_some() {
        store.clear()?;
    }
    let from = match (&wiped, saved_next) {
        (None, Some(n)) if has_data => n,
        _ => low,
    };
    let mut restored = Restored {
        from,
        to: high,
        wiped,
        ..Default::default()
    };
    if from >= high {
        restored.took = started.elapsed();
        restored.source_next = store.load()?.offsets.get(source).copied();
        return Ok(restored);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(from))
        .map_err(kafka)?;
    consumer.assign(&tpl).map_err(kafka)?;
    let total = (high - from) as u64;
    let mut chunk: Chunk = Vec::new();
    let mut source_next: Option<i64> = snapshot.offsets.get(source).copied();
    let mut next = from;
    let mut last_record = Instant::now();
    let mut last_progress = Instant::now();
    let apply =
        |chunk: &mut Chunk, next: i64, source_next: Option<i64>| -> Result<(), StoreError> {
            let mut offsets = Offsets::new();
            if let Some(s) = source_next {
                offsets.insert(source.clone(), s);
            }
            let next_text = next.to_string();
            store.commit(
                &mut chunk.iter().map(|(k, v, _)| (k.as_str(), v.as_deref())),
                &mut chunk
                    .iter()
                    .map(|(k, v, at)| (k.as_str(), v.as_ref().and(*at))),
                &offsets,
                &[(META_CHANGELOG_NEXT, &next_text)],
            )?;
            chunk.clear();
            Ok(())
        };
    while next < high {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                last_record = Instant::now();
                next = m.offset() + 1;
                restored.records += 1;
                let mut expires = None;
                if let Some(hs) = m.headers() {
                    for h in hs.iter() {
                        let value = h.value.and_then(|v| std::str::from_utf8(v).ok());
                        match h.key {
                            HEADER_SOURCE_OFFSET => match value.and_then(|v| v.parse::<i64>().ok())
                            {
                                Some(s) if (0..=source_end).contains(&s) => {
                                    source_next = Some(source_next.unwrap_or(s).max(s));
                                }
                                Some(s) => tracing::warn!(
                                    topic,
                                    partition,
                                    offset = m.offset(),
                                    claimed = s,
                                    source_end,
                                    "changelog record claims a source offset outside the source partition: its claim is ignored"
                                ),
                                None => {}
                            },
                            HEADER_EXPIRES => expires = value.and_then(|v| v.parse().ok()),
                            _ => {}
                        }
                    }
                }
                // Keys the host wrote are UTF-8; anything else is not ours: skipped.
                if let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) {
                    chunk.push((key.to_string(), m.payload().map(<[u8]>::to_vec), expires));
                }
                if chunk.len() >= RESTORE_CHUNK {
                    apply(&mut chunk, next, source_next)?;
                }
            }
            Some(Err(e)) => {
                apply(&mut chunk, next, source_next)?;
                return Err(kafka(e));
            }
            None => {}
        }
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            apply(&mut chunk, next, source_next)?;
            return Err(ChangelogError::Cancelled {
                topic: topic.to_string(),
                partition,
            });
        }
        if last_progress.elapsed() >= Duration::from_secs(2) {
            last_progress = Instant::now();
            progress((next - from) as u64, total);
        }
        if last_record.elapsed() >= RESTORE_STALL {
            apply(&mut chunk, next, source_next)?;
            return Err(ChangelogError::Stalled {
                topic: topic.to_string(),
                partition,
                at: next,
                end: high,
                stalled: RESTORE_STALL,
            });
        }
    }
    apply(&mut chunk, next, source_next)?;
    restored.took = started.elapsed();
    restored.source_next = source_next;
    Ok(restored)
}

/// Creates changelog `topic` (compacted, `partitions` partitions) unless it exists; if it
/// exists with another partition count, says so (a partition's state would go to another
/// partition's changelog).
pub async fn ensure_topic(
    client: &ClientConfig,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    if let Some(found) = partition_count(client, topic).await? {
        anyhow::ensure!(
            found == partitions,
            "changelog topic `{topic}` has {found} partitions, the plugin's input {partitions}: a partition's state goes to the changelog partition of the same number. Delete the changelog topic and run `eddy reset` for the plugin (its state is then recomputed), or give it {partitions} partitions"
        );
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = client.create()?;
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1))
        .set("cleanup.policy", "compact");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let created = admin.create_topics([&new], &options).await;
    let refused = match created {
        Ok(results) => results.into_iter().find_map(|r| match r {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => None,
            Err((_, e)) => Some(e.to_string()),
        }),
        Err(e) => Some(e.to_string()),
    };
    if let Some(why) = refused {
        anyhow::bail!(
            "cannot create changelog topic `{topic}` ({why}): create it yourself (cleanup.policy=compact, {partitions} partitions, like the input topic), or set [state] shared_group = false"
        );
    }
    tracing::info!(topic, partitions, "changelog topic created (compacted)");
    Ok(())
}

/// How many partitions `topic` has, if it exists.
async fn partition_count(client: &ClientConfig, topic: &str) -> anyhow::Result<Option<i32>> {
    let (mut client, name) = (client.clone(), topic.to_string());
    client.set("allow.auto.create.topics", "false");
    tokio::task::spawn_blocking(move || -> anyhow::Result<Option<i32>> {
        let consumer: BaseConsumer = client.create()?;
        let md = consumer.fetch_metadata(Some(&name), Duration::from_secs(10))?;
        Ok(md
            .topics()
            .iter()
            .find(|t| t.name() == name && t.error().is_none())
            .map(|t| t.partitions().len() as i32)
            .filter(|n| *n > 0))
    })
    .await?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::EmbeddedBroker;
    use std::sync::atomic::AtomicBool;

    fn client(broker: &EmbeddedBroker) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", broker.bootstrap_servers())
            .set("group.id", "restore-test");
        c
    }

    /// Commits through a changelog store, then restores another file from the changelog:
    /// the same state, expiries and source offset; a file ahead of the changelog (a
    /// re-created topic) is dropped and restored whole.
    #[test]
    fn a_restored_file_holds_what_was_committed_through_the_changelog() {
        let broker = EmbeddedBroker::start().unwrap();
        broker.create_topic("g-changelog", 2).unwrap();
        broker.create_topic("input", 2).unwrap();
        let producer: FutureProducer = client(&broker).create().unwrap();
        // The source partition holds 30 events: what a changelog record may claim.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        for _ in 0..30 {
            let record = FutureRecord::<str, str>::to("input")
                .partition(1)
                .payload("e")
                .key("k");
            runtime
                .block_on(producer.send(record, Duration::from_secs(5)))
                .unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let source = ("input".to_string(), 1);
        let written = StateStore::open(&dir.path().join("a.redb"), "p").unwrap();
        let store =
            ChangelogStore::new(written, producer, "g-changelog".into(), source.clone()).unwrap();
        let offsets = |n: i64| -> Offsets { [(source.clone(), n)].into_iter().collect() };
        store
            .commit(
                &mut [("a", Some(&b"1"[..])), ("b", Some(&b"2"[..]))].into_iter(),
                &mut [("b", Some(9_000))].into_iter(),
                &offsets(10),
                &[],
            )
            .unwrap();
        // A tick's write: no offsets, the records carry the state's so far.
        store
            .commit(
                &mut [("a", None), ("c", Some(&b"3"[..]))].into_iter(),
                &mut std::iter::empty(),
                &Offsets::new(),
                &[],
            )
            .unwrap();
        store
            .commit(
                &mut [("c", Some(&b"4"[..]))].into_iter(),
                &mut std::iter::empty(),
                &offsets(25),
                &[],
            )
            .unwrap();
        let committed = store.load().unwrap();
        assert_eq!(committed.meta[META_CHANGELOG_NEXT], "5");

        let restored_file = StateStore::open(&dir.path().join("b.redb"), "p").unwrap();
        let keep = Duration::from_secs(600);
        let restore_from = |source: &(String, i32)| {
            restore(
                &client(&broker),
                &restored_file,
                "g-changelog",
                source,
                keep,
                &AtomicBool::new(false),
                &mut |_, _| {},
            )
            .unwrap()
        };
        let done = restore_from(&source);
        assert_eq!((done.records, done.from, done.to), (5, 0, 5));
        assert_eq!(done.source_next, Some(25));
        let snap = restored_file.load().unwrap();
        assert_eq!(snap.state, committed.state);
        assert_eq!(snap.expires, committed.expires);
        assert_eq!(snap.offsets, committed.offsets);
        // Again: nothing new to replay.
        let again = restore_from(&source);
        assert_eq!(again.records, 0);
        assert!(again.wiped.is_none());

        // A record claiming a source offset past the source partition's end (damaged, or
        // not ours) moves nothing: the partition would skip every event to come.
        let hostile = FutureRecord::<str, [u8]>::to("g-changelog")
            .partition(1)
            .key("d")
            .payload(&b"9"[..])
            .headers(OwnedHeaders::new().insert(Header {
                key: HEADER_SOURCE_OFFSET,
                value: Some("9223372036854775807"),
            }));
        let producer: FutureProducer = client(&broker).create().unwrap();
        runtime
            .block_on(producer.send(hostile, Duration::from_secs(5)))
            .unwrap();
        let after = restore_from(&source);
        assert_eq!(after.records, 1);
        assert_eq!(after.source_next, Some(25), "the claim was ignored");

        // The other partition's changelog is empty: a file claiming more is dropped.
        let other = ("input".to_string(), 0);
        let wiped = restore_from(&other);
        assert!(
            wiped
                .wiped
                .is_some_and(|why| why.contains("past the changelog's end"))
        );
        assert_eq!(restored_file.load().unwrap().state.len(), 0);
    }
}
