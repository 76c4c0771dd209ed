//! Realistic user-activity traffic (seed 002's producer), for `eddy produce`, for the
//! in-process generator of `eddy run`, and for tests and benchmarks.
//!
//! Users browse in sessions: each session has a user, a device, a place and an IP address, and
//! its events follow the seed's mix (60% page views, 25% clicks, 10% searches, 3% add-to-cart,
//! 2% purchases) over a small catalogue, with purchases of what is in the cart. Optionally,
//! every `fraud_every` events a burst of high-value purchases by one user from several
//! countries and IP addresses is injected, which the fraud plugin should flag.
//!
//! The same seed gives the same events (a SplitMix64 generator of our own, so the sequence
//! does not change with a dependency's version); with a fixed `start_ms` the timestamps
//! are reproducible too.

mod produce;

pub use produce::{ProduceOptions, Undelivered, produce_blocking};

use crate::clock::format_rfc3339_ms;
use serde_json::json;

/// A small, fast, reproducible random number generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

struct Product {
    id: &'static str,
    name: &'static str,
    price: f64,
    category: &'static str,
}

const PRODUCTS: [Product; 6] = [
    Product {
        id: "PROD-001",
        name: "Laptop",
        price: 999.99,
        category: "electronics",
    },
    Product {
        id: "PROD-002",
        name: "Mouse",
        price: 29.99,
        category: "accessories",
    },
    Product {
        id: "PROD-003",
        name: "Keyboard",
        price: 79.99,
        category: "accessories",
    },
    Product {
        id: "PROD-004",
        name: "Monitor",
        price: 299.99,
        category: "electronics",
    },
    Product {
        id: "PROD-005",
        name: "Headphones",
        price: 149.99,
        category: "audio",
    },
    Product {
        id: "PROD-006",
        name: "Phone",
        price: 1299.0,
        category: "electronics",
    },
];
const PAGES: [&str; 6] = [
    "/",
    "/category/electronics",
    "/category/accessories",
    "/deals",
    "/cart",
    "/account",
];
const SEARCHES: [&str; 6] = [
    "laptop deals",
    "wireless mouse",
    "mechanical keyboard",
    "4k monitor",
    "noise cancelling headphones",
    "phone",
];
const REFERRERS: [&str; 4] = [
    "https://google.com",
    "https://bing.com",
    "direct",
    "https://newsletter.example.com",
];
const PLACES: [(&str, &str, &str); 8] = [
    ("US", "New York", "America/New_York"),
    ("US", "San Francisco", "America/Los_Angeles"),
    ("GB", "London", "Europe/London"),
    ("DE", "Berlin", "Europe/Berlin"),
    ("IN", "Bangalore", "Asia/Kolkata"),
    ("BR", "Sao Paulo", "America/Sao_Paulo"),
    ("JP", "Tokyo", "Asia/Tokyo"),
    ("FR", "Paris", "Europe/Paris"),
];
const DEVICES: [(&str, &str, &str, &str); 6] = [
    (
        "desktop",
        "Windows",
        "Chrome",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/120.0",
    ),
    (
        "desktop",
        "macOS",
        "Safari",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_2) Safari/605.1",
    ),
    (
        "desktop",
        "Linux",
        "Firefox",
        "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Firefox/121.0",
    ),
    (
        "mobile",
        "iOS",
        "Safari",
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_2) Safari/604.1",
    ),
    (
        "mobile",
        "Android",
        "Chrome",
        "Mozilla/5.0 (Linux; Android 14) Chrome/120.0 Mobile",
    ),
    (
        "tablet",
        "iOS",
        "Safari",
        "Mozilla/5.0 (iPad; CPU OS 17_2) Safari/604.1",
    ),
];
/// Sessions in progress at once.
const ACTIVE_SESSIONS: usize = 32;
/// Purchases in one injected fraud burst.
pub const FRAUD_BURST: u64 = 6;

struct Session {
    user: String,
    id: String,
    place: usize,
    device: usize,
    ip: String,
    product: usize,
    cart: Vec<usize>,
}

/// How the generator behaves.
#[derive(Debug, Clone)]
pub struct GeneratorOptions {
    pub seed: u64,
    /// Inject a fraud burst every this many events (0: never).
    pub fraud_every: u64,
    /// Timestamp of the first event, in Unix milliseconds.
    pub start_ms: i64,
    /// Time between consecutive events' timestamps.
    pub spacing_ms: i64,
    /// How many distinct users sessions are drawn from.
    pub users: u64,
    /// Mean events of a session (a new session, and user, replaces it with a chance of one
    /// in this many per event).
    pub session_events: u64,
    /// Give each Kafka record its event's time as its timestamp (else the producer's clock
    /// stamps it). With a `spacing_ms` larger than the real pace, this simulates hours of
    /// traffic in minutes for the plugins' event clock (`[plugin.expire]`); a broker may
    /// refuse timestamps far in the future (Kafka 3.6+: more than an hour, by default).
    pub event_timestamps: bool,
}

