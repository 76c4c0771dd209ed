//! `GET /v1/stream` (Server-Sent Events) and `GET /v1/ws` (WebSocket): the live feed of
//! [`crate::live`] to browsers and scripts.
//!
//! Query: `output=plugin/output` (repeatable; `output=plugin` for all of a plugin's outputs;
//! none: every output), `records=off` for status messages only, `status=off` to leave them
//! out, and `after=ID`, the id of the last record a reconnecting client got (over SSE the
//! `Last-Event-ID` header does the same, as browsers send it): it then gets only newer
//! ones. `GET /v1/outputs` lists the outputs that exist (`["plugin/output",...]`).
//! A client gets:
//! - `hello`, once: `{"outputs":[...],"buffer":N}`, what exists and how far it may fall behind;
//! - `record`, per committed output record of the outputs it asked for:
//!   `{"plugin","output","key","time_ms","value"|"text"}`, with its id (`<run>-<seq>`) as the
//!   SSE event id, or `"id"` over the WebSocket;
//! - `status`, every second: the `/healthz` report with `time_ms` (per plugin: events,
//!   dead letters, lag, breaker, version), from which a page computes rates;
//! - `missed`: `{"missed":N,"buffer":B}` when it fell more than `B` records behind on the
//!   outputs it asked for (a burst faster than it reads): `N` of those records are gone, and
//!   records go on from the oldest held;
//! - `closed`, last: `{"reason": ...}` when the host is stopping.
//!
//! Over SSE these are the event names; over the WebSocket, text messages
//! `{"type":"record",...}`. A client that stops reading is cut off by the connection's send
//! timeout ([`super::listener`]). An unknown output is a 400 naming the known ones; past `[http]
//! stream_max_clients`, 503 with `Retry-After`.

use super::Shared;
use crate::live::{Next, RecordId, WatchError, Watcher};
use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::{SinkExt, StreamExt};
use std::convert::Infallible;
use std::time::Duration;
use tokio::sync::watch;

/// How often a client gets a `status` message.
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// The largest WebSocket message or frame the host reads from a watcher.
const INBOUND_MAX: usize = 4096;
/// How long an EventSource waits before it reconnects (sent to it with `hello`).
const RECONNECT_AFTER: Duration = Duration::from_secs(2);

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/v1/stream", get(sse))
        .route("/v1/ws", get(websocket))
        .route("/v1/outputs", get(outputs))
        .route("/v1/login", axum::routing::post(login))
}

async fn login(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    super::guard::login(&shared.access, &headers)
}

async fn outputs(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    if let Err(denied) = shared.access.check_read(&headers) {
        return denied.into_response();
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::Value::from(shared.live.known_outputs()).to_string() + "\n",
    )
        .into_response()
}

/// What a client asked for in the query string.
#[derive(Debug, Default, PartialEq)]
struct Ask {
    outputs: Vec<String>,
    records: bool,
    status: bool,
    /// The last record a reconnecting client got.
    after: Option<RecordId>,
}

fn parse_query(query: Option<&str>) -> Result<Ask, String> {
    let mut ask = Ask {
        outputs: Vec::new(),
        records: true,
        status: true,
        after: None,
    };
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_encoding::percent_decode_str(&value.replace('+', " "))
            .decode_utf8()
            .map_err(|_| format!("`{key}` is not UTF-8"))?
            .into_owned();
        match key {
            "output" if !value.is_empty() => ask.outputs.push(value),
            "output" => return Err("`output=` names no output".into()),
            "after" => ask.after = Some(value.parse()?),
            "status" | "records" => {
                let on = match value.as_str() {
                    "on" | "true" | "1" => true,
                    "off" | "false" | "0" => false,
                    other => return Err(format!("`{key}` is on or off, not `{other}`")),
                };
                if key == "status" {
                    ask.status = on;
                } else {
                    ask.records = on;
                }
            }
            other => {
                return Err(format!(
                    "unknown parameter `{other}`; expected `output` (repeatable), `records`, `status` or `after`"
                ));
            }
        }
    }
    Ok(ask)
}

