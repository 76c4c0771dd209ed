//! Operations on a plugin's durable state, for the `eddy state`, `eddy reset` and
//! `eddy replay` commands. They need the host stopped: it holds each state file locked
//! while it runs (the error says so). `state` only reads.

use crate::config::Config;
use crate::store::{self, Offsets, StateStore, StoreError};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use std::fmt::Write;
use std::time::Duration;

/// Why an operation could not be done.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("no plugin `{name}` in {config} (plugins: {known})")]
    UnknownPlugin {
        name: String,
        config: String,
        known: String,
    },
    #[error("state is not durable ([state] durable = false): there is no state file to work on")]
    NotDurable,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Kafka(String),
    #[error(
        "`{0}` is not `earliest`, `latest`, an offset or an RFC 3339 time like 2024-01-15T10:00:00Z"
    )]
    BadPosition(String),
}

fn state_file(config: &Config, plugin: &str) -> Result<std::path::PathBuf, OpsError> {
    if !config.state.durable {
        return Err(OpsError::NotDurable);
    }
    if !config.plugins.iter().any(|p| p.name == plugin) {
        return Err(OpsError::UnknownPlugin {
            name: plugin.to_string(),
            config: config.source.display().to_string(),
            known: config
                .plugins
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok(config.state_file(plugin))
}

/// What to show of the state.
#[derive(Debug, Default)]
pub struct Show {
    /// Only keys starting with this.
    pub prefix: String,
    /// At most this many keys.
    pub limit: usize,
}

/// A readable summary: file, size, offsets, metadata and keys with a preview of each value.
pub fn describe(config: &Config, plugin: &str, show: &Show) -> Result<String, OpsError> {
    let path = state_file(config, plugin)?;
    let snap = store::read_only_snapshot(&path, plugin)?;
    let bytes: usize = snap.state.iter().map(|(k, v)| k.len() + v.len()).sum();
    let mut out = String::new();
    let _ = writeln!(out, "plugin {plugin}: {}", path.display());
    let _ = writeln!(out, "  {} keys, {} bytes", snap.state.len(), bytes);
    for (k, v) in &snap.meta {
        let _ = writeln!(out, "  {k}: {v}");
    }
    let _ = writeln!(out, "  offsets (next to consume):");
    if snap.offsets.is_empty() {
        let _ = writeln!(out, "    none yet: starts from `start_from`");
    }
    for ((topic, partition), next) in &snap.offsets {
        let _ = writeln!(out, "    {topic}/{partition}: {}", position(*next));
    }
    let keys: Vec<_> = snap
        .state
        .iter()
        .filter(|(k, _)| k.starts_with(&show.prefix))
        .collect();
    let _ = writeln!(
        out,
        "  keys{}:",
        if show.prefix.is_empty() {
            String::new()
        } else {
            format!(" starting with `{}`", show.prefix)
        }
    );
    for (k, v) in keys.iter().take(show.limit) {
        let _ = writeln!(out, "    {k} = {}", preview(v));
    }
    if keys.len() > show.limit {
        let _ = writeln!(
            out,
            "    … {} more (--limit, --prefix)",
            keys.len() - show.limit
        );
    }
    Ok(out)
}

/// The value of one key, as stored.
pub fn get(config: &Config, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, OpsError> {
    let path = state_file(config, plugin)?;
    Ok(store::read_only_snapshot(&path, plugin)?.state.remove(key))
}

fn position(next: i64) -> String {
    match Offset::from_raw(next) {
        Offset::Beginning => "the beginning".into(),
        Offset::End => "the end".into(),
        _ => next.to_string(),
    }
}

fn preview(v: &[u8]) -> String {
    match std::str::from_utf8(v) {
        Ok(s) if s.chars().count() > 80 => format!(
            "{}… ({} bytes)",
            s.chars().take(80).collect::<String>(),
            v.len()
        ),
        Ok(s) => s.to_string(),
        Err(_) => format!("<{} bytes of binary>", v.len()),
    }
}

/// Drops a plugin's state and offsets: at its next start it begins again from `start_from`.
/// Works on a damaged file too (it is removed).
pub fn reset(config: &Config, plugin: &str) -> Result<String, OpsError> {
    let path = state_file(config, plugin)?;
    if !path.exists() {
        return Ok(format!(
            "plugin {plugin} has no state yet ({})",
            path.display()
        ));
    }
    match StateStore::open(&path, plugin) {
        Ok(s) => s.clear()?,
        Err(StoreError::Damaged { .. }) => {
            std::fs::remove_file(&path).map_err(|e| StoreError::Io {
                path: path.clone(),
                source: Box::new(redb::Error::Io(e)),
            })?
        }
        Err(e) => return Err(e.into()),
    }
    Ok(format!(
        "dropped the state and offsets of plugin {plugin} ({}): at its next start it begins again from `start_from`",
        path.display()
    ))
}

/// Where a replay starts.
#[derive(Debug, Clone, PartialEq)]
pub enum From {
    Earliest,
    Latest,
    Offset(i64),
    /// Unix milliseconds.
    Time(i64),
}

impl std::str::FromStr for From {
    type Err = OpsError;
    fn from_str(s: &str) -> Result<From, OpsError> {
        match s {
            "earliest" => Ok(From::Earliest),
            "latest" => Ok(From::Latest),
            _ => {
                if let Ok(n) = s.parse::<i64>()
                    && n >= 0
                {
                    return Ok(From::Offset(n));
                }
                crate::generator::parse_rfc3339_ms(s)
                    .map(From::Time)
                    .ok_or_else(|| OpsError::BadPosition(s.to_string()))
            }
        }
    }
}

/// Points a plugin at `from` on every partition of the input topic, so that at its next
/// start it handles the events from there again. Unless `keep_state`, its state is dropped
/// first, so that what it computes is not counted twice. Needs the broker; the others
/// plugins are not touched.
pub fn replay(
    config: &Config,
    plugin: &str,
    from: &From,
    keep_state: bool,
) -> Result<String, OpsError> {
    let path = state_file(config, plugin)?;
    if config.embedded() {
        return Err(OpsError::Kafka(
            "the embedded broker keeps nothing after the host exits: there is nothing to replay. \
             Point kafka.brokers at a real cluster"
                .into(),
        ));
    }
    let offsets = positions(config, from)?;
    let store = StateStore::open(&path, plugin)?;
    if !keep_state {
        store.clear()?;
    }
    store.set_offsets(&offsets)?;
    // With `[state] shared_group` the group's committed offsets count when they are later
    // than the saved ones: move them too.
    if config.state.shared_group {
        commit_group(config, plugin, &offsets)?;
    }
    let mut out = format!("plugin {plugin} will start from:\n");
    for ((topic, partition), next) in &offsets {
        let _ = writeln!(out, "  {topic}/{partition}: {next}");
    }
    out.push_str(if keep_state {
        "its state is kept"
    } else {
        "its state was dropped"
    });
    Ok(out)
}

/// Sets `plugin`'s consumer group's committed offsets to `offsets` (the host must be stopped:
/// a running member would overwrite them).
fn commit_group(config: &Config, plugin: &str, offsets: &Offsets) -> Result<(), OpsError> {
    use rdkafka::consumer::{CommitMode, Consumer};
    let group = config
        .plugins
        .iter()
        .find(|p| p.name == plugin)
        .map(|p| p.group_id())
        .unwrap_or_default();
    let kafka = |e: rdkafka::error::KafkaError| {
        OpsError::Kafka(format!(
            "setting the committed offsets of group `{group}` ({}): {e}. Every host sharing the \
             group must be stopped (a killed one counts until its session times out)",
            config.kafka.brokers
        ))
    };
    let consumer: BaseConsumer = crate::broker::client_config(&config.kafka, &config.kafka.brokers)
        .set("group.id", &group)
        .create()
        .map_err(kafka)?;
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), next) in offsets {
        tpl.add_partition_offset(topic, *partition, Offset::Offset(*next))
            .map_err(kafka)?;
    }
    consumer.commit(&tpl, CommitMode::Sync).map_err(kafka)
}

/// The offset of `from` on each partition of the input topic.
fn positions(config: &Config, from: &From) -> Result<Offsets, OpsError> {
    let kafka = |e: rdkafka::error::KafkaError| {
        OpsError::Kafka(format!("asking Kafka ({}): {e}", config.kafka.brokers))
    };
    let timeout = Duration::from_secs(10);
    let consumer: BaseConsumer = crate::broker::client_config(&config.kafka, &config.kafka.brokers)
        .create()
        .map_err(kafka)?;
    let topic = &config.kafka.topic;
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(kafka)?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    drop(md);
    if partitions.is_empty() {
        return Err(OpsError::Kafka(format!(
            "topic `{topic}` has no partitions (does it exist?)"
        )));
    }
    let mut offsets = Offsets::new();
    let by_time = if let From::Time(ms) = from {
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            tpl.add_partition_offset(topic, *p, Offset::Offset(*ms))
                .map_err(kafka)?;
        }
        let found = consumer.offsets_for_times(tpl, timeout).map_err(kafka)?;
        let map: Offsets = found
            .elements()
            .iter()
            .map(|e| {
                (
                    (topic.clone(), e.partition()),
                    e.offset().to_raw().unwrap_or(-1),
                )
            })
            .collect();
        drop(found);
        Some(map)
    } else {
        None
    };
    for p in partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, timeout)
            .map_err(kafka)?;
        let next = match from {
            From::Earliest => low,
            From::Latest => high,
            From::Offset(n) => (*n).clamp(low, high),
            // No event at or after the time: start at the end.
            From::Time(_) => match by_time.as_ref().and_then(|m| m.get(&(topic.clone(), p))) {
                Some(o) if *o >= 0 => *o,
                _ => high,
            },
        };
        offsets.insert((topic.clone(), p), next);
    }
    Ok(offsets)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse() {
        assert_eq!("earliest".parse::<From>().unwrap(), From::Earliest);
        assert_eq!("42".parse::<From>().unwrap(), From::Offset(42));
        assert_eq!(
            "1970-01-01T00:00:01.5Z".parse::<From>().unwrap(),
            From::Time(1500)
        );
        assert_eq!(
            "2024-01-15T10:30:45+01:00".parse::<From>().unwrap(),
            From::Time(1_705_311_045_000)
        );
        assert!(
            "yesterday"
                .parse::<From>()
                .unwrap_err()
                .to_string()
                .contains("RFC 3339")
        );
        assert!("-3".parse::<From>().is_err());
    }
}
