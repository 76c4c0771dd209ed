//! A plugin's state: the in-memory overlay the sandbox reads and writes ([`PluginState`]),
//! and the durable store behind the [`DurableStore`] trait that batches' changes and offsets
//! are committed to together ([`StateStore`], one redb file per plugin), at least every
//! `[state] commit_interval_ms` ([`Durability`]). Keys under a `[plugin.expire]` prefix
//! carry an expiry time, kept next to them in the store and enforced at commit.

pub mod changelog;
pub mod overlay;
pub mod store;

pub use crate::config::{ExpireClock, ExpireRule};
pub use crate::kafka::Offsets;
pub use overlay::{MAX_KEY_BYTES, MAX_VALUE_BYTES, PluginState, StateError};
pub use store::{
    META_CLUSTER, META_WRITER, Snapshot, StateStore, StoreError, open_checked, path_for,
};

use std::path::Path;

/// A change to commit: the key, and its new value (`None` deletes it).
pub type Change<'a> = (&'a str, Option<&'a [u8]>);

/// A key whose expiry changed: when it now expires (milliseconds on its plugin's
/// `[plugin.expire]` clock), or `None` when it no longer does (rewritten without a rule, or
/// deleted).
pub type ExpiryChange<'a> = (&'a str, Option<i64>);

/// How far a commit must reach before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// On disk (fsync'd) when the commit returns, with every deferred commit before it.
    Immediate,
    /// Visible at once, written to the store (in one transaction) with the next immediate
    /// commit: a crash before that leaves the store at the last immediate commit, state and
    /// offsets together, and the events since are handled again. Kafka Streams'
    /// `commit.interval.ms` with exactly-once state, at a fraction of the transactions.
    Deferred,
}

/// Where a plugin's committed state lives, so that it outlives the host. Implemented by
/// [`StateStore`]; the overlay sees only this, so another store (partition-scoped state
/// with a changelog, say) plugs in here.
pub trait DurableStore: Send + std::fmt::Debug {
    /// Everything the store holds: state, offsets and metadata.
    fn load(&self) -> Result<Snapshot, StoreError>;
    /// Applies `changes`, the `expiries` that go with them and the `offsets` they advanced
    /// to, plus `meta`, atomically and durably: after a crash the store holds all of it or
    /// none of it.
    fn commit(
        &self,
        changes: &mut dyn Iterator<Item = Change<'_>>,
        expiries: &mut dyn Iterator<Item = ExpiryChange<'_>>,
        offsets: &Offsets,
        meta: &[(&str, &str)],
    ) -> Result<(), StoreError>;
    /// Where it is, for messages.
    fn path(&self) -> &Path;
}