/// The users sessions are drawn from unless told otherwise.
pub const DEFAULT_USERS: u64 = 5000;
/// Mean events of a session unless told otherwise.
pub const DEFAULT_SESSION_EVENTS: u64 = 30;

impl Default for GeneratorOptions {
    fn default() -> Self {
        GeneratorOptions {
            seed: 42,
            fraud_every: 0,
            start_ms: 0,
            spacing_ms: 1,
            users: DEFAULT_USERS,
            session_events: DEFAULT_SESSION_EVENTS,
            event_timestamps: false,
        }
    }
}

/// One generated record.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The Kafka key: the user id, so a user's events stay in one partition, in order.
    pub key: String,
    pub payload: Vec<u8>,
    /// The event's time (its `timestamp` field), Unix milliseconds.
    pub time_ms: i64,
}

/// An endless stream of events.
pub struct Generator {
    rng: Rng,
    opts: GeneratorOptions,
    sessions: Vec<Session>,
    produced: u64,
    /// Events of a fraud burst still to come.
    burst: Vec<Generated>,
    bursts: u64,
}

impl Generator {
    pub fn new(opts: GeneratorOptions) -> Generator {
        let mut rng = Rng::new(opts.seed);
        let sessions = (0..ACTIVE_SESSIONS)
            .map(|_| new_session(&mut rng, opts.users))
            .collect();
        Generator {
            rng,
            opts,
            sessions,
            produced: 0,
            burst: Vec::new(),
            bursts: 0,
        }
    }

    fn now_ms(&self) -> i64 {
        self.opts.start_ms + self.produced as i64 * self.opts.spacing_ms
    }

    fn next_event(&mut self) -> Generated {
        if self.burst.is_empty()
            && self.opts.fraud_every > 0
            && self.produced > 0
            && self.produced.is_multiple_of(self.opts.fraud_every)
        {
            self.start_burst();
        }
        if !self.burst.is_empty() {
            return self.burst.remove(0);
        }
        let rng = &mut self.rng;
        let i = rng.below(self.sessions.len() as u64) as usize;
        if rng.below(self.opts.session_events.max(1)) == 0 {
            self.sessions[i] = new_session(rng, self.opts.users);
        }
        let roll = rng.below(100);
        let s = &mut self.sessions[i];
        let (kind, page, props) = match roll {
            0..60 => {
                if rng.below(2) == 0 {
                    s.product = rng.below(PRODUCTS.len() as u64) as usize;
                    let p = &PRODUCTS[s.product];
                    (
                        "page_view",
                        format!("/products/{}", p.name.to_lowercase()),
                        product_props(p),
                    )
                } else {
                    ("page_view", rng.pick(&PAGES).to_string(), json!({}))
                }
            }
            60..85 => {
                let p = &PRODUCTS[s.product];
                let target = *rng.pick(&[
                    "product_card",
                    "add_to_wishlist",
                    "banner",
                    "nav_link",
                    "image",
                ]);
                let mut props = product_props(p);
                props["element"] = json!(target);
                (
                    "click",
                    format!("/products/{}", p.name.to_lowercase()),
                    props,
                )
            }
            85..95 => {
                let q = *rng.pick(&SEARCHES);
                (
                    "search",
                    format!("/search?q={}", q.replace(' ', "+")),
                    json!({ "search_query": q }),
                )
            }
            95..98 => {
                s.cart.push(s.product);
                let p = &PRODUCTS[s.product];
                let mut props = product_props(p);
                props["quantity"] = json!(1);
                props["cart_value"] =
                    json!(round2(s.cart.iter().map(|i| PRODUCTS[*i].price).sum()));
                (
                    "add_to_cart",
                    format!("/products/{}", p.name.to_lowercase()),
                    props,
                )
            }
            _ => {
                let item = s.cart.pop().unwrap_or(s.product);
                let p = &PRODUCTS[item];
                let mut props = product_props(p);
                props["quantity"] = json!(1);
                ("purchase", "/checkout".to_string(), props)
            }
        };
        let (user, session, place, device, ip) = (
            s.user.clone(),
            s.id.clone(),
            s.place,
            s.device,
            s.ip.clone(),
        );
        let referrer = *rng.pick(&REFERRERS);
        let event_id = uuid(rng);
        render(
            self.now_ms(),
            &event_id,
            &user,
            &session,
            kind,
            &page,
            referrer,
            &ip,
            place,
            device,
            props,
        )
    }

