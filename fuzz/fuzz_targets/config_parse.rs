//! Arbitrary text as `plugins.toml`: the host's `Config::parse` must never panic (it returns
//! the config or an error naming the file), and neither must what the host then derives from
//! a config it accepted (each plugin's `init` JSON, group, dead-letter topic).
//!
//! # Why `config/` is included by path
//!
//! This target compiles `host/src/config/` itself, with `#[path]`, rather than depending on
//! the `eddy` crate: that crate pulls in wasmtime, cranelift and librdkafka, which would take
//! far longer to build with coverage instrumentation (on the 2-core CI machine) than fuzzing
//! runs. `config/` needs only serde, serde_json, thiserror and toml (the versions of
//! `host/Cargo.toml`) and nothing else of the host crate: it is the bottom floor. Keep it so
//! (a use of another module of the host would break this target).

#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../host/src/config/mod.rs"]
mod config;

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|text: &str| {
    match config::Config::parse(text, Path::new("/etc/eddy/plugins.toml")) {
        Ok(config) => {
            let _ = config.embedded();
            for p in &config.plugins {
                let _ = (p.group_id(), p.dead_letter_topic(), p.config_json());
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
