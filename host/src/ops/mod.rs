//! Operations on a plugin's durable state, for the `eddy state`, `eddy reset` and
//! `eddy replay` commands. They need the host stopped: it holds each state file locked
//! while it runs (the error says so). `state` only reads.

mod replay;
mod show;

pub use replay::{From, replay};
pub use show::{Show, describe, get, partitions, reset};

use crate::config::Config;
use crate::state::StoreError;

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
        "key `{key}` is in partitions {partitions} (partition-scoped state: each partition has its own); `eddy state {plugin}` shows each"
    )]
    InSeveralPartitions {
        key: String,
        partitions: String,
        plugin: String,
    },
    #[error(
        "`{position}` is not `earliest`, `latest`, an offset or an RFC 3339 time like 2024-01-15T10:00:00Z ({reason})"
    )]
    BadPosition { position: String, reason: String },
}

pub(crate) fn state_file(config: &Config, plugin: &str) -> Result<std::path::PathBuf, OpsError> {
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
    Ok(crate::state::path_for(&config.state.dir, plugin))
}
