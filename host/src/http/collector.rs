//! The HTTP collector: `POST /v1/events` takes user-activity events from browsers and
//! services and produces them to the host's topic, `GET /tracker.js` is the browser tracker
//! that posts them, and `GET /demo` a page that uses it.
//!
//! A body is one JSON event, a JSON array of events, or NDJSON (one event a line). Each event
//! is checked as the plugins will parse it (the SDK's [`Activity::from_json`] on the event's
//! own bytes), and the valid ones are produced, keyed by `user_id`, as they were sent. The
//! answer comes once Kafka has acknowledged every one of them, so a 200 means durable; an
//! event Kafka did not acknowledge within `[http] ingest_timeout_ms` (or that did not fit in
//! the producer's queue) makes the answer a 503 with `Retry-After`, and the response says,
//! event by event, which ones to send again (`"retry": true`) and which are already durable.
//!
//! The collector has its own producer, apart from the plugins' outputs: idempotent (its
//! retries never write an event twice), with `message.timeout.ms` = `ingest_timeout_ms` so
//! that an event reported unacknowledged is no longer queued (it cannot land later, behind
//! the client's retry), and a queue of its own, so a flood of posts never fills the queue the
//! plugins' outputs wait on, nor the other way round.

use super::guard::same;
use crate::config::{Config, post_cost_kib};
use crate::metrics::Metrics;
use crate::metrics::collector::RejectReason;
use crate::sinks::send_one;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use eddy_activity::Activity;
use rdkafka::ClientConfig;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use serde::de::IgnoredAny;
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_http::cors::{AllowOrigin, CorsLayer};

/// The browser tracker, served at `/tracker.js`.
pub const TRACKER_JS: &str = include_str!("../../web/tracker.js");
/// The demo shop, served at `/demo`.
pub const DEMO_HTML: &str = include_str!("../../web/demo.html");

/// The environment variable that sets the token (over `[http] token`).
pub const TOKEN_ENV: &str = "EDDY_HTTP_TOKEN";

/// Seconds a client is told to wait (`Retry-After`) before it sends unacknowledged events
/// again.
pub const RETRY_AFTER_SECS: u64 = 2;

/// Seconds a client is told to wait when the collector was too busy to take its post.
pub const BUSY_RETRY_AFTER_SECS: u64 = 1;

/// How much longer than `ingest_timeout_ms` the collector waits for librdkafka's own verdict
/// on an event (it times events out at `message.timeout.ms` = `ingest_timeout_ms`).
const VERDICT_GRACE: Duration = Duration::from_secs(2);

/// What the collector needs to answer a post.
pub struct Collector {
    producer: FutureProducer,
    topic: String,
    timeout: Duration,
    max_body: usize,
    /// How far ahead of the host's clock an event may be dated (`[http] max_clock_skew_ms`).
    max_skew_ms: i64,
    /// How long its body may take to arrive (`[http] body_timeout_ms`).
    body_timeout: Duration,
    /// The most events one post may hold (`[http] max_events_per_post`).
    max_events: usize,
    /// KiB of memory that posts in flight may hold together (`[http] ingest_memory_mib`):
    /// each holds [`crate::config::post_cost_kib`] of it from before its body is read until
    /// it is answered.
    budget: Arc<Semaphore>,
    budget_kib: usize,
    token: Option<String>,
    recent: RecentIds,
    metrics: Arc<Metrics>,
}

impl Collector {
    /// The collector `config` describes, producing with `client`'s settings (the host's,
    /// with `[kafka.settings]`); `EDDY_HTTP_TOKEN` overrides `[http] token`.
    pub fn new(
        config: &Config,
        client: &ClientConfig,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Collector> {
        let http = &config.http;
        let producer = producer(config, client)?;
        let from_env = std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty());
        if let Some(t) = &from_env
            && !crate::config::valid_token(t)
        {
            anyhow::bail!(
                "{TOKEN_ENV} must be 1 to 4096 printable ASCII characters without spaces (unset it for no token)"
            );
        }
        let token = from_env.or_else(|| http.token.clone());
        Ok(Collector {
            producer,
            topic: config.kafka.topic.clone(),
            timeout: Duration::from_millis(http.ingest_timeout_ms),
            max_body: http.max_body_kib << 10,
            body_timeout: Duration::from_millis(http.body_timeout_ms),
            max_skew_ms: http.max_clock_skew_ms as i64,
            max_events: http.max_events_per_post,
            budget: Arc::new(Semaphore::new(http.ingest_memory_mib << 10)),
            budget_kib: http.ingest_memory_mib << 10,
            token,
            recent: RecentIds::default(),
            metrics,
        })
    }
}

