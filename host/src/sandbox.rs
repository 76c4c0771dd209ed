//! The sandbox: one plugin's WebAssembly instance, its limits, and the host side of the
//! `eddy:plugin` contract (state, outputs, logging).
//!
//! What a plugin can reach is exactly its imports: its own state, its own outputs, the log,
//! and the WASI basics a Rust `std` guest links against (random numbers, and stdout/stderr
//! that go nowhere and to an in-memory buffer). It has no preopened directories, no network, no
//! environment variables, no arguments, and a clock frozen at the Unix epoch: time comes from
//! event timestamps and `on-tick`. Each instance has a linear-memory cap and a deadline per call.
//!
//! After any trap a wasmtime `Store` is unusable, so the sandbox rebuilds store and instance
//! and runs `init` again. State lives in [`HostState`], outside the guest, and survives that.

use crate::config::{Limits, PluginConfig};
use crate::state::{PluginState, StateError};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use wasmtime::component::{Component, HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "plugin",
    });
}

use bindings::eddy::plugin::types::Batch;
pub use bindings::eddy::plugin::types::{Header, OutputRecord, Verdict};
use bindings::eddy::plugin::{logging, output, state, types};

/// One Kafka record as the host holds it between consuming it and storing its offset. The
/// sandbox packs a slice of them into the contract's `batch` for each call.
#[derive(Debug, Clone)]
pub struct Event {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Kafka's record timestamp in milliseconds since the Unix epoch, if it has one.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<Header>,
    pub payload: Vec<u8>,
}

/// How often the engine's epoch advances; the granularity of the CPU deadline.
const EPOCH_TICK: Duration = Duration::from_millis(5);
/// How much of a guest's stderr (panic messages) one instance may write; kept to explain a
/// trap. The buffer is new with every instance.
const STDERR_CAPTURE: usize = 1 << 20;

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
/// Cranelift compiles it in the background (see [`crate::reload`]). Same sandbox settings
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

fn error_chain(e: &wasmtime::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

/// Why a plugin could not be loaded. Each names the file and the cause, for the user.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid WebAssembly component: {message}")]
    Compile { path: PathBuf, message: String },
    #[error(
        "{path}: does not implement the eddy:plugin world (build it with the eddy-sdk for wasm32-wasip2): {message}"
    )]
    Contract { path: PathBuf, message: String },
    #[error("{path}: init failed: {message}")]
    Init { path: PathBuf, message: String },
    #[error("{path}: migrate failed: {message}")]
    Migrate { path: PathBuf, message: String },
}

/// A failed call into the plugin: the trap's kind and a message for logs and dead letters.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{} ({message})", kind.label())]
pub struct Trap {
    pub kind: crate::metrics::TrapKind,
    pub message: String,
}

/// The host side of one plugin: what its imports read and write.
pub struct HostState {
    plugin: Arc<str>,
    pub state: PluginState,
    /// Records emitted by the batch's calls, not yet delivered.
    outputs: Vec<OutputRecord>,
    /// Length of `outputs` before the current call, to drop just its records on a trap.
    outputs_mark: usize,
    /// Output names `plugins.toml` maps for this plugin.
    output_names: Arc<BTreeSet<String>>,
}

impl HostState {
    pub fn new(plugin: &PluginConfig, state: PluginState) -> HostState {
        HostState {
            plugin: plugin.name.as_str().into(),
            state,
            outputs: Vec::new(),
            outputs_mark: 0,
            output_names: Arc::new(plugin.outputs.keys().cloned().collect()),
        }
    }
}

impl types::Host for HostState {}

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

impl output::Host for HostState {
    fn emit(&mut self, records: Vec<OutputRecord>) -> Result<(), String> {
        if let Some(r) = records
            .iter()
            .find(|r| !self.output_names.contains(&r.output))
        {
            let mapped: Vec<&str> = self.output_names.iter().map(String::as_str).collect();
            return Err(format!(
                "output `{}` is not mapped for plugin `{}` in plugins.toml (mapped: {})",
                r.output,
                self.plugin,
                if mapped.is_empty() {
                    "none".to_string()
                } else {
                    mapped.join(", ")
                }
            ));
        }
        self.outputs.extend(records);
        Ok(())
    }
}

