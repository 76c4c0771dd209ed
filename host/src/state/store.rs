//! The durable store behind [`DurableStore`](super::DurableStore): an embedded [redb]
//! database file per plugin, holding the
//! plugin's keys and values, the input offsets its state reflects, and a little metadata.
//!
//! Why redb: pure Rust (nothing to build beyond cargo), one file per database, ACID
//! transactions with a crash-safe commit (fsync'd copy-on-write B-trees, no write-ahead log
//! to replay), actively maintained with a stable file format. An LSM store (fjall) would
//! write faster under heavy load but brings compaction threads and several files per plugin;
//! our writes are one small transaction per batch.
//!
//! The point of keeping offsets here: the host writes a batch's state changes and the offsets
//! that batch advanced in one transaction, so after a crash at any moment the file holds a
//! state that reflects exactly the events before its offsets, and the host resumes from
//! those offsets (not from whatever Kafka last had). Each event's effect on state is then
//! applied exactly once.
//!
//! Isolation: each plugin has its own file, which only the host opens; a plugin names keys
//! inside it and cannot name a file, so no key, length or prefix reaches another plugin.
//!
//! [redb]: https://www.redb.org

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
/// (topic, partition) → the next offset to consume.
const OFFSETS: TableDefinition<(&str, i32), i64> = TableDefinition::new("offsets");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// Key → when it expires (milliseconds on the plugin's `[plugin.expire]` clock), for the
/// keys that do.
const EXPIRES: TableDefinition<&str, i64> = TableDefinition::new("expires");

/// redb's page cache per state file. Reads are served from the host's own copy of the state
/// (see `overlay.rs`), so the cache only speeds up writes; redb's default (1 GiB a file) let
/// four plugins with ~700,000 keys between them hold over a gigabyte (`make soak`).
const CACHE_BYTES: usize = 32 << 20;

/// The Kafka cluster the offsets refer to.
pub const META_CLUSTER: &str = "kafka.cluster_id";
/// The plugin version (content digest) that last committed.
pub const META_WRITER: &str = "plugin.digest";
/// The latest event time (Kafka record timestamp, ms) the committed state has seen: the
/// event clock of `[plugin.expire]`.
pub const META_EVENT_TIME: &str = "state.event_time_ms";

use super::{Change, DurableStore, ExpiryChange, Offsets};
use crate::kafka::ClusterView;
use crate::kafka::cluster::EMBEDDED_PREFIX;

/// Why the store cannot be used. Each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "state file {path} is in use by another process (is another eddy running with this data directory?)"
    )]
    Locked { path: PathBuf },
    #[error(
        "state file {path} cannot be read ({source}). It is damaged or not a state file. To recover: \
         `eddy reset {plugin}` drops it (the plugin then recomputes its state from `start_from`), \
         or restore the file from a backup"
    )]
    Damaged {
        path: PathBuf,
        plugin: String,
        source: Box<redb::Error>,
    },
    #[error("state file {path}: {source}")]
    Io {
        path: PathBuf,
        source: Box<redb::Error>,
    },
}

/// Everything a store holds, read at open.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Snapshot {
    pub state: BTreeMap<String, Vec<u8>>,
    /// When each expiring key expires.
    pub expires: BTreeMap<String, i64>,
    pub offsets: Offsets,
    pub meta: BTreeMap<String, String>,
}

/// An open state file.
pub struct StateStore {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateStore")
            .field("path", &self.path)
            .finish()
    }
}

/// The file of `plugin`'s state in `dir`.
pub fn path_for(dir: &Path, plugin: &str) -> PathBuf {
    dir.join(format!("{plugin}.redb"))
}

