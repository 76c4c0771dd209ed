//! One plugin's key/value state, held by the host outside the sandbox.
//!
//! Writes go through two overlays. A call's writes land in `call`; when the call succeeds
//! they move to `batch` ([`PluginState::end_call`]), when it traps they are dropped, so a
//! failed call leaves nothing half-applied and its events can be re-run one by one. Once the
//! batch's outputs are delivered, the host commits `batch` together with the offsets the
//! batch advanced ([`PluginState::commit_batch`]): to the state file in one transaction when
//! state is durable (see [`super::store`]), then in memory. If that cannot happen, `batch`
//! is dropped and the events are consumed again. A deferred commit (see [`Durability`])
//! does not touch the file: its changes and offsets wait in `unsynced`, merged with the
//! deferred commits before it (a counter bumped by every batch is written once), for the
//! next immediate commit to write them in the same transaction as its own.
//!
//! Reads are served from memory (the committed map mirrors the file), so they never wait on
//! disk; `limits.state_mib` bounds that memory.
//!
//! Expiry (`[plugin.expire]`): a key written under a prefix with a rule gets an expiry time
//! (its clock's "now" at the commit plus the rule's duration), kept with it in the store.
//! Each commit first reads the clock (event time: the latest record timestamp of the batches
//! so far; or the wall clock), then deletes every key whose time has passed as part of the
//! same batch (so the deletions reach the file in the same transaction as the offsets), then
//! sets the expiry of the keys the batch wrote. A rewrite pushes a key's expiry back.
//!
//! Keeping state here (not in the instance's memory) is what lets the host throw an instance
//! away after a trap, or swap it for a new version, without losing anything.

use super::{Change, Durability, DurableStore, ExpireClock, ExpireRule, Offsets, StoreError};
use crate::state::store::META_EVENT_TIME;
use std::collections::{BTreeMap, BTreeSet};

/// The longest key a plugin may use.
pub const MAX_KEY_BYTES: usize = 1024;
/// The largest single value.
pub const MAX_VALUE_BYTES: usize = 1 << 20;

/// Why a write was refused (mirrors the contract's `state-error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("state quota exceeded: {0}")]
    QuotaExceeded(String),
    #[error("invalid state write: {0}")]
    Invalid(String),
}

type Overlay = BTreeMap<String, Option<Vec<u8>>>;

#[derive(Debug)]
pub struct PluginState {
    committed: BTreeMap<String, Vec<u8>>,
    /// Size of `committed` (keys + values), bytes.
    committed_bytes: i64,
    /// Changes of the successful calls of the batch in progress: `None` is a deletion.
    batch: Overlay,
    batch_delta: i64,
    /// Changes of the call in progress.
    call: Overlay,
    call_delta: i64,
    /// Most bytes the committed state may take (`limits.state_mib`).
    cap_bytes: i64,
    /// The durable copy, if state is durable.
    store: Option<Box<dyn DurableStore>>,
    /// Offsets the committed state reflects (the next offset to consume per partition).
    offsets: Offsets,
    /// Deferred commits not in the state file yet: the keys they changed (the values are in
    /// `committed`), their offsets and metadata (see [`Durability`]). Empty without a store.
    unsynced: BTreeSet<String>,
    unsynced_offsets: Offsets,
    unsynced_meta: BTreeMap<String, String>,
    /// Expiry: the rules (longest prefix first) and their clock.
    rules: Vec<ExpireRule>,
    clock: ExpireClock,
    /// How far the event clock may run ahead of the host's clock.
    max_ahead_ms: i64,
    /// When each expiring committed key expires, and the same ordered by time.
    expires: BTreeMap<String, i64>,
    due: BTreeSet<(i64, String)>,
    /// The latest event time of the committed batches, and of the batch in progress.
    event_time: i64,
    batch_event_time: i64,
    /// Keys expired since the last [`PluginState::take_expired`].
    expired_uncounted: u64,
    /// The keys expired since the instance last asked ([`PluginState::take_expired_keys`]),
    /// for it to drop from its cache; `None` once more than [`MAX_EXPIRED_LISTED`] went.
    expired_unseen: Option<BTreeSet<String>>,
}

/// How many expired keys are listed for the instance between two of its calls; past that it
/// is told to forget its whole cache instead (a list of every key of a large state would
/// cost more than reading the keys again).
pub const MAX_EXPIRED_LISTED: usize = 4096;

/// An overlay's entries as the store takes them.
fn changes(overlay: &Overlay) -> impl Iterator<Item = Change<'_>> {
    overlay.iter().map(|(k, v)| (k.as_str(), v.as_deref()))
}

