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
//! Errors are classed by SQLSTATE ([`refusal`]): a statement refused for what its rows hold
//! (class 22, data exception: a bad time, an invalid byte sequence, a NUL; 23, integrity
//! constraint; 27, 44, P0, 54: a trigger or a check; 42, except what names the table itself:
//! a field naming no column, a generated column) is retried on halves of the records until
//! the refused rows are alone, each statement bounded by [`STATEMENT_TIMEOUT`] of its own
//! (a statement refused while prepared is refused for its columns: a run whose rows all
//! name the same is refused whole, without halving). Those rows are [`Undeliverable`] (the
//! worker dead-letters them with the database's message), as is a record that is not UTF-8
//! or not a JSON object, and the rest are written. Anything else (the database down or
//! restarting, a timeout, a missing table, no right to it, a full pool) is a [`WriteError`]:
//! the worker retries the whole delivery with backoff, holding the offsets.
//! Rows already written are written again by a retry, which `insert_if_absent` and `upsert`
//! absorb (see the README's PostgreSQL section for why that makes them exactly once).
//!
//! A write given up on stops: each statement runs in a transaction of its own, committed
//! only once it has answered, and a write that times out or whose delivery is dropped
//! closes its connection mid-transaction (no commit) and cancels the statement (see
//! `Held`), so a stale statement never lands after a newer one and rows only move forward.

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

/// How long one statement may take (the wait for a connection is bounded the same way).
pub const STATEMENT_TIMEOUT: Duration = DELIVERY_TIMEOUT;

/// The pools of every `[postgres.NAME]`, made at start (connections are opened on first use,
/// so a database that is down does not stop the host: its outputs wait for it).
#[derive(Clone, Default)]
pub struct Databases {
    pools: Arc<BTreeMap<String, (Pool, Cancel)>>,
}

impl Databases {
    pub fn new(config: &BTreeMap<String, PostgresConfig>) -> anyhow::Result<Databases> {
        let mut pools = BTreeMap::new();
        for (name, db) in config {
            pools.insert(name.clone(), connect(name, db)?);
        }
        Ok(Databases {
            pools: Arc::new(pools),
        })
    }

    pub fn get(&self, name: &str) -> Option<&Pool> {
        self.pools.get(name).map(|(pool, _)| pool)
    }
}

/// How to ask the server to cancel a statement: over a connection of the same kind as the
/// pool's (with TLS where the pool has it).
#[derive(Clone)]
enum Cancel {
    Plain,
    Tls(MakeRustlsConnect),
}

impl Cancel {
    async fn cancel(&self, token: &tokio_postgres::CancelToken) {
        let result = match self {
            Cancel::Plain => token.cancel_query(NoTls).await,
            Cancel::Tls(tls) => token.cancel_query(tls.clone()).await,
        };
        if let Err(e) = result {
            // The connection is closed meanwhile, which ends the transaction as well.
            tracing::debug!("cannot cancel a statement given up on: {}", describe(&e));
        }
    }
}

/// A pool of at most `pool_size` connections to `db`.
pub fn pool(name: &str, db: &PostgresConfig) -> anyhow::Result<Pool> {
    connect(name, db).map(|(pool, _)| pool)
}