impl StateStore {
    /// Opens (or creates) the state file of `plugin` at `path`.
    pub fn open(path: &Path, plugin: &str) -> Result<StateStore, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Io {
                path: path.to_path_buf(),
                source: Box::new(redb::Error::Io(e)),
            })?;
        }
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| classify(path, plugin, e.into()))?;
        let store = StateStore {
            db,
            path: path.to_path_buf(),
        };
        // Create the tables, so readers never meet a half-initialised file.
        store.write(|txn| {
            txn.open_table(STATE)?;
            txn.open_table(OFFSETS)?;
            txn.open_table(META)?;
            txn.open_table(EXPIRES)?;
            Ok(())
        })?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads everything.
    pub fn load(&self) -> Result<Snapshot, StoreError> {
        read_snapshot(&self.db).map_err(|e| StoreError::Io {
            path: self.path.clone(),
            source: Box::new(e),
        })
    }

    /// Applies a batch in one atomic transaction: the state changes (`None` deletes), the
    /// expiries that changed, and the offsets the batch advanced, plus metadata; on disk
    /// when it returns.
    pub fn commit(
        &self,
        changes: &mut dyn Iterator<Item = Change<'_>>,
        expiries: &mut dyn Iterator<Item = ExpiryChange<'_>>,
        offsets: &Offsets,
        meta: &[(&str, &str)],
    ) -> Result<(), StoreError> {
        self.write(|txn| {
            let mut state = txn.open_table(STATE)?;
            for (k, v) in changes {
                match v {
                    Some(v) => state.insert(k, v)?,
                    None => state.remove(k)?,
                };
            }
            let mut expires = txn.open_table(EXPIRES)?;
            for (k, at) in expiries {
                match at {
                    Some(at) => expires.insert(k, at)?,
                    None => expires.remove(k)?,
                };
            }
            let mut table = txn.open_table(OFFSETS)?;
            for ((topic, partition), next) in offsets {
                table.insert((topic.as_str(), *partition), *next)?;
            }
            let mut table = txn.open_table(META)?;
            for (k, v) in meta {
                table.insert(*k, *v)?;
            }
            Ok(())
        })
    }

    /// Replaces the saved offsets with `offsets` (all of them; an empty map clears them).
    pub fn set_offsets(&self, offsets: &Offsets) -> Result<(), StoreError> {
        self.write(|txn| {
            txn.delete_table(OFFSETS)?;
            let mut table = txn.open_table(OFFSETS)?;
            for ((topic, partition), next) in offsets {
                table.insert((topic.as_str(), *partition), *next)?;
            }
            Ok(())
        })
    }

    /// Drops all state and offsets (metadata too).
    pub fn clear(&self) -> Result<(), StoreError> {
        self.write(|txn| {
            txn.delete_table(STATE)?;
            txn.delete_table(OFFSETS)?;
            txn.delete_table(META)?;
            txn.delete_table(EXPIRES)?;
            txn.open_table(STATE)?;
            txn.open_table(OFFSETS)?;
            txn.open_table(META)?;
            txn.open_table(EXPIRES)?;
            Ok(())
        })
    }

    /// Number of keys and their total size (keys + values), in bytes.
    pub fn size(&self) -> Result<(u64, u64), StoreError> {
        let snap = self.load()?;
        let bytes = snap
            .state
            .iter()
            .map(|(k, v)| (k.len() + v.len()) as u64)
            .sum();
        Ok((snap.state.len() as u64, bytes))
    }

    fn write(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), StoreError> {
        let run = || -> Result<(), redb::Error> {
            let txn = self.db.begin_write()?;
            f(&txn)?;
            txn.commit()?;
            Ok(())
        };
        run().map_err(|e| StoreError::Io {
            path: self.path.clone(),
            source: Box::new(e),
        })
    }
}

/// Reads a state file without opening it for writing.
pub fn read_only_snapshot(path: &Path, plugin: &str) -> Result<Snapshot, StoreError> {
    if !path.is_file() {
        return Err(StoreError::Io {
            path: path.to_path_buf(),
            source: Box::new(redb::Error::Io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no such file",
            ))),
        });
    }
    let db = match redb::ReadOnlyDatabase::open(path) {
        Ok(db) => db,
        // Not closed cleanly (the host was killed): opening it for writing repairs it first,
        // as the host itself does at its next start (the host is stopped, or this fails
        // with `Locked`).
        Err(redb::DatabaseError::RepairAborted) => return StateStore::open(path, plugin)?.load(),
        Err(e) => return Err(classify(path, plugin, e.into())),
    };
    read_snapshot(&db).map_err(|e| classify(path, plugin, e))
}