fn entry_size(key: &str, value: Option<&Vec<u8>>) -> i64 {
    value.map_or(0, |v| (key.len() + v.len()) as i64)
}

impl PluginState {
    /// Empty, in-memory state.
    pub fn in_memory(cap_bytes: u64) -> PluginState {
        PluginState {
            committed: BTreeMap::new(),
            committed_bytes: 0,
            batch: Overlay::new(),
            batch_delta: 0,
            call: Overlay::new(),
            call_delta: 0,
            cap_bytes: cap_bytes as i64,
            store: None,
            offsets: Offsets::new(),
            unsynced: BTreeSet::new(),
            unsynced_offsets: Offsets::new(),
            unsynced_meta: BTreeMap::new(),
            rules: Vec::new(),
            clock: ExpireClock::default(),
            max_ahead_ms: crate::config::DEFAULT_MAX_AHEAD_MS,
            expires: BTreeMap::new(),
            due: BTreeSet::new(),
            event_time: i64::MIN,
            batch_event_time: i64::MIN,
            expired_uncounted: 0,
            expired_unseen: Some(BTreeSet::new()),
        }
    }

    /// State read from `store`, written back to it on every commit.
    pub fn durable(
        store: impl DurableStore + 'static,
        cap_bytes: u64,
    ) -> Result<PluginState, StoreError> {
        let snapshot = store.load()?;
        let mut state = PluginState::in_memory(cap_bytes);
        state.committed_bytes = snapshot
            .state
            .iter()
            .map(|(k, v)| entry_size(k, Some(v)))
            .sum();
        state.committed = snapshot.state;
        state.offsets = snapshot.offsets;
        state.due = snapshot
            .expires
            .iter()
            .map(|(k, at)| (*at, k.clone()))
            .collect();
        state.expires = snapshot.expires;
        if let Some(t) = snapshot.meta.get(META_EVENT_TIME) {
            state.event_time = t.parse().unwrap_or(i64::MIN);
        }
        state.store = Some(Box::new(store));
        Ok(state)
    }

    /// Sets the `[plugin.expire]` rules (at load and on every swap), and how far ahead of
    /// the host's clock the event clock may run. Keys written before keep the expiry they
    /// had until they are written again.
    pub fn set_expiry(&mut self, clock: ExpireClock, max_ahead_ms: i64, rules: Vec<ExpireRule>) {
        self.clock = clock;
        self.max_ahead_ms = max_ahead_ms;
        self.rules = rules;
    }

    /// A new `limits.state_mib` (a swap): later writes are held to it; what is there stays.
    pub fn set_cap(&mut self, cap_bytes: u64) {
        self.cap_bytes = cap_bytes as i64;
    }

    /// Notes the latest record timestamp of a call's events: the event clock.
    pub fn saw_event_time(&mut self, timestamp_ms: i64) {
        self.batch_event_time = self.batch_event_time.max(timestamp_ms);
    }

    /// Keys deleted by expiry since the last call of this.
    pub fn take_expired(&mut self) -> u64 {
        std::mem::take(&mut self.expired_uncounted)
    }

    /// The keys that expired since the last call of this, for the instance to drop from its
    /// cache (the contract's `take-expired`); `None`: too many to list, drop everything.
    pub fn take_expired_keys(&mut self) -> Option<Vec<String>> {
        let keys = self.expired_unseen.replace(BTreeSet::new())?;
        Some(keys.into_iter().collect())
    }

    /// A new instance starts with nothing cached: nothing to tell it.
    pub fn forget_expired_keys(&mut self) {
        self.expired_unseen = Some(BTreeSet::new());
    }

    /// How many committed keys carry an expiry.
    pub fn expiring_keys(&self) -> usize {
        self.expires.len()
    }

    /// The expiry clock's reading for the commit in progress. The event clock never runs
    /// more than `max_ahead_ms` ahead of the host's, whatever a record's timestamp said (a
    /// reading saved before that held is brought back too).
    fn clock_now(&self) -> i64 {
        match self.clock {
            ExpireClock::Event => self
                .event_time
                .max(self.batch_event_time)
                .min(crate::clock::now_ms().saturating_add(self.max_ahead_ms)),
            ExpireClock::Host => crate::clock::now_ms(),
        }
    }

    /// When `key`, written now, expires under the rules.
    fn expiry_for(&self, key: &str, now: i64) -> Option<i64> {
        self.rules
            .iter()
            .find(|r| key.starts_with(r.prefix.as_str()))
            .map(|r| now.saturating_add(r.after_ms))
    }

