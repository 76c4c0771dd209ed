//! analytics: the aggregates of the seed systems' `analytics_processor.py`, kept in plugin
//! state so they survive instance restarts, and a JSON snapshot of them on the `snapshots`
//! output every `snapshot_every` events and on each tick with news.
//!
//! State keys (all JSON numbers): `total`, `malformed`, `users`, `type:<event_type>`,
//! `page:<url>` (page views), `user:<id>` (events per user), `journey:<id>` (funnel stages the
//! user reached, a bit set), `funnel:<stage>` (users that reached the stage),
//! `revenue:<YYYY-MM-DDTHH>` and `revenue_total`, `product:<name>` (units purchased),
//! `country:<code>`, `snapshot_at` (the `total` of the last snapshot).

use eddy_sdk::{Activity, Context, Event, EventType, Plugin, Verdict};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Emit a snapshot each time the event count crosses a multiple of this (at most one per
    /// batch: the snapshot shows the state after the batch).
    pub snapshot_every: u64,
    /// How many entries the "top" lists show.
    pub top_n: usize,
    /// How many hours of revenue the snapshot shows (most recent first).
    pub revenue_hours: usize,
    /// The output snapshots go to.
    pub output: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            snapshot_every: 50,
            top_n: 5,
            revenue_hours: 24,
            output: "snapshots".into(),
        }
    }
}

/// Funnel stages, in order, with the bit each sets in `journey:<user>`.
const FUNNEL: [(EventType, u8, &str); 3] = [
    (EventType::PageView, 1, "page_view"),
    (EventType::AddToCart, 2, "add_to_cart"),
    (EventType::Purchase, 4, "purchase"),
];

/// The snapshot record.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub total_events: i64,
    pub malformed_events: i64,
    pub distinct_users: i64,
    pub by_type: BTreeMap<String, i64>,
    /// Users that reached each stage of page_view → add_to_cart → purchase.
    pub funnel: BTreeMap<String, i64>,
    /// purchase users / page_view users.
    pub conversion_rate: f64,
    pub top_pages: Vec<(String, i64)>,
    pub top_products: Vec<(String, i64)>,
    pub top_users: Vec<(String, i64)>,
    pub countries: BTreeMap<String, i64>,
    pub revenue_total: f64,
    pub revenue_by_hour: Vec<(String, f64)>,
}

pub struct Analytics {
    config: Config,
    /// `total` before the current batch, to see whether the batch crossed a snapshot mark.
    total_at_batch_start: Option<i64>,
}

fn product_of(a: &Activity) -> Option<&str> {
    a.properties
        .product_name
        .as_deref()
        .or(a.properties.product_id.as_deref())
}

impl Plugin for Analytics {
    type Config = Config;

    fn init(config: Config, _ctx: &mut Context) -> Result<Self, String> {
        if config.snapshot_every == 0 {
            return Err("snapshot_every must be at least 1".into());
        }
        if config.output.is_empty() {
            return Err("output must name an output".into());
        }
        Ok(Analytics {
            config,
            total_at_batch_start: None,
        })
    }

    fn state_keys(&self, event: &Event, keys: &mut Vec<String>) {
        if keys.is_empty() {
            keys.extend(["total", "malformed", "users", "revenue_total"].map(String::from));
        }
        let Ok(a) = event.activity() else { return };
        keys.push(format!("type:{}", a.event_type));
        keys.push(format!("user:{}", a.user_id));
        keys.push(format!("journey:{}", a.user_id));
        if a.event_type == EventType::PageView
            && let Some(page) = &a.page_url
        {
            keys.push(format!("page:{page}"));
        }
        if let Some(c) = a.country() {
            keys.push(format!("country:{c}"));
        }
        if a.event_type == EventType::Purchase {
            if let Some(h) = a.hour() {
                keys.push(format!("revenue:{h}"));
            }
            if let Some(p) = product_of(a) {
                keys.push(format!("product:{p}"));
            }
        }
    }

