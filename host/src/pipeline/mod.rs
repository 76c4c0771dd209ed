//! The event pipeline of one plugin: its worker loop (consume, fill a batch, run it, deliver,
//! commit, store offsets), where its events come from (its consumer, the shared fetch), what
//! happens to events it fails on, its breaker, and partition-scoped state (`lanes.rs`).

pub mod breaker;
mod control;
mod effects;
mod fill;
mod isolation;
pub mod lanes;
mod source;
pub mod worker;

pub use breaker::{Breaker, BreakerState};
pub use control::Control;
pub use lanes::LaneOpener;
pub use worker::{Worker, version_of};
