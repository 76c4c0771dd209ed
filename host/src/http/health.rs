//! `/healthz`: whether every plugin is consuming with its breaker closed and room in its state
//! quota, and whether Kafka is reachable; per plugin, its state, running version, events
//! handled, dead-lettered and lag. The live stream's `status` messages carry the same report.

use crate::metrics::Metrics;
use std::sync::atomic::Ordering::Relaxed;

/// The health report: `{"status":"ok"|"degraded","kafka":"up"|"down"|"unknown","plugins":{"name":{"up":true,…}}}`.
#[derive(Debug, Clone)]
pub struct Health {
    /// Degraded when a plugin is not consuming, its breaker is open, its state is at
    /// [`STATE_FULL_PERCENT`] of its quota or more, its deliveries fail, or Kafka is
    /// unreachable.
    pub degraded: bool,
    /// `up` if a consumer has a broker connection and none lost it, `down` if any lost it.
    pub kafka: &'static str,
    pub plugins: serde_json::Map<String, serde_json::Value>,
}

impl Health {
    pub fn healthy(&self) -> bool {
        !self.degraded
    }

    pub fn to_json(&self) -> String {
        serde_json::json!({
            "status": if self.degraded { "degraded" } else { "ok" },
            "kafka": self.kafka,
            "plugins": self.plugins,
        })
        .to_string()
    }
}

/// A plugin's state this full (of `limits.state_mib`) counts as full: writes will soon fail.
pub const STATE_FULL_PERCENT: i64 = 95;

/// Whether `bytes` of state are full under a quota of `limit` bytes.
pub fn state_full(bytes: i64, limit: i64) -> bool {
    limit > 0 && bytes * 100 >= limit * STATE_FULL_PERCENT
}

/// The health of the plugins `metrics` knows now (a removed plugin is not among them).
pub fn health(metrics: &Metrics) -> Health {
    let mut all_up = true;
    let mut kafka = "unknown";
    let plugins = metrics
        .plugins()
        .into_iter()
        .map(|(name, m)| {
            let up = m.up.load(Relaxed) == 1;
            let breaker = match m.breaker_state.load(Relaxed) {
                1 => "open",
                2 => "half_open",
                _ => "closed",
            };
            let (bytes, limit) = (
                m.state_bytes.load(Relaxed),
                m.state_limit_bytes.load(Relaxed),
            );
            let full = state_full(bytes, limit);
            let delivering = m.delivery_failing.load(Relaxed) == 0;
            all_up &= up && breaker != "open" && !full && delivering;
            let plugin_kafka = match m.kafka.load(Relaxed) {
                1 => "up",
                2 => "down",
                _ => "unknown",
            };
            kafka = match (kafka, plugin_kafka) {
                ("down", _) | (_, "down") => "down",
                ("up", _) | (_, "up") => "up",
                _ => "unknown",
            };
            let version = m.version();
            let mut v = serde_json::json!({
                "up": up,
                "kafka": plugin_kafka,
                "breaker": breaker,
                "version": { "digest": version.digest, "path": version.path, "loaded_at": version.loaded_at },
                "events": m.events_handled(),
                "dead_letters": m.events(crate::metrics::Outcome::DeadLetter),
                "outputs": m.output_records.load(Relaxed),
                "consumer_lag": m.consumer_lag.load(Relaxed),
                "shared_fetch_partitions": m.shared_partitions.load(Relaxed),
                "state": { "bytes": bytes, "limit_bytes": limit, "full": full },
                "delivering": delivering,
                "assigned_partitions": m.assigned_partitions.load(Relaxed),
                "restoring_partitions": m.restoring_now(),
            });
            if let Some(e) = m.delivery_error.lock().expect("metrics lock").as_ref() {
                v["delivery_error"] = serde_json::Value::String(e.clone());
            }
            (name, v)
        })
        .collect();
    Health {
        degraded: !all_up || kafka == "down",
        kafka,
        plugins,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plugin_that_is_down_degrades_until_it_is_removed() {
        let m = Metrics::default();
        m.plugin("running").up.store(1, Relaxed);
        m.plugin("stopped").up.store(0, Relaxed);
        let h = health(&m);
        assert!(!h.healthy());
        assert!(
            h.to_json().contains(r#""status":"degraded""#),
            "{}",
            h.to_json()
        );
        m.remove_plugin("stopped");
        let h = health(&m);
        assert!(h.healthy(), "{}", h.to_json());
        assert!(!h.plugins.contains_key("stopped"));
    }

    #[test]
    fn a_state_near_its_quota_degrades() {
        let m = Metrics::default();
        let p = m.plugin("a");
        p.up.store(1, Relaxed);
        p.state_limit_bytes.store(1000, Relaxed);
        p.state_bytes.store(949, Relaxed);
        assert!(health(&m).healthy());
        p.state_bytes.store(950, Relaxed);
        let h = health(&m);
        assert!(!h.healthy());
        assert!(h.to_json().contains(r#""full":true"#), "{}", h.to_json());
    }

    #[test]
    fn kafka_down_degrades() {
        let m = Metrics::default();
        let p = m.plugin("a");
        p.up.store(1, Relaxed);
        p.kafka.store(1, Relaxed);
        assert!(health(&m).healthy());
        p.kafka.store(2, Relaxed);
        let h = health(&m);
        assert!(!h.healthy());
        assert_eq!(h.kafka, "down");
    }
}
