//! dashboard: seed 002's `dashboard_processor.py`. Keeps the live figures of the activity
//! stream and emits them on every tick: active users of the last 5 minutes, events per second
//! over the last 10 s and the last minute, the trending pages and products of the last minute,
//! and the live conversion rate (sessions that bought / sessions with a page view, over the
//! last 5 minutes). One compact JSON record to `output` (`summary`: for a live view), and one
//! short line of text to `text_output` (`text`: for a human on standard output).
//!
//! Time is event time (the events' own `timestamp`, else Kafka's), so a replay shows what the
//! dashboard showed then. While the stream is quiet, ticks move "now" on with the host's clock
//! from the last event, so events per second fall to 0 and users leave the active set instead
//! of the figures freezing at their last values.
//!
//! State: `dash`, one record (per-second counts of the last minute, per-10 s page and product
//! counts of the last minute, each active user's and session's last event of the last 5
//! minutes); pruned after every batch, so it stays as large as the last 5 minutes' users.

use eddy_sdk::{Context, Event, EventType, Plugin, Verdict};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// How many trending pages and products to show.
    pub top_n: usize,
    /// The window of active users and of the conversion rate, in seconds.
    pub active_secs: i64,
    pub output: String,
    /// Where the human summary goes ("" for nowhere).
    pub text_output: String,
    /// The human summary on one tick in this many (the JSON record goes out on every tick:
    /// a live page wants it often, a terminal less so).
    pub text_every_ticks: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            top_n: 5,
            active_secs: 300,
            output: "summary".into(),
            text_output: "text".into(),
            text_every_ticks: 1,
        }
    }
}

const MINUTE_MS: i64 = 60_000;
/// Page and product counts are kept per bucket of this much event time.
const BUCKET_MS: i64 = 10_000;

#[derive(Debug, Default, Serialize, Deserialize)]
struct SessionSeen {
    last: i64,
    viewed: bool,
    bought: bool,
}

/// Everything the dashboard keeps, in one state value.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Dash {
    /// The latest event time seen.
    latest: Option<i64>,
    /// Events per second of event time (second, count), the last minute, in order.
    seconds: VecDeque<(i64, u64)>,
    /// Page views per page and purchases per product, per 10 s bucket of the last minute.
    pages: VecDeque<(i64, BTreeMap<String, u64>)>,
    products: VecDeque<(i64, BTreeMap<String, u64>)>,
    /// Each user's and session's latest event time, for those of the active window.
    users: HashMap<String, i64>,
    sessions: HashMap<String, SessionSeen>,
    /// Whether events arrived since the last tick, and the host time of the first tick
    /// after the stream went quiet.
    active_since_tick: bool,
    quiet_since: Option<i64>,
}

/// The record emitted on each tick.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    /// Host time of the tick, and the event time the figures are for.
    pub at_ms: i64,
    pub event_time_ms: Option<i64>,
    pub active_users: usize,
    pub events_per_sec_10s: f64,
    pub events_per_sec_1m: f64,
    pub trending_pages: Vec<(String, u64)>,
    pub trending_products: Vec<(String, u64)>,
    pub sessions: usize,
    pub sessions_with_page_view: usize,
    pub sessions_that_bought: usize,
    /// sessions_that_bought / sessions_with_page_view (0 without any).
    pub conversion_rate: f64,
}

/// Adds `n` to `name` in the bucket of `t`, creating it in order.
fn add_to_bucket(buckets: &mut VecDeque<(i64, BTreeMap<String, u64>)>, t: i64, name: &str) {
    let bucket = t.div_euclid(BUCKET_MS) * BUCKET_MS;
    let i = match buckets.iter().position(|(b, _)| *b == bucket) {
        Some(i) => i,
        None => {
            let at = buckets.partition_point(|(b, _)| *b < bucket);
            buckets.insert(at, (bucket, BTreeMap::new()));
            at
        }
    };
    *buckets[i].1.entry(name.to_string()).or_default() += 1;
}

