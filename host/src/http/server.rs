//! Serving the router: the accept loop and one task per connection (hyper's HTTP/1), with
//! what keeps the port safe to open to anyone.
//!
//! - At most `[http] max_connections` connections are served at once. When all places are
//!   taken, a new connection takes the place of the oldest one that has not sent a whole
//!   request yet (a silent or slow client): an operator's `/healthz` or `/metrics` is
//!   answered however many idle connections someone opened. Only when every connection is
//!   busy with a request does the next one wait (in the kernel's backlog).
//! - A connection has `[http] head_timeout_ms` to send a complete request head, counted from
//!   when it opens or its previous response ended (hyper's one clock for both): a silent
//!   connection, a head sent a byte at a time and an idle keep-alive connection are closed
//!   after it. Bodies are bounded by their readers (`body_timeout_ms` in the collector);
//!   a peer that takes nothing of what is sent, by `send_timeout_ms` ([`super::listener`]).
//! - Stopping: no new connection is accepted, each open one is asked to finish its
//!   request and close, and whatever is still open [`SHUTDOWN_GRACE`] later is dropped: a
//!   slow client never holds the host's stop.

use super::listener::{Permitted, accept_with_backoff};
use crate::config::HttpConfig;
use crate::metrics::Metrics;
use crate::retry::Policy;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::BTreeMap;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, watch};
use tokio::task::JoinSet;

/// How long a stopping server lets open connections finish their requests.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// One open connection, as the accept loop sees it.
#[derive(Default)]
struct Connection {
    /// No request has come whole on it yet: it may give its place to a newcomer.
    silent: AtomicBool,
    /// Tells its task to drop it.
    evict: Notify,
}

/// The open connections, in the order they were accepted.
#[derive(Default)]
struct Open {
    next: u64,
    by_age: BTreeMap<u64, Arc<Connection>>,
}

impl Open {
    fn add(&mut self) -> (u64, Arc<Connection>) {
        let connection = Arc::new(Connection {
            silent: AtomicBool::new(true),
            evict: Notify::new(),
        });
        self.next += 1;
        self.by_age.insert(self.next, connection.clone());
        (self.next, connection)
    }

    /// Tells the oldest silent connection to go; whether there was one.
    fn evict_oldest_silent(&mut self) -> bool {
        let oldest = self
            .by_age
            .iter()
            .find(|(_, c)| c.silent.load(Relaxed))
            .map(|(id, _)| *id);
        match oldest.and_then(|id| self.by_age.remove(&id)) {
            Some(connection) => {
                connection.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Serves `router` on `listener` until `shutdown` becomes true (see the module's doc).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    config: &HttpConfig,
    metrics: &Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let places = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let open = Arc::new(Mutex::new(Open::default()));
    let head_timeout = Duration::from_millis(config.head_timeout_ms);
    let send_timeout = Duration::from_millis(config.send_timeout_ms);
    let mut tasks = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = accept_with_backoff(Policy::ACCEPT, || listener.accept()) => accepted,
            _ = stopping(&mut shutdown) => break,
        };
        let (stream, _peer) = accepted;
        let place = match places.clone().try_acquire_owned() {
            Ok(place) => place,
            Err(_) => {
                if open.lock().expect("open lock").evict_oldest_silent() {
                    metrics.http_evicted.fetch_add(1, Relaxed);
                }
                tokio::select! {
                    place = places.clone().acquire_owned() => place.expect("never closed"),
                    _ = stopping(&mut shutdown) => break,
                }
            }
        };
        let (id, connection) = open.lock().expect("open lock").add();
        let io = Permitted::new(
            stream,
            place,
            send_timeout,
            metrics.http_send_timeouts.clone(),
        );
        let (router, open, shutdown) = (router.clone(), open.clone(), shutdown.clone());
        tasks.spawn(async move {
            serve_connection(io, router, connection, head_timeout, shutdown).await;
            open.lock().expect("open lock").by_age.remove(&id);
        });
        // Finished connections' results, so the set does not grow.
        while tasks.try_join_next().is_some() {}
    }
    drop(listener);
    // Each task bounds its own wind-down by SHUTDOWN_GRACE.
    while tasks.join_next().await.is_some() {}
}

/// One connection until it closes, is evicted, or the host stops.
async fn serve_connection(
    io: Permitted,
    router: Router,
    connection: Arc<Connection>,
    head_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let seen = connection.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        seen.silent.store(false, Relaxed);
        let mut router = router.clone();
        // A Router is always ready: no poll_ready needed.
        async move { tower_service::Service::call(&mut router, request).await }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout)
        .keep_alive(true);
    let mut conn = pin!(
        builder
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades()
    );
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!("http connection ended: {e}");
            }
        }
        _ = connection.evict.notified() => {
            tracing::debug!("http: a silent connection gave its place to a new one");
        }
        _ = stopping(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
        }
    }
}

/// Until the host stops (or nobody can tell it any more).
async fn stopping(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stopping| *stopping).await;
}
