//! `[plugin.outputs]`: where each output's records go. The sinks that deliver them are in
//! [`crate::sinks`]; a new kind of destination adds a variant here and a sink there.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Where an output's records go: `"stdout"`, `"discard"` or `{ topic = "name" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawTarget")]
pub enum OutputTarget {
    /// One line per record on the host's standard output: `[plugin/output] payload`.
    Stdout,
    /// Dropped (counted in metrics).
    Discard,
    /// Produced to this Kafka topic with the record's key.
    Topic(String),
}

/// What the file may say for an output, before it is checked.
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = r#"expected "stdout", "discard" or { topic = "name" }"#
)]
enum RawTarget {
    Named(String),
    Table(TopicTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicTable {
    topic: String,
}

impl TryFrom<RawTarget> for OutputTarget {
    type Error = String;

    fn try_from(raw: RawTarget) -> Result<OutputTarget, String> {
        const EXPECTED: &str = r#"expected "stdout", "discard" or { topic = "name" }"#;
        match raw {
            RawTarget::Named(name) => match name.as_str() {
                "stdout" => Ok(OutputTarget::Stdout),
                "discard" => Ok(OutputTarget::Discard),
                other => Err(format!("unknown output `{other}`, {EXPECTED}")),
            },
            RawTarget::Table(TopicTable { topic }) if topic.is_empty() => {
                Err(format!("empty `topic`, {EXPECTED}"))
            }
            RawTarget::Table(TopicTable { topic }) => Ok(OutputTarget::Topic(topic)),
        }
    }
}

impl fmt::Display for OutputTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutputTarget::Stdout => f.write_str("stdout"),
            OutputTarget::Discard => f.write_str("discard"),
            OutputTarget::Topic(t) => write!(f, "topic {t}"),
        }
    }
}