/// The `n` largest counts of `buckets` after `since`, largest first (ties by name).
fn top(
    buckets: &VecDeque<(i64, BTreeMap<String, u64>)>,
    since: i64,
    n: usize,
) -> Vec<(String, u64)> {
    let mut sum: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, counts) in buckets.iter().filter(|(b, _)| *b + BUCKET_MS > since) {
        for (name, c) in counts {
            *sum.entry(name).or_default() += c;
        }
    }
    let mut all: Vec<(String, u64)> = sum.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    all.truncate(n);
    all
}

impl Dash {
    /// Drops what is older than the windows before `now` (event time).
    fn prune(&mut self, now: i64, active_ms: i64) {
        while self
            .seconds
            .front()
            .is_some_and(|(s, _)| s * 1000 <= now - MINUTE_MS)
        {
            self.seconds.pop_front();
        }
        for buckets in [&mut self.pages, &mut self.products] {
            while buckets
                .front()
                .is_some_and(|(b, _)| b + BUCKET_MS <= now - MINUTE_MS)
            {
                buckets.pop_front();
            }
        }
        self.users.retain(|_, last| *last > now - active_ms);
        self.sessions.retain(|_, s| s.last > now - active_ms);
    }

    fn summary(&self, at_ms: i64, now: Option<i64>, config: &Config) -> Summary {
        let now = now.unwrap_or(i64::MIN);
        let active_ms = config.active_secs * 1000;
        let events_since = |ms: i64| -> u64 {
            self.seconds
                .iter()
                .filter(|(s, _)| s * 1000 > now - ms && s * 1000 <= now)
                .map(|(_, c)| c)
                .sum()
        };
        let sessions: Vec<&SessionSeen> = self
            .sessions
            .values()
            .filter(|s| s.last > now - active_ms)
            .collect();
        let viewed = sessions.iter().filter(|s| s.viewed).count();
        let bought = sessions.iter().filter(|s| s.viewed && s.bought).count();
        Summary {
            at_ms,
            event_time_ms: self.latest.map(|_| now),
            active_users: self
                .users
                .values()
                .filter(|t| **t > now - active_ms)
                .count(),
            events_per_sec_10s: events_since(10_000) as f64 / 10.0,
            events_per_sec_1m: events_since(MINUTE_MS) as f64 / 60.0,
            trending_pages: top(&self.pages, now - MINUTE_MS, config.top_n),
            trending_products: top(&self.products, now - MINUTE_MS, config.top_n),
            sessions: sessions.len(),
            sessions_with_page_view: viewed,
            sessions_that_bought: bought,
            conversion_rate: if viewed == 0 {
                0.0
            } else {
                bought as f64 / viewed as f64
            },
        }
    }
}

pub struct Dashboard {
    config: Config,
    /// Ticks since the instance started (for `text_every_ticks`; not worth durable state).
    ticks: u64,
}

impl Plugin for Dashboard {
    type Config = Config;

    fn init(config: Config, _ctx: &mut Context) -> Result<Self, String> {
        if config.output.is_empty() {
            return Err("output must name an output".into());
        }
        if config.active_secs < 1 {
            return Err("active_secs must be at least 1".into());
        }
        if config.text_every_ticks == 0 {
            return Err("text_every_ticks must be 1 or more".into());
        }
        Ok(Dashboard { config, ticks: 0 })
    }

    fn on_event(&mut self, event: &Event, ctx: &mut Context) -> Verdict {
        let a = match event.activity() {
            Ok(a) => a,
            Err(e) => return Verdict::DeadLetter(e.to_string()),
        };
        let t = match event.time() {
            Ok(t) => t,
            Err(e) => {
                return Verdict::DeadLetter(format!("{e}: the dashboard needs the event's time"));
            }
        };
        let dash: &mut Dash = ctx.state.json_mut("dash");
        dash.latest = Some(dash.latest.map_or(t, |l| l.max(t)));
        dash.active_since_tick = true;
        dash.quiet_since = None;
        let second = t.div_euclid(1000);
        match dash.seconds.iter().position(|(s, _)| *s == second) {
            Some(i) => dash.seconds[i].1 += 1,
            None => {
                let at = dash.seconds.partition_point(|(s, _)| *s < second);
                dash.seconds.insert(at, (second, 1));
            }
        }
        let user = dash.users.entry(a.user_id.to_string()).or_insert(t);
        *user = (*user).max(t);
        if let Some(session) = &a.session_id {
            let s = dash.sessions.entry(session.to_string()).or_default();
            s.last = s.last.max(t);
            s.viewed |= a.event_type == EventType::PageView;
            s.bought |= a.event_type == EventType::Purchase;
        }
        match a.event_type {
            EventType::PageView => {
                if let Some(page) = &a.page_url {
                    add_to_bucket(&mut dash.pages, t, page);
                }
            }
            EventType::Purchase => {
                let product = a
                    .properties
                    .product_name
                    .as_deref()
                    .or(a.properties.product_id.as_deref());
                if let Some(p) = product {
                    add_to_bucket(&mut dash.products, t, p);
                }
            }
            _ => {}
        }
        Verdict::Ok
    }