/// Why a request for the stream was refused.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error(transparent)]
    Denied(#[from] super::guard::Denied),
    #[error("{0}")]
    Query(String),
    #[error(transparent)]
    Watch(#[from] WatchError),
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let body = self.to_string() + "\n";
        match self {
            Refused::Denied(denied) => denied.into_response(),
            Refused::Watch(WatchError::Full(_) | WatchError::Off) => (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "5")],
                body,
            )
                .into_response(),
            _ => (StatusCode::BAD_REQUEST, body).into_response(),
        }
    }
}

/// The watcher a request asked for, if it may read the outputs.
fn start(
    shared: &Shared,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<(Watcher, Ask), Refused> {
    shared.access.check_read(headers)?;
    let mut ask = parse_query(query).map_err(Refused::Query)?;
    // What an EventSource sends when it reconnects on its own; the query wins.
    if ask.after.is_none()
        && let Some(last) = headers.get("last-event-id")
    {
        let last = last.to_str().unwrap_or_default();
        ask.after = Some(
            last.parse()
                .map_err(|e: String| Refused::Query(format!("Last-Event-ID: {e}")))?,
        );
    }
    let watcher = shared.live.watch(ask.outputs.clone(), ask.after)?;
    Ok((watcher, ask))
}

/// One message for a client, whatever carries it.
enum Out {
    /// A record: its id and its JSON.
    Record(RecordId, String),
    Status(String),
    /// It fell behind: how many records it missed.
    Missed(String),
    /// The last one: why the host ends the stream.
    Closed(String),
}

/// What one client is sent, in order: records as they come, status every second, `Missed`
/// when it fell behind, and a last `Closed` when the host stops.
struct Feed {
    watcher: Watcher,
    records: bool,
    status: Option<tokio::time::Interval>,
    shutdown: watch::Receiver<bool>,
    shared: Shared,
    buffer: usize,
}

impl Feed {
    fn new(watcher: Watcher, ask: &Ask, shared: &Shared) -> Feed {
        Feed {
            watcher,
            records: ask.records,
            status: ask.status.then(|| tokio::time::interval(STATUS_EVERY)),
            shutdown: shared.shutdown.clone(),
            buffer: shared.live.buffer,
            shared: shared.clone(),
        }
    }

    fn hello(&self) -> String {
        serde_json::json!({
            "outputs": self.shared.live.known_outputs(),
            "buffer": self.buffer,
        })
        .to_string()
    }

    /// Records first: when the host stops, the records of the plugins' final commits are
    /// out before `closed` (the server stops after the plugins).
    async fn next(&mut self) -> Out {
        tokio::select! {
            biased;
            next = self.watcher.next(), if self.records => match next {
                Next::Record(r) => Out::Record(self.shared.live.id(&r), r.json.clone()),
                Next::Missed { missed } => Out::Missed(
                    serde_json::json!({ "missed": missed, "buffer": self.buffer }).to_string()
                ),
                Next::Closed => Out::Closed("the host is stopping".into()),
            },
            _ = async { self.status.as_mut().expect("guarded").tick().await }, if self.status.is_some() => {
                Out::Status(status(&self.shared))
            }
            _ = self.shutdown.wait_for(|stopping| *stopping) => Out::Closed("the host is stopping".into()),
        }
    }
}

/// The `/healthz` report with the time it was taken.
fn status(shared: &Shared) -> String {
    let health = super::health(&shared.metrics);
    serde_json::json!({
        "time_ms": crate::clock::now_ms(),
        "status": if health.healthy() { "ok" } else { "degraded" },
        "kafka": health.kafka,
        "plugins": health.plugins,
    })
    .to_string()
}

async fn sse(
    State(shared): State<Shared>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let (watcher, ask) = match start(&shared, &headers, query.as_deref()) {
        Ok(started) => started,
        Err(refused) => return refused.into_response(),
    };
    let feed = Feed::new(watcher, &ask, &shared);
    let hello = Event::default()
        .event("hello")
        .retry(RECONNECT_AFTER)
        .data(feed.hello());
    let rest = futures_util::stream::unfold(Some(feed), |feed| async move {
        let mut feed = feed?;
        let event = match feed.next().await {
            Out::Record(id, json) => Event::default()
                .event("record")
                .id(id.to_string())
                .data(json),
            Out::Status(json) => Event::default().event("status").data(json),
            Out::Missed(json) => Event::default().event("missed").data(json),
            Out::Closed(reason) => {
                let data = serde_json::json!({ "reason": reason }).to_string();
                return Some((Ok(Event::default().event("closed").data(data)), None));
            }
        };
        Some((Ok::<_, Infallible>(event), Some(feed)))
    });
    let events = futures_util::stream::once(async { Ok(hello) }).chain(rest);
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn websocket(
    State(shared): State<Shared>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    if let Err(denied) = shared.access.check_origin(&headers) {
        return denied.into_response();
    }
    let (watcher, ask) = match start(&shared, &headers, query.as_deref()) {
        Ok(started) => started,
        Err(refused) => return refused.into_response(),
    };
    let feed = Feed::new(watcher, &ask, &shared);
    // The host reads nothing from a watcher but control frames: a small message or frame
    // is all it takes, and a larger one ends the connection (tungstenite's default would
    // buffer 64 MiB of a message that is then ignored).
    upgrade
        .max_message_size(INBOUND_MAX)
        .max_frame_size(INBOUND_MAX)
        .read_buffer_size(INBOUND_MAX)
        .on_upgrade(move |socket| serve_websocket(socket, feed))
}

/// Sends the feed until the client leaves or the host ends it. Whatever the client sends is
/// read (pings are answered) and otherwise ignored; a message over [`INBOUND_MAX`] bytes
/// ends the connection.
async fn serve_websocket(socket: WebSocket, mut feed: Feed) {
    let (mut sink, mut incoming) = socket.split();
    let typed = |kind: &str, json: &str| format!(r#"{{"type":"{kind}",{}"#, &json[1..]);
    if sink
        .send(Message::Text(typed("hello", &feed.hello()).into()))
        .await
        .is_err()
    {
        return;
    }
    loop {
        let out = tokio::select! {
            message = incoming.next() => match message {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => continue,
            },
            out = feed.next() => out,
        };
        let message = match out {
            Out::Record(id, json) => {
                let json = format!(r#"{{"id":"{id}",{}"#, &json[1..]);
                Message::Text(typed("record", &json).into())
            }
            Out::Status(json) => Message::Text(typed("status", &json).into()),
            Out::Missed(json) => Message::Text(typed("missed", &json).into()),
            Out::Closed(reason) => {
                let _ = sink
                    .send(Message::Close(Some(CloseFrame {
                        code: 1001, // going away
                        reason: reason.chars().take(120).collect::<String>().into(),
                    })))
                    .await;
                return;
            }
        };
        // A client that stops reading is cut off by the connection's send timeout.
        if sink.send(message).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_names_outputs_and_status() {
        assert_eq!(
            parse_query(None).unwrap(),
            Ask {
                outputs: vec![],
                records: true,
                status: true,
                after: None,
            }
        );
        let ask = parse_query(Some("output=dashboard%2Fsummary&output=fraud&status=off")).unwrap();
        assert_eq!(ask.outputs, ["dashboard/summary", "fraud"]);
        assert!(!ask.status);
        assert!(
            parse_query(Some("outputs=x"))
                .unwrap_err()
                .contains("unknown parameter `outputs`")
        );
        assert!(parse_query(Some("output=")).is_err());
        assert!(parse_query(Some("status=maybe")).is_err());
        assert!(!parse_query(Some("records=off")).unwrap().records);
        assert_eq!(
            parse_query(Some("after=1700000000000-42")).unwrap().after,
            Some(RecordId {
                run: 1_700_000_000_000,
                seq: 42
            })
        );
        assert!(parse_query(Some("after=42")).is_err());
    }
}
