//! The host side of the `eddy:plugin` imports: [`HostState`] is what one plugin's imports
//! read and write, and each interface's generated `Host` trait is implemented in a module of
//! its own (as wasmtime's `wasi-keyvalue` does): [`state`], [`output`], [`logging`].

mod logging;
mod output;
mod state;

pub(crate) use logging::LogBudget;
pub(crate) use output::OutputBudget;

use super::bindings::eddy::plugin::types;
use super::bindings::eddy::plugin::types::OutputRecord;
use crate::config::{Limits, PluginConfig};
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
    /// What the current call may still emit.
    pub(crate) output_budget: OutputBudget,
    /// How many log lines the plugin may still write, and how many were dropped.
    pub(crate) log_budget: LogBudget,
    /// Set when the call wrote past the state quota; taken by the trap's classification.
    pub(crate) state_quota_exceeded: Option<String>,
}

impl HostState {
    pub fn new(plugin: &PluginConfig, mut state: PluginState) -> HostState {
        let rules = plugin.expire.rules().unwrap_or_default();
        let max_ahead = plugin.max_ahead_ms().unwrap_or_default();
        state.set_expiry(plugin.expire.clock, max_ahead, rules);
        HostState {
            plugin: plugin.name.as_str().into(),
            state,
            outputs: Vec::new(),
            outputs_mark: 0,
            output_names: Arc::new(plugin.outputs.keys().cloned().collect()),
            output_budget: OutputBudget::new(&plugin.limits),
            log_budget: LogBudget::new(plugin.limits.log_lines_per_s),
            state_quota_exceeded: None,
        }
    }

    /// Before each call into the plugin: what it emits from here on is the call's own (to
    /// drop on a trap), and its output budget is full again.
    pub(crate) fn begin_call(&mut self) {
        self.outputs_mark = self.outputs.len();
        self.output_budget.refill();
        self.state_quota_exceeded = None;
    }

    /// New limits (a swap, or going back after one).
    pub(crate) fn set_limits(&mut self, limits: &Limits) {
        self.output_budget = OutputBudget::new(limits);
        self.log_budget.set_rate(limits.log_lines_per_s);
        self.state.set_cap(limits.state_mib << 20);
    }
}

impl HostState {
    /// New `[plugin.expire]` rules (a swap, or going back after one). Checked when
    /// `plugins.toml` was read.
    pub(crate) fn set_expiry(&mut self, expire: &crate::config::Expire, max_ahead_ms: i64) {
        let rules = expire.rules().unwrap_or_default();
        self.state.set_expiry(expire.clock, max_ahead_ms, rules);
    }
}

impl types::Host for HostState {}