/// [`pool`], and how to cancel a statement on its connections.
fn connect(name: &str, db: &PostgresConfig) -> anyhow::Result<(Pool, Cancel)> {
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
    let (manager, cancel) = match pg.get_ssl_mode() {
        // TLS only where it is required, and then verified: `prefer` with a verifying
        // connector would refuse a server whose certificate it cannot verify (libpq's
        // `prefer` encrypts without verifying, which protects against nothing active).
        SslMode::Require => {
            let tls = tls(name, db)?;
            (
                Manager::from_config(pg, tls.clone(), manager_config),
                Cancel::Tls(tls),
            )
        }
        _ => (
            Manager::from_config(pg, NoTls, manager_config),
            Cancel::Plain,
        ),
    };
    let pool = Pool::builder(manager)
        .max_size(db.pool_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(CONNECT_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .map_err(|e| anyhow::anyhow!("[postgres.{name}]: {e}"))?;
    Ok((pool, cancel))
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

/// What PostgreSQL's refusal of a statement says about it, by SQLSTATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Refused for what its rows hold (their values or their fields): the same rows would
    /// be refused again, however often they are sent.
    Rows,
    /// Refused for the state of the database or of the connection (down, restarting, busy,
    /// a missing table, no right to it): sending the same rows later may succeed.
    ForNow,
}

/// Classifies a SQLSTATE by its class (its first two characters), and within class 42 by
/// whether it names the table (for now: a migration or a `GRANT` may come) or the fields.
fn refusal(code: &str) -> Refusal {
    match code.get(..2).unwrap_or("") {
        // Data exception (22021 invalid byte sequence, 22P05 a NUL, 22007 a bad time, 22001
        // too long, …), integrity constraint (23502 NOT NULL, 23514 CHECK, …), a trigger's
        // or a view's check (27, 44), a trigger raising (P0).
        "22" | "23" | "27" | "44" | "P0" => Refusal::Rows,
        // Program limit exceeded by a row: an index row too big (54000), too many columns.
        "54" => Refusal::Rows,
        // Syntax error or access rule violation: about the fields (42703 no such column,
        // 428C9 a generated column, 42804 a type, 42601 a name no identifier can be, …)
        // except those about the table itself.
        "42" => match code {
            "42P01" | "42501" | "42704" | "42883" => Refusal::ForNow,
            _ => Refusal::Rows,
        },
        _ => Refusal::ForNow,
    }
}

/// [`refusal`] of a client error: one without a SQLSTATE (a closed connection, a timeout
/// of the socket) is for now.
fn refusal_of(e: &tokio_postgres::Error) -> Refusal {
    e.code().map_or(Refusal::ForNow, |c| refusal(c.code()))
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
    pool: Option<(Pool, Cancel)>,
    target: TableTarget,
}

impl TableWriter {
    pub fn new(databases: &Databases, target: &TableTarget) -> TableWriter {
        TableWriter {
            database: target.postgres.clone(),
            pool: databases.pools.get(&target.postgres).cloned(),
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
    ///
    /// Each statement has [`STATEMENT_TIMEOUT`] of its own, so a batch whose every row is
    /// refused (about 2n statements to isolate them) is bounded per statement, not as a
    /// whole: however large, it ends with its rows refused rather than timed out and begun
    /// again.
    pub async fn write(&self, payloads: &[&[u8]]) -> Result<Vec<Undeliverable>, WriteError> {
        let mut refused = Vec::new();
        let mut rows = Vec::with_capacity(payloads.len());
        for (index, json) in payloads.iter().enumerate() {
            // The statement's parameter is text: a record that is not UTF-8 can never be one.
            if let Err(e) = std::str::from_utf8(json) {
                refused.push(Undeliverable {
                    index,
                    reason: format!("not UTF-8 text, which a row must be: {e}"),
                });
                continue;
            }
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
        let Some((pool, cancel)) = &self.pool else {
            return Err(WriteError::NoDatabase(self.database.clone()));
        };
        let mut client = match tokio::time::timeout(STATEMENT_TIMEOUT, pool.get()).await {
            Ok(Ok(client)) => Held {
                client: Some(client),
                cancel: cancel.clone(),
                open: false,
            },
            Ok(Err(deadpool_postgres::PoolError::Backend(e))) => {
                return Err(WriteError::Database(describe(&e)));
            }
            Ok(Err(e)) => return Err(WriteError::Database(e.to_string())),
            Err(_) => return Err(WriteError::TimedOut(STATEMENT_TIMEOUT)),
        };
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
            let mut array = String::with_capacity(part.iter().map(|r| r.json.len() + 1).sum());
            array.push('[');
            for (i, r) in part.iter().enumerate() {
                if i > 0 {
                    array.push(',');
                }
                // Checked above.
                array.push_str(std::str::from_utf8(r.json).unwrap_or_default());
            }
            array.push(']');
            let statement = self.statement(&columns);
            let result = client.run(&statement, &array).await?;
            match result {
                Ok(()) => {}
                Err((stage, e)) if refusal_of(&e) == Refusal::Rows => {
                    // Refused before any row was read: for the columns, which every row
                    // of the run names if they all name the same.
                    let same_columns = stage == Stage::Prepare
                        && part.iter().all(|r| r.columns == part[0].columns);
                    if part.len() == 1 || same_columns {
                        let reason = describe(&e);
                        refused.extend(part.iter().map(|r| Undeliverable {
                            index: r.index,
                            reason: reason.clone(),
                        }));
                    } else {
                        let mid = run.start + part.len() / 2;
                        runs.push_front(mid..run.end);
                        runs.push_front(run.start..mid);
                    }
                }
                Err((_, e)) => return Err(WriteError::Database(describe(&e))),
            }
        }
        refused.sort_by_key(|u| u.index);
        Ok(refused)
    }
}

/// Where a statement was refused: preparing it (its columns) or running it (its rows, or
/// the transaction around it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Prepare,
    Run,
}

/// A pooled connection while a write uses it. Each statement runs in a transaction of its
/// own, committed only once the statement has answered: a write given up on (timed out, or
/// its future dropped because the delivery was) never commits the statement in flight. The
/// connection is then taken out of the pool and closed, which ends the transaction on the
/// server without a commit, and the statement is cancelled so that it lets go of its locks
/// at once. (Given up on while the commit itself is on its way, the commit may land; its
/// rows are locked from the statement's end until then, so a later write to them waits for
/// it and lands after it.) Rows therefore only move forward.
struct Held {
    client: Option<deadpool_postgres::Object>,
    cancel: Cancel,
    /// A transaction is open on the connection.
    open: bool,
}

impl Held {
    /// Runs `statement` with `array` in a transaction of its own, within
    /// [`STATEMENT_TIMEOUT`]. `Ok(Err)`: PostgreSQL refused it (rolled back); `Err`: no
    /// answer in time (the transaction is ended without a commit when `self` is dropped).
    async fn run(
        &mut self,
        statement: &str,
        array: &str,
    ) -> Result<Result<(), (Stage, tokio_postgres::Error)>, WriteError> {
        let client = self.client.as_mut().expect("held until dropped");
        self.open = true;
        let outcome = tokio::time::timeout(STATEMENT_TIMEOUT, async {
            let tx = client.transaction().await.map_err(|e| (Stage::Run, e))?;
            let s = match tx.prepare_cached(statement).await {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.rollback().await;
                    return Err((Stage::Prepare, e));
                }
            };
            if let Err(e) = tx.execute(&s, &[&array]).await {
                let _ = tx.rollback().await;
                return Err((Stage::Run, e));
            }
            tx.commit().await.map_err(|e| (Stage::Run, e))
        })
        .await;
        match outcome {
            Ok(result) => {
                self.open = false;
                Ok(result)
            }
            Err(_) => Err(WriteError::TimedOut(STATEMENT_TIMEOUT)),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.open {
            return;
        }
        let Some(client) = self.client.take() else {
            return;
        };
        tracing::warn!(
            "a PostgreSQL write was given up on mid-statement: its transaction is ended without a commit and the statement cancelled"
        );
        let token = client.cancel_token();
        // Not back to the pool: closed, which rolls the transaction back on the server.
        drop(deadpool_postgres::Object::take(client));
        let cancel = self.cancel.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { cancel.cancel(&token).await });
        }
    }
}

/// Why rows could not be written for now (the caller sends them all again later).
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("[postgres.{0}] was added after the host started: restart the host to use it")]
    NoDatabase(String),
    /// The database's (or the client's) words.
    #[error("{0}")]
    Database(String),
    /// A statement (or the wait for a connection) took longer than this.
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
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
        // Stopped if the delivery is dropped (the worker gave up on it): see [`Held`].
        let write = AbortOnDrop(tokio::spawn(async move {
            let slices: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            writer.write(&slices).await
        }));
        Ok(Box::pin(async move {
            match write.await {
                Ok(Ok(refused)) => Ok(refused),
                Ok(Err(WriteError::TimedOut(_))) => Err(SinkError::TimedOut {
                    output,
                    destination,
                }),
                Ok(Err(e)) => Err(SinkError::Refused {
                    output,
                    destination,
                    message: e.to_string(),
                }),
                Err(e) => Err(SinkError::Refused {
                    output,
                    destination,
                    message: format!("the write failed: {e}"),
                }),
            }
        }))
    }
}

/// A spawned task, aborted when its handle is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> std::future::Future for AbortOnDrop<T> {
    type Output = Result<T, tokio::task::JoinError>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
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
        // Not UTF-8: the statement's text parameter could never carry it (this was an error
        // for the whole batch, retried forever).
        let refused = w.write(&[b"{\"user_id\":\"\xff\"}"]).await.unwrap();
        assert_eq!(refused.len(), 1);
        assert!(refused[0].reason.starts_with("not UTF-8"), "{refused:?}");
    }

    #[test]
    fn refusals_are_classed_by_sqlstate_class() {
        for code in [
            "22021", "22P05", "22007", "22001", "23502", "23514", "42703", "428C9", "42804",
            "42601", "42701", "54000", "P0001", "27000", "44000",
        ] {
            assert_eq!(refusal(code), Refusal::Rows, "{code}");
        }
        for code in [
            "08006", "57P01", "57014", "53300", "40001", "40P01", "55P03", "42P01", "42501",
            "XX000", "58030", "3D000", "28P01", "25P02",
        ] {
            assert_eq!(refusal(code), Refusal::ForNow, "{code}");
        }
    }
}