    fn on_batch_end(&mut self, ctx: &mut Context) {
        let active_ms = self.config.active_secs * 1000;
        let dash: &mut Dash = ctx.state.json_mut("dash");
        if let Some(latest) = dash.latest {
            dash.prune(latest, active_ms);
        }
    }

    fn on_tick(&mut self, now_ms: i64, ctx: &mut Context) {
        let active_ms = self.config.active_secs * 1000;
        let dash: &mut Dash = ctx.state.json_mut("dash");
        // Quiet since the last tick: "now" moves on with the host's clock from the latest
        // event, so the figures fall instead of freezing.
        if dash.active_since_tick {
            dash.active_since_tick = false;
            dash.quiet_since = None;
        } else if dash.quiet_since.is_none() {
            dash.quiet_since = Some(now_ms);
        }
        let now = dash
            .latest
            .map(|l| l.saturating_add(dash.quiet_since.map_or(0, |q| now_ms - q)));
        if let Some(now) = now {
            dash.prune(now, active_ms);
        }
        let summary = dash.summary(now_ms, now, &self.config);
        ctx.emit_json(&self.config.output, None, &summary);
        self.ticks += 1;
        let text_due = (self.ticks - 1).is_multiple_of(u64::from(self.config.text_every_ticks));
        if !self.config.text_output.is_empty() && text_due {
            let pages: Vec<String> = summary
                .trending_pages
                .iter()
                .take(3)
                .map(|(p, n)| format!("{p} ({n})"))
                .collect();
            let line = format!(
                "dashboard: {} active users, {:.1} events/s (10 s), {:.1} events/s (1 min), conversion {:.1}% ({}/{} sessions), trending: {}",
                summary.active_users,
                summary.events_per_sec_10s,
                summary.events_per_sec_1m,
                summary.conversion_rate * 100.0,
                summary.sessions_that_bought,
                summary.sessions_with_page_view,
                if pages.is_empty() {
                    "-".to_string()
                } else {
                    pages.join(", ")
                }
            );
            ctx.emit(&self.config.text_output, None, line.into_bytes());
        }
    }
}

eddy_sdk::plugin!(Dashboard);

#[cfg(test)]
mod tests {
    use super::*;
    use eddy_sdk::testing::Harness;

    /// An event of `user` in `session` at `t` seconds.
    fn event(user: &str, session: &str, kind: &str, page: &str, product: &str, t: i64) -> String {
        let ts = format!("2024-01-15T10:{:02}:{:02}Z", t / 60, t % 60);
        format!(
            r#"{{"user_id":"{user}","session_id":"{session}","event_type":"{kind}","page_url":"{page}","timestamp":"{ts}","properties":{{"product_name":"{product}"}}}}"#
        )
    }

    fn summaries(h: &Harness<Dashboard>) -> Vec<Summary> {
        h.outputs_json("summary")
            .into_iter()
            .map(|v| serde_json::from_value(v).unwrap())
            .collect()
    }

