//! What happens to a batch inside the sandbox: verdicts, retries, and isolation of the
//! events a plugin fails on. When a call traps (panic, CPU deadline, memory cap, output
//! limit), its effects are discarded, the instance is rebuilt, and the batch is run again in
//! smaller pieces, recursively, until the failing events are alone: they are dead-lettered
//! with the trap as the reason, the others get their verdicts (see [`piece_size`] for how
//! small). A poison event never blocks its partition.
//!
//! A call that answers `retry` for some events keeps none of its effects (the sandbox drops
//! them): the other events of the call run again without those, and each retried event is
//! handed again alone after a backoff, so whatever an event wrote or emitted counts once, from
//! the attempt that did not answer `retry`. The backoff is capped and
//! ends at once when the host stops (the batch is then dropped, to be consumed again).
//! Pure of Kafka and async: runs on a blocking thread.

use super::breaker::Breaker;
use crate::config::PluginConfig;
use crate::event::Event;
use crate::metrics::{DeadLetterReason, PluginMetrics, TrapKind};
use crate::retry::{Policy, sleep_blocking_unless_stopping};
use crate::wasm::{Sandbox, Trap, Verdict};
use std::borrow::Cow;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::sync::watch;
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
    /// The host began to stop while retried events waited: the batch is not done (its
    /// dispositions are not all final) and must be dropped.
    pub stopping: bool,
}

/// Runs a batch through the sandbox and turns verdicts, traps and retries into one
/// disposition per event. Blocking: runs on a blocking thread.
pub(super) fn run_events(
    sandbox: &mut Sandbox,
    events: &[Event],
    plugin: &PluginConfig,
    metrics: &PluginMetrics,
    breaker: &mut Breaker,
    shutdown: &watch::Receiver<bool>,
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
    isolation.run(&(0..events.len()).collect::<Vec<_>>());
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
    let mut backoff = Policy {
        first: Duration::from_millis(limits.retry_backoff_ms),
        max: crate::config::MAX_RETRY_DELAY,
    }
    .backoff();
    let mut trapped = trapped;
    let mut stopping = false;
    for _ in 0..limits.max_retries {
        let again: Vec<usize> = (0..verdicts.len())
            .filter(|i| matches!(verdicts[*i], Ok(Verdict::Retry(_))))
            .collect();
        if again.is_empty() {
            break;
        }
        metrics.retries.fetch_add(again.len() as u64, Relaxed);
        if sleep_blocking_unless_stopping(backoff.next_delay(), shutdown).is_err() {
            stopping = true;
            break;
        }
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
        stopping,
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
    /// Runs the events at `indices` (in order) in one call; if that fails, runs them again
    /// in smaller pieces the same way, so the events the plugin fails on end up alone (and
    /// dead-lettered with the trap) while the others get their verdicts, in order. The failed
    /// call's state and outputs were discarded (and a version on probation was replaced by
    /// the previous one, which runs the pieces). A call that answered `retry` for some events
    /// kept no effects either: the others run again without them. Stops, leaving the later
    /// events undecided, when the breaker opens.
    fn run(&mut self, indices: &[usize]) {
        if self.tripped.is_some() || indices.is_empty() {
            return;
        }
        let events = gather(self.events, indices);
        match call(self.sandbox, &events, self.metrics) {
            Ok(verdicts) if verdicts.iter().any(|v| matches!(v, Verdict::Retry(_))) => {
                let mut rest = Vec::with_capacity(indices.len());
                for (&i, v) in indices.iter().zip(verdicts) {
                    if matches!(v, Verdict::Retry(_)) {
                        self.verdicts[i] = Some(Ok(v));
                    } else {
                        rest.push(i);
                    }
                }
                self.run(&rest);
            }
            Ok(verdicts) => {
                self.breaker.succeeded(indices.len());
                for (&i, v) in indices.iter().zip(verdicts) {
                    self.verdicts[i] = Some(Ok(v));
                }
            }
            Err(trap) if indices.len() == 1 => {
                self.trapped = true;
                if self.breaker.failed() {
                    self.tripped = Some(format!(
                        "{} of the last events failed (the last: {trap})",
                        self.breaker.recent_failures()
                    ));
                }
                self.verdicts[indices[0]] = Some(Err(trap));
            }
            Err(trap) => {
                self.trapped = true;
                let piece = piece_size(indices.len(), trap.kind);
                if indices.len() == self.events.len() {
                    warn!(
                        events = indices.len(),
                        "batch failed ({trap}); isolating the failing events (pieces of {piece})"
                    );
                }
                for chunk in indices.chunks(piece) {
                    self.run(chunk);
                }
            }
        }
    }
}

/// The events at `indices`: borrowed when they are a run of the batch (always, unless a call
/// answered `retry` for some of them).
fn gather<'e>(events: &'e [Event], indices: &[usize]) -> Cow<'e, [Event]> {
    let (first, last) = (indices[0], indices[indices.len() - 1]);
    if last - first + 1 == indices.len() {
        Cow::Borrowed(&events[first..=last])
    } else {
        Cow::Owned(indices.iter().map(|&i| events[i].clone()).collect())
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
        // An output flood is found like a panic; pieces of a batch whose events together
        // emitted too much may each fit, and so may those of one that wrote past a state
        // quota that is nearly full.
        TrapKind::Trap | TrapKind::Output | TrapKind::StateQuota => {
            ((n as f64).sqrt().ceil() as usize).clamp(1, n - 1)
        }
    }
}

fn call(
    sandbox: &mut Sandbox,
    events: &[Event],
    metrics: &PluginMetrics,
) -> Result<Vec<Verdict>, Trap> {
    let result = sandbox.call_batch(events);
    metrics
        .log_lines_dropped
        .fetch_add(sandbox.take_log_lines_dropped(), Relaxed);
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
            for kind in TrapKind::ALL {
                let piece = piece_size(n, kind);
                assert!((1..n).contains(&piece), "n = {n}, {kind:?}: {piece}");
            }
        }
        assert_eq!(piece_size(500, TrapKind::Trap), 23);
        assert_eq!(piece_size(500, TrapKind::Deadline), 1);
    }
}