impl logging::Host for HostState {
    fn log(&mut self, level: types::Level, message: String) {
        let plugin = &*self.plugin;
        match level {
            types::Level::Trace => tracing::trace!(plugin, "{message}"),
            types::Level::Debug => tracing::debug!(plugin, "{message}"),
            types::Level::Info => tracing::info!(plugin, "{message}"),
            types::Level::Warn => tracing::warn!(plugin, "{message}"),
            types::Level::Error => tracing::error!(plugin, "{message}"),
        }
    }
}

/// Everything a `Store` holds for one instance.
struct StoreData {
    wasi: WasiCtx,
    table: ResourceTable,
    memory: MemoryCap,
    host: HostState,
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
struct MemoryCap {
    max_bytes: usize,
    hit: bool,
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

/// How many batches a newly swapped-in version runs on probation: if it traps during them,
/// the host goes back to the version it replaced.
pub const PROBATION_BATCHES: u32 = 3;

/// One compiled version of a plugin, linked against the host and ready to instantiate. A hot
/// swap prepares one of these off the event path; the switch itself only instantiates it.
pub struct Program {
    path: PathBuf,
    digest: String,
    pre: bindings::PluginPre<StoreData>,
    /// Whether the component exports the optional `migrate` function.
    has_migrate: bool,
    /// How long reading, compiling (or loading the precompiled artifact) and linking took.
    pub compile_time: Duration,
    /// Whether the machine code came from the compile cache rather than a compile.
    pub precompiled: bool,
    /// Whether the machine code is the baseline compiler's ([`baseline_engine`]): a stopgap
    /// until the optimized code is ready.
    pub baseline: bool,
}

impl Program {
    /// Reads, compiles and links the component at `path`, checking that it implements the
    /// contract (its imports are ours, its exports have the right types). With a `cache`
    /// directory, the machine code of a `.wasm` compiled before (same bytes, same engine) is
    /// loaded from there instead of compiled again, and a new compile is stored there.
    pub fn compile(
        engine: &Engine,
        path: &Path,
        cache: Option<&Path>,
    ) -> Result<Program, LoadError> {
        Program::compile_and_release(engine, path, cache, true)
    }

    /// [`Program::compile`], handing the memory the compile freed back to the OS
    /// afterwards if `release` (a few milliseconds).
    fn compile_and_release(
        engine: &Engine,
        path: &Path,
        cache: Option<&Path>,
        release: bool,
    ) -> Result<Program, LoadError> {
        let started = std::time::Instant::now();
        let path = path.to_path_buf();
        let bytes = std::fs::read(&path).map_err(|source| LoadError::Read {
            path: path.clone(),
            source,
        })?;
        let digest = digest(&bytes);
        let cached = cache.map(|dir| cache_file(engine, dir, &digest));
        let (component, precompiled) = match cached.as_deref().and_then(|f| load_cached(engine, f))
        {
            Some(component) => (component, true),
            None => {
                let component = compile_component(engine, &path, &bytes)?;
                if let Some(file) = &cached {
                    store_cached(&component, file);
                }
                if release {
                    release_compile_memory();
                }
                (component, false)
            }
        };
        Program::link(engine, path, digest, component, started, precompiled)
    }

    /// Compiles the component at `path` with the baseline compiler (`engine` is a
    /// [`baseline_engine`]), checking the contract like [`Program::compile`]. Never cached:
    /// its code only bridges the time until the optimized compile is done, so it does not
    /// spend time giving memory back either: the optimized compile right after does.
    pub fn compile_baseline(engine: &Engine, path: &Path) -> Result<Program, LoadError> {
        let mut program = Program::compile_and_release(engine, path, None, false)?;
        program.baseline = true;
        Ok(program)
    }

    /// Whether `cache` holds `engine`'s compiled code for the `.wasm` with this digest.
    pub fn is_cached(engine: &Engine, cache: &Path, digest: &str) -> bool {
        cache_file(engine, cache, digest).is_file()
    }