/// The collector's producer: `client`'s settings (the host's, with `[kafka.settings]`),
/// idempotent, giving up on an event after `[http] ingest_timeout_ms`.
pub fn producer(config: &Config, client: &ClientConfig) -> anyhow::Result<FutureProducer> {
    let mut client = client.clone();
    client.set("enable.idempotence", "true");
    // An event librdkafka gives up on is out of its queue when we answer 503: it cannot be
    // written after the client has been told to send it again.
    client.set(
        "message.timeout.ms",
        config.http.ingest_timeout_ms.to_string(),
    );
    if !config.kafka.settings.contains_key("linger.ms") {
        // The client waits for the acknowledgement; records gather into batches anyway while
        // a request is in flight.
        client.set("linger.ms", "0");
    }
    client
        .create()
        .map_err(|e| anyhow::anyhow!("cannot create the collector's producer: {e}"))
}

/// The collector's routes: `POST /v1/events` (with CORS for `[http] cors_origins`),
/// `GET /tracker.js`, `GET /demo`. Merged into [`super::router`]'s by the host.
pub fn router(collector: Collector, cors_origins: &[String]) -> Router {
    let mut events = Router::new()
        .route("/v1/events", post(ingest))
        .with_state(Arc::new(collector));
    if let Some(cors) = cors(cors_origins) {
        events = events.layer(cors);
    }
    Router::new()
        .route("/tracker.js", get(tracker))
        .route("/demo", get(demo))
        .merge(events)
}

/// CORS for `origins` (`["*"]`: any); none when empty. Preflights are answered by the layer.
fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        // Checked by the config (`valid_origin`): every one is a valid header value.
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::POST])
            .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION])
            .expose_headers([header::RETRY_AFTER])
            .max_age(Duration::from_secs(3600)),
    )
}

async fn tracker() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        TRACKER_JS,
    )
        .into_response()
}

async fn demo() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        DEMO_HTML,
    )
        .into_response()
}

async fn ingest(
    State(c): State<Arc<Collector>>,
    headers: HeaderMap,
    uri: Uri,
    body: Body,
) -> Response {
    let started = Instant::now();
    let response = c.handle(&headers, &uri, body).await;
    c.metrics
        .collector
        .request(response.status().as_u16(), started.elapsed());
    response
}

/// A JSON answer.
fn answer(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string() + "\n",
    )
        .into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    answer(status, &json!({ "error": message.into() }))
}

/// Bodies larger than this are split, checked and sent in `block_in_place`.
const LARGE_BODY: usize = 64 << 10;

/// A post's events on their way: each one's fate so far (`Accepted` for those sent, until
/// Kafka says), the deliveries to wait for (with the index of their event), and each
/// event's hashed `event_id`.
struct Sent<'a> {
    pieces: Vec<Piece<'a>>,
    fates: Vec<Fate>,
    pending: Vec<(usize, DeliveryFuture)>,
    ids: Vec<Option<u64>>,
}

/// What became of one event of a post.
enum Fate {
    /// Durable: Kafka acknowledged it.
    Accepted,
    /// Refused for good: sending it again cannot help.
    Rejected(RejectReason, String),
    /// Not acknowledged (in time): the client must send it again.
    Retry(String),
    /// Its `event_id` was acknowledged before: durable already, not written again.
    Duplicate,
    /// Its `event_id` came earlier in the same post (at this index): the same fate.
    SameAs(usize),
}