    /// Turns every committed key whose time has passed into a deletion of the batch (unless
    /// the batch wrote it again), then works out the expiry of each key the batch touches:
    /// the keys whose expiry changes, with their new one. Changes nothing else, so a commit
    /// that fails can run it again.
    fn expire_and_schedule(&mut self, now: i64) -> Vec<(String, Option<i64>)> {
        if self.rules.is_empty() && self.expires.is_empty() {
            return Vec::new();
        }
        let passed: Vec<String> = self
            .due
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, key)| key.clone())
            .filter(|key| !self.batch.contains_key(key))
            .collect();
        for key in passed {
            self.batch_delta -= entry_size(&key, self.committed.get(&key));
            self.batch.insert(key, None);
        }
        let mut changed = Vec::new();
        for (key, value) in &self.batch {
            let new = value.as_ref().and_then(|_| self.expiry_for(key, now));
            if self.expires.get(key).copied() != new {
                changed.push((key.clone(), new));
            }
        }
        changed
    }

    /// Applies expiry changes to memory once they are committed, counting the keys that went
    /// because their time had passed.
    fn apply_expiries(&mut self, changed: Vec<(String, Option<i64>)>, now: i64) {
        for (key, at) in changed {
            let old = match at {
                Some(at) => {
                    self.due.insert((at, key.clone()));
                    self.expires.insert(key.clone(), at)
                }
                None => self.expires.remove(&key),
            };
            if let Some(old) = old {
                self.due.remove(&(old, key.clone()));
                if at.is_none() && old <= now {
                    self.expired_uncounted += 1;
                    if let Some(unseen) = &mut self.expired_unseen {
                        unseen.insert(key);
                        if unseen.len() > MAX_EXPIRED_LISTED {
                            self.expired_unseen = None;
                        }
                    }
                }
            }
        }
    }

    pub fn is_durable(&self) -> bool {
        self.store.is_some()
    }

    /// The offsets the committed state reflects.
    pub fn offsets(&self) -> &Offsets {
        &self.offsets
    }

    /// The value as the plugin sees it now: the call's changes over the batch's over the
    /// committed state.
    fn current(&self, key: &str) -> Option<&Vec<u8>> {
        match self.call.get(key).or_else(|| self.batch.get(key)) {
            Some(v) => v.as_ref(),
            None => self.committed.get(key),
        }
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.current(key).cloned()
    }

    pub fn set_many(&mut self, entries: Vec<(String, Vec<u8>)>) -> Result<(), StateError> {
        let mut delta = 0;
        // Each key's size now, looked up once (three maps deep) for both loops.
        let mut old_sizes = Vec::with_capacity(entries.len());
        for (k, v) in &entries {
            if k.len() > MAX_KEY_BYTES {
                return Err(StateError::Invalid(format!(
                    "key of {} bytes (at most {MAX_KEY_BYTES})",
                    k.len()
                )));
            }
            if v.len() > MAX_VALUE_BYTES {
                return Err(StateError::Invalid(format!(
                    "value of {} bytes for key `{k}` (at most {MAX_VALUE_BYTES})",
                    v.len()
                )));
            }
            let old = entry_size(k, self.current(k));
            old_sizes.push(old);
            delta += entry_size(k, Some(v)) - old;
        }
        let total = self.committed_bytes + self.batch_delta + self.call_delta + delta;
        if delta > 0 && total > self.cap_bytes {
            return Err(StateError::QuotaExceeded(format!(
                "the plugin's state would take {:.1} MiB, over limits.state_mib = {:.0}",
                total as f64 / (1 << 20) as f64,
                self.cap_bytes as f64 / (1 << 20) as f64
            )));
        }
        for ((k, v), old) in entries.into_iter().zip(old_sizes) {
            // A key given twice: the second replaces the first, not what was there before.
            let old = if self.call.contains_key(&k) {
                entry_size(&k, self.current(&k))
            } else {
                old
            };
            self.call_delta += entry_size(&k, Some(&v)) - old;
            self.call.insert(k, Some(v));
        }
        Ok(())
    }

    pub fn delete(&mut self, key: String) {
        self.call_delta -= entry_size(&key, self.current(&key));
        self.call.insert(key, None);
    }

    /// Keys starting with `prefix`, in order, as the plugin would see them now.
    pub fn scan_prefix(&self, prefix: &str, limit: usize) -> Vec<(String, Vec<u8>)> {
        let from = prefix.to_string();
        let committed = self
            .committed
            .range(from.clone()..)
            .take_while(|(k, _)| k.starts_with(prefix));
        // The batch's changes with the call's on top, for this prefix only.
        let mut overlay: BTreeMap<&String, &Option<Vec<u8>>> = self
            .batch
            .range(from.clone()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .collect();
        overlay.extend(
            self.call
                .range(from..)
                .take_while(|(k, _)| k.starts_with(prefix)),
        );
        // Merge two sorted streams; an overlay entry overrides the committed one.
        let mut out = Vec::new();
        let mut c = committed.peekable();
        let mut p = overlay.into_iter().peekable();
        while out.len() < limit {
            let take_overlay = match (c.peek(), p.peek()) {
                (None, None) => break,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some((ck, _)), Some((pk, _))) => {
                    if ck == pk {
                        c.next();
                        true
                    } else {
                        pk < ck
                    }
                }
            };
            if take_overlay {
                let (k, v) = p.next().expect("peeked");
                if let Some(v) = v {
                    out.push((k.clone(), v.clone()));
                }
            } else {
                let (k, v) = c.next().expect("peeked");
                out.push((k.clone(), v.clone()));
            }
        }
        out
    }

    /// Ends the call in progress: keeps its changes in the batch if it succeeded, drops
    /// them if it failed.
    pub fn end_call(&mut self, succeeded: bool) {
        let call = std::mem::take(&mut self.call);
        let delta = std::mem::take(&mut self.call_delta);
        if succeeded {
            self.batch.extend(call);
            self.batch_delta += delta;
        }
    }

    /// Makes the batch's changes permanent together with `offsets` (the next offset to
    /// consume of each partition the batch advanced): in memory, and in the state file if
    /// durable: at once in one transaction with every deferred commit before it
    /// ([`Durability::Immediate`]), or with the next immediate commit
    /// ([`Durability::Deferred`]). On an error nothing changed and the batch is still
    /// pending, so the caller may try again.
    pub fn commit_batch(
        &mut self,
        offsets: &Offsets,
        meta: &[(&str, &str)],
        durability: Durability,
    ) -> Result<(), StoreError> {
        self.end_call(true);
        let now = self.clock_now();
        let changed = self.expire_and_schedule(now);
        let event_time = now.to_string();
        let mut meta = meta.to_vec();
        if !self.rules.is_empty() && self.clock == ExpireClock::Event && now != self.event_time {
            meta.push((META_EVENT_TIME, &event_time));
        }
        let meta = meta.as_slice();
        if let Some(store) = &self.store {
            match durability {
                Durability::Deferred => {
                    // Only the keys: their values (and expiries) are in memory when the
                    // sync comes.
                    self.unsynced.extend(self.batch.keys().cloned());
                    self.unsynced_offsets
                        .extend(offsets.iter().map(|(k, v)| (k.clone(), *v)));
                    self.unsynced_meta
                        .extend(meta.iter().map(|(k, v)| (k.to_string(), v.to_string())));
                }
                Durability::Immediate
                    if self.unsynced_offsets.is_empty() && self.unsynced.is_empty() =>
                {
                    if !self.batch.is_empty() || !offsets.is_empty() {
                        let mut expiries = changed.iter().map(|(k, at)| (k.as_str(), *at));
                        store.commit(&mut changes(&self.batch), &mut expiries, offsets, meta)?;
                    }
                }
                Durability::Immediate => {
                    // The deferred commits' keys at their committed values, then this batch,
                    // in one transaction; they stay pending until it went through.
                    let (batch, committed) = (&self.batch, &self.committed);
                    let earlier = self
                        .unsynced
                        .iter()
                        .filter(|k| !batch.contains_key(*k))
                        .map(|k| (k.as_str(), committed.get(k).map(Vec::as_slice)));
                    let mut all_changes = earlier.chain(changes(batch));
                    // Every key of both with its expiry as it will be: the file has none
                    // of the deferred commits' expiries yet.
                    let expiry_in_use = !self.rules.is_empty() || !self.expires.is_empty();
                    let new_expiry: BTreeMap<&str, Option<i64>> =
                        changed.iter().map(|(k, at)| (k.as_str(), *at)).collect();
                    let expires = &self.expires;
                    let mut all_expiries = self
                        .unsynced
                        .iter()
                        .filter(|k| !batch.contains_key(*k))
                        .map(|k| k.as_str())
                        .chain(batch.keys().map(String::as_str))
                        .filter(|_| expiry_in_use)
                        .map(|k| {
                            let at = match new_expiry.get(k) {
                                Some(at) => *at,
                                None => expires.get(k).copied(),
                            };
                            (k, at)
                        });
                    let mut all_offsets = self.unsynced_offsets.clone();
                    all_offsets.extend(offsets.iter().map(|(k, v)| (k.clone(), *v)));
                    let mut all_meta = self.unsynced_meta.clone();
                    all_meta.extend(meta.iter().map(|(k, v)| (k.to_string(), v.to_string())));
                    let all_meta: Vec<(&str, &str)> = all_meta
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect();
                    store.commit(&mut all_changes, &mut all_expiries, &all_offsets, &all_meta)?;
                    drop(all_changes);
                    self.unsynced.clear();
                    self.unsynced_offsets.clear();
                    self.unsynced_meta.clear();
                }
            }
        }
        for (k, v) in std::mem::take(&mut self.batch) {
            match v {
                Some(v) => {
                    self.committed.insert(k, v);
                }
                None => {
                    self.committed.remove(&k);
                }
            }
        }
        self.apply_expiries(changed, now);
        if self.clock == ExpireClock::Event {
            self.event_time = now;
        }
        self.batch_event_time = i64::MIN;
        self.committed_bytes += std::mem::take(&mut self.batch_delta);
        self.offsets
            .extend(offsets.iter().map(|(k, v)| (k.clone(), *v)));
        Ok(())
    }

    /// Forgets the batch's changes (and the call's).
    pub fn abort_batch(&mut self) {
        self.batch_event_time = i64::MIN;
        self.call.clear();
        self.batch.clear();
        self.call_delta = 0;
        self.batch_delta = 0;
    }

    pub fn len(&self) -> usize {
        self.committed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.committed.is_empty()
    }

    /// Size of the committed state (keys + values), bytes.
    pub fn bytes(&self) -> u64 {
        self.committed_bytes as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{ExpiryChange, StateStore};

    fn kv(k: &str, v: &str) -> (String, Vec<u8>) {
        (k.to_string(), v.as_bytes().to_vec())
    }

    fn state() -> PluginState {
        PluginState::in_memory(1 << 20)
    }

    fn commit(s: &mut PluginState) {
        s.commit_batch(&Offsets::new(), &[], Durability::Immediate)
            .unwrap();
    }

    #[test]
    fn a_failed_call_is_undone_and_a_good_one_kept_until_the_batch_ends() {
        let mut s = state();
        s.set_many(vec![kv("a", "1")]).unwrap();
        commit(&mut s);
        s.set_many(vec![kv("a", "2"), kv("b", "x")]).unwrap();
        s.delete("a".into());
        assert_eq!(s.get("a"), None);
        assert_eq!(s.get("b"), Some(b"x".to_vec()));
        s.end_call(false);
        assert_eq!(s.get("a"), Some(b"1".to_vec()));
        assert_eq!(s.get("b"), None);
        s.set_many(vec![kv("c", "kept")]).unwrap();
        s.end_call(true);
        s.set_many(vec![kv("d", "dropped")]).unwrap();
        s.end_call(false);
        assert_eq!(s.get("c"), Some(b"kept".to_vec()));
        assert_eq!(s.len(), 1, "nothing is committed before the batch is");
        commit(&mut s);
        assert_eq!(s.len(), 2);
        s.set_many(vec![kv("e", "1")]).unwrap();
        s.end_call(true);
        s.abort_batch();
        assert_eq!(s.get("e"), None);
        assert_eq!(s.bytes(), 2 + 5, "a=1 and c=kept");
    }

    #[test]
    fn scan_merges_committed_and_pending_in_order() {
        let mut s = state();
        s.set_many(vec![
            kv("p:a", "1"),
            kv("p:c", "3"),
            kv("p:d", "4"),
            kv("q:z", "0"),
        ])
        .unwrap();
        commit(&mut s);
        s.set_many(vec![kv("p:b", "2"), kv("p:c", "32")]).unwrap();
        s.end_call(true);
        s.set_many(vec![kv("p:c", "33")]).unwrap();
        s.delete("p:d".into());
        let got: Vec<(String, Vec<u8>)> = s.scan_prefix("p:", 10);
        assert_eq!(got, vec![kv("p:a", "1"), kv("p:b", "2"), kv("p:c", "33")]);
        assert_eq!(s.scan_prefix("p:", 2).len(), 2);
        commit(&mut s);
        assert_eq!(s.len(), 4);
    }

    #[test]
    fn a_key_written_twice_in_one_call_is_counted_once() {
        let mut s = state();
        s.set_many(vec![kv("a", "12345"), kv("a", "1")]).unwrap();
        s.set_many(vec![kv("a", "123")]).unwrap();
        commit(&mut s);
        assert_eq!(s.get("a"), Some(b"123".to_vec()));
        assert_eq!(s.bytes(), 1 + 3);
    }

    #[test]
    fn oversized_writes_are_refused_whole() {
        let mut s = state();
        let big = "k".repeat(MAX_KEY_BYTES + 1);
        let err = s.set_many(vec![kv("ok", "1"), kv(&big, "v")]).unwrap_err();
        assert!(matches!(err, StateError::Invalid(_)));
        assert_eq!(
            s.get("ok"),
            None,
            "nothing of a refused set-many is applied"
        );
    }

    #[test]
    fn the_size_cap_counts_pending_writes_and_frees_on_delete() {
        let mut s = PluginState::in_memory(100);
        s.set_many(vec![kv("a", &"x".repeat(49))]).unwrap(); // 50 bytes
        s.end_call(true);
        s.set_many(vec![kv("b", &"x".repeat(39))]).unwrap(); // 90 in all
        let err = s.set_many(vec![kv("c", &"x".repeat(20))]).unwrap_err();
        assert!(err.to_string().contains("limits.state_mib"), "{err}");
        // Overwriting with something smaller, or deleting, is always allowed.
        s.delete("a".into());
        s.set_many(vec![kv("c", &"x".repeat(20))]).unwrap();
        commit(&mut s);
        assert_eq!(s.bytes(), 40 + 21);
    }

    #[test]
    fn durable_commits_reach_the_file_with_their_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::state::path_for(dir.path(), "p");
        let mut s = PluginState::durable(StateStore::open(&path, "p").unwrap(), 1 << 20).unwrap();
        s.set_many(vec![kv("n", "1")]).unwrap();
        let offsets: Offsets = [(("t".to_string(), 2), 41)].into_iter().collect();
        s.commit_batch(&offsets, &[], Durability::Immediate)
            .unwrap();
        // A batch that is never committed (a crash) leaves no trace in the file.
        s.set_many(vec![kv("n", "2")]).unwrap();
        s.end_call(true);
        drop(s);
        let s = PluginState::durable(StateStore::open(&path, "p").unwrap(), 1 << 20).unwrap();
        assert_eq!(s.get("n"), Some(b"1".to_vec()));
        assert_eq!(s.offsets()[&("t".to_string(), 2)], 41);
        assert_eq!(s.bytes(), 2);
    }

    const AHEAD: i64 = crate::config::DEFAULT_MAX_AHEAD_MS;

    /// Issue 26: one record stamped in the year 2999 (or in microseconds) took the event
    /// clock there: every expiring key went at the next commit, and the clock stayed, so no
    /// key written afterwards expired on time. The clock now stops at the host's clock plus
    /// `max_ahead`: keys due later than that stay, and expiry goes on as time passes.
    #[test]
    fn a_record_from_the_far_future_moves_the_event_clock_no_further_than_max_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::state::path_for(dir.path(), "p");
        let open = || {
            let mut s =
                PluginState::durable(StateStore::open(&path, "p").unwrap(), 1 << 20).unwrap();
            s.set_expiry(ExpireClock::Event, 60_000, rules(&[("u:", 3600)]));
            s
        };
        let now = crate::clock::now_ms();
        let mut s = open();
        // Written a minute ago by event time: due in 59 minutes.
        s.saw_event_time(now - 60_000);
        s.set_many(vec![kv("u:1", "x")]).unwrap();
        s.commit_batch(&Offsets::new(), &[], Durability::Immediate)
            .unwrap();
        // One record from 2999, then one stamped in microseconds.
        for t in [32_472_144_000_000, now * 1000] {
            s.saw_event_time(t);
            s.commit_batch(&Offsets::new(), &[], Durability::Immediate)
                .unwrap();
            assert_eq!(s.get("u:1"), Some(b"x".to_vec()), "not due for 59 minutes");
            assert!(s.clock_now() <= crate::clock::now_ms() + 60_000);
        }
        // Saved as the clock stood, not as the record said: a restart keeps the bound.
        drop(s);
        let s = open();
        assert!(
            s.event_time <= crate::clock::now_ms() + 60_000,
            "{}",
            s.event_time
        );
        assert_eq!(s.get("u:1"), Some(b"x".to_vec()));
    }

    fn rules(rules: &[(&str, i64)]) -> Vec<ExpireRule> {
        let mut expire = crate::config::Expire::default();
        for (prefix, secs) in rules {
            expire.after.insert(prefix.to_string(), format!("{secs}s"));
        }
        expire.rules().unwrap()
    }

    /// One batch whose latest event is at `t` seconds, writing `writes`.
    fn batch_at(s: &mut PluginState, t: i64, writes: &[(&str, &str)], durability: Durability) {
        s.saw_event_time(t * 1000);
        s.set_many(writes.iter().map(|(k, v)| kv(k, v)).collect())
            .unwrap();
        s.commit_batch(&Offsets::new(), &[], durability).unwrap();
    }

    #[test]
    fn keys_expire_by_event_time_after_their_last_write() {
        let mut s = state();
        s.set_expiry(
            ExpireClock::Event,
            AHEAD,
            rules(&[("recent:", 60), ("recent:vip:", 600)]),
        );
        batch_at(
            &mut s,
            1_000,
            &[("recent:a", "1"), ("recent:vip:b", "1"), ("total", "1")],
            Durability::Immediate,
        );
        assert_eq!(s.expiring_keys(), 2, "`total` is under no rule");
        // 59 s later: nothing is due; `recent:a` is written again, which pushes it back.
        batch_at(&mut s, 1_059, &[("recent:a", "2")], Durability::Immediate);
        // 61 s after the first write, 2 s after the second: still there.
        batch_at(&mut s, 1_061, &[], Durability::Immediate);
        assert_eq!(s.get("recent:a"), Some(b"2".to_vec()));
        assert_eq!(s.take_expired(), 0);
        // 60 s after its last write it goes, with the batch that brought the time past it.
        batch_at(&mut s, 1_119, &[("other", "x")], Durability::Immediate);
        assert_eq!(s.get("recent:a"), None);
        assert_eq!(s.take_expired(), 1);
        // The longest prefix decides: `recent:vip:b` lives 600 s.
        assert_eq!(s.get("recent:vip:b"), Some(b"1".to_vec()));
        // Time does not run backwards: a late event does not bring the clock back.
        batch_at(&mut s, 900, &[], Durability::Immediate);
        batch_at(&mut s, 1_600, &[], Durability::Immediate);
        assert_eq!(s.get("recent:vip:b"), None);
        assert_eq!((s.len(), s.expiring_keys(), s.take_expired()), (2, 0, 1));
        assert_eq!(s.bytes(), 6 + 6, "total=1 and other=x");
    }

    /// The instance hears of each expired key once (to drop it from its cache), and is told
    /// to forget everything when too many went to list.
    #[test]
    fn the_instance_is_told_which_keys_expired_once() {
        let mut s = state();
        s.set_expiry(ExpireClock::Event, AHEAD, rules(&[("u:", 10)]));
        batch_at(
            &mut s,
            1_000,
            &[("u:a", "1"), ("u:b", "1")],
            Durability::Immediate,
        );
        batch_at(&mut s, 1_005, &[("u:b", "2")], Durability::Immediate);
        assert_eq!(s.take_expired_keys(), Some(vec![]));
        batch_at(&mut s, 1_011, &[], Durability::Immediate);
        assert_eq!(s.take_expired_keys(), Some(vec!["u:a".to_string()]));
        assert_eq!(s.take_expired_keys(), Some(vec![]), "told once");
        let many: Vec<(String, String)> = (0..=MAX_EXPIRED_LISTED)
            .map(|i| (format!("u:{i}"), "1".to_string()))
            .collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        batch_at(&mut s, 1_020, &many, Durability::Immediate);
        batch_at(&mut s, 1_040, &[], Durability::Immediate);
        assert_eq!(s.take_expired_keys(), None, "too many to list");
        assert_eq!(s.take_expired_keys(), Some(vec![]));
    }

    #[test]
    fn expiry_survives_a_restart_with_deferred_commits_and_frees_the_quota() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::state::path_for(dir.path(), "p");
        let open = || {
            let mut s = PluginState::durable(StateStore::open(&path, "p").unwrap(), 40).unwrap();
            s.set_expiry(ExpireClock::Event, AHEAD, rules(&[("u:", 10)]));
            s
        };
        let mut s = open();
        batch_at(&mut s, 100, &[("u:1", "aaaaaaaa")], Durability::Deferred);
        batch_at(&mut s, 105, &[("u:2", "bbbbbbbb")], Durability::Deferred);
        batch_at(&mut s, 106, &[("keep", "1")], Durability::Immediate);
        drop(s);
        let mut s = open();
        assert_eq!((s.len(), s.expiring_keys()), (3, 2));
        // The quota (40 bytes) is full: u:1 and u:2 take 22 bytes, keep 5.
        let err = s.set_many(vec![kv("u:3", &"c".repeat(20))]).unwrap_err();
        assert!(matches!(err, StateError::QuotaExceeded(_)));
        s.end_call(false);
        // The event clock was saved: at 111 s, u:1 (written at 100 s) is gone, u:2 is not.
        batch_at(&mut s, 111, &[], Durability::Immediate);
        assert_eq!((s.get("u:1"), s.get("u:2").is_some()), (None, true));
        batch_at(
            &mut s,
            115,
            &[("u:3", &"c".repeat(20))],
            Durability::Immediate,
        );
        drop(s);
        let s = open();
        assert_eq!(s.get("u:2"), None);
        assert_eq!(s.len(), 2, "keep and u:3");
        assert_eq!(s.expiring_keys(), 1);
    }

    #[test]
    fn a_failed_commit_keeps_keys_due_and_the_retry_expires_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::state::path_for(dir.path(), "p");
        let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let store = Flaky {
            store: StateStore::open(&path, "p").unwrap(),
            failing: failing.clone(),
        };
        let mut s = PluginState::durable(store, 1 << 20).unwrap();
        s.set_expiry(ExpireClock::Event, AHEAD, rules(&[("u:", 10)]));
        batch_at(&mut s, 100, &[("u:1", "x")], Durability::Immediate);
        failing.store(true, std::sync::atomic::Ordering::Relaxed);
        s.saw_event_time(200_000);
        assert!(
            s.commit_batch(&Offsets::new(), &[], Durability::Immediate)
                .is_err()
        );
        s.abort_batch();
        assert_eq!(s.get("u:1"), Some(b"x".to_vec()), "nothing changed");
        failing.store(false, std::sync::atomic::Ordering::Relaxed);
        batch_at(&mut s, 200, &[], Durability::Immediate);
        assert_eq!((s.get("u:1"), s.take_expired()), (None, 1));
    }

    /// A [`StateStore`] whose commits fail while `failing` is set.
    #[derive(Debug)]
    struct Flaky {
        store: StateStore,
        failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    impl DurableStore for Flaky {
        fn load(&self) -> Result<crate::state::Snapshot, StoreError> {
            self.store.load()
        }
        fn commit(
            &self,
            changes: &mut dyn Iterator<Item = Change<'_>>,
            expiries: &mut dyn Iterator<Item = ExpiryChange<'_>>,
            offsets: &Offsets,
            meta: &[(&str, &str)],
        ) -> Result<(), StoreError> {
            if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
                return Err(StoreError::Locked {
                    path: self.path().to_path_buf(),
                });
            }
            self.store.commit(changes, expiries, offsets, meta)
        }
        fn path(&self) -> &std::path::Path {
            self.store.path()
        }
    }

    #[test]
    fn deferred_commits_reach_the_file_together_with_the_next_immediate_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::state::path_for(dir.path(), "p");
        let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open = || {
            let store = Flaky {
                store: StateStore::open(&path, "p").unwrap(),
                failing: failing.clone(),
            };
            PluginState::durable(store, 1 << 20).unwrap()
        };
        let offsets = |n: i64| -> Offsets { [(("t".to_string(), 0), n)].into_iter().collect() };
        let mut s = open();
        for n in 1..=3 {
            s.set_many(vec![kv("n", &n.to_string()), kv(&format!("k{n}"), "x")])
                .unwrap();
            s.commit_batch(&offsets(n), &[], Durability::Deferred)
                .unwrap();
        }
        assert_eq!(s.get("n"), Some(b"3".to_vec()), "visible at once");
        // A crash now: the file has none of it, state and offsets alike.
        drop(s);
        let mut s = open();
        assert_eq!((s.get("n"), s.offsets().len()), (None, 0));
        for n in 1..=2 {
            s.set_many(vec![kv("n", &n.to_string())]).unwrap();
            s.commit_batch(&offsets(n), &[], Durability::Deferred)
                .unwrap();
        }
        // An immediate commit that fails leaves everything pending, and a retry writes it.
        s.set_many(vec![kv("m", "1")]).unwrap();
        failing.store(true, std::sync::atomic::Ordering::Relaxed);
        let err = s.commit_batch(&offsets(3), &[], Durability::Immediate);
        assert!(err.is_err());
        failing.store(false, std::sync::atomic::Ordering::Relaxed);
        s.commit_batch(&offsets(3), &[], Durability::Immediate)
            .unwrap();
        drop(s);
        let s = open();
        assert_eq!(s.get("n"), Some(b"2".to_vec()));
        assert_eq!(s.get("m"), Some(b"1".to_vec()));
        assert_eq!(s.offsets()[&("t".to_string(), 0)], 3);
    }
}
