//! The dashboard: plain HTML and JavaScript served by the binary, no network access needed.
//! It reads `/v1/dashboard` (every system with its topology, checks and live figures).

use axum::Router;
use axum::response::Html;
use axum::routing::get;

const INDEX_HTML: &str = include_str!("index.html");

/// `/` and `/systems/{id}`: the same page, which reads the path to pick its view.
pub fn routes() -> Router {
    Router::new().route("/", get(|| async { Html(INDEX_HTML) })).route("/systems/{id}", get(|| async { Html(INDEX_HTML) }))
}
