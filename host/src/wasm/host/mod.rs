//! The host side of the `eddy:plugin` imports: [`HostState`] is what one plugin's imports
//! read and write, and each interface's generated `Host` trait is implemented in a module of
//! its own (as wasmtime's `wasi-keyvalue` does): [`state`], [`output`], [`logging`].

mod logging;
mod output;
mod state;

use super::bindings::eddy::plugin::types;
use super::bindings::eddy::plugin::types::OutputRecord;
use crate::config::PluginConfig;
use crate::state::PluginState;
use std::collections::BTreeSet;
use std::sync::Arc;

/// The host side of one plugin: what its imports read and write.
pub struct HostState {
    pub(crate) plugin: Arc<str>,
    pub state: PluginState,
    /// Records emitted by the batch's calls, not yet delivered.
    pub(crate) outputs: Vec<OutputRecord>,
    /// Length of `outputs` before the current call, to drop just its records on a trap.
    pub(crate) outputs_mark: usize,
    /// Output names `plugins.toml` maps for this plugin.
    pub(crate) output_names: Arc<BTreeSet<String>>,
}

impl HostState {
    pub fn new(plugin: &PluginConfig, state: PluginState) -> HostState {
        HostState {
            plugin: plugin.name.as_str().into(),
            state,
            outputs: Vec::new(),
            outputs_mark: 0,
            output_names: Arc::new(plugin.outputs.keys().cloned().collect()),
        }
    }
}

impl types::Host for HostState {}
