//! Loading plugins: opening a plugin's state as `[state]` says and starting its sandbox on
//! it, for every plugin at start (in parallel, all failures reported together) and for each
//! one a reload adds.

use crate::config::{Config, PluginConfig};
use crate::kafka::ClusterView;
use crate::state::PluginState;
use crate::wasm::Sandbox;
use anyhow::Context as _;
use wasmtime::Engine;

/// Why a plugin could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Load(#[from] crate::wasm::LoadError),
    #[error(transparent)]
    State(#[from] crate::state::StoreError),
    #[error(
        "state file {path} holds the whole plugin's state, from before `[state] shared_group`. With \
         shared_group each partition has its own state (in {dir}/), and the partitions' share cannot \
         be told apart in that file. Run `eddy reset {plugin}` (the plugin recomputes its state from \
         `start_from`), or set shared_group = false to keep running on it"
    )]
    PluginWideState {
        path: std::path::PathBuf,
        dir: std::path::PathBuf,
        plugin: String,
    },
}

/// Whether `plugin`'s state is kept per partition: `[state] shared_group` with durable
/// state (see `pipeline::lanes`).
pub fn partition_scoped(state: &crate::config::StateConfig) -> bool {
    state.durable && state.shared_group
}

/// Opens `plugin`'s state as `[state]` says (checking saved offsets against `cluster`) and
/// loads the plugin on it. Blocking.
pub fn load_plugin(
    engine: &Engine,
    state: &crate::config::StateConfig,
    plugin: &PluginConfig,
    cluster: &ClusterView,
) -> Result<Sandbox, StartError> {
    let cap = plugin.limits.state_mib << 20;
    let plugin_state = if partition_scoped(state) {
        let path = crate::state::path_for(&state.dir, &plugin.name);
        if path.exists() {
            let store = crate::state::StateStore::open(&path, &plugin.name)?;
            let snapshot = store.load()?;
            if !snapshot.state.is_empty() || !snapshot.offsets.is_empty() {
                return Err(StartError::PluginWideState {
                    dir: crate::state::changelog::dir_for(&state.dir, &plugin.name),
                    path,
                    plugin: plugin.name.clone(),
                });
            }
        }
        // The template of the partitions' instances: it never handles events.
        PluginState::in_memory(cap)
    } else if state.durable {
        let path = crate::state::path_for(&state.dir, &plugin.name);
        if state.shared_group && !path.exists() {
            tracing::info!(
                plugin = %plugin.name,
                "no state file here: joining consumer group `{}` where it is (shared_group), with fresh state for the partitions this host is given",
                plugin.group_id()
            );
        } else if !path.exists() && cluster.group_has_committed(&plugin.group_id()) {
            tracing::warn!(
                plugin = %plugin.name,
                path = %path.display(),
                "no state file, but consumer group `{}` has committed offsets, so this plugin ran before: its state \
                 is gone (deleted or moved?). It starts with fresh state from `start_from` ({}). To undo, stop the \
                 host and put the file back",
                plugin.group_id(),
                plugin.start_from.as_kafka()
            );
        }
        let store = crate::state::open_checked(&state.dir, &plugin.name, cluster)?;
        PluginState::durable(store, cap)?
    } else {
        PluginState::in_memory(cap)
    };
    Ok(Sandbox::load(
        engine,
        plugin,
        plugin_state,
        Some(&state.compiled_dir()),
    )?)
}

/// Loads every plugin, in parallel (compiling is the slow part). All failures are reported
/// together, so a user fixes them in one go.
pub async fn load_all(
    engine: &Engine,
    config: &Config,
    cluster: &ClusterView,
) -> anyhow::Result<Vec<Sandbox>> {
    let loads: Vec<_> = config
        .plugins
        .iter()
        .map(|p| {
            let (engine, p, state, cluster) = (
                engine.clone(),
                p.clone(),
                config.state.clone(),
                cluster.clone(),
            );
            tokio::task::spawn_blocking(move || {
                load_plugin(&engine, &state, &p, &cluster).map_err(|e| (p.name.clone(), e))
            })
        })
        .collect();
    let mut sandboxes = Vec::new();
    let mut errors = Vec::new();
    for load in loads {
        match load.await.context("loading a plugin")? {
            Ok(s) => sandboxes.push(s),
            Err((name, e)) => errors.push(format!("plugin `{name}`: {e}")),
        }
    }
    load_errors(errors).map(|()| sandboxes)
}

/// One error for every plugin that failed to load, each line naming its plugin.
pub fn load_errors(errors: Vec<String>) -> anyhow::Result<()> {
    match errors.len() {
        0 => Ok(()),
        1 => anyhow::bail!("{}", errors[0]),
        n => anyhow::bail!("{n} plugins failed to load:\n  {}", errors.join("\n  ")),
    }
}
