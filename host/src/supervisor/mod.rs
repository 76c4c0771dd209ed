//! Hot reload: the supervisor owns the set of running plugins and changes it while the host
//! runs, without a restart.
//!
//! A reload (a watched file changed, `SIGHUP`, or [`crate::Host::reload`]) re-reads
//! `plugins.toml`. If it does not parse or validate, nothing changes and the error says what
//! and where. Otherwise, per plugin:
//! - new in the file: compile it, start a worker with a new consumer group;
//! - gone from the file: close its worker's control channel; it finishes its batch, commits
//!   and leaves its group;
//! - `.wasm` content or settings changed: compile the new version here, off the event path,
//!   try its `init` in a scratch sandbox, then hand it to the worker, which switches between
//!   two batches, keeping the state (see [`crate::wasm::Sandbox::swap`]). If any step
//!   fails, the old version keeps running. A changed `group`, `start_from` or `topic` means
//!   a new consumer group: the plugin is removed and added back, with fresh state;
//! - unchanged: nothing, not even a recompile.
//!
//! A version that failed, or trapped on probation and was rolled back, is not tried again
//! until its file changes again.
//!
//! The supervisor is an async task on the runtime every worker shares: reading
//! `plugins.toml`, reading and hashing a `.wasm` file, compiling and loading all happen on
//! blocking threads.

mod load;
mod watch;

pub use load::{StartError, load_all, load_errors, load_plugin, partition_scoped};

use crate::config::{Config, PluginConfig};
use crate::kafka::ClusterView;
use crate::kafka::shared_fetch::SharedFetch;
use crate::live::Live;
use crate::metrics::{Metrics, ReloadOutcome};
use crate::pipeline::{Control, Worker};
use crate::sinks::Outputs;
use crate::wasm::{self, Program, Sandbox};
use rdkafka::ClientConfig;
use rdkafka::producer::FutureProducer;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};
use wasmtime::Engine;
use watch::{FileWatcher, settle};

/// What one reload did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// `plugins.toml` could not be used: nothing changed.
    pub config_error: Option<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Switched to a new version or new settings.
    pub swapped: Vec<String>,
    /// Could not be added or switched: name and why.
    pub failed: Vec<(String, String)>,
}

/// A running plugin, as the supervisor sees it.
struct Running {
    /// The settings last applied (or last tried, if they were refused).
    plugin: PluginConfig,
    /// The version the worker runs.
    program: Arc<Program>,
    /// The version it ran before the last switch, in case the new one is rolled back.
    previous: Option<Arc<Program>>,
    /// Digest of a version that was refused or rolled back: not retried until the file
    /// changes again.
    refused: Option<String>,
    control: mpsc::Sender<Control>,
    task: JoinHandle<()>,
}

/// Owns the workers and applies reloads.
pub struct Supervisor {
    engine: Engine,
    config: Config,
    client: ClientConfig,
    producer: FutureProducer,
    /// With partition-scoped state: the (idempotent) producer of the changelogs.
    changelog_producer: Option<FutureProducer>,
    /// The pools of `[postgres.NAME]`, made at start.
    databases: crate::sinks::Databases,
    metrics: Arc<Metrics>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// The id the host gave its own embedded broker, if it runs one.
    embedded_cluster: Option<String>,
    running: BTreeMap<String, Running>,
    /// Winch, for new versions that have no precompiled code; made at the first such swap.
    baseline_engine: Option<Engine>,
    /// Optimized compiles finished in the background, to replace baseline code.
    optimized_tx: mpsc::UnboundedSender<Optimized>,
    optimized_rx: Option<mpsc::UnboundedReceiver<Optimized>>,
    /// The topic's shared fetch, if on.
    shared_fetch: Option<Arc<SharedFetch>>,
    /// The live feed every worker publishes its committed records to.
    live: Arc<Live>,
}

/// The optimized compile of a version that runs on baseline code for now.
struct Optimized {
    plugin: String,
    digest: String,
    program: Result<Program, crate::wasm::LoadError>,
}

