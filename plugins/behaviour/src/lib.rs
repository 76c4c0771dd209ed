//! behaviour: seed 002's `behavior_analyzer.py`. Rebuilds each visit as a session (by
//! `session_id`, or by user with an inactivity gap when the event has none) and, once a
//! session has ended (no event for `session_gap_secs` of event time, or the stream has been
//! quiet that long), folds it into the insights: the most common navigation paths (the
//! session's first pages), drop-off points (the last page of sessions that did not buy), time
//! to purchase (first event of a session to its first purchase, as a distribution), and
//! segments (configurable rules, first match wins) with their engagement score and device
//! preference. Insights go to `output` every `insights_every` events and on ticks with news.
//!
//! State: open sessions in the SDK's session windows (closed ones are folded in and deleted),
//! and one `insights` value whose path and drop-off tables keep at most `max_paths` entries
//! (the rarest go first), so state stays bounded however many users come.

use eddy_sdk::window::{Closed, Windows};
use eddy_sdk::{Context, Event, EventType, Plugin, Verdict};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A segment rule: a session belongs to the first segment whose every condition holds.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Segment {
    pub name: String,
    #[serde(default)]
    pub min_purchases: u32,
    #[serde(default)]
    pub min_add_to_carts: u32,
    #[serde(default)]
    pub min_searches: u32,
    #[serde(default)]
    pub min_page_views: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// A session ends after this long without an event (event time).
    pub session_gap_secs: i64,
    /// How far behind the latest event time an event may be and still join its session
    /// (events of several partitions arrive interleaved); sessions end that much later.
    pub lateness_secs: i64,
    /// On a quiet stream, sessions end once nothing arrived for this long (host time);
    /// `session_gap_secs` by default.
    pub idle_close_secs: Option<i64>,
    /// Emit insights each time this many more events have been seen.
    pub insights_every: u64,
    /// How many pages from a session's start make its navigation path.
    pub path_pages: usize,
    /// Most paths (and drop-off pages) kept.
    pub max_paths: usize,
    /// How many of each top list the insights show.
    pub top_n: usize,
    /// First match wins; a session matching none is in no segment.
    pub segments: Vec<Segment>,
    pub output: String,
}

impl Default for Config {
    fn default() -> Self {
        let segment = |name: &str, purchases, searches, page_views| Segment {
            name: name.into(),
            min_purchases: purchases,
            min_add_to_carts: 0,
            min_searches: searches,
            min_page_views: page_views,
        };
        Config {
            session_gap_secs: 1800,
            lateness_secs: 60,
            idle_close_secs: None,
            insights_every: 100,
            path_pages: 3,
            max_paths: 1000,
            top_n: 5,
            segments: vec![
                segment("buyers", 1, 0, 0),
                segment("researchers", 0, 2, 0),
                segment("researchers", 0, 0, 5),
                segment("browsers", 0, 0, 0),
            ],
            output: "insights".into(),
        }
    }
}

/// One session while it is open.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct Visit {
    pub user: String,
    pub first_ms: i64,
    /// Pages viewed, in order (the first `path_pages`), and the last one.
    pub pages: Vec<String>,
    pub last_page: Option<String>,
    pub page_views: u32,
    pub clicks: u32,
    pub searches: u32,
    pub add_to_carts: u32,
    pub purchases: u32,
    pub first_purchase_ms: Option<i64>,
    pub device: Option<String>,
}

/// Two parts of one session a late event joined.
fn merge(a: &mut Visit, b: Visit) {
    let (first, second) = if b.first_ms < a.first_ms {
        (b, std::mem::take(a))
    } else {
        (std::mem::take(a), b)
    };
    let mut pages = first.pages;
    pages.extend(second.pages);
    *a = Visit {
        user: first.user,
        first_ms: first.first_ms,
        pages,
        last_page: second.last_page.or(first.last_page),
        page_views: first.page_views + second.page_views,
        clicks: first.clicks + second.clicks,
        searches: first.searches + second.searches,
        add_to_carts: first.add_to_carts + second.add_to_carts,
        purchases: first.purchases + second.purchases,
        first_purchase_ms: match (first.first_purchase_ms, second.first_purchase_ms) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        },
        device: first.device.or(second.device),
    };
}

