//! analytics: the aggregates of the seed systems' `analytics_processor.py`, kept in plugin
//! state so they survive instance restarts, and a JSON snapshot of them on the `snapshots`
//! output every `snapshot_every` events and on each tick with news.
//!
//! State keys (all JSON numbers): `total`, `malformed`, `users`, `type:<event_type>`,
//! `page:<url>` (page views), `user:<id>` (events per user), `journey:<id>` (funnel stages the
//! user reached, a bit set), `funnel:<stage>` (users that reached the stage),
//! `revenue:<YYYY-MM-DDTHH>` and `revenue_total`, `product:<name>` (units purchased),
//! `country:<code>`, `snapshot_at` (the `total` of the last snapshot), and `top:users`,
//! `top:pages`, `top:products`: the largest of those counters, kept as they grow, so that a
//! snapshot reads three keys instead of scanning every user.
//!
//! Partials (issue 28, two-stage totals): with `partials` set to an output name, every batch
//! that counted events ends with one [`Partial`] on that output, keyed by its source:
//! `{"source":"user-activities/3","offset":1234,"figures":{"total":100,"malformed":1,
//! "users":40,"type:click":40,…,"revenue_total":12.5}}`. Its figures are absolute (this
//! instance's counters, not a delta), so a reducer that keeps the latest partial of each
//! source (the `eddy-reducer` plugin) sums them exactly, however often one is delivered.
//! `partial_offset` keeps how far they reach in each partition.

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
    /// The output partials go to (see the module's documentation); none: no partials.
    pub partials: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            snapshot_every: 50,
            top_n: 5,
            revenue_hours: 24,
            output: "snapshots".into(),
            partials: None,
        }
    }
}

/// The counters with a "top" list in the snapshot: their key prefix and their list's key.
const TOPS: [(&str, &str); 3] = [
    ("user:", "top:users"),
    ("page:", "top:pages"),
    ("product:", "top:products"),
];

/// The `keep` largest counters under one prefix, largest first (ties by name), kept up to
/// date as they grow. Counters only grow, so a counter outside the list can enter it only
/// when it grows itself: updating the list then keeps it exact without ever scanning.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Top {
    keep: usize,
    entries: Vec<(String, i64)>,
}

impl Top {
    /// Rebuilt from every counter under `prefix` (once: when the list is missing, e.g. state
    /// from an older version, or `top_n` grew beyond what was kept).
    fn scan(s: &mut eddy_sdk::State, prefix: &str, keep: usize) -> Top {
        let mut entries: Vec<(String, i64)> = s
            .scan_prefix(prefix, u32::MAX)
            .into_iter()
            .filter_map(|(k, v)| {
                Some((
                    k[prefix.len()..].to_string(),
                    serde_json::from_slice(&v).ok()?,
                ))
            })
            .collect();
        entries.sort_by(by_count);
        entries.truncate(keep);
        Top { keep, entries }
    }

    /// `name`'s counter is now `count`.
    fn grew(&mut self, name: &str, count: i64) {
        if let Some(entry) = self.entries.iter_mut().find(|(n, _)| n == name) {
            entry.1 = count;
        } else if self.entries.len() < self.keep
            || self
                .entries
                .last()
                .is_some_and(|(n, c)| count > *c || (count == *c && name < n.as_str()))
        {
            self.entries.push((name.to_string(), count));
        } else {
            return;
        }
        self.entries.sort_by(by_count);
        self.entries.truncate(self.keep);
    }
}

/// Largest count first, then by name.
fn by_count(a: &(String, i64), b: &(String, i64)) -> std::cmp::Ordering {
    b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0))
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

/// The partial record: this instance's absolute figures, for a reducer to sum over sources.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Partial {
    /// `<topic>/<partition>` of the events the figures count, or `<topic>/*` when they count
    /// events of more than one partition (one instance handling the whole topic).
    pub source: String,
    /// One past the last offset the figures count. For a `<topic>/*` source, the sum of that
    /// over the partitions counted: it grows with every batch all the same, so a later
    /// partial of a source always has a larger offset.
    pub offset: i64,
    /// `total`, `malformed`, `users`, `revenue_total` and every `type:<event_type>`.
    pub figures: BTreeMap<String, serde_json::Value>,
}

/// `partial_offset`: how far the figures reach in each partition.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Reach {
    /// Per partition, one past the last offset counted.
    next: BTreeMap<i32, i64>,
    /// Events were counted before partials were turned on, of partitions not recorded in
    /// `next`: the figures may count any partition, so their source is `<topic>/*`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    earlier: bool,
}

pub struct Analytics {
    config: Config,
    /// `total` before the current batch, to see whether the batch crossed a snapshot mark.
    total_at_batch_start: Option<i64>,
    /// With `partials`: the topic of the current batch's events, and per partition one past
    /// the last offset it handled.
    batch_topic: Option<String>,
    batch_reach: Vec<(i32, i64)>,
}

