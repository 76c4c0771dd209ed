//! One wasmtime `Store`: what a plugin instance can reach. Sandboxed WASI (no preopened
//! directories, no network, no environment, no arguments, stdout discarded, stderr captured
//! to explain a trap, clocks frozen at the Unix epoch), the linear-memory cap, and the
//! plugin's [`HostState`].

use super::host::HostState;
use crate::config::Limits;
use crate::state::PluginState;
use std::time::Duration;
use wasmtime::component::ResourceTable;
use wasmtime::{Engine, Store};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// How much of a guest's stderr (panic messages) one instance may write; kept to explain a
/// trap. The buffer is new with every instance.
const STDERR_CAPTURE: usize = 1 << 20;

/// Everything a `Store` holds for one instance.
pub(crate) struct StoreData {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) memory: MemoryCap,
    pub(crate) host: HostState,
}

impl WasiView for StoreData {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// Caps linear memory and remembers that the cap was hit, so the trap that follows can be
/// reported as "memory" rather than as a generic guest abort.
pub(crate) struct MemoryCap {
    max_bytes: usize,
    /// Set when a growth was refused; taken by the trap's classification.
    pub(crate) hit: bool,
}

impl wasmtime::ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.hit = true;
            wasmtime::bail!(
                "memory cap of {} MiB exceeded (wanted {} MiB)",
                self.max_bytes >> 20,
                desired >> 20
            );
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// A wall clock stopped at the Unix epoch: plugins get time from events and `on-tick`.
struct FrozenWallClock;

impl wasmtime_wasi::HostWallClock for FrozenWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

struct FrozenMonotonicClock;

impl wasmtime_wasi::HostMonotonicClock for FrozenMonotonicClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

impl StoreData {
    /// A store's data with nothing in it, to stand in while the real one moves.
    pub(crate) fn empty() -> StoreData {
        StoreData {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            memory: MemoryCap {
                max_bytes: 0,
                hit: false,
            },
            host: HostState::new(&empty_plugin(), PluginState::in_memory(0)),
        }
    }
}

/// A plugin entry with nothing in it, for [`StoreData::empty`].
fn empty_plugin() -> crate::config::PluginConfig {
    crate::config::PluginConfig {
        name: String::new(),
        path: Default::default(),
        group: None,
        topic: None,
        topic_partitions: None,
        start_from: Default::default(),
        max_batch: 1,
        batch_linger_ms: 0,
        tick_interval_ms: 0,
        dead_letter_topic: None,
        dead_letter_table: None,
        limits: Limits::default(),
        breaker: Default::default(),
        expire: Default::default(),
        max_ahead: None,
        outputs: Default::default(),
        config: Default::default(),
    }
}

/// A fresh store around `host`: sandboxed WASI, the memory cap.
pub(crate) fn new_store(
    engine: &Engine,
    limits: &Limits,
    host: HostState,
) -> (Store<StoreData>, MemoryOutputPipe) {
    let stderr = MemoryOutputPipe::new(STDERR_CAPTURE);
    let wasi = WasiCtx::builder()
        .stderr(stderr.clone())
        // A plugin's output goes through `emit`; stray prints are dropped.
        .stdout(wasmtime_wasi::p2::pipe::SinkOutputStream)
        .wall_clock(FrozenWallClock)
        .monotonic_clock(FrozenMonotonicClock)
        .build();
    let data = StoreData {
        wasi,
        table: ResourceTable::new(),
        memory: MemoryCap {
            max_bytes: (limits.memory_mib as usize) << 20,
            hit: false,
        },
        host,
    };
    let mut store = Store::new(engine, data);
    store.limiter(|d| &mut d.memory);
    (store, stderr)
}