/// The engagement score of a session, 0-100: page views and clicks 1 point, searches 2,
/// add-to-carts 3, purchases 5.
pub fn engagement(v: &Visit) -> u32 {
    (v.page_views + v.clicks + 2 * v.searches + 3 * v.add_to_carts + 5 * v.purchases).min(100)
}

/// Upper bounds (seconds) of the time-to-purchase buckets; the last bucket is open.
pub const TIME_TO_PURCHASE_BUCKETS: [(&str, i64); 5] = [
    ("<1m", 60),
    ("1-5m", 300),
    ("5-15m", 900),
    ("15-60m", 3600),
    (">=1h", i64::MAX),
];

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct SegmentFigures {
    pub sessions: u64,
    pub engagement_total: u64,
    pub devices: BTreeMap<String, u64>,
}

/// What has been learnt from ended sessions.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Insights {
    events: u64,
    sessions: u64,
    purchasing_sessions: u64,
    paths: BTreeMap<String, u64>,
    drop_offs: BTreeMap<String, u64>,
    time_to_purchase: BTreeMap<String, u64>,
    time_to_purchase_total_s: i64,
    segments: BTreeMap<String, SegmentFigures>,
    /// `events` when insights were last emitted.
    emitted_at: u64,
}

/// The insights record.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub events: u64,
    pub sessions: u64,
    pub purchasing_sessions: u64,
    pub top_paths: Vec<(String, u64)>,
    pub top_drop_offs: Vec<(String, u64)>,
    pub time_to_purchase: BTreeMap<String, u64>,
    pub mean_time_to_purchase_s: Option<f64>,
    /// Per segment: sessions, mean engagement, devices by sessions, preferred device.
    pub segments: BTreeMap<String, SegmentReport>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct SegmentReport {
    pub sessions: u64,
    pub mean_engagement: f64,
    pub devices: BTreeMap<String, u64>,
    pub preferred_device: Option<String>,
}

fn top(map: &BTreeMap<String, u64>, n: usize) -> Vec<(String, u64)> {
    let mut all: Vec<(String, u64)> = map.iter().map(|(k, v)| (k.clone(), *v)).collect();
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    all.truncate(n);
    all
}

/// Counts `key` in `map`, keeping at most `max` entries: past it, the rarest (then the
/// greatest name) goes.
fn count_bounded(map: &mut BTreeMap<String, u64>, key: String, max: usize) {
    *map.entry(key).or_default() += 1;
    while map.len() > max.max(1) {
        let rarest = map
            .iter()
            .min_by(|a, b| a.1.cmp(b.1).then_with(|| b.0.cmp(a.0)))
            .map(|(k, _)| k.clone())
            .expect("not empty");
        map.remove(&rarest);
    }
}

pub struct Behaviour {
    config: Config,
    sessions: Windows<Visit>,
}