/// Room a post holds in `[http] ingest_memory_mib`, given back (and uncounted) when dropped.
struct Room {
    _permit: OwnedSemaphorePermit,
    kib: u64,
    metrics: Arc<Metrics>,
}

impl Drop for Room {
    fn drop(&mut self) {
        self.metrics
            .collector
            .memory_held_kib
            .fetch_sub(self.kib, Relaxed);
    }
}

/// How long a post waits for room in `[http] ingest_memory_mib` before it is answered 503.
const ADMIT_WAIT: Duration = Duration::from_secs(1);

impl Collector {
    /// `kib` of room in the budget ([`crate::config::post_cost_kib`]), waiting up to
    /// [`ADMIT_WAIT`].
    async fn admit(&self, kib: usize) -> Result<Room, Response> {
        let kib = kib.min(self.budget_kib) as u32;
        match tokio::time::timeout(ADMIT_WAIT, self.budget.clone().acquire_many_owned(kib)).await {
            Ok(Ok(permit)) => {
                self.metrics
                    .collector
                    .memory_held_kib
                    .fetch_add(kib.into(), Relaxed);
                Ok(Room {
                    _permit: permit,
                    kib: kib.into(),
                    metrics: self.metrics.clone(),
                })
            }
            _ => {
                self.metrics.collector.busy.fetch_add(1, Relaxed);
                let mut r = error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "the collector is busy: the posts in flight hold its memory ({} MiB, [http] ingest_memory_mib); send again after {BUSY_RETRY_AFTER_SECS} s",
                        self.budget_kib >> 10
                    ),
                );
                r.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(BUSY_RETRY_AFTER_SECS),
                );
                Err(r)
            }
        }
    }

    async fn handle(&self, headers: &HeaderMap, uri: &Uri, body: Body) -> Response {
        if let Some(token) = &self.token
            && !authorized(headers, uri, token)
        {
            let mut r = error(
                StatusCode::UNAUTHORIZED,
                "POST /v1/events needs the token: `Authorization: Bearer <token>` (or `?token=<token>`)",
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
        let too_large = || {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the body is larger than {} KiB ([http] max_body_kib): send the events in smaller batches",
                    self.max_body >> 10
                ),
            )
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_body as u64) {
            return too_large();
        }
        // Room for the body before it is read (without a Content-Length it may be as large as
        // max_body_kib), and for its events once they are counted.
        let body_kib = post_cost_kib(declared.map_or(self.max_body, |n| n as usize), 0);
        let _body_room = match self.admit(body_kib).await {
            Ok(permit) => permit,
            Err(busy) => return busy,
        };
        let read =
            tokio::time::timeout(self.body_timeout, axum::body::to_bytes(body, self.max_body));
        let Ok(read) = read.await else {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the body did not arrive whole within {} ms ([http] body_timeout_ms): nothing of it was produced",
                    self.body_timeout.as_millis()
                ),
            );
        };
        let bytes = match read {
            Ok(b) => b,
            Err(e) if is_length_limit(&e) => return too_large(),
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the body: {e}"),
                );
            }
        };
        let ndjson = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(is_ndjson);
        // Splitting, checking and sending cost a few µs an event: a large body's are done
        // where they do not hold up the runtime's other tasks (as other blocking work is).
        let large = bytes.len() > LARGE_BODY;
        let split_body = || split(&bytes, ndjson, self.max_events);
        let pieces = match if large {
            crate::kafka::blocking(split_body)
        } else {
            split_body()
        } {
            Ok(pieces) => pieces,
            Err(e @ SplitError::TooMany(_)) => {
                return error(StatusCode::PAYLOAD_TOO_LARGE, e.to_string());
            }
            Err(e @ SplitError::Invalid(_)) => {
                return error(StatusCode::BAD_REQUEST, e.to_string());
            }
        };
        let _events_room = match self.admit(post_cost_kib(0, pieces.len())).await {
            Ok(permit) => permit,
            Err(busy) => return busy,
        };
        let Sent {
            pieces,
            fates,
            pending,
            ids,
        } = if large {
            crate::kafka::blocking(|| self.send(pieces))
        } else {
            self.send(pieces)
        };
        let fates = self.acknowledged(fates, pending, &ids).await;
        self.respond(&pieces, &fates)
    }

    /// Checks each of a body's events and sends the valid ones (see [`Sent`]).
    fn send<'a>(&self, pieces: Vec<Piece<'a>>) -> Sent<'a> {
        let now_ms = crate::clock::now_ms();
        let mut fates = Vec::with_capacity(pieces.len());
        let mut pending = Vec::new();
        // Once the producer's queue is full, the rest of the post is not sent at all.
        let mut queue_full: Option<String> = None;
        // The `event_id` (hashed) of each event sent, and where it first came in this post.
        let mut ids: Vec<Option<u64>> = Vec::with_capacity(pieces.len());
        let mut first_at: HashMap<u64, usize> = HashMap::new();
        for (i, piece) in pieces.iter().enumerate() {
            let activity = match check(piece.bytes).and_then(|a| self.not_ahead(a, now_ms)) {
                Ok(a) => a,
                Err((reason, message)) => {
                    fates.push(Fate::Rejected(reason, message));
                    ids.push(None);
                    continue;
                }
            };
            let id = activity.event_id.as_deref().map(|id| self.recent.key(id));
            ids.push(id);
            if let Some(id) = id {
                if self.recent.contains(id) {
                    fates.push(Fate::Duplicate);
                    continue;
                }
                if let Some(first) = first_at.get(&id) {
                    fates.push(Fate::SameAs(*first));
                    continue;
                }
                first_at.insert(id, i);
            }
            if let Some(why) = &queue_full {
                fates.push(Fate::Retry(why.clone()));
                continue;
            }
            let record = FutureRecord::to(&self.topic)
                .key(activity.user_id.as_bytes())
                .payload(piece.bytes);
            match send_one(&self.producer, record) {
                Ok(Ok(delivery)) => {
                    pending.push((i, delivery));
                    fates.push(Fate::Accepted);
                }
                Ok(Err(why)) => fates.push(Fate::Rejected(
                    RejectReason::Kafka,
                    format!("refused by Kafka: {why}"),
                )),
                Err(why) => {
                    let why = format!("not sent: {why}");
                    queue_full = Some(why.clone());
                    fates.push(Fate::Retry(why));
                }
            }
        }
        Sent {
            pieces,
            fates,
            pending,
            ids,
        }
    }

    /// Refuses an event dated further ahead of `now_ms` than `[http] max_clock_skew_ms`:
    /// one such event would move every plugin's event clock (windows, "active users",
    /// expiry) ahead for good.
    fn not_ahead<'a>(
        &self,
        activity: Activity<'a>,
        now_ms: i64,
    ) -> Result<Activity<'a>, (RejectReason, String)> {
        match activity.time_ms() {
            Some(t) if t > now_ms.saturating_add(self.max_skew_ms) => Err((
                RejectReason::Future,
                format!(
                    "`timestamp` is {} s ahead of the host's clock, more than [http] max_clock_skew_ms ({} s) allows: fix the sender's clock",
                    (t - now_ms) / 1000,
                    self.max_skew_ms / 1000
                ),
            )),
            _ => Ok(activity),
        }
    }

    /// Waits for Kafka's verdict on every event sent, and settles the fate of each.
    async fn acknowledged(
        &self,
        mut fates: Vec<Fate>,
        pending: Vec<(usize, DeliveryFuture)>,
        ids: &[Option<u64>],
    ) -> Vec<Fate> {
        let deadline = tokio::time::Instant::now() + self.timeout + VERDICT_GRACE;
        for (i, delivery) in pending {
            fates[i] = match tokio::time::timeout_at(deadline, delivery).await {
                Ok(Ok(Ok(_))) => Fate::Accepted,
                Ok(Ok(Err((e, _)))) if crate::sinks::is_permanent(e.rdkafka_error_code()) => {
                    Fate::Rejected(RejectReason::Kafka, format!("refused by Kafka: {e}"))
                }
                Ok(Ok(Err((e, _)))) => Fate::Retry(format!("not acknowledged by Kafka: {e}")),
                Ok(Err(_)) => Fate::Retry("the producer went away".into()),
                Err(_) => Fate::Retry(format!(
                    "not acknowledged by Kafka within {} ms",
                    self.timeout.as_millis()
                )),
            };
        }
        for i in 0..fates.len() {
            if let Fate::SameAs(first) = fates[i] {
                fates[i] = match &fates[first] {
                    Fate::Accepted => Fate::Duplicate,
                    Fate::Retry(why) => Fate::Retry(why.clone()),
                    Fate::Rejected(reason, why) => Fate::Rejected(*reason, why.clone()),
                    Fate::Duplicate | Fate::SameAs(_) => Fate::Duplicate,
                };
            }
        }
        self.recent.remember(
            fates
                .iter()
                .zip(ids)
                .filter(|(f, _)| matches!(f, Fate::Accepted))
                .filter_map(|(_, id)| *id),
        );
        fates
    }

    /// The answer: 200 once every valid event is durable, 400 if none was valid, 503 with
    /// `Retry-After` if any must be sent again; per event, what became of it.
    fn respond(&self, pieces: &[Piece<'_>], fates: &[Fate]) -> Response {
        let m = &self.metrics.collector;
        let (mut accepted, mut rejected, mut retry, mut duplicates) = (0u64, 0u64, 0u64, 0u64);
        let results: Vec<Value> = pieces
            .iter()
            .zip(fates)
            .enumerate()
            .map(|(index, (piece, fate))| {
                let mut r = match fate {
                    Fate::Accepted => {
                        accepted += 1;
                        json!({ "index": index, "ok": true })
                    }
                    Fate::Rejected(reason, message) => {
                        rejected += 1;
                        m.reject(*reason);
                        let message = match piece.line {
                            Some(line) => format!("line {line}: {message}"),
                            None => message.clone(),
                        };
                        json!({ "index": index, "ok": false, "error": message })
                    }
                    Fate::Retry(message) => {
                        retry += 1;
                        json!({ "index": index, "ok": false, "retry": true, "error": message })
                    }
                    Fate::Duplicate | Fate::SameAs(_) => {
                        duplicates += 1;
                        json!({ "index": index, "ok": true, "duplicate": true })
                    }
                };
                if let Some(line) = piece.line {
                    r["line"] = json!(line);
                }
                r
            })
            .collect();
        m.accepted.fetch_add(accepted, Relaxed);
        m.duplicates.fetch_add(duplicates, Relaxed);
        m.unacknowledged.fetch_add(retry, Relaxed);
        let mut body = json!({
            "accepted": accepted + duplicates,
            "rejected": rejected,
            "retry": retry,
            "results": results,
        });
        if duplicates > 0 {
            body["duplicates"] = json!(duplicates);
        }
        if retry > 0 {
            body["error"] = json!(format!(
                "Kafka did not acknowledge {retry} of the events within {} ms ([http] ingest_timeout_ms): send the events marked \"retry\": true again after {RETRY_AFTER_SECS} s (the others are durable or refused for good)",
                self.timeout.as_millis()
            ));
            let mut r = answer(StatusCode::SERVICE_UNAVAILABLE, &body);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            return r;
        }
        let status = if accepted + duplicates == 0 && rejected > 0 {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::OK
        };
        answer(status, &body)
    }
}