fn read_snapshot(db: &impl ReadableDatabase) -> Result<Snapshot, redb::Error> {
    let txn = db.begin_read()?;
    let mut snap = Snapshot::default();
    for entry in txn.open_table(STATE)?.iter()? {
        let (k, v) = entry?;
        snap.state.insert(k.value().to_string(), v.value().to_vec());
    }
    for entry in txn.open_table(OFFSETS)?.iter()? {
        let (k, v) = entry?;
        let (topic, partition) = k.value();
        snap.offsets
            .insert((topic.to_string(), partition), v.value());
    }
    for entry in txn.open_table(META)?.iter()? {
        let (k, v) = entry?;
        snap.meta
            .insert(k.value().to_string(), v.value().to_string());
    }
    // A file written before expiry existed has no such table.
    match txn.open_table(EXPIRES) {
        Ok(table) => {
            for entry in table.iter()? {
                let (k, v) = entry?;
                snap.expires.insert(k.value().to_string(), v.value());
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(snap)
}

fn classify(path: &Path, plugin: &str, e: redb::Error) -> StoreError {
    match e {
        redb::Error::DatabaseAlreadyOpen => StoreError::Locked {
            path: path.to_path_buf(),
        },
        // Not a redb file, or a truncated one: damaged. Other I/O errors (permissions, a
        // full disk) are about the file system, not the file.
        redb::Error::Io(ref io)
            if !matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            StoreError::Io {
                path: path.to_path_buf(),
                source: Box::new(e),
            }
        }
        other => StoreError::Damaged {
            path: path.to_path_buf(),
            plugin: plugin.to_string(),
            source: Box::new(other),
        },
    }
}

/// Number of entries in the state table (cheap: no scan).
pub fn count_keys(store: &StateStore) -> Result<u64, StoreError> {
    let run =
        || -> Result<u64, redb::Error> { Ok(store.db.begin_read()?.open_table(STATE)?.len()?) };
    run().map_err(|e| StoreError::Io {
        path: store.path.clone(),
        source: Box::new(e),
    })
}

impl DurableStore for StateStore {
    fn load(&self) -> Result<Snapshot, StoreError> {
        StateStore::load(self)
    }

    fn commit(
        &self,
        changes: &mut dyn Iterator<Item = Change<'_>>,
        expiries: &mut dyn Iterator<Item = ExpiryChange<'_>>,
        offsets: &Offsets,
        meta: &[(&str, &str)],
    ) -> Result<(), StoreError> {
        StateStore::commit(self, changes, expiries, offsets, meta)
    }

    fn path(&self) -> &Path {
        StateStore::path(self)
    }
}

/// Opens `plugin`'s state file in `dir` and checks it against `cluster`. If its offsets
/// cannot belong to this cluster (the embedded broker forgets everything when the host
/// exits; a topic was re-created), they would be misapplied: the file is moved aside as a
/// backup, with a warning, and the plugin starts with fresh state.
pub fn open_checked(
    dir: &Path,
    plugin: &str,
    cluster: &ClusterView,
) -> Result<StateStore, StoreError> {
    let path = path_for(dir, plugin);
    let store = StateStore::open(&path, plugin)?;
    let snapshot = store.load()?;
    let saved_cluster = snapshot.meta.get(META_CLUSTER).map(String::as_str);
    let store = match cluster.mismatch(saved_cluster, &snapshot.offsets) {
        None => store,
        Some(why) if saved_cluster.is_some_and(|id| id.starts_with(EMBEDDED_PREFIX)) => {
            // Written against an embedded broker of an earlier run: that broker and its
            // offsets are gone for good, so there is nothing to keep.
            store.clear()?;
            tracing::info!(
                plugin,
                "starting with fresh state: {why} (the embedded broker forgets its topics and offsets when the host exits, and so does the state)"
            );
            store
        }
        Some(why) => {
            drop(store);
            let stamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let backup = path.with_extension(format!("redb.{stamp}.bak"));
            std::fs::rename(&path, &backup).map_err(|e| StoreError::Io {
                path: path.clone(),
                source: Box::new(redb::Error::Io(e)),
            })?;
            tracing::warn!(
                plugin,
                backup = %backup.display(),
                "saved state does not match the Kafka cluster: {why}. Its offsets mean nothing here, so the \
                 plugin starts with fresh state (from `start_from`); the old file is kept as the backup"
            );
            StateStore::open(&path, plugin)?
        }
    };
    if let Some(id) = &cluster.id {
        store.commit(
            &mut std::iter::empty(),
            &mut std::iter::empty(),
            &Offsets::new(),
            &[(META_CLUSTER, id)],
        )?;
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_and_offsets_survive_a_reopen_together() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(dir.path(), "p");
        {
            let s = StateStore::open(&path, "p").unwrap();
            let mut changes = [("a", Some(&b"1"[..])), ("b", Some(&b"2"[..]))].into_iter();
            let offsets = [(("t".to_string(), 0), 10), (("t".to_string(), 3), 7)]
                .into_iter()
                .collect();
            let mut expiries = [("b", Some(5_000))].into_iter();
            s.commit(
                &mut changes,
                &mut expiries,
                &offsets,
                &[(META_CLUSTER, "c1")],
            )
            .unwrap();
            let mut changes = [("a", None), ("c", Some(&b"3"[..]))].into_iter();
            let mut expiries = [("c", Some(9_000))].into_iter();
            let offsets = [(("t".to_string(), 0), 12)].into_iter().collect();
            s.commit(&mut changes, &mut expiries, &offsets, &[])
                .unwrap();
        }
        let s = StateStore::open(&path, "p").unwrap();
        let snap = s.load().unwrap();
        assert_eq!(snap.state.keys().collect::<Vec<_>>(), ["b", "c"]);
        let expires: Vec<(&str, i64)> =
            snap.expires.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(expires, [("b", 5_000), ("c", 9_000)]);
        assert_eq!(snap.offsets[&("t".to_string(), 0)], 12);
        assert_eq!(snap.offsets[&("t".to_string(), 3)], 7);
        assert_eq!(snap.meta[META_CLUSTER], "c1");
        assert_eq!(count_keys(&s).unwrap(), 2);
        s.clear().unwrap();
        assert_eq!(s.load().unwrap(), Snapshot::default());
    }

    #[test]
    fn a_second_open_is_refused_while_the_first_is_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(dir.path(), "p");
        let _first = StateStore::open(&path, "p").unwrap();
        let err = StateStore::open(&path, "p").unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    }

    #[test]
    fn a_damaged_file_says_how_to_recover() {
        let dir = tempfile::tempdir().unwrap();
        let path = path_for(dir.path(), "analytics");
        std::fs::write(&path, vec![0xAB; 64 * 1024]).unwrap();
        let err = StateStore::open(&path, "analytics")
            .unwrap_err()
            .to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        assert!(err.contains("eddy reset analytics"), "{err}");
    }
}
