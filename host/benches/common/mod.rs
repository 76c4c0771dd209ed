//! Helpers shared by the benchmarks.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where `make plugins` left the `.wasm` files.
pub fn plugins_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| root.join(d))
        .unwrap_or_else(|| root.join("target"));
    let dir = target.join("wasm32-wasip2").join("plugin");
    assert!(
        dir.join("eddy_analytics.wasm").is_file(),
        "build the plugins first: make plugins"
    );
    dir
}

/// `[kafka]` for a broker at `bootstrap`, with the settings the host uses for its own
/// embedded broker (see `Host::start`).
pub fn kafka_section(bootstrap: &str) -> String {
    format!(
        "[kafka]\nbrokers = \"{bootstrap}\"\n[kafka.settings]\n\"fetch.wait.max.ms\" = \"20\"\n"
    )
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
