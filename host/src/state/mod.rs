//! A plugin's state: the in-memory overlay the sandbox reads and writes ([`PluginState`]),
//! and the durable store behind the [`DurableStore`] trait that a batch's changes and
//! offsets are committed to together ([`StateStore`], one redb file per plugin).

pub mod overlay;
pub mod store;

pub use crate::kafka::Offsets;
pub use overlay::{MAX_KEY_BYTES, MAX_VALUE_BYTES, PluginState, StateError};
pub use store::{
    META_CLUSTER, META_WRITER, Snapshot, StateStore, StoreError, open_checked, path_for,
};

use std::collections::BTreeMap;
use std::path::Path;

/// A batch's state changes: `None` deletes the key.
pub type Changes = BTreeMap<String, Option<Vec<u8>>>;

/// Where a plugin's committed state lives, so that it outlives the host. Implemented by
/// [`StateStore`]; the overlay sees only this, so another store (partition-scoped state
/// with a changelog, say) plugs in here.
pub trait DurableStore: Send + std::fmt::Debug {
    /// Everything the store holds: state, offsets and metadata.
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Applies `changes` and the `offsets` they advanced to, plus `meta`, atomically and
    /// durably: after a crash the store holds all of it or none of it.
    fn commit(
        &self,
        changes: &Changes,
        offsets: &Offsets,
        meta: &[(&str, &str)],
    ) -> Result<(), StoreError>;
    /// Where it is, for messages.
    fn path(&self) -> &Path;
}
