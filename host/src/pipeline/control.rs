//! What the supervisor tells a running worker, applied between two batches.

use crate::config::PluginConfig;
use crate::wasm::Program;
use std::sync::Arc;
use tokio::sync::oneshot;

/// Instructions from the supervisor, applied between batches.
pub enum Control {
    /// Run `program` with `plugin`'s config from now on, keeping the state. The answer says
    /// whether the switch happened (if not, the old version still runs).
    Swap {
        program: Arc<Program>,
        plugin: Box<PluginConfig>,
        /// Only the optimized code of the version the worker runs on baseline code: refused
        /// if the worker runs another version by now (one that trapped on probation was
        /// rolled back while it compiled, say).
        tier_up: bool,
        done: oneshot::Sender<Result<(), String>>,
    },
}
