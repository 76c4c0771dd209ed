//! `{ postgres = "NAME", table = "t", mode = …, key = [...] }`: an output's records as rows of
//! a PostgreSQL table, and dead letters as rows of a dead-letter table.
//!
//! A record is a JSON object whose fields are columns. Each output's records of a batch go
//! in one statement on one pooled connection:
//!
//! ```sql
//! INSERT INTO t (c1, c2) SELECT c1, c2 FROM jsonb_populate_recordset(NULL::t, $1::text::jsonb)
//!   [ON CONFLICT (key) DO NOTHING | DO UPDATE SET c2 = EXCLUDED.c2]
//! ```
//!
//! with the batch as one JSON array (the payloads joined, not re-encoded): PostgreSQL converts
//! each field to its column's type. The columns are those the batch's records name; a column
//! a record leaves out is NULL in its row. `upsert` keeps the last record of each key in the
//! batch (`DISTINCT ON`, by position), so a key updated several times in a batch is one row
//! change and the latest value wins.
//!
//! Errors: a statement refused for what is in a row (SQLSTATE class 22, data exception, or
//! 23, integrity constraint violation, or 42703, a field naming no column) is retried on
//! halves of the records until the refused rows are alone: those are [`Undeliverable`] (the
//! worker dead-letters them with the database's message) and the rest are written. Anything
//! else (the database down or restarting, a timeout, a missing table, a full pool) is
//! [`SinkError`]: the worker retries the whole delivery with backoff, holding the offsets.
//! Rows already written are written again by a retry, which `insert_if_absent` and `upsert`
//! absorb (see the README's PostgreSQL section for why that makes them exactly once).

use super::{DELIVERY_TIMEOUT, Delivery, Sink, SinkError, Undeliverable};
use crate::config::{PostgresConfig, TableTarget, WriteMode};
use crate::wasm::OutputRecord;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::NoTls;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// How long to wait for a connection: a free one from the pool, or a new one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The pools of every `[postgres.NAME]`, made at start (connections are opened on first use,
/// so a database that is down does not stop the host: its outputs wait for it).
#[derive(Clone, Default)]
pub struct Databases {
    pools: Arc<BTreeMap<String, Pool>>,
}

impl Databases {
    pub fn new(config: &BTreeMap<String, PostgresConfig>) -> anyhow::Result<Databases> {
        let mut pools = BTreeMap::new();
        for (name, db) in config {
            pools.insert(name.clone(), pool(name, db)?);
        }
        Ok(Databases {
            pools: Arc::new(pools),
        })
    }

    pub fn get(&self, name: &str) -> Option<&Pool> {
        self.pools.get(name)
    }
}

/// A pool of at most `pool_size` connections to `db`.
pub fn pool(name: &str, db: &PostgresConfig) -> anyhow::Result<Pool> {
    let mut pg: tokio_postgres::Config = db.url.parse().map_err(|e| {
        anyhow::anyhow!("[postgres.{name}] url is not a libpq connection string: {e}")
    })?;
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(CONNECT_TIMEOUT);
    }
    if pg.get_application_name().is_none() {
        pg.application_name("eddy");
    }
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match pg.get_ssl_mode() {
        // TLS only where it is required, and then verified: `prefer` with a verifying
        // connector would refuse a server whose certificate it cannot verify (libpq's
        // `prefer` encrypts without verifying, which protects against nothing active).
        SslMode::Require => {
            let tls = tls(name, db)?;
            Manager::from_config(pg, tls, manager_config)
        }
        _ => Manager::from_config(pg, NoTls, manager_config),
    };
    Pool::builder(manager)
        .max_size(db.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(CONNECT_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .map_err(|e| anyhow::anyhow!("[postgres.{name}]: {e}"))
}

/// The TLS connector for `sslmode=require`: rustls (ring), the server's certificate verified
/// against `ca_file`, else the system's roots, and its name against the host connected to.
fn tls(name: &str, db: &PostgresConfig) -> anyhow::Result<MakeRustlsConnect> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    match &db.ca_file {
        Some(file) => {
            let certs = CertificateDer::pem_file_iter(file)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    anyhow::anyhow!("[postgres.{name}] ca_file {}: {e}", file.display())
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                anyhow::bail!(
                    "[postgres.{name}] ca_file {}: no certificate in it",
                    file.display()
                );
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                anyhow::bail!(
                    "[postgres.{name}] sslmode=require: no system root certificates found ({:?}); set ca_file",
                    found.errors
                );
            }
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| anyhow::anyhow!("[postgres.{name}] TLS: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// Whether PostgreSQL refused a statement for what is in a row: retrying it cannot help.
fn refused_for_good(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        let c = c.code();
        c.starts_with("22") || c.starts_with("23") || c == "42703"
    })
}

/// The database's own words for `e`: message, detail and SQLSTATE.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {}", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                let _ = write!(s, "; {detail}");
            }
            s.push(')');
            s
        }
        None => {
            // The client's error, with its cause (a refused connection, a closed socket).
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                let _ = write!(s, ": {cause}");
                source = cause.source();
            }
            s
        }
    }
}