/// How many acknowledged `event_id`s the collector remembers, to answer a post of one of
/// them again (a client's retry after a lost answer, say) without writing it twice.
pub const REMEMBERED_IDS: usize = 100_000;

/// The `event_id`s of the last [`REMEMBERED_IDS`] events Kafka acknowledged, as 64-bit
/// keyed hashes (2-3 MB; the key is random per process, so nobody can make two ids collide
/// on purpose).
#[derive(Default)]
struct RecentIds {
    hasher: RandomState,
    ids: Mutex<(HashSet<u64>, VecDeque<u64>)>,
}

impl RecentIds {
    fn key(&self, event_id: &str) -> u64 {
        self.hasher.hash_one(event_id)
    }

    fn contains(&self, key: u64) -> bool {
        self.ids.lock().expect("ids lock").0.contains(&key)
    }

    fn remember(&self, keys: impl Iterator<Item = u64>) {
        let mut ids = self.ids.lock().expect("ids lock");
        let (set, order) = &mut *ids;
        for key in keys {
            if set.insert(key) {
                order.push_back(key);
            }
            if order.len() > REMEMBERED_IDS
                && let Some(old) = order.pop_front()
            {
                set.remove(&old);
            }
        }
    }
}

/// Whether the request carries `token`: `Authorization: Bearer <token>`, or `?token=` for
/// `navigator.sendBeacon`, which cannot set headers.
fn authorized(headers: &HeaderMap, uri: &Uri, token: &str) -> bool {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, value) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| value.trim())
        });
    // The tracker sends it percent-encoded (`encodeURIComponent`): a base64 token's `+`, `/`
    // and `=` arrive as `%2B`, `%2F`, `%3D`. A `+` is kept as it is (a token has no space).
    let query = uri
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("token="))
        .map(|v| percent_encoding::percent_decode_str(v).collect::<Vec<u8>>());
    bearer.is_some_and(|given| same(given.as_bytes(), token.as_bytes()))
        || query.is_some_and(|given| same(&given, token.as_bytes()))
}

