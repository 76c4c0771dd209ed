//! `eddy state` (show a plugin's state, or one key) and `eddy reset` (drop it).

use super::{OpsError, state_file};
use crate::config::Config;
use crate::state::{StateStore, StoreError, changelog, store};
use rdkafka::Offset;
use std::fmt::Write;
use std::path::Path;

/// What to show of the state.
#[derive(Debug, Default)]
pub struct Show {
    /// Only keys starting with this.
    pub prefix: String,
    /// At most this many keys.
    pub limit: usize,
}

/// A readable summary: file, size, offsets, metadata and keys with a preview of each value;
/// with partition-scoped state, one such summary per partition file on this host.
pub fn describe(config: &Config, plugin: &str, show: &Show) -> Result<String, OpsError> {
    let path = state_file(config, plugin)?;
    let mut out = String::new();
    if !crate::supervisor::partition_scoped(&config.state) {
        let snap = store::read_only_snapshot(&path, plugin)?;
        describe_one(&mut out, &format!("plugin {plugin}"), &path, &snap, show);
        return Ok(out);
    }
    let files = partitions(config, plugin)?;
    let _ = writeln!(
        out,
        "plugin {plugin}: state per partition ({} files on this host in {}; the partitions other hosts hold are in theirs)",
        files.len(),
        changelog::dir_for(&config.state.dir, plugin).display()
    );
    for (partition, file, snap) in &files {
        describe_one(
            &mut out,
            &format!("partition {partition}"),
            file,
            snap,
            show,
        );
    }
    Ok(out)
}

fn describe_one(out: &mut String, label: &str, path: &Path, snap: &store::Snapshot, show: &Show) {
    let bytes: usize = snap.state.iter().map(|(k, v)| k.len() + v.len()).sum();
    let _ = writeln!(out, "{label}: {}", path.display());
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
}

/// The value of one key, as stored. With partition-scoped state, from the one partition
/// file on this host that has it (a key several partitions have, each their own, is an
/// error that names them).
pub fn get(config: &Config, plugin: &str, key: &str) -> Result<Option<Vec<u8>>, OpsError> {
    let path = state_file(config, plugin)?;
    if !crate::supervisor::partition_scoped(&config.state) {
        return Ok(store::read_only_snapshot(&path, plugin)?.state.remove(key));
    }
    let mut found: Vec<(i32, Vec<u8>)> = partitions(config, plugin)?
        .into_iter()
        .filter_map(|(p, _, mut snap)| snap.state.remove(key).map(|v| (p, v)))
        .collect();
    if found.len() > 1 {
        return Err(OpsError::InSeveralPartitions {
            key: key.to_string(),
            partitions: found
                .iter()
                .map(|(p, _)| p.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            plugin: plugin.to_string(),
        });
    }
    Ok(found.pop().map(|(_, v)| v))
}

/// With partition-scoped state: each partition file of `plugin` on this host, with what it
/// holds.
pub fn partitions(
    config: &Config,
    plugin: &str,
) -> Result<Vec<(i32, std::path::PathBuf, store::Snapshot)>, OpsError> {
    state_file(config, plugin)?;
    changelog::partition_files(&config.state.dir, plugin)
        .into_iter()
        .map(|(p, file)| {
            let snap = store::read_only_snapshot(&file, plugin)?;
            Ok((p, file, snap))
        })
        .collect()
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
    if crate::supervisor::partition_scoped(&config.state) {
        return reset_partitions(config, plugin, &path);
    }
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

/// [`reset`] of partition-scoped state: the partition files on this host, any plugin-wide
/// file from before, and the changelog (else the next start would restore from it). Other
/// hosts sharing the group must be stopped and reset too.
fn reset_partitions(
    config: &Config,
    plugin: &str,
    path: &std::path::Path,
) -> Result<String, OpsError> {
    let dir = changelog::dir_for(&config.state.dir, plugin);
    let io = |path: &std::path::Path, e: std::io::Error| StoreError::Io {
        path: path.to_path_buf(),
        source: Box::new(redb::Error::Io(e)),
    };
    let group = config
        .plugins
        .iter()
        .find(|p| p.name == plugin)
        .map(|p| p.group_id())
        .unwrap_or_default();
    let topic = changelog::topic_for(&group);
    if !config.embedded() {
        let client = crate::kafka::client_config(&config.kafka, &config.kafka.brokers);
        delete_topic(&client, &topic).map_err(|e| {
            OpsError::Kafka(format!(
                "cannot delete changelog topic `{topic}` ({e}): without that the next start restores the state from it. Delete it yourself, then run `eddy reset {plugin}` again"
            ))
        })?;
    }
    for (_, file) in changelog::partition_files(&config.state.dir, plugin) {
        std::fs::remove_file(&file).map_err(|e| io(&file, e))?;
    }
    if path.exists() {
        std::fs::remove_file(path).map_err(|e| io(path, e))?;
    }
    Ok(format!(
        "dropped the state of plugin {plugin} ({}) and its changelog `{topic}`: at its next start it begins again where its group is (reset every host sharing it)",
        dir.display()
    ))
}

/// Deletes `topic` (gone already is fine). Blocking.
fn delete_topic(client: &rdkafka::ClientConfig, topic: &str) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = client.create()?;
    let options = AdminOptions::new().operation_timeout(Some(std::time::Duration::from_secs(10)));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for r in runtime.block_on(admin.delete_topics(&[topic], &options))? {
        match r {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((_, e)) => anyhow::bail!("{e}"),
        }
    }
    Ok(())
}
