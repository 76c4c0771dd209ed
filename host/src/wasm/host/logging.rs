//! `eddy:plugin/logging`: the host's log, tagged with the plugin's name, at most
//! `limits.log_lines_per_s` lines a second per plugin ([`LogBudget`]): a plugin that logs in a
//! loop must not flood the host's log (or its disk). Dropped lines are counted, and said once
//! the plugin may log again.

use super::HostState;
use crate::wasm::bindings::eddy::plugin::{logging, types};
use std::time::Instant;

/// The longest line a plugin may log, in bytes; the rest is cut.
const MAX_LINE: usize = 4096;

/// A token bucket of log lines: `rate` a second, bursts of up to `rate`.
#[derive(Debug, Clone)]
pub(crate) struct LogBudget {
    rate: f64,
    tokens: f64,
    refilled: Instant,
    /// Dropped since the last line that was written (said in the next one).
    dropped_unsaid: u64,
    /// Dropped and not yet counted in the plugin's metrics.
    pub(crate) dropped_uncounted: u64,
}

impl LogBudget {
    pub(crate) fn new(lines_per_s: u32) -> LogBudget {
        LogBudget {
            rate: lines_per_s as f64,
            tokens: lines_per_s as f64,
            refilled: Instant::now(),
            dropped_unsaid: 0,
            dropped_uncounted: 0,
        }
    }

    pub(crate) fn set_rate(&mut self, lines_per_s: u32) {
        self.rate = lines_per_s as f64;
        self.tokens = self.tokens.min(self.rate);
    }

    /// Whether one more line may be written now; if not, it is counted as dropped.
    fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.dropped_unsaid += 1;
            self.dropped_uncounted += 1;
            false
        }
    }
}

impl logging::Host for HostState {
    fn log(&mut self, level: types::Level, mut message: String) {
        if !self.log_budget.allow(Instant::now()) {
            return;
        }
        let plugin = &*self.plugin;
        let dropped = std::mem::take(&mut self.log_budget.dropped_unsaid);
        if dropped > 0 {
            tracing::warn!(
                plugin,
                dropped,
                "dropped {dropped} log lines of plugin `{plugin}`: past limits.log_lines_per_s"
            );
        }
        if message.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str(" [cut at 4 KiB]");
        }
        match level {
            types::Level::Trace => tracing::trace!(plugin, "{message}"),
            types::Level::Debug => tracing::debug!(plugin, "{message}"),
            types::Level::Info => tracing::info!(plugin, "{message}"),
            types::Level::Warn => tracing::warn!(plugin, "{message}"),
            types::Level::Error => tracing::error!(plugin, "{message}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn lines_past_the_rate_are_dropped_and_counted_and_the_budget_refills() {
        let start = Instant::now();
        let mut budget = LogBudget::new(10);
        let allowed = (0..25).filter(|_| budget.allow(start)).count();
        assert_eq!(allowed, 10, "a burst of the rate");
        assert_eq!(budget.dropped_uncounted, 15);
        // Half a second later, half the rate again.
        let later = start + Duration::from_millis(500);
        let allowed = (0..25).filter(|_| budget.allow(later)).count();
        assert_eq!(allowed, 5);
        assert_eq!(budget.dropped_uncounted, 35);
    }
}
