//! fraud: the seed systems' `fraud_detector.py`. Scores each purchase and add-to-cart by
//! purchase velocity, high value and how many IP addresses and countries the user was seen
//! from within a short window, and emits an alert with the score and the reasons.
//!
//! Time is the events' own time (their `timestamp`, else Kafka's), never the wall clock: a
//! replay of the same events gives the same alerts. State: `recent:<user>`, the user's events
//! inside the window (bounded by `max_tracked`); `alerts` (count of alerts emitted).

use eddy_sdk::{Context, Event, EventType, Plugin, Verdict};
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The window, in seconds, for velocity and IP/country checks.
    pub window_secs: u64,
    /// More purchases than this inside the window is suspicious.
    pub max_purchases: usize,
    /// A purchase of at least this amount is suspicious.
    pub high_value: f64,
    /// More distinct IP addresses than this inside the window is suspicious.
    pub max_ips: usize,
    /// More distinct countries than this inside the window is suspicious.
    pub max_countries: usize,
    /// Alert when the score (0–100) reaches this.
    pub alert_score: u32,
    /// At most this many recent events are kept per user.
    pub max_tracked: usize,
    pub output: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            window_secs: 60,
            max_purchases: 3,
            high_value: 1000.0,
            max_ips: 2,
            max_countries: 1,
            alert_score: 50,
            max_tracked: 50,
            output: "alerts".into(),
        }
    }
}

/// One remembered event of a user.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Seen {
    t: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    country: Option<String>,
    purchase: bool,
}

#[derive(Serialize)]
struct FraudAlert<'a> {
    kind: &'static str,
    user_id: &'a str,
    score: u32,
    reasons: Vec<String>,
    event_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    amount: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_id: Option<&'a str>,
    partition: i32,
    offset: i64,
}

pub struct Fraud {
    config: Config,
}

fn key(user: &str) -> String {
    format!("recent:{user}")
}

impl Plugin for Fraud {
    type Config = Config;

    fn init(config: Config, _ctx: &mut Context) -> Result<Self, String> {
        if config.window_secs == 0 {
            return Err("window_secs must be at least 1".into());
        }
        if config.alert_score == 0 || config.alert_score > 100 {
            return Err(format!(
                "alert_score must be between 1 and 100, not {}",
                config.alert_score
            ));
        }
        if config.max_tracked == 0 {
            return Err("max_tracked must be at least 1".into());
        }
        Ok(Fraud { config })
    }

    fn state_keys(&self, event: &Event, keys: &mut Vec<String>) {
        if let Ok(a) = event.activity() {
            keys.push(key(&a.user_id));
        }
    }

    fn on_event(&mut self, event: &Event, ctx: &mut Context) -> Verdict {
        let a = match event.activity() {
            Ok(a) => a,
            Err(e) => return Verdict::DeadLetter(e.to_string()),
        };
        let now = match event.time() {
            Ok(t) => t,
            Err(e) => {
                return Verdict::DeadLetter(format!("{e}: fraud checks need the event's time"));
            }
        };
        let c = &self.config;
        // Changed in place: decoded once per batch however many of its events are this user's.
        let recent: &mut Vec<Seen> = ctx.state.json_mut(("recent:", &a.user_id));
        // Saturating: `now` may be any Kafka record timestamp, down to i64::MIN.
        let window_ms = i64::try_from(c.window_secs)
            .unwrap_or(i64::MAX)
            .saturating_mul(1000);
        let since = now.saturating_sub(window_ms);
        recent.retain(|s| s.t > since && s.t <= now);
        let is_purchase = a.event_type == EventType::Purchase;
        recent.push(Seen {
            t: now,
            ip: a.ip_address.as_deref().map(str::to_string),
            country: a.country().map(str::to_string),
            purchase: is_purchase,
        });
        if recent.len() > c.max_tracked {
            recent.drain(..recent.len() - c.max_tracked);
        }
        if !matches!(a.event_type, EventType::Purchase | EventType::AddToCart) {
            return Verdict::Skip;
        }
        let (score, reasons) = score(c, recent, is_purchase.then(|| a.amount()).flatten());
        if score >= c.alert_score {
            let alert = FraudAlert {
                kind: "fraud",
                user_id: &a.user_id,
                score,
                reasons,
                event_type: a.event_type.as_str(),
                amount: a.amount(),
                event_id: a.event_id.as_deref(),
                partition: event.partition,
                offset: event.offset,
            };
            ctx.emit_json(&c.output, Some(a.user_id.as_bytes()), &alert);
            ctx.state.incr("alerts", 1);
        }
        Verdict::Ok
    }
}