impl Supervisor {
    /// Starts a worker for each loaded plugin of `config`.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        engine: Engine,
        config: Config,
        sandboxes: Vec<Sandbox>,
        embedded_cluster: Option<String>,
        client: ClientConfig,
        producer: FutureProducer,
        changelog_producer: Option<FutureProducer>,
        databases: crate::sinks::Databases,
        metrics: Arc<Metrics>,
        shutdown: tokio::sync::watch::Receiver<bool>,
        shared_fetch: Option<Arc<SharedFetch>>,
        live: Arc<Live>,
    ) -> Supervisor {
        let (optimized_tx, optimized_rx) = mpsc::unbounded_channel();
        let mut s = Supervisor {
            engine,
            config,
            client,
            producer,
            changelog_producer,
            databases,
            metrics,
            shutdown,
            embedded_cluster,
            running: BTreeMap::new(),
            baseline_engine: None,
            optimized_tx,
            optimized_rx: Some(optimized_rx),
            shared_fetch,
            live,
        };
        for (plugin, sandbox) in s.config.plugins.clone().into_iter().zip(sandboxes) {
            s.spawn(plugin, sandbox);
        }
        s
    }

    fn spawn(&mut self, plugin: PluginConfig, sandbox: Sandbox) {
        // Known to the live stream from now on, before the worker runs.
        self.live
            .set_outputs(&plugin.name, plugin.outputs.keys().cloned());
        let (control, control_rx) = mpsc::channel(1);
        let program = sandbox.program().clone();
        let topic = plugin.input_topic(&self.config.kafka.topic).to_string();
        // The shared fetch reads `kafka.topic`: a plugin on another topic fetches for itself.
        let shared_fetch = self
            .shared_fetch
            .clone()
            .filter(|_| topic == self.config.kafka.topic);
        let worker = Worker::new(
            plugin.clone(),
            topic,
            self.client.clone(),
            sandbox,
            Outputs::new(&plugin, self.producer.clone(), self.databases.clone()),
            self.metrics.plugin(&plugin.name),
            self.shutdown.clone(),
            control_rx,
        )
        .sharing_the_group(self.config.state.shared_group)
        .sharing_the_fetch(shared_fetch)
        .watched_by(self.live.clone())
        .syncing_every(Duration::from_millis(self.config.state.commit_interval_ms))
        .partition_scoped(self.lane_opener());
        let name = plugin.name.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = worker.run().await {
                error!(plugin = %name, "plugin stopped: {e:#}");
            }
        });
        self.running.insert(
            plugin.name.clone(),
            Running {
                plugin,
                program,
                previous: None,
                refused: None,
                control,
                task,
            },
        );
    }

    /// What a plugin's partition-scoped state needs, if state is partition-scoped.
    fn lane_opener(&self) -> Option<crate::pipeline::LaneOpener> {
        let state = &self.config.state;
        let producer = self.changelog_producer.clone()?;
        if !load::partition_scoped(state) {
            return None;
        }
        // The restore reader is assigned its partition: it never joins its group (librdkafka
        // wants one named to assign) nor commits.
        let mut client = self.client.clone();
        client.remove("group.instance.id");
        client.set("group.id", "eddy-changelog-restore");
        client.set("enable.auto.commit", "false");
        client.set("enable.auto.offset.store", "false");
        Some(crate::pipeline::LaneOpener {
            state_dir: state.dir.clone(),
            client,
            producer,
            keep_revoked: Duration::from_secs(state.keep_revoked_s),
        })
    }

    /// Stops a worker: it finishes its batch, commits and leaves its group.
    async fn remove(&mut self, name: &str) {
        if let Some(r) = self.running.remove(name) {
            drop(r.control);
            if let Err(e) = r.task.await {
                error!(plugin = %name, "worker task failed: {e}");
            }
        }
    }

    /// The files whose changes trigger a reload.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.config.source.clone()];
        files.extend(self.config.plugins.iter().map(|p| p.path.clone()));
        files
    }

    /// Re-reads `plugins.toml` and applies what changed.
    pub async fn reload(&mut self) -> ReloadReport {
        let mut report = ReloadReport::default();
        let source = self.config.source.clone();
        let loaded = tokio::task::spawn_blocking(move || Config::load(&source))
            .await
            .expect("config task");
        let new = match loaded {
            Ok(c) => c,
            Err(e) => {
                self.metrics
                    .config_reloads_failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                error!("{e} — nothing changed, the running plugins keep running");
                report.config_error = Some(e.to_string());
                return report;
            }
        };
        self.metrics
            .config_reloads_ok
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for (section, changed) in [
            ("[kafka]", new.kafka != self.config.kafka),
            ("[http]", new.http != self.config.http),
            ("[generator]", new.generator != self.config.generator),
            ("[reload]", new.reload != self.config.reload),
            ("[postgres]", new.postgres != self.config.postgres),
        ] {
            if changed {
                warn!(
                    "{section} changed in {}: applied at the next restart",
                    new.source.display()
                );
            }
        }

        let wanted: BTreeSet<&str> = new.plugins.iter().map(|p| p.name.as_str()).collect();
        let gone: Vec<String> = self
            .running
            .keys()
            .filter(|n| !wanted.contains(n.as_str()))
            .cloned()
            .collect();
        for name in gone {
            info!(plugin = %name, "removed from plugins.toml: stopping it");
            self.remove(&name).await;
            // Its series leave /metrics and its entry /healthz: a removed plugin is not a
            // plugin that is down.
            self.metrics.remove_plugin(&name);
            self.live.forget(&name);
            report.removed.push(name);
        }

        for plugin in &new.plugins {
            let name = plugin.name.clone();
            let outcome = match self.running.get(&name) {
                None => self
                    .add(plugin)
                    .await
                    .map(|()| report.added.push(name.clone())),
                Some(r)
                    if r.plugin.group_id() != plugin.group_id()
                        || r.plugin.start_from != plugin.start_from
                        || r.plugin.topic != plugin.topic =>
                {
                    info!(plugin = %name, "consumer group settings (group, start_from, topic) changed: restarting it with fresh state");
                    self.remove(&name).await;
                    self.add(plugin)
                        .await
                        .map(|()| report.added.push(name.clone()))
                }
                Some(_) => match self.update(plugin).await {
                    Ok(true) => {
                        report.swapped.push(name.clone());
                        Ok(())
                    }
                    Ok(false) => Ok(()),
                    Err(e) => Err(e),
                },
            };
            if let Err(e) = outcome {
                report.failed.push((name, e));
            }
        }
        // Sections that need a restart keep their running values, so the warning repeats
        // only when they change again.
        self.config = Config {
            kafka: self.config.kafka.clone(),
            http: self.config.http.clone(),
            generator: self.config.generator.clone(),
            reload: self.config.reload.clone(),
            postgres: self.config.postgres.clone(),
            ..new
        };
        report
    }

    async fn add(&mut self, plugin: &PluginConfig) -> Result<(), String> {
        let (engine, p, state) = (
            self.engine.clone(),
            plugin.clone(),
            self.config.state.clone(),
        );
        let client = self.client.clone();
        let topic = plugin.input_topic(&self.config.kafka.topic).to_string();
        let embedded = self.embedded_cluster.clone();
        let loaded = tokio::task::spawn_blocking(move || {
            let mut cluster = ClusterView::probe(&client, &[topic]);
            if embedded.is_some() {
                cluster.id = embedded;
            }
            load_plugin(&engine, &state, &p, &cluster)
        })
        .await
        .expect("load task");
        match loaded {
            Ok(sandbox) => {
                info!(plugin = %plugin.name, digest = %sandbox.program().digest(), "added");
                self.spawn(plugin.clone(), sandbox);
                Ok(())
            }
            Err(e) => {
                error!(plugin = %plugin.name, "cannot add it: {e}");
                self.metrics
                    .plugin(&plugin.name)
                    .reload(ReloadOutcome::Failed);
                Err(e.to_string())
            }
        }
    }

    /// Switches a running plugin to its new file content or settings. Ok(false): nothing to do.
    async fn update(&mut self, plugin: &PluginConfig) -> Result<bool, String> {
        // The file's digest, and whether its compiled code is in the cache.
        let (path, engine, cache) = (
            plugin.path.clone(),
            self.engine.clone(),
            self.config.state.compiled_dir(),
        );
        let (digest, cached) = tokio::task::spawn_blocking(move || {
            let bytes = std::fs::read(&path)
                .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
            let digest = wasm::digest(&bytes);
            let cached = Program::is_cached(&engine, &cache, &digest);
            Ok::<_, String>((digest, cached))
        })
        .await
        .expect("read task")?;
        self.note_rollback(&plugin.name);
        let running = self.running.get_mut(&plugin.name).expect("caller checked");
        let same_settings = *plugin == running.plugin;
        if same_settings
            && (digest == running.program.digest() || running.refused.as_deref() == Some(&digest))
        {
            return Ok(false);
        }
        let program = if digest == running.program.digest() {
            running.program.clone()
        } else {
            let (engine, path) = (self.engine.clone(), plugin.path.clone());
            let cache = self.config.state.compiled_dir();
            // Without precompiled code, run the new version on quickly compiled baseline code
            // now, and switch to optimized code when Cranelift is done (`tier_up`).
            let baseline = if cached { None } else { self.baseline_engine() };
            let compiled = tokio::task::spawn_blocking(move || {
                let mut baseline_failed = None;
                if let Some(baseline) = baseline {
                    match Program::compile_baseline(&baseline, &path) {
                        Err(crate::wasm::LoadError::Compile { message, .. }) => {
                            baseline_failed = Some(message);
                        }
                        done => return done,
                    }
                }
                // Said only if the optimized compiler takes it: bytes that are no component
                // at all get one refusal, for the reason both compilers share.
                let optimized = Program::compile(&engine, &path, Some(&cache));
                if let (Ok(_), Some(message)) = (&optimized, baseline_failed) {
                    warn!(path = %path.display(), "the baseline compiler cannot compile it ({message}): it runs on optimized code once that is compiled");
                }
                optimized
            })
            .await
            .expect("compile task");
            match compiled {
                Ok(p) => Arc::new(p),
                Err(e) => return Err(self.refuse(plugin, &digest, e.to_string())),
            }
        };
        // Try init with the new config in a scratch sandbox, off the event path.
        let (p, prog) = (plugin.clone(), program.clone());
        let validated = tokio::task::spawn_blocking(move || Sandbox::validate(&prog, &p))
            .await
            .expect("validate task");
        if let Err(e) = validated {
            return Err(self.refuse(plugin, &digest, e.to_string()));
        }
        let (done, answer) = oneshot::channel();
        let running = self.running.get_mut(&plugin.name).expect("caller checked");
        let swap = Control::Swap {
            program: program.clone(),
            plugin: Box::new(plugin.clone()),
            tier_up: false,
            done,
        };
        if running.control.send(swap).await.is_err() {
            return Err("its worker has stopped".into());
        }
        match answer.await {
            Ok(Ok(())) => {
                if program.baseline {
                    self.compile_optimized(&plugin.name, &program);
                }
                let running = self.running.get_mut(&plugin.name).expect("caller checked");
                running.previous = Some(std::mem::replace(&mut running.program, program));
                running.plugin = plugin.clone();
                running.refused = None;
                Ok(true)
            }
            // The worker logged why and counted it.
            Ok(Err(e)) => {
                running.plugin = plugin.clone();
                running.refused = Some(digest);
                Err(e)
            }
            Err(_) => Err("its worker stopped during the switch".into()),
        }
    }

    /// The baseline compiler's engine, made on first use. `None` (and a warning) if it
    /// cannot be made: swaps then wait for the optimizing compiler.
    fn baseline_engine(&mut self) -> Option<Engine> {
        if self.baseline_engine.is_none() {
            match wasm::baseline_engine() {
                Ok(e) => self.baseline_engine = Some(e),
                Err(e) => {
                    warn!("no baseline compiler ({e:#}): hot swaps compile optimized code first")
                }
            }
        }
        self.baseline_engine.clone()
    }

    /// Compiles `program`'s file with the optimizing compiler in the background (into the
    /// compile cache); [`Supervisor::tier_up`] switches to it when done.
    fn compile_optimized(&self, plugin: &str, program: &Program) {
        let (engine, path) = (self.engine.clone(), program.path().to_path_buf());
        let cache = self.config.state.compiled_dir();
        let (tx, plugin, digest) = (
            self.optimized_tx.clone(),
            plugin.to_string(),
            program.digest().to_string(),
        );
        tokio::task::spawn_blocking(move || {
            let program = Program::compile(&engine, &path, Some(&cache));
            let _ = tx.send(Optimized {
                plugin,
                digest,
                program,
            });
        });
    }

    /// Catches up with a worker that went back to the previous version after the new one
    /// trapped on probation: the previous version is the running one again, and the one that
    /// trapped is refused until its file changes.
    fn note_rollback(&mut self, name: &str) {
        let version_now = self.metrics.plugin(name).version().digest;
        let Some(running) = self.running.get_mut(name) else {
            return;
        };
        if version_now != running.program.digest()
            && let Some(previous) = running.previous.take()
            && previous.digest() == version_now
        {
            running.refused = Some(running.program.digest().to_string());
            running.program = previous;
        }
    }

    /// Switches a plugin from baseline code to the optimized code of the same version (same
    /// file, same settings, same state: not a reload). Does nothing if the plugin moved on
    /// to another version or was removed meanwhile.
    async fn tier_up(&mut self, optimized: Optimized) {
        // A version rolled back while it compiled must not come back as "optimized code".
        self.note_rollback(&optimized.plugin);
        let Some(running) = self.running.get_mut(&optimized.plugin) else {
            return;
        };
        if !running.program.baseline || running.program.digest() != optimized.digest {
            return;
        }
        let program = match optimized.program {
            // The same bytes may have changed on disk since: then a reload is coming anyway.
            Ok(p) if p.digest() == optimized.digest => Arc::new(p),
            Ok(_) => return,
            Err(e) => {
                warn!(plugin = %optimized.plugin, "optimized compile failed, it keeps running on baseline code: {e}");
                return;
            }
        };
        let (done, answer) = oneshot::channel();
        let swap = Control::Swap {
            program: program.clone(),
            plugin: Box::new(running.plugin.clone()),
            tier_up: true,
            done,
        };
        if running.control.send(swap).await.is_err() {
            return;
        }
        if let Ok(Ok(())) = answer.await
            && let Some(running) = self.running.get_mut(&optimized.plugin)
        {
            running.program = program;
        }
    }

    /// Records a version that cannot run, so it is not retried until the file changes.
    fn refuse(&mut self, plugin: &PluginConfig, digest: &str, why: String) -> String {
        error!(plugin = %plugin.name, path = %plugin.path.display(), digest, "change refused, the plugin keeps running as before: {why}");
        self.metrics
            .plugin(&plugin.name)
            .reload(ReloadOutcome::Failed);
        if let Some(r) = self.running.get_mut(&plugin.name) {
            r.plugin = plugin.clone();
            r.refused = Some(digest.to_string());
        }
        why
    }

    /// Stops every worker (after the host's shutdown signal).
    pub async fn stop(mut self) {
        let names: Vec<String> = self.running.keys().cloned().collect();
        for name in names {
            self.remove(&name).await;
        }
    }
}

