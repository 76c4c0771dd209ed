//! `eddy replay`: point one plugin at an earlier (or later) position of the input topic,
//! dropping its state unless told to keep it.

use super::{OpsError, state_file};
use crate::config::Config;
use crate::kafka;
use crate::kafka::Offsets;
use crate::state::StateStore;
use std::fmt::Write;

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
                crate::clock::parse_rfc3339_ms(s)
                    .map(From::Time)
                    .map_err(|reason| OpsError::BadPosition {
                        position: s.to_string(),
                        reason,
                    })
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
    if crate::supervisor::partition_scoped(&config.state) {
        return Err(OpsError::Kafka(
            "`eddy replay` does not work on partition-scoped state ([state] shared_group) yet: \
             its state is also in the changelog topic, which a replay would have to rewind. \
             `eddy reset` on every host, then start them with `start_from`, recomputes it"
                .into(),
        ));
    }
    if config.embedded() {
        return Err(OpsError::Kafka(
            "the embedded broker keeps nothing after the host exits: there is nothing to replay. \
             Point kafka.brokers at a real cluster"
                .into(),
        ));
    }
    let topic = config
        .plugins
        .iter()
        .find(|p| p.name == plugin)
        .map_or(config.kafka.topic.as_str(), |p| {
            p.input_topic(&config.kafka.topic)
        });
    let offsets = positions(config, topic, from)?;
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
    let group = config
        .plugins
        .iter()
        .find(|p| p.name == plugin)
        .map(|p| p.group_id())
        .unwrap_or_default();
    let client = kafka::client_config(&config.kafka, &config.kafka.brokers);
    kafka::admin::commit_group_offsets(&client, &group, offsets).map_err(|e| {
        OpsError::Kafka(format!(
            "setting the committed offsets of group `{group}` ({}): {e}. Every host sharing the \
             group must be stopped (a killed one counts until its session times out)",
            config.kafka.brokers
        ))
    })
}

/// The offset of `from` on each partition of `topic`, the plugin's input.
fn positions(config: &Config, topic: &str, from: &From) -> Result<Offsets, OpsError> {
    let kafka_error = |e: rdkafka::error::KafkaError| {
        OpsError::Kafka(format!("asking Kafka ({}): {e}", config.kafka.brokers))
    };
    let client = kafka::client_config(&config.kafka, &config.kafka.brokers);
    let extents = kafka::admin::extents(&client, topic).map_err(kafka_error)?;
    if extents.is_empty() {
        return Err(OpsError::Kafka(format!(
            "topic `{topic}` has no partitions (does it exist?)"
        )));
    }
    let at_time = match from {
        From::Time(ms) => {
            let partitions: Vec<i32> = extents.iter().map(|e| e.partition).collect();
            kafka::admin::offsets_for_time(&client, topic, &partitions, *ms).map_err(kafka_error)?
        }
        _ => Default::default(),
    };
    Ok(extents
        .into_iter()
        .map(|e| {
            let next = match from {
                From::Earliest => e.low,
                From::Latest => e.high,
                From::Offset(n) => (*n).clamp(e.low, e.high),
                // No event at or after the time: start at the end.
                From::Time(_) => at_time.get(&e.partition).copied().unwrap_or(e.high),
            };
            ((topic.to_string(), e.partition), next)
        })
        .collect())
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
