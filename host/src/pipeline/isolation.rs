//! What happens to a batch inside the sandbox: verdicts, retries, and isolation of the
//! events a plugin fails on. When a call traps (panic, CPU deadline, memory cap), its effects
//! are discarded, the instance is rebuilt, and the batch is run again in smaller pieces,
//! recursively, until the failing events are alone: they are dead-lettered with the trap as
//! the reason, the others get their verdicts (see [`piece_size`] for how small). A poison
//! event never blocks its partition. Pure of Kafka and async: runs on a blocking thread.

use super::breaker::Breaker;
use crate::config::PluginConfig;
use crate::event::Event;
use crate::metrics::{DeadLetterReason, PluginMetrics, TrapKind};
use crate::wasm::{Sandbox, Trap, Verdict};
use std::ops::Range;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tracing::warn;

/// What the worker decided for one event after verdicts, retries and traps.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Disposition {
    Ok,
    Skip,
    DeadLetter {
        reason: String,
        attempts: u32,
        cause: DeadLetterReason,
    },
}

/// The verdicts for a batch, or for the part of it decided before the breaker opened.
pub(super) struct Ran {
    /// One per event of a prefix of the batch: all of it, unless the breaker opened.
    pub dispositions: Vec<Disposition>,
    /// Whether any call failed.
    pub trapped: bool,
    /// Why the breaker opened, if it did.
    pub tripped: Option<String>,
}

/// Runs a batch through the sandbox and turns verdicts, traps and retries into one
/// disposition per event. Blocking: runs on a blocking thread.
pub(super) fn run_events(
    sandbox: &mut Sandbox,
    events: &[Event],
    plugin: &PluginConfig,
    metrics: &PluginMetrics,
    breaker: &mut Breaker,
) -> Ran {
    let mut isolation = Isolation {
        sandbox,
        events,
        metrics,
        breaker,
        verdicts: (0..events.len()).map(|_| None).collect(),
        trapped: false,
        tripped: None,
    };
    isolation.run(0..events.len());
    let Isolation {
        sandbox,
        breaker,
        verdicts,
        trapped,
        mut tripped,
        ..
    } = isolation;
    // The decided events: all of them, or those before the breaker opened.
    let mut verdicts: Vec<Result<Verdict, Trap>> = verdicts.into_iter().map_while(|v| v).collect();

    let mut attempts = vec![1u32; verdicts.len()];
    let limits = &plugin.limits;
    let mut backoff = Duration::from_millis(limits.retry_backoff_ms);
    let mut trapped = trapped;
    for _ in 0..limits.max_retries {
        let again: Vec<usize> = (0..verdicts.len())
            .filter(|i| matches!(verdicts[*i], Ok(Verdict::Retry(_))))
            .collect();
        if again.is_empty() {
            break;
        }
        metrics.retries.fetch_add(again.len() as u64, Relaxed);
        std::thread::sleep(backoff);
        backoff *= 2;
        for i in again {
            attempts[i] += 1;
            verdicts[i] =
                call(sandbox, std::slice::from_ref(&events[i]), metrics).map(|mut v| v.remove(0));
            trapped |= verdicts[i].is_err();
        }
    }
    let dispositions = verdicts
        .into_iter()
        .zip(attempts)
        .map(|(v, attempts)| match v {
            Ok(Verdict::Ok) => Disposition::Ok,
            Ok(Verdict::Skip) => Disposition::Skip,
            Ok(Verdict::DeadLetter(reason)) => Disposition::DeadLetter {
                reason,
                attempts,
                cause: DeadLetterReason::Verdict,
            },
            Ok(Verdict::Retry(reason)) => {
                if breaker.failed() && tripped.is_none() {
                    tripped = Some(format!(
                        "{} of the last {} events failed (the last ran out of retries: {reason})",
                        breaker.recent_failures(),
                        plugin.breaker.window
                    ));
                }
                Disposition::DeadLetter {
                    reason: format!("still failing after {attempts} attempts: {reason}"),
                    attempts,
                    cause: DeadLetterReason::RetriesExhausted,
                }
            }
            Err(trap) => Disposition::DeadLetter {
                reason: format!("plugin failed: {trap}"),
                attempts,
                cause: DeadLetterReason::Failed(trap.kind),
            },
        })
        .collect();
    Ran {
        dispositions,
        trapped,
        tripped,
    }
}

