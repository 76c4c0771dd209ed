//! The per-plugin circuit breaker: when a plugin keeps failing, stop feeding it for a while.
//!
//! One poison event is isolated and dead-lettered (see `isolation`), and the plugin goes on. A
//! plugin that fails on *most* events is different: a bug in a new code path, a limit set too
//! low, a plugin that cannot cope with today's traffic. Isolating and dead-lettering every
//! event would flood its dead-letter topic with good events and burn CPU on traps. So when
//! `failures` of the last `window` events failed (trapped, hit a limit, or ran out of
//! retries), the breaker opens: the worker commits what it decided, holds the rest of the
//! batch in memory and stops consuming for `pause_ms`. Then it tries again (half-open). If
//! the plugin fails again before `window` events went through, the next pause is twice as
//! long (up to `max_pause_ms`); once `window` events went through, the breaker is closed and
//! the pause starts over. A hot swap closes it at once: a fix should not wait out a pause.
//!
//! Every pause dead-letters at most `failures` events, so progress is guaranteed (a burst of
//! poison events is worked through, `failures` at a time) and a broken plugin costs a few
//! dead letters per pause rather than all its traffic. Other plugins are not involved: each
//! has its own worker, breaker and consumer group.

use crate::config::BreakerPolicy;
use std::collections::VecDeque;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Normal operation.
    Closed,
    /// Paused: no events reach the plugin.
    Open,
    /// Running again after a pause; one more trip doubles the pause.
    HalfOpen,
}

/// The gauge `eddy_breaker_state` shows: 0 closed, 1 open, 2 half-open.
impl From<BreakerState> for i64 {
    fn from(state: BreakerState) -> i64 {
        match state {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

#[derive(Debug)]
pub struct Breaker {
    policy: BreakerPolicy,
    state: BreakerState,
    /// Events recorded so far (the position of the next one).
    seen: u64,
    /// Positions of the failed events among the last `window`.
    failed: VecDeque<u64>,
    /// Events that went through since the last pause ended.
    since_resume: u64,
    /// The pause the next trip starts.
    next_pause: Duration,
}

impl Breaker {
    pub fn new(policy: BreakerPolicy) -> Breaker {
        Breaker {
            next_pause: Duration::from_millis(policy.pause_ms),
            policy,
            state: BreakerState::Closed,
            seen: 0,
            failed: VecDeque::new(),
            since_resume: 0,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Takes a new policy (a `plugins.toml` change), keeping what was recorded.
    pub fn set_policy(&mut self, policy: BreakerPolicy) {
        if policy != self.policy {
            *self = Breaker::new(policy);
        }
    }

    /// Records `n` events that went through.
    pub fn succeeded(&mut self, n: usize) {
        self.seen += n as u64;
        self.forget_old();
        if self.state == BreakerState::HalfOpen {
            self.since_resume += n as u64;
            if self.since_resume >= u64::from(self.policy.window) {
                self.close();
            }
        }
    }

    /// Records one failed event. Returns true if that opens the breaker: the caller stops
    /// handing events to the plugin and calls [`Breaker::open`].
    #[must_use]
    pub fn failed(&mut self) -> bool {
        self.failed.push_back(self.seen);
        self.seen += 1;
        self.forget_old();
        self.policy.failures > 0 && self.failed.len() >= self.policy.failures as usize
    }

    /// Opens the breaker and says how long to pause; the next pause is twice as long.
    pub fn open(&mut self) -> Duration {
        let pause = self.next_pause;
        self.next_pause = (pause * 2).min(Duration::from_millis(self.policy.max_pause_ms));
        self.state = BreakerState::Open;
        self.failed.clear();
        pause
    }

    /// The pause is over: let events through again, on trial.
    pub fn resume(&mut self) {
        self.state = BreakerState::HalfOpen;
        self.since_resume = 0;
    }

    /// Back to normal, with the first pause as it was configured.
    pub fn close(&mut self) {
        *self = Breaker::new(self.policy.clone());
    }

    /// How many events failed among the last `window`.
    pub fn recent_failures(&self) -> usize {
        self.failed.len()
    }

    fn forget_old(&mut self) {
        let window = u64::from(self.policy.window);
        while self.failed.front().is_some_and(|p| *p + window < self.seen) {
            self.failed.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(failures: u32, window: u32) -> BreakerPolicy {
        BreakerPolicy {
            failures,
            window,
            pause_ms: 100,
            max_pause_ms: 350,
        }
    }

    #[test]
    fn opens_when_enough_of_the_recent_events_failed() {
        let mut b = Breaker::new(policy(3, 10));
        assert!(!b.failed());
        b.succeeded(5);
        assert!(!b.failed());
        b.succeeded(4);
        assert!(
            !b.failed(),
            "the first failure is 11 events back: two within the last ten"
        );
        b.succeeded(2);
        assert!(b.failed(), "three failures within the last ten events");
        assert_eq!(b.open(), Duration::from_millis(100));
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn failures_spread_thinner_than_the_window_never_open_it() {
        let mut b = Breaker::new(policy(2, 10));
        for _ in 0..50 {
            assert!(!b.failed());
            b.succeeded(10);
        }
        assert_eq!(b.recent_failures(), 0);
    }

    #[test]
    fn pauses_double_up_to_the_cap_and_reset_after_a_good_window() {
        let mut b = Breaker::new(policy(1, 10));
        assert!(b.failed());
        assert_eq!(b.open(), Duration::from_millis(100));
        b.resume();
        b.succeeded(3);
        assert!(b.failed(), "fails again while on trial");
        assert_eq!(b.open(), Duration::from_millis(200));
        b.resume();
        assert!(b.failed());
        assert_eq!(b.open(), Duration::from_millis(350), "capped");
        b.resume();
        b.succeeded(10);
        assert_eq!(b.state(), BreakerState::Closed, "a window of good events");
        assert!(b.failed());
        assert_eq!(b.open(), Duration::from_millis(100), "starts over");
    }

    #[test]
    fn zero_failures_turns_it_off() {
        let mut b = Breaker::new(policy(0, 10));
        for _ in 0..100 {
            assert!(!b.failed());
        }
    }
}
