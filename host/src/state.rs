//! One plugin's key/value state, held by the host outside the sandbox.
//!
//! Writes go through two overlays. A call's writes land in `call`; when the call succeeds
//! they move to `batch` ([`PluginState::end_call`]), when it traps they are dropped, so a
//! failed call leaves nothing half-applied and its events can be re-run one by one. Once the
//! batch's outputs are delivered, the host commits `batch` ([`PluginState::commit_batch`]);
//! if they cannot be, it drops `batch` and the events are consumed again.
//!
//! Keeping state here (not in the instance's memory) is what lets the host throw an instance
//! away after a trap, or swap it for a new version, without losing anything.

use std::collections::BTreeMap;

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

#[derive(Debug, Default)]
pub struct PluginState {
    committed: BTreeMap<String, Vec<u8>>,
    /// Changes of the successful calls of the batch in progress: `None` is a deletion.
    batch: BTreeMap<String, Option<Vec<u8>>>,
    /// Changes of the call in progress.
    call: BTreeMap<String, Option<Vec<u8>>>,
}

impl PluginState {
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        match self.call.get(key).or_else(|| self.batch.get(key)) {
            Some(v) => v.clone(),
            None => self.committed.get(key).cloned(),
        }
    }

    pub fn set_many(&mut self, entries: Vec<(String, Vec<u8>)>) -> Result<(), StateError> {
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
        }
        for (k, v) in entries {
            self.call.insert(k, Some(v));
        }
        Ok(())
    }

    pub fn delete(&mut self, key: String) {
        self.call.insert(key, None);
    }

    /// Keys starting with `prefix`, in order, as the plugin would see them now (committed
    /// state with this call's changes applied).
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
        let pending = overlay.into_iter();
        // Merge two sorted streams; a pending entry overrides the committed one.
        let mut out = Vec::new();
        let mut c = committed.peekable();
        let mut p = pending.peekable();
        while out.len() < limit {
            let take_pending = match (c.peek(), p.peek()) {
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
            if take_pending {
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
        if succeeded {
            self.batch.extend(call);
        }
    }

    /// Makes the batch's changes permanent.
    pub fn commit_batch(&mut self) {
        self.end_call(true);
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
    }

    /// Forgets the batch's changes (and the call's).
    pub fn abort_batch(&mut self) {
        self.call.clear();
        self.batch.clear();
    }

    pub fn len(&self) -> usize {
        self.committed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.committed.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(k: &str, v: &str) -> (String, Vec<u8>) {
        (k.to_string(), v.as_bytes().to_vec())
    }

    #[test]
    fn a_failed_call_is_undone_and_a_good_one_kept_until_the_batch_ends() {
        let mut s = PluginState::default();
        s.set_many(vec![kv("a", "1")]).unwrap();
        s.commit_batch();
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
        s.commit_batch();
        assert_eq!(s.len(), 2);
        s.set_many(vec![kv("e", "1")]).unwrap();
        s.end_call(true);
        s.abort_batch();
        assert_eq!(s.get("e"), None);
    }

    #[test]
    fn scan_merges_committed_and_pending_in_order() {
        let mut s = PluginState::default();
        s.set_many(vec![
            kv("p:a", "1"),
            kv("p:c", "3"),
            kv("p:d", "4"),
            kv("q:z", "0"),
        ])
        .unwrap();
        s.commit_batch();
        s.set_many(vec![kv("p:b", "2"), kv("p:c", "32")]).unwrap();
        s.end_call(true);
        s.set_many(vec![kv("p:c", "33")]).unwrap();
        s.delete("p:d".into());
        let got: Vec<(String, Vec<u8>)> = s.scan_prefix("p:", 10);
        assert_eq!(got, vec![kv("p:a", "1"), kv("p:b", "2"), kv("p:c", "33")]);
        assert_eq!(s.scan_prefix("p:", 2).len(), 2);
        s.commit_batch();
        assert_eq!(s.len(), 4);
    }

    #[test]
    fn oversized_writes_are_refused_whole() {
        let mut s = PluginState::default();
        let big = "k".repeat(MAX_KEY_BYTES + 1);
        let err = s.set_many(vec![kv("ok", "1"), kv(&big, "v")]).unwrap_err();
        assert!(matches!(err, StateError::Invalid(_)));
        assert_eq!(
            s.get("ok"),
            None,
            "nothing of a refused set-many is applied"
        );
    }
}