impl Behaviour {
    /// Folds ended sessions into the insights.
    fn fold(&self, ctx: &mut Context, ended: Vec<Closed<Visit>>) {
        if ended.is_empty() {
            return;
        }
        let c = &self.config;
        let insights: &mut Insights = ctx.state.json_mut("insights");
        for Closed { agg: v, .. } in ended {
            insights.sessions += 1;
            if !v.pages.is_empty() {
                count_bounded(&mut insights.paths, v.pages.join(" > "), c.max_paths);
            }
            match v.first_purchase_ms {
                Some(t) => {
                    insights.purchasing_sessions += 1;
                    let secs = (t - v.first_ms).max(0) / 1000;
                    let bucket = TIME_TO_PURCHASE_BUCKETS
                        .iter()
                        .find(|(_, upper)| secs < *upper)
                        .map_or(">=1h", |(name, _)| name);
                    *insights.time_to_purchase.entry(bucket.into()).or_default() += 1;
                    insights.time_to_purchase_total_s += secs;
                }
                None => {
                    if let Some(page) = &v.last_page {
                        count_bounded(&mut insights.drop_offs, page.clone(), c.max_paths);
                    }
                }
            }
            if let Some(segment) = c.segments.iter().find(|s| {
                v.purchases >= s.min_purchases
                    && v.add_to_carts >= s.min_add_to_carts
                    && v.searches >= s.min_searches
                    && v.page_views >= s.min_page_views
            }) {
                let figures = insights.segments.entry(segment.name.clone()).or_default();
                figures.sessions += 1;
                figures.engagement_total += u64::from(engagement(&v));
                let device = v.device.clone().unwrap_or_else(|| "unknown".into());
                *figures.devices.entry(device).or_default() += 1;
            }
        }
    }

    fn report(&self, ctx: &mut Context) -> Report {
        let insights: &mut Insights = ctx.state.json_mut("insights");
        insights.emitted_at = insights.events;
        let n = self.config.top_n;
        Report {
            events: insights.events,
            sessions: insights.sessions,
            purchasing_sessions: insights.purchasing_sessions,
            top_paths: top(&insights.paths, n),
            top_drop_offs: top(&insights.drop_offs, n),
            time_to_purchase: insights.time_to_purchase.clone(),
            mean_time_to_purchase_s: (insights.purchasing_sessions > 0).then(|| {
                insights.time_to_purchase_total_s as f64 / insights.purchasing_sessions as f64
            }),
            segments: insights
                .segments
                .iter()
                .map(|(name, f)| {
                    let preferred = top(&f.devices, 1).pop().map(|(d, _)| d);
                    (
                        name.clone(),
                        SegmentReport {
                            sessions: f.sessions,
                            mean_engagement: f.engagement_total as f64 / f.sessions.max(1) as f64,
                            devices: f.devices.clone(),
                            preferred_device: preferred,
                        },
                    )
                })
                .collect(),
        }
    }
}

impl Plugin for Behaviour {
    type Config = Config;

    fn init(config: Config, _ctx: &mut Context) -> Result<Self, String> {
        if config.session_gap_secs < 1 {
            return Err("session_gap_secs must be at least 1".into());
        }
        if config.insights_every == 0 {
            return Err("insights_every must be at least 1".into());
        }
        if config.output.is_empty() {
            return Err("output must name an output".into());
        }
        if let Some(s) = config.segments.iter().find(|s| s.name.is_empty()) {
            return Err(format!("a segment needs a name: {s:?}"));
        }
        let gap = config.session_gap_secs * 1000;
        if config.lateness_secs < 0 {
            return Err("lateness_secs must not be negative".into());
        }
        let sessions = Windows::session("sessions", gap, merge)
            .allowed_lateness(config.lateness_secs * 1000)
            .close_when_idle(config.idle_close_secs.map_or(gap, |s| s.max(1) * 1000));
        Ok(Behaviour { config, sessions })
    }

