//! `eddy:plugin/logging`: the host's log, tagged with the plugin's name.

use super::HostState;
use crate::wasm::bindings::eddy::plugin::{logging, types};

impl logging::Host for HostState {
    fn log(&mut self, level: types::Level, message: String) {
        let plugin = &*self.plugin;
        match level {
            types::Level::Trace => tracing::trace!(plugin, "{message}"),
            types::Level::Debug => tracing::debug!(plugin, "{message}"),
            types::Level::Info => tracing::info!(plugin, "{message}"),
            types::Level::Warn => tracing::warn!(plugin, "{message}"),
            types::Level::Error => tracing::error!(plugin, "{message}"),
        }
    }
}