    #[test]
    fn figures_of_the_last_minute_and_five_minutes_on_each_tick() {
        let mut h = Harness::<Dashboard>::new("{}").unwrap();
        // 0-299 s: u1..u5 active; s1 views and buys, s2 views only, s3 only clicks.
        let mut events = vec![
            event("u1", "s1", "page_view", "/home", "", 10),
            event("u1", "s1", "purchase", "/checkout", "Laptop", 20),
            event("u2", "s2", "page_view", "/p/1", "", 100),
            event("u3", "s3", "click", "/p/1", "", 250),
        ];
        // The last minute (t in 241..=300): 6 events in the last 10 s.
        for i in 0..6 {
            events.push(event("u4", "s4", "page_view", "/p/2", "", 291 + i));
        }
        events.push(event("u5", "s5", "purchase", "/checkout", "Phone", 280));
        h.run_payloads(&events);
        h.set_time(1_000_000);
        h.advance(10_000);
        let s = &summaries(&h)[0];
        assert_eq!(s.active_users, 5);
        assert_eq!(s.events_per_sec_10s, 0.6, "6 events in (286, 296]");
        assert_eq!(
            s.events_per_sec_1m,
            8.0 / 60.0,
            "u3's click, u5's purchase, 6 views"
        );
        assert_eq!(s.trending_pages, [("/p/2".to_string(), 6)]);
        assert_eq!(s.trending_products, [("Phone".to_string(), 1)]);
        assert_eq!(
            (
                s.sessions,
                s.sessions_with_page_view,
                s.sessions_that_bought
            ),
            (5, 3, 1)
        );
        assert!((s.conversion_rate - 1.0 / 3.0).abs() < 1e-9);
        let text = &h.recorded().outputs.last().unwrap().payload.clone();
        let text = String::from_utf8_lossy(text);
        assert!(text.contains("5 active users"), "{text}");
    }

    #[test]
    fn the_text_line_comes_on_one_tick_in_text_every_ticks() {
        let mut h = Harness::<Dashboard>::new(r#"{"text_every_ticks":3}"#).unwrap();
        h.run_payloads(&[event("u1", "s1", "page_view", "/", "", 1)]);
        h.set_time(1_000_000);
        for _ in 0..7 {
            h.advance(2_000);
        }
        let texts = h
            .recorded()
            .outputs
            .iter()
            .filter(|o| o.output == "text")
            .count();
        assert_eq!((summaries(&h).len(), texts), (7, 3), "ticks 1, 4 and 7");
        assert!(Harness::<Dashboard>::new(r#"{"text_every_ticks":0}"#).is_err());
    }

    #[test]
    fn a_quiet_stream_winds_down_and_the_figures_survive_a_restart() {
        let mut h = Harness::<Dashboard>::new("{}").unwrap();
        let events: Vec<String> = (0..20)
            .map(|i| event("u1", "s1", "page_view", "/", "", 100 + i))
            .collect();
        h.run_payloads(&events);
        h.restart("{}").unwrap();
        h.set_time(1_000_000);
        h.advance(10_000); // events since the last tick: now = the latest event
        assert_eq!(summaries(&h)[0].events_per_sec_10s, 1.0);
        h.advance(10_000); // quiet from here
        h.advance(10_000); // 10 s of quiet
        assert_eq!(summaries(&h)[2].events_per_sec_10s, 0.0);
        assert_eq!(summaries(&h)[2].active_users, 1);
        for _ in 0..30 {
            h.advance(10_000);
        }
        let last = summaries(&h).pop().unwrap();
        assert_eq!((last.active_users, last.events_per_sec_1m), (0, 0.0));
        assert!(last.trending_pages.is_empty());
    }

    #[test]
    fn a_late_event_counts_where_it_belongs_and_state_stays_bounded() {
        let mut h = Harness::<Dashboard>::new("{}").unwrap();
        let events: Vec<String> = (0..600)
            .map(|i| event(&format!("u{i}"), &format!("s{i}"), "click", "/", "", i))
            .collect();
        h.run_payloads(&events);
        // 5 minutes of users are kept, not all 600.
        let dash: Dash = h.state_json("dash").unwrap();
        assert_eq!(dash.users.len(), 300);
        assert!(dash.seconds.len() <= 60);
        h.run_payloads(&[event("late", "sl", "page_view", "/late", "", 590)]);
        h.set_time(1_000_000);
        h.advance(10_000);
        let s = &summaries(&h)[0];
        assert_eq!(s.active_users, 301);
        assert_eq!(s.trending_pages, [("/late".to_string(), 1)]);
    }
}