/// Scores the user's recent events (the current one last). Returns the score, capped at
/// 100, and one reason per rule that fired.
fn score(c: &Config, recent: &[Seen], purchase_amount: Option<f64>) -> (u32, Vec<String>) {
    let mut score = 0;
    let mut reasons = Vec::new();
    let purchases = recent.iter().filter(|s| s.purchase).count();
    if purchases > c.max_purchases {
        score += 40;
        reasons.push(format!("{purchases} purchases within {}s", c.window_secs));
    }
    if let Some(amount) = purchase_amount.filter(|x| *x >= c.high_value) {
        score += 30;
        reasons.push(format!("high-value purchase of {amount:.2}"));
    }
    let mut ips: Vec<&str> = recent.iter().filter_map(|s| s.ip.as_deref()).collect();
    ips.sort_unstable();
    ips.dedup();
    if ips.len() > c.max_ips {
        score += 30;
        reasons.push(format!(
            "{} IP addresses within {}s",
            ips.len(),
            c.window_secs
        ));
    }
    let mut countries: Vec<&str> = recent.iter().filter_map(|s| s.country.as_deref()).collect();
    countries.sort_unstable();
    countries.dedup();
    if countries.len() > c.max_countries {
        score += 40;
        reasons.push(format!(
            "{} countries within {}s ({})",
            countries.len(),
            c.window_secs,
            countries.join(", ")
        ));
    }
    (score.min(100), reasons)
}

eddy_sdk::plugin!(Fraud);

#[cfg(test)]
mod tests {
    use super::*;
    use eddy_sdk::testing::Harness;

    fn ev(user: &str, kind: &str, secs: u32, ip: &str, country: &str, price: f64) -> Vec<u8> {
        format!(
            r#"{{"user_id":"{user}","event_type":"{kind}","timestamp":"2024-01-15T10:{:02}:{:02}Z","ip_address":"{ip}",
            "location":{{"country":"{country}"}},"properties":{{"price":{price}}}}}"#,
            secs / 60,
            secs % 60
        )
        .into_bytes()
    }

    #[test]
    fn normal_shopping_raises_nothing() {
        let mut h = Harness::<Fraud>::new("{}").unwrap();
        h.run_payloads(&[
            ev("u", "page_view", 0, "1.1.1.1", "US", 0.0),
            ev("u", "add_to_cart", 10, "1.1.1.1", "US", 79.99),
            ev("u", "purchase", 20, "1.1.1.1", "US", 79.99),
        ]);
        assert!(h.outputs_json("alerts").is_empty());
    }

    #[test]
    fn a_burst_from_several_countries_raises_an_alert_with_reasons() {
        let mut h = Harness::<Fraud>::new("{}").unwrap();
        let burst: Vec<Vec<u8>> = (0..5)
            .map(|i| {
                ev(
                    "evil",
                    "purchase",
                    i * 5,
                    &format!("10.0.0.{i}"),
                    ["US", "RU", "BR"][i as usize % 3],
                    1299.0,
                )
            })
            .collect();
        h.run_payloads(&burst);
        let alerts = h.outputs_json("alerts");
        assert!(!alerts.is_empty());
        let last = alerts.last().unwrap();
        assert_eq!(last["user_id"], "evil");
        assert_eq!(last["score"], 100);
        let reasons: Vec<&str> = last["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap())
            .collect();
        assert!(
            reasons.iter().any(|r| r.contains("purchases within 60s")),
            "{reasons:?}"
        );
        assert!(
            reasons.iter().any(|r| r.contains("high-value")),
            "{reasons:?}"
        );
        assert!(
            reasons.iter().any(|r| r.contains("countries")),
            "{reasons:?}"
        );
        assert_eq!(h.state_json::<i64>("alerts"), Some(alerts.len() as i64));
    }

    #[test]
    fn old_events_leave_the_window() {
        let mut h = Harness::<Fraud>::new(r#"{"window_secs": 30, "alert_score": 40}"#).unwrap();
        // Four purchases, but 40 s apart: never more than one inside a 30 s window.
        let spaced: Vec<Vec<u8>> = (0..4)
            .map(|i| ev("u", "purchase", i * 40, "1.1.1.1", "US", 10.0))
            .collect();
        h.run_payloads(&spaced);
        assert!(h.outputs_json("alerts").is_empty());
        // The window is remembered across batches and instance restarts.
        h.restart(r#"{"window_secs": 30, "alert_score": 40}"#)
            .unwrap();
        let fast: Vec<Vec<u8>> = (0..4)
            .map(|i| ev("u", "purchase", 200 + i, "1.1.1.1", "US", 10.0))
            .collect();
        h.run_payloads(&fast[..2]);
        h.restart(r#"{"window_secs": 30, "alert_score": 40}"#)
            .unwrap();
        h.run_payloads(&fast[2..]);
        assert_eq!(h.outputs_json("alerts").len(), 1);
    }

    #[test]
    fn extreme_kafka_timestamps_and_windows_do_not_overflow() {
        let no_time = br#"{"user_id":"u","event_type":"purchase","properties":{"price":5}}"#;
        for config in [r#"{}"#, r#"{"window_secs": 18446744073709551615}"#] {
            let mut h = Harness::<Fraud>::new(config).unwrap();
            for t in [i64::MIN, -1, 0, i64::MAX] {
                let mut e = h.event(no_time);
                e.timestamp_ms = Some(t);
                assert_eq!(h.run(&[e]), vec![Verdict::Ok]);
            }
        }
    }

    #[test]
    fn bad_config_is_rejected() {
        assert!(
            Harness::<Fraud>::new(r#"{"alert_score": 0}"#)
                .err()
                .unwrap()
                .contains("alert_score")
        );
        assert!(
            Harness::<Fraud>::new(r#"{"window": 5}"#)
                .err()
                .unwrap()
                .contains("window")
        );
    }
}