/// Requests to the supervisor task.
pub enum Request {
    Reload(oneshot::Sender<ReloadReport>),
}

/// Runs the supervisor: applies reload requests, watched file changes and `SIGHUP`, until
/// `shutdown`; then stops every worker. The file watch is in place when this returns, so a
/// change made right after cannot be missed; the returned future does the rest.
pub fn supervise(
    mut supervisor: Supervisor,
    mut requests: mpsc::Receiver<Request>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send {
    let (changes_tx, mut changes) = mpsc::unbounded_channel();
    let mut optimized = supervisor.optimized_rx.take().expect("supervised once");
    let debounce = Duration::from_millis(supervisor.config.reload.debounce_ms);
    let mut watcher = if supervisor.config.reload.watch {
        FileWatcher::new(changes_tx)
    } else {
        None
    };
    if let Some(w) = &mut watcher {
        w.watch(&supervisor.watched_files());
    }
    async move {
        #[cfg(unix)]
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let sighup = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let sighup = std::future::pending::<Option<()>>();
            tokio::select! {
                _ = shutdown.changed() => break,
                request = requests.recv() => match request {
                    Some(Request::Reload(reply)) => {
                        let _ = reply.send(supervisor.reload().await);
                    }
                    None => break,
                },
                Some(first) = changes.recv() => {
                    let touched = settle(first, &mut changes, debounce).await;
                    info!(files = ?touched, "files changed: reloading");
                    supervisor.reload().await;
                }
                Some(ready) = optimized.recv() => supervisor.tier_up(ready).await,
                _ = sighup => {
                    info!("SIGHUP: reloading");
                    supervisor.reload().await;
                }
            }
            if let Some(w) = &mut watcher {
                w.watch(&supervisor.watched_files());
            }
        }
        supervisor.stop().await;
    }
}
