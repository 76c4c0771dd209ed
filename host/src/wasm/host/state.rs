//! `eddy:plugin/state`: the plugin's own key/value state, nobody else's.

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

    fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), state::StateError> {
        self.set_many(vec![(key, value)])
    }

    fn set_many(&mut self, entries: Vec<(String, Vec<u8>)>) -> Result<(), state::StateError> {
        self.state.set_many(entries).map_err(|e| match e {
            StateError::QuotaExceeded(m) => state::StateError::QuotaExceeded(m),
            StateError::Invalid(m) => state::StateError::Invalid(m),
        })
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
}