    fn on_event(&mut self, event: &Event, ctx: &mut Context) -> Verdict {
        let s = &mut ctx.state;
        if self.total_at_batch_start.is_none() {
            self.total_at_batch_start = Some(s.get_json("total").unwrap_or(0));
        }
        s.incr("total", 1);
        let a = match event.activity() {
            Ok(a) => a,
            Err(e) => {
                s.incr("malformed", 1);
                return Verdict::DeadLetter(e.to_string());
            }
        };
        s.incr(&format!("type:{}", a.event_type), 1);
        if s.incr(&format!("user:{}", a.user_id), 1) == 1 {
            s.incr("users", 1);
        }
        if let Some((_, bit, stage)) = FUNNEL.iter().find(|(t, _, _)| *t == a.event_type) {
            let reached: &mut u8 = s.json_mut(&format!("journey:{}", a.user_id));
            if *reached & bit == 0 {
                *reached |= bit;
                s.incr(&format!("funnel:{stage}"), 1);
            }
        }
        if a.event_type == EventType::PageView
            && let Some(page) = &a.page_url
        {
            s.incr(&format!("page:{page}"), 1);
        }
        if let Some(c) = a.country() {
            s.incr(&format!("country:{c}"), 1);
        }
        if a.event_type == EventType::Purchase {
            let amount = a.amount().unwrap_or(0.0);
            s.add_f64("revenue_total", amount);
            if let Some(h) = a.hour() {
                s.add_f64(&format!("revenue:{h}"), amount);
            }
            if let Some(p) = product_of(a) {
                s.incr(
                    &format!("product:{p}"),
                    i64::from(a.properties.quantity.unwrap_or(1).max(1)),
                );
            }
        }
        Verdict::Ok
    }

    fn on_batch_end(&mut self, ctx: &mut Context) {
        let Some(before) = self.total_at_batch_start.take() else {
            return;
        };
        let after: i64 = ctx.state.get_json("total").unwrap_or(0);
        let every = self.config.snapshot_every as i64;
        if after / every > before / every {
            self.emit_snapshot(ctx, after);
        }
    }

    fn on_tick(&mut self, _now_ms: i64, ctx: &mut Context) {
        let total: i64 = ctx.state.get_json("total").unwrap_or(0);
        let last: i64 = ctx.state.get_json("snapshot_at").unwrap_or(0);
        if total != last {
            self.emit_snapshot(ctx, total);
        }
    }
}

impl Analytics {
    fn emit_snapshot(&self, ctx: &mut Context, total: i64) {
        let snapshot = snapshot(&mut ctx.state, self.config.top_n, self.config.revenue_hours);
        ctx.state.set_json("snapshot_at", &total);
        ctx.emit_json(&self.config.output, None, &snapshot);
    }
}

/// Builds the snapshot from state.
pub fn snapshot(s: &mut eddy_sdk::State, top_n: usize, revenue_hours: usize) -> Snapshot {
    let counts = |s: &mut eddy_sdk::State, prefix: &str| -> Vec<(String, i64)> {
        s.scan_prefix(prefix, u32::MAX)
            .into_iter()
            .filter_map(|(k, v)| {
                Some((
                    k[prefix.len()..].to_string(),
                    serde_json::from_slice(&v).ok()?,
                ))
            })
            .collect()
    };
    let top = |mut v: Vec<(String, i64)>| {
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(top_n);
        v
    };
    let funnel: BTreeMap<String, i64> = counts(s, "funnel:").into_iter().collect();
    let viewed = funnel.get("page_view").copied().unwrap_or(0);
    let bought = funnel.get("purchase").copied().unwrap_or(0);
    let mut revenue_by_hour: Vec<(String, f64)> = s
        .scan_prefix("revenue:", u32::MAX)
        .into_iter()
        .filter_map(|(k, v)| {
            Some((
                k["revenue:".len()..].to_string(),
                serde_json::from_slice(&v).ok()?,
            ))
        })
        .collect();
    revenue_by_hour.reverse();
    revenue_by_hour.iter_mut().for_each(|(_, x)| *x = cents(*x));
    revenue_by_hour.truncate(revenue_hours);
    Snapshot {
        total_events: s.get_json("total").unwrap_or(0),
        malformed_events: s.get_json("malformed").unwrap_or(0),
        distinct_users: s.get_json("users").unwrap_or(0),
        by_type: counts(s, "type:").into_iter().collect(),
        conversion_rate: if viewed > 0 {
            bought as f64 / viewed as f64
        } else {
            0.0
        },
        funnel,
        top_pages: top(counts(s, "page:")),
        top_products: top(counts(s, "product:")),
        top_users: top(counts(s, "user:")),
        countries: counts(s, "country:").into_iter().collect(),
        revenue_total: cents(s.get_json("revenue_total").unwrap_or(0.0)),
        revenue_by_hour,
    }
}