/// Whether reading a body failed on `to_bytes`'s limit (the error's text is all axum lets
/// us see of it).
fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if s.to_string().contains("length limit exceeded") {
            return true;
        }
        source = s.source();
    }
    false
}

/// `application/x-ndjson`, `application/ndjson`, `application/jsonl` (and `jsonlines`).
fn is_ndjson(content_type: &str) -> bool {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    matches!(
        media.as_str(),
        "application/x-ndjson"
            | "application/ndjson"
            | "application/jsonl"
            | "application/x-jsonlines"
    )
}

/// One event's bytes in a body, and its line for NDJSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece<'a> {
    pub bytes: &'a [u8],
    /// Its line (from 1) in an NDJSON body.
    pub line: Option<usize>,
}

fn is_space(b: &u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !is_space(b))
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_space(b))
        .map_or(start, |e| e + 1);
    &bytes[start..end]
}

/// Why a body as a whole is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    /// Not usable at all: the reason, with line and column.
    #[error("{0}")]
    Invalid(String),
    /// More events than one post may hold: found while splitting, before anything is built
    /// for the events past the limit.
    #[error(
        "more than {0} events in one post ([http] max_events_per_post): send them in smaller batches"
    )]
    TooMany(usize),
}

/// Splits a body into its events: a JSON array's elements, NDJSON's non-blank lines
/// (`ndjson`, or when the body is several lines each holding a value), or the body as one
/// event; at most `max_events` of them. An error (the body as a whole is unusable) says why.
pub fn split(body: &[u8], ndjson: bool, max_events: usize) -> Result<Vec<Piece<'_>>, SplitError> {
    let trimmed = trim(body);
    if trimmed.is_empty() {
        return Err(SplitError::Invalid(
            "empty body: expected a JSON event, a JSON array of events, or NDJSON (one event a line)"
                .into(),
        ));
    }
    if ndjson {
        return lines(body, max_events);
    }
    if trimmed[0] == b'[' {
        return split_array(trimmed, max_events);
    }
    // One value alone is one event; a value followed by more on other lines is NDJSON.
    let mut values = serde_json::Deserializer::from_slice(trimmed).into_iter::<IgnoredAny>();
    let first_is_json = matches!(values.next(), Some(Ok(_)));
    let rest = &trimmed[values.byte_offset()..];
    if first_is_json && trim(rest).is_empty() {
        return Ok(vec![Piece {
            bytes: trimmed,
            line: None,
        }]);
    }
    let first_line = trimmed.split(|b| *b == b'\n').next().unwrap_or(trimmed);
    let several_lines = trimmed.contains(&b'\n');
    if several_lines && serde_json::from_slice::<IgnoredAny>(first_line).is_ok() {
        return lines(body, max_events);
    }
    Ok(vec![Piece {
        bytes: trimmed,
        line: None,
    }])
}