fn product_of<'a>(a: &'a Activity) -> Option<&'a str> {
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
        match config.partials.as_deref() {
            Some("") => return Err("partials must name an output (leave it out for none)".into()),
            Some(p) if p == config.output => {
                return Err(format!(
                    "partials must be another output than snapshots' (`{p}`)"
                ));
            }
            _ => {}
        }
        Ok(Analytics {
            config,
            total_at_batch_start: None,
            batch_topic: None,
            batch_reach: Vec::new(),
        })
    }

    fn state_keys(&self, event: &Event, keys: &mut Vec<String>) {
        if keys.is_empty() {
            keys.extend(["total", "malformed", "users", "revenue_total"].map(String::from));
            keys.extend(TOPS.map(|(_, list)| list.to_string()));
            if self.config.partials.is_some() {
                keys.push("partial_offset".into());
            }
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
            let total = s.get_json("total").unwrap_or(0);
            self.total_at_batch_start = Some(total);
            self.check_top_lists(s, total);
        }
        if self.config.partials.is_some() {
            self.reached(event);
        }
        s.incr("total", 1);
        let a = match event.activity() {
            Ok(a) => a,
            Err(e) => {
                s.incr("malformed", 1);
                return Verdict::DeadLetter(e.to_string());
            }
        };
        s.incr(("type:", a.event_type.as_str()), 1);
        let count = s.incr(("user:", &a.user_id), 1);
        if count == 1 {
            s.incr("users", 1);
        }
        s.json_mut::<Top>("top:users").grew(&a.user_id, count);
        if let Some((_, bit, stage)) = FUNNEL.iter().find(|(t, _, _)| *t == a.event_type) {
            let reached: &mut u8 = s.json_mut(("journey:", &a.user_id));
            if *reached & bit == 0 {
                *reached |= bit;
                s.incr(("funnel:", stage), 1);
            }
        }
        if a.event_type == EventType::PageView
            && let Some(page) = &a.page_url
        {
            let count = s.incr(("page:", page), 1);
            s.json_mut::<Top>("top:pages").grew(page, count);
        }
        if let Some(c) = a.country() {
            s.incr(("country:", c), 1);
        }
        if a.event_type == EventType::Purchase {
            let amount = a.amount().unwrap_or(0.0);
            s.add_f64("revenue_total", amount);
            if let Some(h) = a.hour() {
                s.add_f64(("revenue:", h), amount);
            }
            if let Some(p) = product_of(a) {
                let count = s.incr(
                    ("product:", p),
                    i64::from(a.properties.quantity.unwrap_or(1).max(1)),
                );
                s.json_mut::<Top>("top:products").grew(p, count);
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
        let topic = self.batch_topic.take();
        let reach = std::mem::take(&mut self.batch_reach);
        if let (Some(output), Some(topic)) = (&self.config.partials, topic)
            && after != before
        {
            let partial = partial(&mut ctx.state, &topic, &reach, before);
            ctx.emit_json(output, Some(partial.source.as_bytes()), &partial);
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
    /// Notes that the batch reached `event` (for the partial).
    fn reached(&mut self, event: &Event) {
        if self.batch_topic.is_none() {
            self.batch_topic = Some(event.topic.to_string());
        }
        let next = event.offset.saturating_add(1);
        match self
            .batch_reach
            .iter_mut()
            .find(|(p, _)| *p == event.partition)
        {
            Some((_, n)) => *n = (*n).max(next),
            None => self.batch_reach.push((event.partition, next)),
        }
    }

    /// Makes sure each top list exists and keeps at least `top_n` entries, rebuilding it
    /// from its counters if not. Called once per batch, before its first event counts, with
    /// the events counted so far (none: nothing to scan).
    fn check_top_lists(&self, s: &mut eddy_sdk::State, total: i64) {
        let keep = self.config.top_n;
        for (prefix, list) in TOPS {
            let ok = s.get_json::<Top>(list).is_some_and(|t| t.keep >= keep);
            if !ok {
                let top = if total == 0 {
                    Top {
                        keep,
                        entries: Vec::new(),
                    }
                } else {
                    Top::scan(s, prefix, keep)
                };
                s.set_json(list, &top);
            }
        }
    }

    fn emit_snapshot(&self, ctx: &mut Context, total: i64) {
        self.check_top_lists(&mut ctx.state, total);
        let snapshot = snapshot(&mut ctx.state, self.config.top_n, self.config.revenue_hours);
        ctx.state.set_json("snapshot_at", &total);
        ctx.emit_json(&self.config.output, None, &snapshot);
    }
}

/// Records how far the batch reached (`reach`, per partition) in `partial_offset`, and builds
/// the partial of the figures in state. `before`: `total` before the batch (events counted
/// while partials were off, if `partial_offset` is new).
fn partial(s: &mut eddy_sdk::State, topic: &str, reach: &[(i32, i64)], before: i64) -> Partial {
    let mut covered: Reach = s.get_json("partial_offset").unwrap_or(Reach {
        next: BTreeMap::new(),
        earlier: before > 0,
    });
    for &(p, next) in reach {
        let n = covered.next.entry(p).or_insert(next);
        *n = (*n).max(next);
    }
    s.set_json("partial_offset", &covered);
    let (source, offset) = match covered.next.first_key_value() {
        Some((p, next)) if covered.next.len() == 1 && !covered.earlier => {
            (format!("{topic}/{p}"), *next)
        }
        _ => (format!("{topic}/*"), covered.next.values().sum()),
    };
    let mut figures = BTreeMap::new();
    for key in ["total", "malformed", "users"] {
        figures.insert(key.to_string(), s.get_json::<i64>(key).unwrap_or(0).into());
    }
    let revenue = cents(s.get_json("revenue_total").unwrap_or(0.0));
    figures.insert("revenue_total".into(), revenue.into());
    for (key, value) in s.scan_prefix("type:", u32::MAX) {
        if let Ok(n) = serde_json::from_slice::<i64>(&value) {
            figures.insert(key, n.into());
        }
    }
    Partial {
        source,
        offset,
        figures,
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
    let top = |s: &mut eddy_sdk::State, list: &str| {
        let mut entries = s.get_json::<Top>(list).unwrap_or_default().entries;
        entries.truncate(top_n);
        entries
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
        top_pages: top(s, "top:pages"),
        top_products: top(s, "top:products"),
        top_users: top(s, "top:users"),
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
    fn top_lists_kept_as_counters_grow_match_a_full_scan() {
        let mut h = Harness::<Analytics>::new(r#"{"snapshot_every": 50, "top_n": 3}"#).unwrap();
        // Uneven traffic over 40 users, 9 pages and 6 products, in batches of 25.
        let mut seed = 7u64;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for _ in 0..16 {
            let batch: Vec<Vec<u8>> = (0..25)
                .map(|_| {
                    let user = format!("u{}", next(40) * next(40) / 40);
                    if next(2) == 0 {
                        ev(
                            &user,
                            "page_view",
                            &format!(r#","page_url":"/p{}""#, next(9)),
                        )
                    } else {
                        let extra = format!(
                            r#","properties":{{"product_name":"x{}","price":5,"quantity":{}}}"#,
                            next(6),
                            next(3) + 1
                        );
                        ev(&user, "purchase", &extra)
                    }
                })
                .collect();
            h.run_payloads(&batch);
        }
        let full_scan = |h: &Harness<Analytics>, prefix: &str, n: usize| {
            let mut all: Vec<(String, i64)> = h
                .recorded()
                .state
                .iter()
                .filter_map(|(k, v)| {
                    let name = k.strip_prefix(prefix)?;
                    Some((name.to_string(), serde_json::from_slice(v).unwrap()))
                })
                .collect();
            all.sort_by(by_count);
            all.truncate(n);
            all
        };
        let last = |h: &Harness<Analytics>| -> Snapshot {
            serde_json::from_value(h.outputs_json("snapshots").pop().unwrap()).unwrap()
        };
        let snap = last(&h);
        assert_eq!(snap.total_events, 400);
        assert_eq!(snap.top_users, full_scan(&h, "user:", 3));
        assert_eq!(snap.top_pages, full_scan(&h, "page:", 3));
        assert_eq!(snap.top_products, full_scan(&h, "product:", 3));

        // A larger top_n than was kept: the lists are rebuilt from the counters once.
        h.restart(r#"{"snapshot_every": 50, "top_n": 5}"#).unwrap();
        h.tick(1);
        h.run_payloads(&[ev("u1", "click", "")]);
        h.tick(2);
        let snap = last(&h);
        assert_eq!(snap.top_users, full_scan(&h, "user:", 5));
        assert_eq!(snap.top_pages.len(), 5);
        assert_eq!(snap.top_pages, full_scan(&h, "page:", 5));
    }

    /// A batch of `payloads` on `partition` of user-activities, from `offset` on.
    fn on_partition(
        h: &mut Harness<Analytics>,
        partition: i32,
        offset: i64,
        payloads: &[Vec<u8>],
    ) -> Vec<Verdict> {
        let events: Vec<Event> = payloads
            .iter()
            .enumerate()
            .map(|(i, p)| Event::new("user-activities", partition, offset + i as i64, None, p))
            .collect();
        h.run(&events)
    }

    fn partials(h: &Harness<Analytics>) -> Vec<(Vec<u8>, Partial)> {
        h.recorded()
            .outputs
            .iter()
            .filter(|r| r.output == "partials")
            .map(|r| {
                let key = r.key.clone().expect("partials are keyed by their source");
                (key, serde_json::from_slice(&r.payload).unwrap())
            })
            .collect()
    }

    #[test]
    fn each_batch_that_counts_ends_with_an_absolute_partial_of_its_partition() {
        let config = r#"{"snapshot_every": 1000, "partials": "partials"}"#;
        let mut h = Harness::<Analytics>::new(config).unwrap();
        let purchase = ev(
            "b",
            "purchase",
            r#","properties":{"product_name":"Laptop","price":10.25}"#,
        );
        let first = [ev("a", "click", ""), purchase.clone(), b"nope".to_vec()];
        on_partition(&mut h, 3, 100, &first);
        let got = partials(&h);
        assert_eq!(got.len(), 1, "one partial per batch");
        let (key, p) = &got[0];
        assert_eq!(key, b"user-activities/3");
        assert_eq!(p.source, "user-activities/3");
        assert_eq!(p.offset, 103, "one past the last event's offset");
        let expected = serde_json::json!({
            "total": 3, "malformed": 1, "users": 2,
            "type:click": 1, "type:purchase": 1, "revenue_total": 10.25,
        });
        assert_eq!(serde_json::to_value(&p.figures).unwrap(), expected);
        assert_eq!(h.outputs_json("snapshots").len(), 0);

        // Absolute, not a delta; the offset outlives the instance.
        h.restart(config).unwrap();
        on_partition(&mut h, 3, 103, &[purchase]);
        let (_, p) = partials(&h).pop().unwrap();
        assert_eq!(p.source, "user-activities/3");
        assert_eq!(p.offset, 104);
        assert_eq!(p.figures["total"], 4);
        assert_eq!(p.figures["type:purchase"], 2);
        assert_eq!(p.figures["revenue_total"], 20.5);
        assert_eq!(
            h.state_json::<serde_json::Value>("partial_offset").unwrap()["next"]["3"],
            104
        );

        // The partial costs a few host calls per batch (a scan of `type:`, and the write-back
        // it flushes), not one per event.
        let batch: Vec<Vec<u8>> = (0..200)
            .map(|i| ev(&format!("u{}", i % 7), "click", ""))
            .collect();
        on_partition(&mut h, 3, 104, &batch);
        let calls = h.recorded().host_calls;
        on_partition(&mut h, 3, 304, &batch);
        let calls = h.recorded().host_calls - calls;
        assert!(calls <= 5, "{calls} host calls for 200 events");
        let (_, p) = partials(&h).pop().unwrap();
        assert_eq!(
            (p.offset, &p.figures["total"]),
            (504, &serde_json::json!(404))
        );

        // A batch with no events says nothing new (a tick neither).
        h.run(&[]);
        h.tick(1);
        assert_eq!(partials(&h).len(), 4);

        // Events of another partition too: the instance counts the whole topic, and says so.
        on_partition(&mut h, 0, 7, &[ev("c", "click", "")]);
        let (key, p) = partials(&h).pop().unwrap();
        assert_eq!(key, b"user-activities/*");
        assert_eq!(p.source, "user-activities/*");
        assert_eq!(
            p.offset,
            504 + 8,
            "the sum over the partitions, still growing"
        );
        assert_eq!(p.figures["total"], 405);
        on_partition(&mut h, 3, 504, &[ev("c", "click", "")]);
        let (_, p) = partials(&h).pop().unwrap();
        assert_eq!((p.source.as_str(), p.offset), ("user-activities/*", 513));
    }

    #[test]
    fn partials_turned_on_over_counted_events_do_not_name_one_partition() {
        let mut h = Harness::<Analytics>::new("{}").unwrap();
        on_partition(&mut h, 1, 0, &[ev("a", "click", "")]);
        assert!(partials(&h).is_empty(), "off by default");
        h.restart(r#"{"partials": "partials"}"#).unwrap();
        on_partition(&mut h, 2, 0, &[ev("a", "click", "")]);
        let (_, p) = partials(&h).pop().unwrap();
        assert_eq!((p.source.as_str(), p.offset), ("user-activities/*", 1));
        assert_eq!(p.figures["total"], 2);
    }

    #[test]
    fn partials_need_an_output_of_their_own() {
        assert!(Harness::<Analytics>::new(r#"{"partials": ""}"#).is_err());
        assert!(Harness::<Analytics>::new(r#"{"partials": "snapshots"}"#).is_err());
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
        // One to hear of expired keys, one read of the keys, one write-back (and one more,
        // at most, for a key read on its own).
        assert!(calls <= 4, "{calls} host calls for 200 events");
    }
}