/// `name` or `schema.name`, quoted part by part.
fn quote_table(table: &str) -> String {
    table.split('.').map(quote).collect::<Vec<_>>().join(".")
}

/// An identifier as PostgreSQL reads it quoted: exactly as written.
fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// One record to write: its index among the records sent, its JSON text and its fields.
struct Row<'a> {
    index: usize,
    json: &'a [u8],
    columns: Vec<String>,
}

/// Writes JSON-object records into one table (an output's, or a dead-letter table).
#[derive(Clone)]
pub struct TableWriter {
    database: String,
    pool: Option<Pool>,
    target: TableTarget,
}

impl TableWriter {
    pub fn new(databases: &Databases, target: &TableTarget) -> TableWriter {
        TableWriter {
            database: target.postgres.clone(),
            pool: databases.get(&target.postgres).cloned(),
            target: target.clone(),
        }
    }

    fn destination(&self) -> String {
        format!("postgres `{}` table `{}`", self.database, self.target.table)
    }

    /// The statement that writes rows with `columns` (sorted, key columns among them).
    fn statement(&self, columns: &BTreeSet<&str>) -> String {
        let table = quote_table(&self.target.table);
        let cols: Vec<String> = columns.iter().map(|c| quote(c)).collect();
        let cols = cols.join(", ");
        let key: Vec<String> = self.target.key.iter().map(|c| quote(c)).collect();
        let key = key.join(", ");
        let source = format!("jsonb_populate_recordset(NULL::{table}, $1::text::jsonb)");
        match self.target.mode {
            WriteMode::Append => {
                format!("INSERT INTO {table} ({cols}) SELECT {cols} FROM {source}")
            }
            WriteMode::InsertIfAbsent => format!(
                "INSERT INTO {table} ({cols}) SELECT {cols} FROM {source} ON CONFLICT ({key}) DO NOTHING"
            ),
            WriteMode::Upsert => {
                let updates: Vec<String> = columns
                    .iter()
                    .filter(|c| !self.target.key.iter().any(|k| k == *c))
                    .map(|c| format!("{0} = EXCLUDED.{0}", quote(c)))
                    .collect();
                let action = if updates.is_empty() {
                    "DO NOTHING".to_string()
                } else {
                    format!("DO UPDATE SET {}", updates.join(", "))
                };
                // The last record of each key wins, and the statement touches each row once
                // (PostgreSQL refuses an upsert that would change a row twice).
                format!(
                    "INSERT INTO {table} ({cols}) SELECT DISTINCT ON ({key}) {cols} FROM {source} WITH ORDINALITY AS r ORDER BY {key}, r.ordinality DESC ON CONFLICT ({key}) {action}"
                )
            }
        }
    }