/// NDJSON: every non-blank line, numbered from 1; at most `max_events`.
fn lines(body: &[u8], max_events: usize) -> Result<Vec<Piece<'_>>, SplitError> {
    let mut pieces = Vec::new();
    for (i, line) in body.split(|b| *b == b'\n').enumerate() {
        let bytes = trim(line);
        if bytes.is_empty() {
            continue;
        }
        if pieces.len() == max_events {
            return Err(SplitError::TooMany(max_events));
        }
        pieces.push(Piece {
            bytes,
            line: Some(i + 1),
        });
    }
    Ok(pieces)
}

/// A JSON array's elements, each its own bytes as sent; at most `max_events`. The whole
/// array must be JSON (checked without building anything of it).
fn split_array(array: &[u8], max_events: usize) -> Result<Vec<Piece<'_>>, SplitError> {
    if let Err(e) = serde_json::from_slice::<IgnoredAny>(array) {
        return Err(SplitError::Invalid(format!(
            "the body is not a valid JSON array: {e}"
        )));
    }
    // Valid JSON: the elements end at the commas (and the `]`) outside strings at depth 1.
    let mut pieces = Vec::new();
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let mut start = 1;
    for (i, b) in array.iter().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => depth += 1,
            b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    push_element(&mut pieces, &array[start..i], max_events)?;
                }
            }
            b',' if depth == 1 => {
                push_element(&mut pieces, &array[start..i], max_events)?;
                start = i + 1;
            }
            _ => {}
        }
    }
    Ok(pieces)
}

