//! The web dashboard at `/`: plain HTML and JavaScript in `host/web/`, compiled into the
//! binary (no build step, nothing to install). The page reads the live stream
//! (`/v1/stream`): the dashboard plugin's figures, the alert plugins' records, and the
//! host's status each second.

use super::Shared;
use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

const INDEX_HTML: &str = include_str!("../../web/index.html");
const DASHBOARD_JS: &str = include_str!("../../web/dashboard.js");

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/", get(index))
        .route("/dashboard.js", get(script))
}

async fn index() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        INDEX_HTML,
    )
}

async fn script() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        DASHBOARD_JS,
    )
}
