//! `[plugin.outputs]`: where each output's records go. The sinks that deliver them are in
//! [`crate::sinks`]; a new kind of destination adds a variant here and a sink there.

use super::postgres::{TableTarget, WriteMode, valid_column, valid_table};
use serde::{Deserialize, Serialize};
use std::fmt;

/// Where an output's records go: `"stdout"`, `"discard"`, `{ topic = "name" }` or
/// `{ postgres = "NAME", table = "t", mode = "upsert", key = ["id"] }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawTarget")]
pub enum OutputTarget {
    /// One line per record on the host's standard output: `[plugin/output] payload`.
    Stdout,
    /// Dropped (counted in metrics).
    Discard,
    /// Produced to this Kafka topic with the record's key.
    Topic(String),
    /// Rows of a PostgreSQL table (each record a JSON object, its fields the columns).
    Postgres(TableTarget),
}

/// What the file may say for an output, before it is checked.
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = r#"expected "stdout", "discard", { topic = "name" } or { postgres = "NAME", table = "name", mode = "append"|"insert_if_absent"|"upsert", key = [columns] }"#
)]
enum RawTarget {
    Named(String),
    Table(RawTable),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTable {
    topic: Option<String>,
    postgres: Option<String>,
    table: Option<String>,
    mode: Option<WriteMode>,
    key: Option<Vec<String>>,
}

impl TryFrom<RawTarget> for OutputTarget {
    type Error = String;

    fn try_from(raw: RawTarget) -> Result<OutputTarget, String> {
        const EXPECTED: &str = r#"expected "stdout", "discard", { topic = "name" } or { postgres = "NAME", table = "name" }"#;
        match raw {
            RawTarget::Named(name) => match name.as_str() {
                "stdout" => Ok(OutputTarget::Stdout),
                "discard" => Ok(OutputTarget::Discard),
                other => Err(format!("unknown output `{other}`, {EXPECTED}")),
            },
            RawTarget::Table(t) => match (t.topic, t.postgres) {
                (Some(_), Some(_)) => Err(format!("both `topic` and `postgres`, {EXPECTED}")),
                (Some(topic), None) => {
                    if t.table.is_some() || t.mode.is_some() || t.key.is_some() {
                        Err("`table`, `mode` and `key` are for `postgres` outputs".into())
                    } else if topic.is_empty() {
                        Err(format!("empty `topic`, {EXPECTED}"))
                    } else {
                        Ok(OutputTarget::Topic(topic))
                    }
                }
                (None, Some(postgres)) => {
                    let table = t.table.ok_or("a `postgres` output needs `table`")?;
                    if !valid_table(&table) {
                        return Err(format!(
                            "`{table}` is not a table name (`table` or `schema.table`, letters, digits and `_`)"
                        ));
                    }
                    let mode = t.mode.unwrap_or_default();
                    let key = t.key.unwrap_or_default();
                    if let Some(bad) = key.iter().find(|c| !valid_column(c)) {
                        return Err(format!("`{bad}` in `key` is not a column name"));
                    }
                    match (mode, key.is_empty()) {
                        (WriteMode::Append, false) => {
                            return Err("`key` is for mode \"insert_if_absent\" or \"upsert\", not \"append\"".into());
                        }
                        (WriteMode::InsertIfAbsent | WriteMode::Upsert, true) => {
                            return Err(format!(
                                "mode \"{}\" needs `key`: the columns of a unique constraint of `{table}`",
                                mode.label()
                            ));
                        }
                        _ => {}
                    }
                    Ok(OutputTarget::Postgres(TableTarget {
                        postgres,
                        table,
                        mode,
                        key,
                    }))
                }
                (None, None) => Err(format!("no `topic` or `postgres`, {EXPECTED}")),
            },
        }
    }
}

impl fmt::Display for OutputTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OutputTarget::Stdout => f.write_str("stdout"),
            OutputTarget::Discard => f.write_str("discard"),
            OutputTarget::Topic(t) => write!(f, "topic {t}"),
            OutputTarget::Postgres(t) => write!(
                f,
                "postgres {} table {} ({})",
                t.postgres,
                t.table,
                t.mode.label()
            ),
        }
    }
}