/// Rounds money to cents, so sums of prices read as prices.
fn cents(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

eddy_sdk::plugin!(Analytics);

#[cfg(test)]
mod tests {
    use super::*;
    use eddy_sdk::testing::Harness;

    fn ev(user: &str, kind: &str, extra: &str) -> Vec<u8> {
        format!(r#"{{"user_id":"{user}","event_type":"{kind}","timestamp":"2024-01-15T10:30:00Z","location":{{"country":"US"}}{extra}}}"#)
            .into_bytes()
    }

    #[test]
    fn aggregates_and_snapshots_every_n_events() {
        let mut h = Harness::<Analytics>::new(r#"{"snapshot_every": 4}"#).unwrap();
        let batch = [
            ev("a", "page_view", r#","page_url":"/""#),
            ev("a", "page_view", r#","page_url":"/products/laptop""#),
            ev(
                "a",
                "add_to_cart",
                r#","properties":{"product_name":"Laptop","price":999.99}"#,
            ),
            ev(
                "a",
                "purchase",
                r#","properties":{"product_name":"Laptop","price":999.99}"#,
            ),
            ev("b", "page_view", r#","page_url":"/""#),
        ];
        let verdicts = h.run_payloads(&batch);
        assert!(verdicts.iter().all(|v| *v == Verdict::Ok));
        let snaps = h.outputs_json("snapshots");
        assert_eq!(
            snaps.len(),
            1,
            "5 events with snapshot_every=4: one snapshot after the batch"
        );
        let snap: Snapshot = serde_json::from_value(snaps[0].clone()).unwrap();
        assert_eq!(snap.total_events, 5);
        assert_eq!(snap.distinct_users, 2);
        assert_eq!(snap.by_type["page_view"], 3);
        assert_eq!(snap.funnel["page_view"], 2);
        assert_eq!(snap.funnel["add_to_cart"], 1);
        assert_eq!(snap.funnel["purchase"], 1);
        assert_eq!(snap.conversion_rate, 0.5);
        assert_eq!(snap.top_pages[0], ("/".to_string(), 2));
        assert_eq!(snap.top_products, vec![("Laptop".to_string(), 1)]);
        assert_eq!(snap.top_users[0], ("a".to_string(), 4));
        assert_eq!(snap.countries["US"], 5);
        assert_eq!(
            snap.revenue_by_hour,
            vec![("2024-01-15T10".to_string(), 999.99)]
        );
    }

    #[test]
    fn counts_survive_an_instance_restart() {
        let mut h = Harness::<Analytics>::new("{}").unwrap();
        h.run_payloads(&[ev("a", "click", ""), ev("b", "click", "")]);
        h.restart("{}").unwrap();
        h.run_payloads(&[ev("a", "click", "")]);
        assert_eq!(h.state_json::<i64>("total"), Some(3));
        assert_eq!(h.state_json::<i64>("users"), Some(2));
        assert_eq!(h.state_json::<i64>("type:click"), Some(3));
    }

    #[test]
    fn malformed_events_are_counted_and_dead_lettered() {
        let mut h = Harness::<Analytics>::new("{}").unwrap();
        let v = h.run_payloads(&[&b"nope"[..], br#"{"user_id":"x"}"#]);
        assert!(v.iter().all(|v| matches!(v, Verdict::DeadLetter(_))));
        assert_eq!(h.state_json::<i64>("malformed"), Some(2));
        assert_eq!(h.state_json::<i64>("total"), Some(2));
    }

    #[test]
    fn tick_snapshots_only_when_something_changed() {
        let mut h = Harness::<Analytics>::new(r#"{"snapshot_every": 1000}"#).unwrap();
        h.tick(1);
        assert!(h.outputs_json("snapshots").is_empty());
        h.run_payloads(&[ev("a", "click", "")]);
        h.tick(2);
        h.tick(3);
        assert_eq!(h.outputs_json("snapshots").len(), 1);
    }

    #[test]
    fn a_batch_costs_a_few_host_calls_not_one_per_event() {
        let mut h = Harness::<Analytics>::new(r#"{"snapshot_every": 100000}"#).unwrap();
        let batch: Vec<Vec<u8>> = (0..200)
            .map(|i| ev(&format!("u{}", i % 7), "page_view", r#","page_url":"/""#))
            .collect();
        let before = h.recorded().host_calls;
        h.run_payloads(&batch);
        let calls = h.recorded().host_calls - before;
        assert!(calls <= 3, "{calls} host calls for 200 events");
    }
}
