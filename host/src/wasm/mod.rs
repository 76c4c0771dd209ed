//! WebAssembly: the engines, compiled programs and their cache, the sandbox lifecycle of one
//! plugin instance, and the host side of each `eddy:plugin` interface.
//!
//! What a plugin can reach is exactly its imports: its own state, its own outputs, the log,
//! and the WASI basics a Rust `std` guest links against (see [`instance`]). Each instance has
//! a linear-memory cap and a CPU deadline per call.

mod batch;
pub mod bindings;
mod cache;
pub mod engine;
mod host;
mod instance;
pub mod program;
pub mod sandbox;
pub mod trap;

pub use bindings::eddy::plugin::types::{OutputRecord, Verdict};
pub use cache::digest;
pub use engine::{baseline_engine, engine, engine_without_deadline, wasm_error};
pub use host::HostState;
pub use program::{CONTRACT_VERSION, LoadError, Program};
pub use sandbox::{PROBATION_BATCHES, RolledBack, Sandbox};
pub use trap::Trap;
