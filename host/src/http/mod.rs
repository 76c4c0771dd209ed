//! The host's HTTP server (axum routes, served by hyper on the host's tokio runtime):
//! `/metrics` and `/healthz`; the live stream of plugins' outputs (`/v1/stream`, `/v1/ws`:
//! [`stream`]) and the web dashboard at `/` (`pages.rs`); the collector (`POST /v1/events`,
//! `/tracker.js`, `/demo`: [`collector`]). Connections are bounded and timed ([`server`]:
//! `[http] max_connections`, a silent connection gives its place to a new one,
//! `head_timeout_ms`; `listener.rs`: `send_timeout_ms`, accept backoff). Stops within
//! [`server::SHUTDOWN_GRACE`] at shutdown (live streams end with a `closed` message).

pub mod collector;
pub mod guard;
pub mod health;
mod listener;
mod pages;
pub mod server;
pub mod stream;

pub use health::{Health, health};
pub use listener::accept_with_backoff;
pub use server::serve;

use crate::live::Live;
use crate::metrics::Metrics;
use crate::metrics::exposition::CONTENT_TYPE;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Binds `address`; the error names it and says where to change it.
pub async fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {address} for /metrics: {e} (change [http] address in plugins.toml)"
        )
    })
}

/// What every handler may use.
#[derive(Clone)]
pub struct Shared {
    pub metrics: Arc<Metrics>,
    pub live: Arc<Live>,
    /// Becomes true when the host stops: long-lived responses (live streams) end then.
    pub shutdown: watch::Receiver<bool>,
    /// Who may read the outputs.
    pub access: Arc<guard::Access>,
}

/// The routes.
pub fn router(shared: Shared) -> Router {
    Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(health_page))
        .merge(stream::routes())
        .merge(pages::routes())
        .fallback(not_found)
        .with_state(shared)
}

async fn metrics_page(State(shared): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        shared.metrics.render(),
    )
        .into_response()
}

/// 200 with the report while healthy, 503 with the same report while degraded, so a load
/// balancer or an orchestrator's probe sees the difference without parsing the body.
async fn health_page(State(shared): State<Shared>) -> Response {
    let report = health(&shared.metrics);
    let status = if report.healthy() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        report.to_json() + "\n",
    )
        .into_response()
}

async fn not_found() -> (StatusCode, &'static str) {
    (
        StatusCode::NOT_FOUND,
        "try / (the dashboard), /metrics, /healthz or /v1/stream\n",
    )
}
