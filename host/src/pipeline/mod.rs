//! The event pipeline of one plugin: its worker loop (consume, fill a batch, run it, deliver,
//! commit, store offsets), what happens to events it fails on, and its breaker.

pub mod breaker;
mod control;
mod effects;
mod fill;
mod isolation;
pub mod worker;

pub use breaker::{Breaker, BreakerState};
pub use control::Control;
pub use worker::{Worker, version_of};
