//! Where state reads and writes, outputs and log lines go: the host (inside a component) or
//! memory (in native tests, see [`crate::testing`]).

use crate::{Level, OutputRecord};

/// The host services a plugin uses. Each method is one host call, so they are coarse.
pub trait Backend {
    fn get_many(&mut self, keys: &[String]) -> Vec<Option<Vec<u8>>>;
    fn set_many(&mut self, entries: &[(String, Vec<u8>)]) -> Result<(), String>;
    fn delete_many(&mut self, keys: &[String]);
    fn scan_prefix(&mut self, prefix: &str, limit: u32) -> Vec<(String, Vec<u8>)>;
    /// The keys the host deleted itself (`[plugin.expire]`) since the previous call; `None`:
    /// too many to list, forget every cached key.
    fn take_expired(&mut self) -> Option<Vec<String>>;
    fn emit(&mut self, records: Vec<OutputRecord>) -> Result<(), String>;
    fn log(&mut self, level: Level, message: &str);
}

/// The real host, through the component's imports.
pub(crate) struct Host;

impl Backend for Host {
    fn get_many(&mut self, keys: &[String]) -> Vec<Option<Vec<u8>>> {
        crate::bindings::eddy::plugin::state::get_many(keys)
    }

    fn set_many(&mut self, entries: &[(String, Vec<u8>)]) -> Result<(), String> {
        use crate::bindings::eddy::plugin::state::{self, StateError};
        state::set_many(entries).map_err(|e| match e {
            StateError::QuotaExceeded(m) => format!("state quota exceeded: {m}"),
            StateError::Invalid(m) => format!("invalid state write: {m}"),
        })
    }

    fn delete_many(&mut self, keys: &[String]) {
        crate::bindings::eddy::plugin::state::delete_many(keys)
    }

    fn scan_prefix(&mut self, prefix: &str, limit: u32) -> Vec<(String, Vec<u8>)> {
        crate::bindings::eddy::plugin::state::scan_prefix(prefix, limit)
    }

    fn take_expired(&mut self) -> Option<Vec<String>> {
        crate::bindings::eddy::plugin::state::take_expired()
    }

    fn emit(&mut self, records: Vec<OutputRecord>) -> Result<(), String> {
        use crate::bindings::eddy::plugin::types::OutputRecord as Wit;
        let records: Vec<Wit> = records
            .into_iter()
            .map(|r| Wit {
                output: r.output,
                key: r.key,
                payload: r.payload,
            })
            .collect();
        crate::bindings::eddy::plugin::output::emit(&records)
    }

    fn log(&mut self, level: Level, message: &str) {
        use crate::bindings::eddy::plugin::types::Level as Wit;
        let level = match level {
            Level::Trace => Wit::Trace,
            Level::Debug => Wit::Debug,
            Level::Info => Wit::Info,
            Level::Warn => Wit::Warn,
            Level::Error => Wit::Error,
        };
        crate::bindings::eddy::plugin::logging::log(level, message)
    }
}