    fn on_event(&mut self, event: &Event, ctx: &mut Context) -> Verdict {
        let a = match event.activity() {
            Ok(a) => a,
            Err(e) => return Verdict::DeadLetter(e.to_string()),
        };
        let t = match event.time() {
            Ok(t) => t,
            Err(e) => return Verdict::DeadLetter(format!("{e}: sessions need the event's time")),
        };
        ctx.state.json_mut::<Insights>("insights").events += 1;
        let key = match &a.session_id {
            Some(s) => format!("s:{s}"),
            None => format!("u:{}", a.user_id),
        };
        let path_pages = self.config.path_pages;
        let added = self
            .sessions
            .add(&mut ctx.state, event.partition, &key, t, |v| {
                if v.user.is_empty() {
                    v.user = a.user_id.to_string();
                    v.first_ms = t;
                }
                v.first_ms = v.first_ms.min(t);
                if v.device.is_none() {
                    v.device = a
                        .device
                        .as_ref()
                        .and_then(|d| d.kind.as_deref())
                        .map(str::to_string);
                }
                match a.event_type {
                    EventType::PageView => {
                        v.page_views += 1;
                        if let Some(page) = &a.page_url {
                            if v.pages.len() < path_pages {
                                v.pages.push(page.to_string());
                            }
                            v.last_page = Some(page.to_string());
                        }
                    }
                    EventType::Click => v.clicks += 1,
                    EventType::Search => v.searches += 1,
                    EventType::AddToCart => v.add_to_carts += 1,
                    EventType::Purchase => {
                        v.purchases += 1;
                        v.first_purchase_ms = Some(v.first_purchase_ms.map_or(t, |p| p.min(t)));
                    }
                    _ => {}
                }
            });
        match added {
            eddy_sdk::Added::Counted => Verdict::Ok,
            // Its session ended and was folded in already.
            eddy_sdk::Added::TooLate => Verdict::Skip,
        }
    }

    fn on_batch_end(&mut self, ctx: &mut Context) {
        let ended = self.sessions.close_due(&mut ctx.state);
        self.fold(ctx, ended);
        let insights: Insights = ctx.state.get_json("insights").unwrap_or_default();
        let every = self.config.insights_every;
        if insights.events / every > insights.emitted_at / every {
            let report = self.report(ctx);
            ctx.emit_json(&self.config.output, None, &report);
        }
    }

    fn on_tick(&mut self, now_ms: i64, ctx: &mut Context) {
        let ended = self.sessions.tick(&mut ctx.state, now_ms);
        let news = !ended.is_empty();
        self.fold(ctx, ended);
        let insights: Insights = ctx.state.get_json("insights").unwrap_or_default();
        if news || insights.events != insights.emitted_at {
            let report = self.report(ctx);
            ctx.emit_json(&self.config.output, None, &report);
        }
    }
}

eddy_sdk::plugin!(Behaviour);

#[cfg(test)]
mod tests {
    use super::*;
    use eddy_sdk::testing::Harness;