    fn link(
        engine: &Engine,
        path: PathBuf,
        digest: String,
        component: Component,
        started: std::time::Instant,
        precompiled: bool,
    ) -> Result<Program, LoadError> {
        if let Some(version) = other_contract_version(engine, &component) {
            return Err(LoadError::Contract {
                path,
                message: format!(
                    "it was built against eddy:plugin@{version}, and this host speaks \
                     eddy:plugin@{CONTRACT_VERSION}: rebuild it with the eddy-sdk of this release"
                ),
            });
        }
        let contract = |e: wasmtime::Error| LoadError::Contract {
            path: path.clone(),
            message: error_chain(&e),
        };
        let mut linker: Linker<StoreData> = Linker::new(engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(contract)?;
        bindings::Plugin::add_to_linker::<StoreData, HasSelf<HostState>>(&mut linker, |d| {
            &mut d.host
        })
        .map_err(contract)?;
        let pre = linker
            .instantiate_pre(&component)
            .and_then(bindings::PluginPre::new)
            .map_err(contract)?;
        let has_migrate = component.get_export_index(None, "migrate").is_some();
        Ok(Program {
            path,
            digest,
            pre,
            has_migrate,
            compile_time: started.elapsed(),
            precompiled,
            baseline: false,
        })
    }

    /// Compiles the component at `path` into `cache` (unless it is there already), for a
    /// later [`Program::compile`] to load: `eddy compile`. Returns the artifact's path.
    pub fn precompile(engine: &Engine, path: &Path, cache: &Path) -> Result<PathBuf, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file = cache_file(engine, cache, &digest(&bytes));
        if load_cached(engine, &file).is_none() {
            store_cached(&compile_component(engine, path, &bytes)?, &file);
        }
        Ok(file)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The engine that compiled this version: its instances must live in a store of it.
    pub fn engine(&self) -> &Engine {
        self.pre.instance_pre().engine()
    }

    /// `sha256:<hex>` of the `.wasm` file's bytes.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Instantiates this version in a scratch sandbox with empty state and runs `init` with
    /// `plugin`'s config: catches a bad config before the real switch.
    pub fn validate(self: &Arc<Self>, plugin: &PluginConfig) -> Result<(), LoadError> {
        let scratch = PluginState::in_memory(plugin.limits.state_mib << 20);
        Sandbox::start(self.clone(), plugin, scratch).map(drop)
    }
}

/// The version of the `eddy:plugin` package in `wit/`, the one this host implements.
pub const CONTRACT_VERSION: &str = "0.3.0";

/// The `eddy:plugin` version a component imports, if it is not [`CONTRACT_VERSION`]: for a
/// message that says "rebuild" rather than "no matching implementation".
fn other_contract_version(engine: &Engine, component: &Component) -> Option<String> {
    component
        .component_type()
        .imports(engine)
        .filter_map(|(name, _)| name.strip_prefix("eddy:plugin/")?.split_once('@'))
        .map(|(_, version)| version.to_string())
        .find(|version| version != CONTRACT_VERSION)
}

/// Hands the memory a compile freed back to the operating system. Cranelift allocates tens
/// of MiB while it compiles a plugin, on several threads and so in several of glibc's malloc
/// arenas, and glibc keeps what is freed there for later: without this, a host that
/// compiled its plugins stays ~7 MiB per plugin bigger than one that loaded them from the
/// compile cache (`make bench-memory`). Takes a few milliseconds, once per compile.
fn release_compile_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of glibc's heaps to the kernel; it does
    // not touch memory in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn compile_component(engine: &Engine, path: &Path, bytes: &[u8]) -> Result<Component, LoadError> {
    Component::new(engine, bytes).map_err(|e| LoadError::Compile {
        path: path.to_path_buf(),
        // wasmparser's messages span lines (byte dumps): keep them on one.
        message: error_chain(&e)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
    })
}

/// Where the compiled code of the `.wasm` with `digest` is kept for `engine`: the engine's
/// compatibility hash (wasmtime version, settings, CPU features) is part of the name, so an
/// upgraded host never picks up code compiled by another.
fn cache_file(engine: &Engine, dir: &Path, digest: &str) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    let hex = digest.trim_start_matches("sha256:");
    dir.join(format!("{hex}-{:016x}.cwasm", hasher.finish()))
}

/// The cached component in `file`, if there is a usable one.
fn load_cached(engine: &Engine, file: &Path) -> Option<Component> {
    if !file.is_file() {
        return None;
    }
    // SAFETY: `deserialize_file` trusts the file to be machine code that wasmtime produced
    // for this engine. The cache directory is the host's own (under its state directory,
    // written only by `store_cached`); wasmtime itself checks the version and settings
    // recorded in the file and refuses a mismatch, which we treat as a miss.
    match unsafe { Component::deserialize_file(engine, file) } {
        Ok(component) => Some(component),
        Err(e) => {
            tracing::warn!(file = %file.display(), "ignoring a cached compile: {}", error_chain(&e));
            None
        }
    }
}

/// Stores `component`'s code in `file` (written aside, then renamed into place, so a reader
/// never sees half a file). A failure only costs the next start a compile.
fn store_cached(component: &Component, file: &Path) {
    let result = (|| -> anyhow::Result<()> {
        let bytes = component.serialize().map_err(wasm_error)?;
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = file.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, file)?;
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!(file = %file.display(), "cannot store the compiled plugin: {e:#}");
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(bytes);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The version a swap replaced, kept while the new one is on probation.
struct Previous {
    program: Arc<Program>,
    config_json: String,
    limits: Limits,
    output_names: Arc<BTreeSet<String>>,
}

/// A loaded, initialised plugin instance.
pub struct Sandbox {
    program: Arc<Program>,
    store: Store<StoreData>,
    /// `None` only if re-creating the instance failed (calls then fail and are accounted for).
    linked: Option<Linked>,
    config_json: String,
    limits: Limits,
    /// The guest's stderr (a panic message lands here).
    stderr: MemoryOutputPipe,
    previous: Option<Previous>,
    probation_left: u32,
    /// Set when a version on probation trapped and the previous one was restored.
    rolled_back: Option<RolledBack>,
    /// The buffers each call's events are packed into, kept between calls.
    packed: Batch,
}

/// A version that was taken back because it trapped on probation.
#[derive(Debug, Clone)]
pub struct RolledBack {
    pub path: PathBuf,
    pub digest: String,
    pub restored_digest: String,
    pub trap: String,
}

impl Sandbox {
    /// Compiles (or loads from `cache`), links and initialises the plugin at `plugin.path`,
    /// on `state`.
    pub fn load(
        engine: &Engine,
        plugin: &PluginConfig,
        state: PluginState,
        cache: Option<&Path>,
    ) -> Result<Sandbox, LoadError> {
        let program = Arc::new(Program::compile(engine, &plugin.path, cache)?);
        Sandbox::start(program, plugin, state)
    }

    /// Instantiates and initialises `program` on `state`.
    pub fn start(
        program: Arc<Program>,
        plugin: &PluginConfig,
        state: PluginState,
    ) -> Result<Sandbox, LoadError> {
        let engine = program.engine().clone();
        let (mut store, stderr) = new_store(&engine, &plugin.limits, HostState::new(plugin, state));
        let linked = link(&mut store, &program).map_err(|message| LoadError::Contract {
            path: program.path.clone(),
            message,
        })?;
        let mut sandbox = Sandbox {
            program,
            store,
            linked: Some(linked),
            config_json: plugin.config_json(),
            limits: plugin.limits.clone(),
            stderr,
            previous: None,
            probation_left: 0,
            rolled_back: None,
            packed: empty_batch(),
        };
        sandbox.init()?;
        Ok(sandbox)
    }

    pub fn program(&self) -> &Arc<Program> {
        &self.program
    }

    /// The plugin's state (for inspection).
    pub fn state(&self) -> &PluginState {
        &self.store.data().host.state
    }

    /// Switches to `program` with `plugin`'s config and limits, keeping the state: `init`,
    /// then `migrate` (if exported and the version changed). Call it between batches. On an
    /// error the running version stays as it was, state included. On success the old version
    /// is kept for [`PROBATION_BATCHES`] batches, to go back to if the new one traps.
    pub fn swap(&mut self, program: Arc<Program>, plugin: &PluginConfig) -> Result<(), LoadError> {
        let previous = Previous {
            program: self.program.clone(),
            config_json: std::mem::replace(&mut self.config_json, plugin.config_json()),
            limits: std::mem::replace(&mut self.limits, plugin.limits.clone()),
            output_names: std::mem::replace(
                &mut self.store.data_mut().host.output_names,
                Arc::new(plugin.outputs.keys().cloned().collect()),
            ),
        };
        let from_digest = self.program.digest.clone();
        let version_changed = program.digest != from_digest;
        let result = self.replace_instance(program.clone()).and_then(|()| {
            let migrate = self.linked.as_ref().and_then(|l| l.migrate);
            if version_changed && let Some(migrate) = migrate {
                self.store.set_epoch_deadline(deadline_ticks(&self.limits));
                let result = migrate.call(&mut self.store, (from_digest,));
                let outcome = match result {
                    Ok((Ok(()),)) => Ok(()),
                    Ok((Err(message),)) => Err(message),
                    Err(e) => Err(self.classify(&e).to_string()),
                };
                outcome.map_err(|message| LoadError::Migrate {
                    path: program.path.clone(),
                    message,
                })
            } else {
                Ok(())
            }
        });
        match result {
            Ok(()) => {
                // What init and migrate wrote joins the next batch's commit.
                self.store.data_mut().host.state.end_call(true);
                self.previous = Some(previous);
                self.probation_left = PROBATION_BATCHES;
                Ok(())
            }
            Err(e) => {
                self.store.data_mut().host.state.end_call(false);
                self.restore(previous);
                Err(e)
            }
        }
    }

    /// Goes back to `previous` (same state), after a failed swap or a trap on probation.
    fn restore(&mut self, previous: Previous) {
        self.config_json = previous.config_json;
        self.limits = previous.limits;
        self.store.data_mut().host.output_names = previous.output_names;
        if let Err(e) = self.replace_instance(previous.program) {
            tracing::error!(path = %self.program.path.display(), "cannot restore the previous version: {e}");
        }
    }

    /// Counts a batch that went through without a trap; ends probation after enough.
    pub fn batch_succeeded(&mut self) {
        if self.probation_left > 0 {
            self.probation_left -= 1;
            if self.probation_left == 0 {
                self.previous = None;
            }
        }
    }

    /// The version taken back since the last call, if any.
    pub fn take_rolled_back(&mut self) -> Option<RolledBack> {
        self.rolled_back.take()
    }
    fn init(&mut self) -> Result<(), LoadError> {
        let path = self.program.path.clone();
        let Some(linked) = &self.linked else {
            return Err(LoadError::Contract {
                path,
                message: "no instance".into(),
            });
        };
        self.store.set_epoch_deadline(deadline_ticks(&self.limits));
        self.store.data_mut().host.outputs_mark = self.store.data().host.outputs.len();
        let result = linked.plugin.call_init(&mut self.store, &self.config_json);
        let host = &mut self.store.data_mut().host;
        match result {
            Ok(Ok(())) => {
                // What init wrote is kept with the next batch; what it emitted is dropped:
                // there is no event to tie it to.
                host.state.end_call(true);
                host.outputs.truncate(host.outputs_mark);
                Ok(())
            }
            Ok(Err(message)) => {
                host.state.end_call(false);
                Err(LoadError::Init { path, message })
            }
            Err(e) => {
                self.store.data_mut().host.state.end_call(false);
                let trap = self.classify(&e);
                Err(LoadError::Init {
                    path,
                    message: trap.to_string(),
                })
            }
        }
    }

    /// Runs `events` through the plugin. On success its state changes join the batch in
    /// progress and its outputs are queued (see [`Sandbox::take_outputs`],
    /// [`Sandbox::commit_batch`]). On a trap they are discarded and the instance is rebuilt
    /// (or, on probation, the previous version restored) before this returns, so the sandbox
    /// is ready for the next call.
    pub fn call_batch(&mut self, events: &[Event]) -> Result<Vec<Verdict>, Trap> {
        // A batch holds one topic. Eddy consumes one, but should events of several ever be
        // mixed, each run of one topic is its own call.
        let same_topic = events
            .iter()
            .take_while(|e| e.topic == events[0].topic)
            .count();
        if same_topic < events.len() {
            let mut verdicts = self.call_batch(&events[..same_topic])?;
            verdicts.extend(self.call_batch(&events[same_topic..])?);
            return Ok(verdicts);
        }
        let linked = self.linked.as_ref().ok_or_else(not_linked)?;
        self.store.set_epoch_deadline(deadline_ticks(&self.limits));
        self.store.data_mut().host.outputs_mark = self.store.data().host.outputs.len();
        pack(&mut self.packed, events);
        match linked.plugin.call_on_batch(&mut self.store, &self.packed) {
            Ok(verdicts) if verdicts.len() == events.len() => {
                self.store.data_mut().host.state.end_call(true);
                Ok(verdicts)
            }
            Ok(verdicts) => {
                self.discard_call();
                Err(Trap {
                    kind: crate::metrics::TrapKind::Trap,
                    message: format!(
                        "returned {} verdicts for {} events",
                        verdicts.len(),
                        events.len()
                    ),
                })
            }
            Err(e) => Err(self.fail(&e)),
        }
    }

    /// Calls `on-tick`; like [`Sandbox::call_batch`], its effects join the batch in progress.
    pub fn call_tick(&mut self, now_ms: i64) -> Result<(), Trap> {
        let linked = self.linked.as_ref().ok_or_else(not_linked)?;
        self.store.set_epoch_deadline(deadline_ticks(&self.limits));
        self.store.data_mut().host.outputs_mark = self.store.data().host.outputs.len();
        match linked.plugin.call_on_tick(&mut self.store, now_ms) {
            Ok(()) => {
                self.store.data_mut().host.state.end_call(true);
                Ok(())
            }
            Err(e) => Err(self.fail(&e)),
        }
    }

    /// The outputs queued by this batch's successful calls, for delivery.
    pub fn take_outputs(&mut self) -> Vec<OutputRecord> {
        let host = &mut self.store.data_mut().host;
        host.outputs_mark = 0;
        std::mem::take(&mut host.outputs)
    }

    /// Makes the batch's state changes permanent together with the offsets it advanced:
    /// call once its outputs are delivered. On an error the batch is still pending.
    pub fn commit_batch(
        &mut self,
        offsets: &crate::store::Offsets,
    ) -> Result<(), crate::store::StoreError> {
        let digest = self.program.digest.clone();
        self.store
            .data_mut()
            .host
            .state
            .commit_batch(offsets, &[(crate::store::META_WRITER, &digest)])
    }

    /// Drops the batch's state changes: its events will be consumed again.
    pub fn abort_batch(&mut self) {
        let host = &mut self.store.data_mut().host;
        host.state.abort_batch();
        host.outputs.clear();
        host.outputs_mark = 0;
    }

    /// Drops the effects of the call that just failed (earlier calls of the batch stay).
    fn discard_call(&mut self) {
        let host = &mut self.store.data_mut().host;
        host.state.end_call(false);
        host.outputs.truncate(host.outputs_mark);
    }

    /// Handles a trapped call: classify it, drop its effects, and rebuild the instance; a
    /// version on probation is replaced by the one it replaced.
    fn fail(&mut self, e: &wasmtime::Error) -> Trap {
        let trap = self.classify(e);
        self.discard_call();
        if let Some(previous) = self.previous.take() {
            self.probation_left = 0;
            self.rolled_back = Some(RolledBack {
                path: self.program.path.clone(),
                digest: self.program.digest.clone(),
                restored_digest: previous.program.digest.clone(),
                trap: trap.to_string(),
            });
            self.restore(previous);
        } else if let Err(e) = self.replace_instance(self.program.clone()) {
            // The same bytes loaded and initialised before, so this is unexpected. Keep the
            // trap as the answer; the next call fails the same way and is accounted for.
            tracing::error!(path = %self.program.path.display(), "cannot recreate the instance after a trap: {e}");
        }
        trap
    }

    fn classify(&mut self, e: &wasmtime::Error) -> Trap {
        use crate::metrics::TrapKind;
        let memory_hit = std::mem::take(&mut self.store.data_mut().memory.hit);
        let kind = if memory_hit {
            TrapKind::Memory
        } else if matches!(
            e.downcast_ref::<wasmtime::Trap>(),
            Some(wasmtime::Trap::Interrupt)
        ) {
            TrapKind::Deadline
        } else {
            TrapKind::Trap
        };
        let detail = match kind {
            TrapKind::Deadline => {
                format!("ran longer than limits.cpu_ms = {} ms", self.limits.cpu_ms)
            }
            TrapKind::Memory => format!(
                "grew past limits.memory_mib = {} MiB",
                self.limits.memory_mib
            ),
            TrapKind::Trap => {
                let cause = e.root_cause().to_string();
                tracing::debug!(path = %self.program.path.display(), "trap: {}", error_chain(e));
                match panic_message(&self.stderr.contents()) {
                    Some(panic) => format!("{panic} ({cause})"),
                    None => cause,
                }
            }
        };
        Trap {
            kind,
            message: detail,
        }
    }

    /// Replaces store and instance with fresh ones of `program` around the same state, and
    /// runs `init`. Whatever happens, the state stays in `self.store`.
    fn replace_instance(&mut self, program: Arc<Program>) -> Result<(), LoadError> {
        // The program's own engine: a tier-up moves from the baseline engine's code to the
        // optimizing one's, and a store runs only its engine's code.
        let engine = program.engine().clone();
        let empty = Store::new(&engine, StoreData::empty());
        let host = std::mem::replace(&mut self.store, empty).into_data().host;
        let (mut store, stderr) = new_store(&engine, &self.limits, host);
        let linked = link(&mut store, &program);
        self.store = store;
        self.stderr = stderr;
        self.program = program;
        match linked {
            Ok(l) => {
                self.linked = Some(l);
                self.init()
            }
            Err(message) => {
                self.linked = None;
                Err(LoadError::Contract {
                    path: self.program.path.clone(),
                    message,
                })
            }
        }
    }
}

fn empty_batch() -> Batch {
    Batch {
        topic: String::new(),
        partitions: Vec::new(),
        offsets: Vec::new(),
        timestamps_ms: Vec::new(),
        key_lens: Vec::new(),
        payload_lens: Vec::new(),
        header_counts: Vec::new(),
        data: Vec::new(),
        headers: Vec::new(),
    }
}

/// Packs `events` (all of one topic) into `batch`, column by column (see `batch` in
/// `wit/eddy.wit`), reusing its buffers: after the first few calls, packing allocates
/// nothing.
fn pack(batch: &mut Batch, events: &[Event]) {
    let topic = events.first().map_or("", |e| e.topic.as_str());
    if batch.topic != topic {
        batch.topic = topic.to_string();
    }
    batch.partitions.clear();
    batch.offsets.clear();
    batch.timestamps_ms.clear();
    batch.key_lens.clear();
    batch.payload_lens.clear();
    batch.header_counts.clear();
    batch.data.clear();
    batch.headers.clear();
    // Lengths are 32-bit: a batch is cut well below 4 GiB (`max_batch_bytes`), and the
    // guest's memory cap is lower still, so these conversions cannot truncate a batch that
    // fits. -1 is Kafka's own "none" for a timestamp and a key.
    for e in events {
        batch.partitions.push(e.partition);
        batch.offsets.push(e.offset);
        batch.timestamps_ms.push(e.timestamp_ms.unwrap_or(-1));
        match &e.key {
            Some(key) => {
                batch.key_lens.push(key.len() as i32);
                batch.data.extend_from_slice(key);
            }
            None => batch.key_lens.push(-1),
        }
        batch.payload_lens.push(e.payload.len() as u32);
        batch.data.extend_from_slice(&e.payload);
        batch.header_counts.push(e.headers.len() as u32);
        batch.headers.extend(e.headers.iter().cloned());
    }
}

fn not_linked() -> Trap {
    Trap {
        kind: crate::metrics::TrapKind::Trap,
        message: "the plugin has no instance (it could not be re-created; see the log)".into(),
    }
}

fn deadline_ticks(limits: &Limits) -> u64 {
    limits.cpu_ms.div_ceil(EPOCH_TICK.as_millis() as u64).max(1)
}

/// The last panic a Rust guest wrote to stderr, as `panicked at FILE:LINE:COL: MESSAGE`.
fn panic_message(stderr: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.iter().rposition(|l| l.contains("panicked at"))?;
    let head = lines[start]
        .split_once("panicked at")
        .map_or(lines[start], |(_, rest)| rest)
        .trim();
    let message: Vec<&str> = lines[start + 1..]
        .iter()
        .take_while(|l| !l.starts_with("note: "))
        .map(|l| l.trim())
        .collect();
    Some(
        format!("panicked at {head} {}", message.join(" "))
            .trim()
            .to_string(),
    )
}

/// The typed exports of one instance.
struct Linked {
    plugin: bindings::Plugin,
    /// The optional `migrate` export.
    migrate: Option<MigrateFunc>,
}

/// `migrate: func(from-digest: string) -> result<_, string>`.
type MigrateFunc = wasmtime::component::TypedFunc<(String,), (Result<(), String>,)>;

impl StoreData {
    /// A store's data with nothing in it, to stand in while the real one moves.
    fn empty() -> StoreData {
        StoreData {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            memory: MemoryCap {
                max_bytes: 0,
                hit: false,
            },
            host: HostState {
                plugin: "".into(),
                state: PluginState::in_memory(0),
                outputs: Vec::new(),
                outputs_mark: 0,
                output_names: Arc::default(),
            },
        }
    }
}

/// A fresh store around `host`: sandboxed WASI, the memory cap.
fn new_store(
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

/// Instantiates `program` in `store`.
fn link(store: &mut Store<StoreData>, program: &Program) -> Result<Linked, String> {
    store.set_epoch_deadline(u64::MAX / 2);
    let instance = program
        .pre
        .instance_pre()
        .instantiate(&mut *store)
        .map_err(|e| error_chain(&e))?;
    let plugin = bindings::Plugin::new(&mut *store, &instance).map_err(|e| error_chain(&e))?;
    let migrate = if program.has_migrate {
        let f = instance
            .get_typed_func::<(String,), (Result<(), String>,)>(&mut *store, "migrate")
            .map_err(|e| {
                format!(
                    "its `migrate` export has the wrong type: {}",
                    error_chain(&e)
                )
            })?;
        Some(f)
    } else {
        None
    };
    Ok(Linked { plugin, migrate })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_version_is_the_wit_packages() {
        let wit = include_str!("../../wit/eddy.wit");
        assert!(
            wit.contains(&format!("package eddy:plugin@{CONTRACT_VERSION};")),
            "CONTRACT_VERSION {CONTRACT_VERSION} is not wit/eddy.wit's package version"
        );
    }

    #[test]
    fn packing_keeps_each_events_bytes_and_reuses_the_buffers() {
        let event = |offset: i64, key: Option<&[u8]>, payload: &[u8], headers: usize| Event {
            topic: "t".into(),
            partition: 2,
            offset,
            timestamp_ms: Some(offset * 10),
            key: key.map(<[u8]>::to_vec),
            headers: (0..headers)
                .map(|i| Header {
                    key: format!("h{i}"),
                    value: (i % 2 == 0).then(|| vec![i as u8]),
                })
                .collect(),
            payload: payload.to_vec(),
        };
        let events = [
            event(7, Some(b"k1"), b"{\"a\":1}", 0),
            event(8, None, b"", 2),
            event(9, Some(b""), b"xyz", 1),
        ];
        let mut batch = empty_batch();
        for _ in 0..2 {
            pack(&mut batch, &events);
            assert_eq!(batch.topic, "t");
            assert_eq!(batch.partitions, [2, 2, 2]);
            assert_eq!(batch.offsets, [7, 8, 9]);
            assert_eq!(batch.timestamps_ms, [70, 80, 90]);
            // No key is -1, an empty key 0.
            assert_eq!(batch.key_lens, [2, -1, 0]);
            assert_eq!(batch.payload_lens, [7, 0, 3]);
            assert_eq!(batch.data, b"k1{\"a\":1}xyz");
            assert_eq!(batch.header_counts, [0, 2, 1]);
            let headers: Vec<_> = events.iter().flat_map(|e| e.headers.clone()).collect();
            assert_eq!(
                batch
                    .headers
                    .iter()
                    .map(|h| (&h.key, &h.value))
                    .collect::<Vec<_>>(),
                headers
                    .iter()
                    .map(|h| (&h.key, &h.value))
                    .collect::<Vec<_>>()
            );
        }
        // A record without a timestamp is -1, Kafka's own encoding.
        let mut untimed = events[0].clone();
        untimed.timestamp_ms = None;
        pack(&mut batch, &[untimed]);
        assert_eq!(batch.timestamps_ms, [-1]);
    }
}