    /// Writes `payloads` (JSON objects), one statement per run of rows, and returns those
    /// refused for good (index into `payloads`, why). `Err`: nothing can be said for now
    /// (the database is unreachable, say): the caller sends them all again later.
    pub async fn write(&self, payloads: &[&[u8]]) -> Result<Vec<Undeliverable>, String> {
        let mut refused = Vec::new();
        let mut rows = Vec::with_capacity(payloads.len());
        for (index, json) in payloads.iter().enumerate() {
            match serde_json::from_slice::<BTreeMap<String, serde::de::IgnoredAny>>(json) {
                Ok(fields) => {
                    if let Some(k) = self.target.key.iter().find(|k| !fields.contains_key(*k)) {
                        refused.push(Undeliverable {
                            index,
                            reason: format!("the record has no `{k}`, a key column"),
                        });
                    } else {
                        rows.push(Row {
                            index,
                            json,
                            columns: fields.into_keys().collect(),
                        });
                    }
                }
                Err(e) => refused.push(Undeliverable {
                    index,
                    reason: format!("not a JSON object, the fields of a row: {e}"),
                }),
            }
        }
        if rows.is_empty() {
            return Ok(refused);
        }
        let Some(pool) = &self.pool else {
            return Err(format!(
                "[postgres.{}] was added after the host started: restart the host to use it",
                self.database
            ));
        };
        let write = async {
            let client = pool.get().await.map_err(|e| match e {
                deadpool_postgres::PoolError::Backend(e) => describe(&e),
                e => e.to_string(),
            })?;
            // Runs of rows, in order: a run refused for what is in a row is split in two,
            // until the refused rows are alone.
            let mut runs = VecDeque::new();
            runs.push_back(0..rows.len());
            while let Some(run) = runs.pop_front() {
                let part = &rows[run.clone()];
                let columns: BTreeSet<&str> = part
                    .iter()
                    .flat_map(|r| r.columns.iter().map(String::as_str))
                    .collect();
                let mut array = Vec::with_capacity(part.iter().map(|r| r.json.len() + 1).sum());
                array.push(b'[');
                for (i, r) in part.iter().enumerate() {
                    if i > 0 {
                        array.push(b',');
                    }
                    array.extend_from_slice(r.json);
                }
                array.push(b']');
                let array =
                    String::from_utf8(array).map_err(|_| "records are not UTF-8".to_string())?;
                let result = match client.prepare_cached(&self.statement(&columns)).await {
                    Ok(s) => client.execute(&s, &[&array]).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(_) => {}
                    Err(e) if refused_for_good(&e) => {
                        if part.len() == 1 {
                            refused.push(Undeliverable {
                                index: part[0].index,
                                reason: describe(&e),
                            });
                        } else {
                            let mid = run.start + part.len() / 2;
                            runs.push_front(mid..run.end);
                            runs.push_front(run.start..mid);
                        }
                    }
                    Err(e) => return Err(describe(&e)),
                }
            }
            Ok(())
        };
        match tokio::time::timeout(DELIVERY_TIMEOUT, write).await {
            Ok(Ok(())) => {
                refused.sort_by_key(|u| u.index);
                Ok(refused)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("no answer within {DELIVERY_TIMEOUT:?}")),
        }
    }
}

/// An output's sink: its records as rows of a table.
pub struct Table {
    writer: TableWriter,
}

impl Table {
    pub fn new(databases: &Databases, target: &TableTarget) -> Table {
        Table {
            writer: TableWriter::new(databases, target),
        }
    }
}

impl Sink for Table {
    fn send(&self, output: &str, records: &[&OutputRecord]) -> Result<Delivery, SinkError> {
        let writer = self.writer.clone();
        let payloads: Vec<Vec<u8>> = records.iter().map(|r| r.payload.to_vec()).collect();
        let output = output.to_string();
        let destination = writer.destination();
        // Started now, not when awaited: the worker sends every output of a batch before it
        // waits for any, so outputs to tables write at once, each on its own connection.
        let write = tokio::spawn(async move {
            let slices: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            writer.write(&slices).await
        });
        Ok(Box::pin(async move {
            let written = write
                .await
                .unwrap_or_else(|e| Err(format!("the write failed: {e}")));
            written.map_err(|message| SinkError::Refused {
                output,
                destination,
                message,
            })
        }))
    }
}

