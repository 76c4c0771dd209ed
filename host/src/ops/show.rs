//! `eddy state` (show a plugin's state, or one key) and `eddy reset` (drop it).

use super::{OpsError, state_file};
use crate::config::Config;
use crate::state::{StateStore, StoreError, store};
use rdkafka::Offset;
use std::fmt::Write;

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
