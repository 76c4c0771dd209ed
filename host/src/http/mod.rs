//! The host's HTTP server (axum on the host's tokio runtime): `/metrics` and `/healthz`, and
//! the collector (`POST /v1/events`, `/tracker.js`, `/demo`: [`collector`]). Bounded: at most
//! `[http] max_connections` connections at once (more wait in the kernel's backlog), and the
//! accept loop backs off after an error such as too many open files. Stops gracefully at
//! shutdown.

pub mod collector;
pub mod health;
mod listener;

pub use health::{Health, health};
pub use listener::{BoundedListener, accept_with_backoff};

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

/// The routes.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(health_page))
        .fallback(not_found)
        .with_state(metrics)
}

/// Serves `router` on `listener` until `shutdown`, then lets requests in flight finish.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let listener = BoundedListener::new(listener, max_connections);
    let stopping = async move {
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                break;
            }
        }
    };
    if let Err(e) = axum::serve(listener, router)
        .with_graceful_shutdown(stopping)
        .await
    {
        tracing::error!("http server stopped: {e}");
    }
}

async fn metrics_page(State(metrics): State<Arc<Metrics>>) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], metrics.render()).into_response()
}

/// 200 with the report while healthy, 503 with the same report while degraded, so a load
/// balancer or an orchestrator's probe sees the difference without parsing the body.
async fn health_page(State(metrics): State<Arc<Metrics>>) -> Response {
    let report = health(&metrics);
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
    (StatusCode::NOT_FOUND, "try /metrics or /healthz\n")
}