/// Runs events through the plugin, isolating the ones it fails on.
struct Isolation<'a> {
    sandbox: &'a mut Sandbox,
    events: &'a [Event],
    metrics: &'a PluginMetrics,
    breaker: &'a mut Breaker,
    /// `None` until the event is decided.
    verdicts: Vec<Option<Result<Verdict, Trap>>>,
    trapped: bool,
    tripped: Option<String>,
}

impl Isolation<'_> {
    /// Runs `range` in one call; if that fails, runs it again in smaller pieces the same way,
    /// so the events the plugin fails on end up alone (and dead-lettered with the trap) while
    /// the others get their verdicts, in order. The failed call's state and outputs were
    /// discarded (and a version on probation was replaced by the previous one, which runs the
    /// pieces). Stops, leaving the later events undecided, when the breaker opens.
    fn run(&mut self, range: Range<usize>) {
        if self.tripped.is_some() || range.is_empty() {
            return;
        }
        match call(self.sandbox, &self.events[range.clone()], self.metrics) {
            Ok(verdicts) => {
                self.breaker.succeeded(range.len());
                for (slot, v) in self.verdicts[range].iter_mut().zip(verdicts) {
                    *slot = Some(Ok(v));
                }
            }
            Err(trap) if range.len() == 1 => {
                self.trapped = true;
                if self.breaker.failed() {
                    self.tripped = Some(format!(
                        "{} of the last events failed (the last: {trap})",
                        self.breaker.recent_failures()
                    ));
                }
                self.verdicts[range.start] = Some(Err(trap));
            }
            Err(trap) => {
                self.trapped = true;
                let piece = piece_size(range.len(), trap.kind);
                if range.len() == self.events.len() {
                    warn!(
                        events = range.len(),
                        "batch failed ({trap}); isolating the failing events (pieces of {piece})"
                    );
                }
                let mut start = range.start;
                while start < range.end {
                    let end = (start + piece).min(range.end);
                    self.run(start..end);
                    start = end;
                }
            }
        }
    }
}

/// How big the pieces are when a failed call of `n` events is run again. What a failure
/// costs decides: after a CPU-deadline or memory-cap hit, every failed call costs a full
/// deadline (or a memory's worth of growth), so the events are run one at a time (two
/// failures for one poison event, whatever the batch size). After a panic, failing is cheap
/// and calls are what cost: pieces of about √n events find one poison event in about 2√n
/// calls (45 for a batch of 500) with three failures. Halving would take 2·log2(n) calls
/// and log2(n) failures.
fn piece_size(n: usize, kind: TrapKind) -> usize {
    match kind {
        TrapKind::Deadline | TrapKind::Memory => 1,
        // Always smaller than `n` (which is at least 2 here), or it would never end.
        TrapKind::Trap => ((n as f64).sqrt().ceil() as usize).clamp(1, n - 1),
    }
}

fn call(
    sandbox: &mut Sandbox,
    events: &[Event],
    metrics: &PluginMetrics,
) -> Result<Vec<Verdict>, Trap> {
    let result = sandbox.call_batch(events);
    if let Err(trap) = &result {
        metrics.trap(trap.kind);
        metrics.instance_restarts.fetch_add(1, Relaxed);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolation_pieces_always_shrink() {
        for n in 2..2_000 {
            for kind in [TrapKind::Trap, TrapKind::Deadline, TrapKind::Memory] {
                let piece = piece_size(n, kind);
                assert!((1..n).contains(&piece), "n = {n}, {kind:?}: {piece}");
            }
        }
        assert_eq!(piece_size(500, TrapKind::Trap), 23);
        assert_eq!(piece_size(500, TrapKind::Deadline), 1);
    }
}
