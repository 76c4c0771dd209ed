//! `[postgres.NAME]`: PostgreSQL databases that outputs (`{ postgres = "NAME", table = … }`)
//! and dead-letter tables write to. The sink that writes is `crate::sinks::postgres`.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One `[postgres.NAME]` table: a database and the pool of connections to it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// libpq connection string: a URL (`postgresql://user:pass@host:5432/db`) or keywords
    /// (`host=… user=… dbname=…`). `sslmode=require` connects with TLS and verifies the
    /// server's certificate (against `ca_file`, else the system's roots) and name;
    /// `disable` and `prefer` (the default) connect without TLS.
    pub url: String,
    /// PEM file of the certificate authorities that signed the server's certificate, for
    /// `sslmode=require` (default: the system's roots).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Most connections open at once (shared by every output and plugin that writes here).
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// A directory of `.sql` files applied in name order, each once (`eddy migrate`).
    #[serde(default)]
    pub migrations: Option<PathBuf>,
    /// Apply `migrations` when the host starts (as `eddy migrate` does) instead of only on
    /// command.
    #[serde(default)]
    pub migrate_on_start: bool,
}

fn default_pool_size() -> usize {
    4
}

/// How an output's records become rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteMode {
    /// `INSERT`: every record is a new row (at-least-once: a replay inserts again).
    #[default]
    Append,
    /// `INSERT … ON CONFLICT (key) DO NOTHING`: the first record of a key wins.
    InsertIfAbsent,
    /// `INSERT … ON CONFLICT (key) DO UPDATE`: the last record of a key wins.
    Upsert,
}

impl WriteMode {
    pub fn label(self) -> &'static str {
        match self {
            WriteMode::Append => "append",
            WriteMode::InsertIfAbsent => "insert_if_absent",
            WriteMode::Upsert => "upsert",
        }
    }
}

/// Where an output's records (JSON objects, fields as columns) go in PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableTarget {
    /// The `[postgres.NAME]` it writes to.
    pub postgres: String,
    /// `table` or `schema.table`.
    pub table: String,
    pub mode: WriteMode,
    /// The columns of a unique constraint (`insert_if_absent`, `upsert`).
    pub key: Vec<String>,
}

/// `dead_letter_table = { postgres = "NAME", table = "dead_letter_queue" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterTable {
    pub postgres: String,
    #[serde(default = "default_dead_letter_table")]
    pub table: String,
}

fn default_dead_letter_table() -> String {
    "dead_letter_queue".into()
}

/// A table name PostgreSQL takes unquoted or quoted: one or two (`schema.table`) parts of
/// letters, digits and `_`, not starting with a digit, at most 63 bytes each.
pub fn valid_table(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() <= 2 && parts.iter().all(|p| valid_column(p))
}

/// A column name: letters, digits and `_`, not starting with a digit, 1 to 63 bytes.
pub fn valid_column(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// What a connection string says about TLS, if it asks for a mode the host does not have.
pub fn tls_refusal(url: &str) -> Option<String> {
    let lower = url.to_ascii_lowercase().replace(' ', "");
    ["verify-ca", "verify-full", "allow"]
        .iter()
        .find(|mode| lower.contains(&format!("sslmode={mode}")))
        .map(|mode| {
            format!(
                "sslmode={mode} is not supported: use sslmode=require (TLS, the server's certificate and name verified against ca_file or the system's roots), prefer or disable (no TLS)"
            )
        })
}
