//! The host's one retry policy: exponential backoff, capped, and cancellable at shutdown.
//! Deliveries and state commits that fail are retried on it until they go through, a
//! plugin's `retry` verdicts wait on it (on a blocking thread), and the
//! HTTP server's accept loop backs off on it after an error (EMFILE, say), instead of
//! retrying at once and spinning a core.

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use std::time::Duration;
use tokio::sync::watch;

/// How long to wait between attempts: `first`, doubling after every failure, up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub first: Duration,
    pub max: Duration,
}

impl Policy {
    /// Outputs, dead letters and state commits: the broker or the disk needs time.
    pub const DELIVERY: Policy = Policy {
        first: Duration::from_millis(100),
        max: Duration::from_secs(10),
    };

    /// A consumer error, before polling again.
    pub const CONSUME: Policy = Policy {
        first: Duration::from_millis(100),
        max: Duration::from_secs(5),
    };

    /// The HTTP accept loop, after an error such as too many open files.
    pub const ACCEPT: Policy = Policy {
        first: Duration::from_millis(10),
        max: Duration::from_secs(1),
    };

    /// A fresh backoff on this policy.
    pub fn backoff(self) -> Backoff {
        Backoff {
            policy: self,
            delays: self.builder().build(),
        }
    }

    fn builder(self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.first)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .without_max_times()
    }
}

/// The host is shutting down: stop retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the host is stopping")]
pub struct Stopping;

/// The delays of one run of attempts.
#[derive(Debug)]
pub struct Backoff {
    policy: Policy,
    delays: ExponentialBackoff,
}

impl Backoff {
    /// The wait before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.policy.max)
    }

    /// Back to the first delay, after a success.
    pub fn reset(&mut self) {
        self.delays = self.policy.builder().build();
    }
}

/// Sleeps `delay`, or returns [`Stopping`] as soon as `shutdown` says so (or its sender is
/// gone).
pub async fn sleep_unless_stopping(
    delay: Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), Stopping> {
    if *shutdown.borrow() {
        return Err(Stopping);
    }
    tokio::select! {
        _ = shutdown.changed() => Err(Stopping),
        _ = tokio::time::sleep(delay) => Ok(()),
    }
}

/// [`sleep_unless_stopping`] for a blocking thread (a plugin's retry backoff, which waits
/// between calls into the sandbox): wakes every 10 ms to look at `shutdown`.
pub fn sleep_blocking_unless_stopping(
    delay: Duration,
    shutdown: &watch::Receiver<bool>,
) -> Result<(), Stopping> {
    const LOOK_EVERY: Duration = Duration::from_millis(10);
    let until = std::time::Instant::now() + delay;
    loop {
        if *shutdown.borrow() || shutdown.has_changed().is_err() {
            return Err(Stopping);
        }
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(LOOK_EVERY));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_start_over_after_a_reset() {
        let mut b = Policy::DELIVERY.backoff();
        let delays: Vec<u64> = (0..10).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(
            delays,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn a_blocking_wait_ends_soon_after_the_host_stops() {
        let (stop, shutdown) = watch::channel(false);
        let started = std::time::Instant::now();
        let waiting = std::thread::spawn(move || {
            sleep_blocking_unless_stopping(Duration::from_secs(3600), &shutdown)
        });
        std::thread::sleep(Duration::from_millis(30));
        stop.send(true).unwrap();
        assert_eq!(waiting.join().unwrap(), Err(Stopping));
        assert!(started.elapsed() < Duration::from_secs(5));
        let (_sender, shutdown) = watch::channel(false);
        assert_eq!(
            sleep_blocking_unless_stopping(Duration::from_millis(20), &shutdown),
            Ok(())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_at_once_when_the_host_stops() {
        let (stop, mut shutdown) = watch::channel(false);
        let started = tokio::time::Instant::now();
        let waiting = tokio::spawn(async move {
            sleep_unless_stopping(Duration::from_secs(3600), &mut shutdown).await
        });
        tokio::task::yield_now().await;
        stop.send(true).unwrap();
        assert_eq!(waiting.await.unwrap(), Err(Stopping));
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
