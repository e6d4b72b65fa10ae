//! The dashboard: plain HTML, CSS and JavaScript compiled into the binary; no network access
//! needed (no CDN, no web fonts). It polls `/v1/dashboard` every second (every system with its
//! topology, checks and live figures) and turns the cumulative counters into rates by
//! differencing successive polls.
//!
//! `/` lists the 35 systems; `/systems/{id}` draws one system's topology as an SVG graph with
//! its live figures, status, checks and targets. Both are the same page, which reads the path to
//! pick its view. The stylesheet and the script are inlined into the page when it is served, so
//! that in tokens mode (`?access_token=`) the page needs a single authorised request; the script
//! passes the token on to its fetches and links.

use std::sync::LazyLock;

use axum::Router;
use axum::response::Html;
use axum::routing::get;

const INDEX_HTML: &str = include_str!("index.html");
const DASHBOARD_CSS: &str = include_str!("dashboard.css");
const DASHBOARD_JS: &str = include_str!("dashboard.js");

/// index.html with the stylesheet and script in place of its two markers.
static PAGE: LazyLock<String> = LazyLock::new(|| {
    INDEX_HTML
        .replacen("/*DASHBOARD_CSS*/", DASHBOARD_CSS, 1)
        .replacen("/*DASHBOARD_JS*/", DASHBOARD_JS, 1)
});

/// `/` and `/systems/{id}`: the same page, which reads the path to pick its view.
pub fn routes() -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE.as_str()) }))
        .route("/systems/{id}", get(|| async { Html(PAGE.as_str()) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_inlines_its_stylesheet_and_script_and_loads_nothing_from_elsewhere() {
        assert!(!PAGE.contains("/*DASHBOARD_CSS*/") && !PAGE.contains("/*DASHBOARD_JS*/"));
        assert!(PAGE.contains("function renderOverview"));
        for external in ["https://", "src=\"http", "href=\"http", "url(http", "@import", "@font-face"] {
            assert!(!PAGE.contains(external), "the dashboard must work offline: found {external}");
        }
    }
}
