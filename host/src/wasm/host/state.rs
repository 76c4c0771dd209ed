//! `eddy:plugin/state`: the plugin's own key/value state, nobody else's, and the keys the
//! host deleted from it itself (`[plugin.expire]`), which an instance must drop from its cache.
//!
//! A write past `limits.state_mib` traps (`kind="state_quota"`): the events of the call are
//! dead-lettered with a reason naming the limit, whatever the plugin does with the error (the
//! SDK used to panic on it, which read as a bug in the plugin).

use super::HostState;
use crate::state::StateError;
use crate::wasm::bindings::eddy::plugin::state;

impl state::Host for HostState {
    fn get(&mut self, key: String) -> Option<Vec<u8>> {
        self.state.get(&key)
    }

    fn get_many(&mut self, keys: Vec<String>) -> Vec<Option<Vec<u8>>> {
        keys.iter().map(|k| self.state.get(k)).collect()
    }

    fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), state::StateError>> {
        self.set_many(vec![(key, value)])
    }

    fn set_many(
        &mut self,
        entries: Vec<(String, Vec<u8>)>,
    ) -> wasmtime::Result<Result<(), state::StateError>> {
        match self.state.set_many(entries) {
            Ok(()) => Ok(Ok(())),
            Err(StateError::QuotaExceeded(m)) => {
                self.state_quota_exceeded = Some(m.clone());
                wasmtime::bail!("{m}")
            }
            Err(StateError::Invalid(m)) => Ok(Err(state::StateError::Invalid(m))),
        }
    }

    fn delete(&mut self, key: String) {
        self.state.delete(key);
    }

    fn delete_many(&mut self, keys: Vec<String>) {
        for k in keys {
            self.state.delete(k);
        }
    }

    fn scan_prefix(&mut self, prefix: String, limit: u32) -> Vec<(String, Vec<u8>)> {
        self.state.scan_prefix(&prefix, limit as usize)
    }

    fn take_expired(&mut self) -> Option<Vec<String>> {
        self.state.take_expired_keys()
    }
}