/// Applies the `.sql` files of `[postgres.NAME] migrations` in name order, each once: those
/// applied are recorded in the table `eddy_migrations`, each file in its own transaction with
/// its record, under an advisory lock (two hosts starting at once apply each file once).
/// Returns the files applied now.
pub async fn migrate(name: &str, db: &PostgresConfig) -> anyhow::Result<Vec<String>> {
    let Some(dir) = &db.migrations else {
        anyhow::bail!("[postgres.{name}] has no `migrations` directory");
    };
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("[postgres.{name}] migrations {}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    let pool = pool(name, db)?;
    let mut client = pool
        .get()
        .await
        .map_err(|e| anyhow::anyhow!("[postgres.{name}]: cannot connect: {e}"))?;
    // Not the server's NOTICEs of `IF NOT EXISTS` on every run.
    client
        .batch_execute(
            "SET client_min_messages = warning; CREATE TABLE IF NOT EXISTS eddy_migrations (name TEXT PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .await
        .map_err(|e| anyhow::anyhow!("[postgres.{name}]: {}", describe(&e)))?;
    let mut applied = Vec::new();
    for file in files {
        let file_name = file
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let sql = std::fs::read_to_string(&file)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        let tx = client.transaction().await?;
        // One migrator at a time (the key: "eddy" in ASCII).
        tx.execute("SELECT pg_advisory_xact_lock(1701078137)", &[])
            .await?;
        let done = tx
            .query_opt(
                "SELECT 1 FROM eddy_migrations WHERE name = $1",
                &[&file_name],
            )
            .await?
            .is_some();
        if done {
            tx.rollback().await?;
            continue;
        }
        tx.batch_execute(&sql)
            .await
            .map_err(|e| anyhow::anyhow!("{}: {}", file.display(), describe(&e)))?;
        tx.execute(
            "INSERT INTO eddy_migrations (name) VALUES ($1)",
            &[&file_name],
        )
        .await?;
        tx.commit().await?;
        applied.push(file_name);
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(mode: WriteMode, key: &[&str]) -> TableWriter {
        TableWriter::new(
            &Databases::default(),
            &TableTarget {
                postgres: "main".into(),
                table: "public.user_stats".into(),
                mode,
                key: key.iter().map(|k| k.to_string()).collect(),
            },
        )
    }

    #[test]
    fn statements_quote_names_and_update_all_but_the_key() {
        let cols: BTreeSet<&str> = ["user_id", "total", "we\"ird"].into_iter().collect();
        let s = writer(WriteMode::Upsert, &["user_id"]).statement(&cols);
        assert_eq!(
            s,
            r#"INSERT INTO "public"."user_stats" ("total", "user_id", "we""ird") SELECT DISTINCT ON ("user_id") "total", "user_id", "we""ird" FROM jsonb_populate_recordset(NULL::"public"."user_stats", $1::text::jsonb) WITH ORDINALITY AS r ORDER BY "user_id", r.ordinality DESC ON CONFLICT ("user_id") DO UPDATE SET "total" = EXCLUDED."total", "we""ird" = EXCLUDED."we""ird""#
        );
        let s = writer(WriteMode::InsertIfAbsent, &["user_id"]).statement(&cols);
        assert!(s.ends_with(r#"ON CONFLICT ("user_id") DO NOTHING"#), "{s}");
        let s = writer(WriteMode::Append, &[]).statement(&cols);
        assert!(!s.contains("ON CONFLICT"), "{s}");
    }

    #[tokio::test]
    async fn records_that_are_no_objects_or_lack_the_key_are_refused_before_any_database() {
        let w = writer(WriteMode::Upsert, &["user_id"]);
        // No pool: anything that reached the database would be an error instead.
        assert!(w.write(&[b"{\"user_id\":1}"]).await.is_err());
        let refused = w.write(&[b"[1]", b"{\"total\":1}"]).await.unwrap();
        assert_eq!(refused.len(), 2);
        assert!(
            refused[0].reason.starts_with("not a JSON object"),
            "{refused:?}"
        );
        assert!(refused[1].reason.contains("no `user_id`"), "{refused:?}");
    }
}
