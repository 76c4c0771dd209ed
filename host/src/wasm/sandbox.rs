//! One loaded plugin instance and its lifecycle: instantiate and `init`, run a batch or a
//! tick under the CPU deadline, rebuild the instance after a trap (a wasmtime `Store` is
//! unusable after one), swap to a new version keeping the state, and go back to the previous
//! version if the new one traps on probation. State lives in the [`HostState`], outside the
//! guest, and survives all of that.

use super::batch::{empty_batch, pack};
use super::bindings;
use super::bindings::eddy::plugin::types::{Batch, OutputRecord, Verdict};
use super::engine::{EPOCH_TICK, error_chain};
use super::host::HostState;
use super::instance::{StoreData, new_store};
use super::program::{LoadError, Program};
use super::trap::{Trap, panic_message};
use crate::config::{Limits, PluginConfig};
use crate::event::Event;
use crate::state::PluginState;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use wasmtime::{Engine, Store};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

/// How many batches a newly swapped-in version runs on probation: if it traps during them,
/// the host goes back to the version it replaced.
pub const PROBATION_BATCHES: u32 = 3;

/// The version a swap replaced, kept while the new one is on probation.
struct Previous {
    program: Arc<Program>,
    config_json: String,
    limits: Limits,
    expire: crate::config::Expire,
    max_ahead_ms: i64,
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
    /// `[plugin.expire]` as in force (to go back to after a failed swap).
    expire: crate::config::Expire,
    /// How far ahead of the host's clock an event's time is believed (`max_ahead`): handed
    /// to the plugin with each batch, and the bound of the expiry's event clock.
    max_ahead_ms: i64,
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
            expire: plugin.expire.clone(),
            max_ahead_ms: plugin
                .max_ahead_ms()
                .unwrap_or(crate::config::DEFAULT_MAX_AHEAD_MS),
            stderr,
            previous: None,
            probation_left: 0,
            rolled_back: None,
            packed: empty_batch(),
        };
        sandbox.init()?;
        Ok(sandbox)
    }

    /// Instantiates `program` in a scratch sandbox with empty state and runs `init` with
    /// `plugin`'s config: catches a bad config before the real switch.
    pub fn validate(program: &Arc<Program>, plugin: &PluginConfig) -> Result<(), LoadError> {
        let scratch = PluginState::in_memory(plugin.limits.state_mib << 20);
        Sandbox::start(program.clone(), plugin, scratch).map(drop)
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
            expire: std::mem::replace(&mut self.expire, plugin.expire.clone()),
            max_ahead_ms: std::mem::replace(
                &mut self.max_ahead_ms,
                plugin
                    .max_ahead_ms()
                    .unwrap_or(crate::config::DEFAULT_MAX_AHEAD_MS),
            ),
            output_names: std::mem::replace(
                &mut self.store.data_mut().host.output_names,
                Arc::new(plugin.outputs.keys().cloned().collect()),
            ),
        };
        self.store.data_mut().host.set_limits(&plugin.limits);
        let max_ahead_ms = self.max_ahead_ms;
        self.store
            .data_mut()
            .host
            .set_expiry(&plugin.expire, max_ahead_ms);
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
        self.expire = previous.expire;
        self.max_ahead_ms = previous.max_ahead_ms;
        let host = &mut self.store.data_mut().host;
        host.output_names = previous.output_names;
        host.set_limits(&self.limits);
        host.set_expiry(&self.expire, self.max_ahead_ms);
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
        self.store.data_mut().host.begin_call();
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

    /// Runs `events` through the plugin. A call that answers `retry` for any event keeps
    /// none of its effects (and a fresh instance replaces the one that made them). Otherwise,
    /// on success its state changes join the batch in progress and its outputs are queued (see [`Sandbox::take_outputs`],
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
        let host = &mut self.store.data_mut().host;
        host.begin_call();
        if let Some(latest) = events.iter().filter_map(|e| e.timestamp_ms).max() {
            host.state.saw_event_time(latest);
        }
        pack(
            &mut self.packed,
            events,
            crate::clock::now_ms(),
            self.max_ahead_ms,
        );
        match linked.plugin.call_on_batch(&mut self.store, &self.packed) {
            Ok(verdicts)
                if verdicts.len() == events.len()
                    && verdicts.iter().any(|v| matches!(v, Verdict::Retry(_))) =>
            {
                // Which of the call's writes and outputs belong to the events it wants again
                // is not known, so none stay (see `pipeline/isolation.rs`); the instance goes
                // too, since the SDK caches what it wrote.
                self.discard_call();
                if let Err(e) = self.replace_instance(self.program.clone()) {
                    tracing::error!(path = %self.program.path.display(), "cannot recreate the instance after a retry: {e}");
                }
                Ok(verdicts)
            }
            Ok(verdicts) if verdicts.len() == events.len() => {
                self.store.data_mut().host.state.end_call(true);
                Ok(verdicts)
            }
            Ok(verdicts) => Err(self.recover(Trap {
                kind: crate::metrics::TrapKind::Trap,
                message: format!(
                    "returned {} verdicts for {} events",
                    verdicts.len(),
                    events.len()
                ),
            })),
            Err(e) => Err(self.fail(&e)),
        }
    }

    /// Calls `on-tick`; like [`Sandbox::call_batch`], its effects join the batch in progress.
    pub fn call_tick(&mut self, now_ms: i64) -> Result<(), Trap> {
        let linked = self.linked.as_ref().ok_or_else(not_linked)?;
        self.store.set_epoch_deadline(deadline_ticks(&self.limits));
        self.store.data_mut().host.begin_call();
        match linked.plugin.call_on_tick(&mut self.store, now_ms) {
            Ok(()) => {
                self.store.data_mut().host.state.end_call(true);
                Ok(())
            }
            Err(e) => Err(self.fail(&e)),
        }
    }

    /// State keys deleted by `[plugin.expire]` since the last call of this.
    pub fn take_expired_keys(&mut self) -> u64 {
        self.store.data_mut().host.state.take_expired()
    }

    /// Plugin log lines dropped by `limits.log_lines_per_s` since the last call of this.
    pub fn take_log_lines_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.store.data_mut().host.log_budget.dropped_uncounted)
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
        offsets: &crate::state::Offsets,
        durability: crate::state::Durability,
    ) -> Result<(), crate::state::StoreError> {
        let digest = self.program.digest.clone();
        self.store.data_mut().host.state.commit_batch(
            offsets,
            &[(crate::state::META_WRITER, &digest)],
            durability,
        )
    }

    /// Drops the batch's state changes: its events will be consumed again.
    /// The instance is recreated too: it may keep a cache of its state (the SDK does), which
    /// must not remember writes the host dropped.
    pub fn abort_batch(&mut self) {
        let host = &mut self.store.data_mut().host;
        host.state.abort_batch();
        host.outputs.clear();
        host.outputs_mark = 0;
        if let Err(e) = self.replace_instance(self.program.clone()) {
            tracing::error!(path = %self.program.path.display(), "cannot recreate the instance after dropping a batch: {e}");
        }
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
        self.recover(trap)
    }

    /// After a failed call: drop its effects and rebuild the instance (a version on
    /// probation is replaced by the one it replaced). Never keeps the instance: it may cache
    /// state writes the host just dropped.
    fn recover(&mut self, trap: Trap) -> Trap {
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
        let host = &mut self.store.data_mut().host;
        let limit_hit = match (
            host.output_budget.exceeded.take(),
            host.state_quota_exceeded.take(),
        ) {
            (Some(output), _) => Some((TrapKind::Output, output)),
            (None, Some(quota)) => Some((
                TrapKind::StateQuota,
                format!("{quota} (expire or delete keys, or raise the limit)"),
            )),
            (None, None) => None,
        };
        let kind = if let Some((kind, message)) = limit_hit {
            return Trap { kind, message };
        } else if memory_hit {
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
            TrapKind::Output | TrapKind::StateQuota => unreachable!("returned above"),
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

fn not_linked() -> Trap {
    Trap {
        kind: crate::metrics::TrapKind::Trap,
        message: "the plugin has no instance (it could not be re-created; see the log)".into(),
    }
}

fn deadline_ticks(limits: &Limits) -> u64 {
    limits.cpu_ms.div_ceil(EPOCH_TICK.as_millis() as u64).max(1)
}

/// The typed exports of one instance.
struct Linked {
    plugin: bindings::Plugin,
    /// The optional `migrate` export.
    migrate: Option<MigrateFunc>,
}

/// `migrate: func(from-digest: string) -> result<_, string>`.
type MigrateFunc = wasmtime::component::TypedFunc<(String,), (Result<(), String>,)>;

/// Instantiates `program` in `store`.
fn link(store: &mut Store<StoreData>, program: &Program) -> Result<Linked, String> {
    store.set_epoch_deadline(u64::MAX / 2);
    // The new instance has nothing cached yet: no expired key to tell it about.
    store.data_mut().host.state.forget_expired_keys();
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
