//! The wasmtime engines every plugin shares, and the thread that advances their epoch: the
//! clock the CPU deadline is measured on.

use std::time::Duration;
use wasmtime::Engine;

/// How often the engine's epoch advances; the granularity of the CPU deadline.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Creates the engine every plugin shares, and starts the thread that drives its epoch
/// (the clock the CPU deadline is measured on). The thread ends when the engine is dropped.
pub fn engine() -> anyhow::Result<Engine> {
    engine_with(true)
}

/// An engine whose compiled code has no CPU-deadline checks: plugins on it can run forever.
/// Only for measuring what the deadline costs (`cargo bench -p eddy --bench dispatch`).
pub fn engine_without_deadline() -> anyhow::Result<Engine> {
    engine_with(false)
}

/// An engine that compiles with Winch, wasmtime's baseline compiler: about 5x faster to
/// compile than Cranelift (80 against 390 ms for the analytics plugin here), for code that
/// runs slower. A hot swap that finds no precompiled code runs the new version on this while
/// Cranelift compiles it in the background (see [`crate::supervisor`]). Same sandbox settings
/// and the same CPU deadline as [`engine`].
pub fn baseline_engine() -> anyhow::Result<Engine> {
    engine_for(true, wasmtime::Strategy::Winch)
}

fn engine_with(deadline: bool) -> anyhow::Result<Engine> {
    engine_for(deadline, wasmtime::Strategy::Cranelift)
}

fn engine_for(deadline: bool, strategy: wasmtime::Strategy) -> anyhow::Result<Engine> {
    let mut config = wasmtime::Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(deadline);
    config.strategy(strategy);
    // `EDDY_PERFMAP=1` writes /tmp/perf-<pid>.map so `perf report` names plugin functions.
    if std::env::var_os("EDDY_PERFMAP").is_some_and(|v| v == "1") {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    let engine = Engine::new(&config).map_err(wasm_error)?;
    if !deadline {
        return Ok(engine);
    }
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("eddy-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })?;
    Ok(engine)
}

/// Turns a wasmtime error (not an `std::error::Error` since wasmtime 42) into an anyhow one.
pub fn wasm_error(e: wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!(error_chain(&e))
}

pub fn error_chain(e: &wasmtime::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}