fn push_element<'a>(
    pieces: &mut Vec<Piece<'a>>,
    element: &'a [u8],
    max_events: usize,
) -> Result<(), SplitError> {
    let bytes = trim(element);
    // `[]` has no element (valid JSON never has an empty one otherwise).
    if !bytes.is_empty() {
        if pieces.len() == max_events {
            return Err(SplitError::TooMany(max_events));
        }
        pieces.push(Piece { bytes, line: None });
    }
    Ok(())
}

/// Checks one event as a plugin's SDK will parse it: an object that
/// [`Activity::from_json`] takes. The error says why not, and its class.
pub fn check(bytes: &[u8]) -> Result<Activity<'_>, (RejectReason, String)> {
    let is_json = || serde_json::from_slice::<IgnoredAny>(bytes).is_ok();
    if bytes.first() != Some(&b'{') {
        return Err(if is_json() {
            (
                RejectReason::NotObject,
                "not an activity event: an event is a JSON object".into(),
            )
        } else {
            (
                RejectReason::Json,
                Activity::from_json(bytes).map_or_else(|e| e.to_string(), |_| String::new()),
            )
        });
    }
    Activity::from_json(bytes).map_err(|e| {
        let reason = if is_json() {
            RejectReason::Schema
        } else {
            RejectReason::Json
        };
        (reason, e.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(pieces: &[Piece<'_>]) -> Vec<(String, Option<usize>)> {
        pieces
            .iter()
            .map(|p| (String::from_utf8_lossy(p.bytes).into_owned(), p.line))
            .collect()
    }

    #[test]
    fn an_object_an_array_and_ndjson_split_into_events_as_sent() {
        let one = texts(&split(b" {\"a\": [1, {\"b\": \"],\"}]} \n", false, 1000).unwrap());
        assert_eq!(one, [("{\"a\": [1, {\"b\": \"],\"}]}".to_string(), None)]);
        let array = split(b"[ {\"a\":\"x,]\\\"\"} ,\n{\"b\":[1,2]}, 3 ]", false, 1000).unwrap();
        assert_eq!(
            texts(&array),
            [
                ("{\"a\":\"x,]\\\"\"}".to_string(), None),
                ("{\"b\":[1,2]}".to_string(), None),
                ("3".to_string(), None)
            ]
        );
        assert!(split(b"[]", false, 1000).unwrap().is_empty());
        // NDJSON, told or detected; blank lines are skipped and do not shift line numbers.
        let body = b"{\"a\":1}\r\n\n   \n{\"b\":2}\nnot json\n";
        for ndjson in [true, false] {
            assert_eq!(
                texts(&split(body, ndjson, 1000).unwrap()),
                [
                    ("{\"a\":1}".to_string(), Some(1)),
                    ("{\"b\":2}".to_string(), Some(4)),
                    ("not json".to_string(), Some(5))
                ]
            );
        }
    }

    #[test]
    fn a_body_of_more_events_than_allowed_is_refused_whole() {
        let many = format!("[{}1]", "1,".repeat(500_000));
        assert_eq!(
            split(many.as_bytes(), false, 1000),
            Err(SplitError::TooMany(1000))
        );
        let lines = "{}\n".repeat(1001);
        for ndjson in [true, false] {
            assert_eq!(
                split(lines.as_bytes(), ndjson, 1000),
                Err(SplitError::TooMany(1000))
            );
        }
        let exactly = format!("[{}{{}}]", "{},".repeat(999));
        assert_eq!(split(exactly.as_bytes(), false, 1000).unwrap().len(), 1000);
    }

    #[test]
    fn a_broken_body_is_refused_whole_and_a_broken_event_alone() {
        let e = split(b"[{\"a\":1},\n{\"b\":}]", false, 1000)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not a valid JSON array") && e.contains("line 2"),
            "{e}"
        );
        assert!(
            split(b" \n ", false, 1000)
                .unwrap_err()
                .to_string()
                .contains("empty body")
        );
        // A single broken object is one event, rejected with the parser's line and column.
        let pieces = split(b"{\"user_id\": }", false, 1000).unwrap();
        assert_eq!(pieces.len(), 1);
        let (reason, message) = check(pieces[0].bytes).unwrap_err();
        assert_eq!(reason, RejectReason::Json);
        assert!(message.contains("line 1 column"), "{message}");
    }

    #[test]
    fn events_are_checked_as_the_sdk_parses_them() {
        assert!(check(br#"{"user_id":"u1","event_type":"click"}"#).is_ok());
        let (reason, message) = check(br#"{"event_type":"click"}"#).unwrap_err();
        assert_eq!(reason, RejectReason::Schema);
        assert!(message.contains("missing field `user_id`"), "{message}");
        let (reason, _) = check(br#"{"user_id":true,"event_type":"click"}"#).unwrap_err();
        assert_eq!(reason, RejectReason::Schema);
        for not_object in [&b"3"[..], b"\"x\"", b"[1]", b"null"] {
            let (reason, message) = check(not_object).unwrap_err();
            assert_eq!(reason, RejectReason::NotObject, "{message}");
        }
        assert_eq!(check(b"nope").unwrap_err().0, RejectReason::Json);
    }

    #[test]
    fn the_token_comes_as_a_bearer_header_or_in_the_query() {
        let mut h = HeaderMap::new();
        let uri: Uri = "/v1/events".parse().unwrap();
        assert!(!authorized(&h, &uri, "s3cret"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer s3cre"),
        );
        assert!(!authorized(&h, &uri, "s3cret"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer s3cret"),
        );
        assert!(authorized(&h, &uri, "s3cret"));
        let beacon: Uri = "/v1/events?x=1&token=s3cret".parse().unwrap();
        assert!(authorized(&HeaderMap::new(), &beacon, "s3cret"));
        // A base64 token as the tracker's sendBeacon sends it (encodeURIComponent).
        let token = "a+b/c==";
        let beacon: Uri = "/v1/events?token=a%2Bb%2Fc%3D%3D".parse().unwrap();
        assert!(authorized(&HeaderMap::new(), &beacon, token));
        let raw: Uri = "/v1/events?token=a+b/c==".parse().unwrap();
        assert!(authorized(&HeaderMap::new(), &raw, token));
        let wrong: Uri = "/v1/events?token=a%2Bb%2Fc%3D".parse().unwrap();
        assert!(!authorized(&HeaderMap::new(), &wrong, token));
        assert!(is_ndjson("application/x-ndjson; charset=utf-8"));
        assert!(!is_ndjson("application/json"));
    }
}