    /// Queues a burst: one user buying expensive goods fast (two seconds apart), from
    /// several countries and IP addresses.
    fn start_burst(&mut self) {
        self.bursts += 1;
        let user = format!("user-fraud-{:04}", self.bursts);
        let session = format!("sess-{:016x}", self.rng.next_u64());
        let start = self.now_ms();
        for k in 0..FRAUD_BURST {
            let p = &PRODUCTS[if k % 2 == 0 { 0 } else { 5 }];
            let place = [0, 5, 6][k as usize % 3];
            let ip = format!("203.0.113.{}", 10 + k % 3);
            let mut props = product_props(p);
            props["quantity"] = json!(1);
            let event_id = uuid(&mut self.rng);
            let time = start + k as i64 * 2000;
            let g = render(
                time,
                &event_id,
                &user,
                &session,
                "purchase",
                "/checkout",
                "direct",
                &ip,
                place,
                0,
                props,
            );
            self.burst.push(g);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn render(
    time_ms: i64,
    event_id: &str,
    user: &str,
    session: &str,
    kind: &str,
    page: &str,
    referrer: &str,
    ip: &str,
    place: usize,
    device: usize,
    properties: serde_json::Value,
) -> Generated {
    let (country, city, tz) = PLACES[place];
    let (dtype, os, browser, agent) = DEVICES[device];
    let event = json!({
        "event_id": event_id,
        "timestamp": format_rfc3339_ms(time_ms),
        "user_id": user,
        "session_id": session,
        "event_type": kind,
        "page_url": page,
        "referrer": referrer,
        "user_agent": agent,
        "ip_address": ip,
        "properties": properties,
        "device": { "type": dtype, "os": os, "browser": browser },
        "location": { "country": country, "city": city, "timezone": tz },
    });
    Generated {
        key: user.to_string(),
        payload: serde_json::to_vec(&event).expect("JSON"),
        time_ms,
    }
}

impl Iterator for Generator {
    type Item = Generated;

    fn next(&mut self) -> Option<Generated> {
        let g = self.next_event();
        self.produced += 1;
        Some(g)
    }
}

fn new_session(rng: &mut Rng, users: u64) -> Session {
    let user = format!("user-{:05}", rng.below(users.max(1)) + 1);
    Session {
        id: format!("sess-{:016x}", rng.next_u64()),
        place: rng.below(PLACES.len() as u64) as usize,
        device: rng.below(DEVICES.len() as u64) as usize,
        ip: format!("198.51.{}.{}", rng.below(256), rng.below(254) + 1),
        product: rng.below(PRODUCTS.len() as u64) as usize,
        cart: Vec::new(),
        user,
    }
}

fn product_props(p: &Product) -> serde_json::Value {
    json!({ "product_id": p.id, "product_name": p.name, "price": p.price, "category": p.category })
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn uuid(rng: &mut Rng) -> String {
    let (a, b) = (rng.next_u64(), rng.next_u64());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        ((b >> 48) & 0x3fff) | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(seed: u64, fraud_every: u64) -> GeneratorOptions {
        GeneratorOptions {
            seed,
            fraud_every,
            start_ms: 1_705_314_600_000,
            spacing_ms: 10,
            ..Default::default()
        }
    }

    #[test]
    fn same_seed_same_events() {
        let a: Vec<_> = Generator::new(opts(7, 100))
            .take(500)
            .map(|g| g.payload)
            .collect();
        let b: Vec<_> = Generator::new(opts(7, 100))
            .take(500)
            .map(|g| g.payload)
            .collect();
        let c: Vec<_> = Generator::new(opts(8, 100))
            .take(500)
            .map(|g| g.payload)
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn follows_the_seed_mix_and_schema() {
        let n = 20_000;
        let mut counts = std::collections::BTreeMap::<String, u64>::new();
        for g in Generator::new(opts(1, 0)).take(n) {
            let v: serde_json::Value = serde_json::from_slice(&g.payload).unwrap();
            assert_eq!(v["user_id"].as_str().unwrap(), g.key);
            for field in [
                "event_id",
                "timestamp",
                "session_id",
                "page_url",
                "ip_address",
            ] {
                assert!(v[field].is_string(), "{field} missing in {v}");
            }
            assert!(v["location"]["country"].is_string());
            assert!(v["device"]["type"].is_string());
            *counts
                .entry(v["event_type"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        let share = |k: &str| counts[k] as f64 / n as f64 * 100.0;
        assert!((share("page_view") - 60.0).abs() < 2.0, "{counts:?}");
        assert!((share("click") - 25.0).abs() < 2.0, "{counts:?}");
        assert!((share("search") - 10.0).abs() < 1.5, "{counts:?}");
        assert!((share("add_to_cart") - 3.0).abs() < 1.0, "{counts:?}");
        assert!((share("purchase") - 2.0).abs() < 1.0, "{counts:?}");
    }

    #[test]
    fn fraud_bursts_are_fast_high_value_and_multi_country() {
        let events: Vec<serde_json::Value> = Generator::new(opts(3, 100))
            .take(250)
            .map(|g| serde_json::from_slice(&g.payload).unwrap())
            .collect();
        let burst: Vec<&serde_json::Value> = events
            .iter()
            .filter(|v| v["user_id"].as_str().unwrap().starts_with("user-fraud-"))
            .collect();
        assert_eq!(burst.len() as u64, 2 * FRAUD_BURST);
        assert!(
            burst.iter().all(|v| v["event_type"] == "purchase"
                && v["properties"]["price"].as_f64().unwrap() > 900.0)
        );
        let countries: std::collections::BTreeSet<&str> = burst[..FRAUD_BURST as usize]
            .iter()
            .map(|v| v["location"]["country"].as_str().unwrap())
            .collect();
        assert!(countries.len() >= 3);
    }
}