    /// An event at `t` seconds past 10:00.
    fn event(user: &str, session: Option<&str>, kind: &str, page: &str, t: i64) -> String {
        let ts = format!(
            "2024-01-15T{:02}:{:02}:{:02}Z",
            10 + t / 3600,
            t / 60 % 60,
            t % 60
        );
        let session = session.map_or(String::new(), |s| format!(r#""session_id":"{s}","#));
        format!(
            r#"{{"user_id":"{user}",{session}"event_type":"{kind}","page_url":"{page}","timestamp":"{ts}","device":{{"type":"mobile"}}}}"#
        )
    }

    fn reports(h: &Harness<Behaviour>) -> Vec<Report> {
        h.outputs_json("insights")
            .into_iter()
            .map(|v| serde_json::from_value(v).unwrap())
            .collect()
    }

    const CONFIG: &str = r#"{"session_gap_secs": 60, "lateness_secs": 0, "insights_every": 1000}"#;

    #[test]
    fn ended_sessions_give_paths_drop_offs_time_to_purchase_and_segments() {
        let mut h = Harness::<Behaviour>::new(CONFIG).unwrap();
        // In event time order, as one partition delivers them.
        h.run_payloads(&[
            // s1 buys 90 s after its first event; s2 searches twice and leaves from
            // /search; u3 has no session id: its events 2 minutes apart are two visits.
            event("u1", Some("s1"), "page_view", "/home", 0),
            event("u3", None, "page_view", "/home", 0),
            event("u2", Some("s2"), "page_view", "/home", 10),
            event("u2", Some("s2"), "search", "/search", 20),
            event("u2", Some("s2"), "search", "/search", 25),
            event("u2", Some("s2"), "page_view", "/search", 26),
            event("u1", Some("s1"), "page_view", "/p/1", 30),
            event("u1", Some("s1"), "add_to_cart", "/p/1", 60),
            event("u1", Some("s1"), "purchase", "/checkout", 90),
            event("u3", None, "page_view", "/p/2", 120),
        ]);
        // Not ended yet (the gap is 60 s; the latest event is at 120 s).
        h.set_time(1_000_000);
        h.advance(10_000);
        assert_eq!(
            reports(&h)[0].sessions,
            2,
            "s2 (last 26 s) and u3's first visit"
        );
        // An event at 400 s ends everything before 340 s.
        h.run_payloads(&[event("u9", Some("s9"), "click", "/", 400)]);
        h.advance(10_000);
        let r = reports(&h).pop().unwrap();
        assert_eq!((r.sessions, r.purchasing_sessions), (4, 1));
        let paths: BTreeMap<String, u64> = r.top_paths.into_iter().collect();
        assert_eq!(paths["/home > /p/1"], 1, "s1: path pages are page views");
        assert_eq!(paths["/home > /search"], 1);
        assert_eq!(paths["/p/2"], 1);
        assert_eq!(paths["/home"], 1);
        let drops: BTreeMap<String, u64> = r.top_drop_offs.into_iter().collect();
        assert_eq!(drops["/search"], 1);
        assert_eq!(drops["/home"], 1);
        assert_eq!(drops["/p/2"], 1);
        assert_eq!(r.time_to_purchase["1-5m"], 1);
        assert_eq!(r.mean_time_to_purchase_s, Some(90.0));
        assert_eq!(r.segments["buyers"].sessions, 1);
        assert_eq!(r.segments["researchers"].sessions, 1);
        assert_eq!(r.segments["browsers"].sessions, 2);
        // s1: 2 views + 1 add-to-cart (3) + 1 purchase (5) = 10.
        assert_eq!(r.segments["buyers"].mean_engagement, 10.0);
        assert_eq!(
            r.segments["buyers"].preferred_device.as_deref(),
            Some("mobile")
        );
    }

    #[test]
    fn a_quiet_stream_ends_its_sessions_on_ticks_and_state_keeps_only_open_ones() {
        let mut h = Harness::<Behaviour>::new(CONFIG).unwrap();
        let events: Vec<String> = (0..50)
            .map(|i| {
                event(
                    &format!("u{i}"),
                    Some(&format!("s{i}")),
                    "page_view",
                    "/",
                    i,
                )
            })
            .collect();
        h.run_payloads(&events);
        h.restart(CONFIG).unwrap();
        h.set_time(1_000_000);
        h.advance(10_000); // events since the last tick
        h.advance(10_000); // quiet from here
        assert_eq!(reports(&h).last().unwrap().sessions, 0);
        for _ in 0..7 {
            h.advance(10_000);
        }
        assert_eq!(reports(&h).last().unwrap().sessions, 50);
        let open = h
            .recorded()
            .state
            .keys()
            .filter(|k| k.starts_with("__eddy.win.sessions/"))
            .count();
        assert_eq!(open, 0, "ended sessions are folded in and dropped");
    }

    #[test]
    fn insights_every_n_events_and_paths_stay_bounded() {
        let config = r#"{"session_gap_secs": 1, "lateness_secs": 0, "insights_every": 100, "max_paths": 10}"#;
        let mut h = Harness::<Behaviour>::new(config).unwrap();
        let events: Vec<String> = (0..250)
            .map(|i| {
                event(
                    "u",
                    Some(&format!("s{i}")),
                    "page_view",
                    &format!("/p/{i}"),
                    i * 10,
                )
            })
            .collect();
        for chunk in events.chunks(50) {
            h.run_payloads(chunk);
        }
        let r = reports(&h);
        assert_eq!(r.len(), 2, "at 100 and 200 events");
        let insights: Insights = h.state_json("insights").unwrap();
        assert!(insights.paths.len() <= 10);
        assert!(insights.drop_offs.len() <= 10);
        assert_eq!(insights.sessions, 249, "all but the last have ended");
    }
}
