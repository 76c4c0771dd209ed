//! Eddy: a Kafka consumer host that runs every event through sandboxed WebAssembly plugins.
//!
//! Each plugin in `plugins.toml` gets its own consumer group (so it sees every event, at its
//! own pace), its own sandbox (memory cap, CPU deadline, no ambient authority) and its own
//! state, which only it can see and which outlives its instance.
//!
//! # Layout
//! One folder per subsystem; a module depends only on those listed before it.
//! - [`clock`], [`retry`], [`event`]: wall-clock time and RFC 3339; the one backoff policy;
//!   a consumed record as the host holds it.
//! - [`config`]: `plugins.toml`, parsed and validated, with errors that name file and key
//!   (`plugin.rs` one `[[plugin]]`, `outputs.rs` where outputs go).
//! - [`metrics`]: what is counted, per plugin and host-wide, and its Prometheus exposition.
//! - [`kafka`]: client settings, the embedded broker, a plugin's consumer and its callbacks
//!   (where partitions start, lag, connectivity), the topic's shared fetch, and what the
//!   host knows of the cluster.
//! - [`state`]: a plugin's state: the overlay the sandbox writes through, and the durable
//!   store (one redb file per plugin) behind a trait, committed with the offsets; with
//!   `[state] shared_group`, a file per partition written through the plugin's changelog
//!   topic and restored from it (`changelog.rs`).
//! - [`wasm`]: engines, compiled programs and their cache, the sandbox lifecycle
//!   (traps, swaps, probation), and the host side of each WIT interface in `wasm/host/`.
//! - [`sinks`]: where outputs go, one [`sinks::Sink`] per kind (stdout, Kafka topic,
//!   PostgreSQL table, whose module also applies migrations: `eddy migrate`), and dead
//!   letters (to a topic, and optionally a table).
//! - [`live`]: the live feed: committed output records fanned out to watchers, a lagging
//!   watcher told what it missed rather than waited for.
//! - [`pipeline`]: one plugin's worker: take events (its consumer or the shared fetch), fill
//!   a batch, run it (isolating failing events), deliver, commit, store offsets; its breaker;
//!   with partition-scoped state, an instance per partition (`lanes.rs`).
//! - [`supervisor`]: the running set of plugins: loading, hot reload, file watching.
//! - [`http`]: the HTTP server (axum routes, hyper connections bounded and timed in
//!   `server.rs`, who may read what in `guard.rs`): `/metrics`, `/healthz`, the live stream
//!   (`/v1/stream`, `/v1/ws`), the web dashboard at `/`, and the collector
//!   (`POST /v1/events` into the topic, `/tracker.js`, `/demo`) (their files in `host/web/`).
//! - [`ops`]: `eddy state`, `eddy reset`, `eddy replay`.
//! - [`generator`]: realistic user-activity traffic (`eddy produce`, the in-process generator).
//! - `host.rs`: [`Host::start`] wires these together; [`run`] is start, wait for shutdown,
//!   stop. `main.rs` is the command line.

pub mod clock;
pub mod config;
pub mod event;
pub mod generator;
mod host;
pub mod http;
pub mod kafka;
pub mod live;
pub mod metrics;
pub mod ops;
pub mod pipeline;
pub mod retry;
pub mod sinks;
pub mod state;
pub mod supervisor;
pub mod wasm;

pub use host::{Host, check_plugins, run};
