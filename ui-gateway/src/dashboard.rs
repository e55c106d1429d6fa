//! `GET /dashboard`: the live cluster page an operator opens in a browser.
//!
//! One page, its script and its style, all compiled into the binary (no CDN, nothing
//! fetched from elsewhere). The script polls this gateway's own `GET /cluster`
//! (servers, job counts, leases and schedules, from heartbeats; dead letters) and
//! `GET /metrics` (per-handler rate, error rate and p99, from counter and
//! histogram-bucket deltas between polls) about once a second, and renders with
//! `textContent` only: names from heartbeats are never read as HTML. The page shows
//! no request data and no user ids, because neither source holds any.
//!
//! The responses forbid everything the page does not need (a `Content-Security-Policy`
//! that allows only this origin's script, style and fetches, no framing), and are
//! not cached, so an upgraded gateway serves its own page. `gateway.dashboard = false`
//! removes the routes: they answer 404 like any unknown path.

use crate::routes::AppState;
use axum::Router;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};
use axum::response::IntoResponse;
use axum::routing::get;

const PAGE: &str = include_str!("dashboard/index.html");
const SCRIPT: &str = include_str!("dashboard/dashboard.js");
const STYLE: &str = include_str!("dashboard/dashboard.css");

/// Only this origin's script, style and fetches; no inline code, no framing.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// The dashboard's routes when `enabled`, else none.
pub(crate) fn routes(enabled: bool) -> Router<AppState> {
    if !enabled {
        return Router::new();
    }
    Router::new()
        .route(
            "/dashboard",
            get(|| asset("text/html; charset=utf-8", PAGE)),
        )
        .route(
            "/dashboard/dashboard.js",
            get(|| asset("text/javascript; charset=utf-8", SCRIPT)),
        )
        .route(
            "/dashboard/dashboard.css",
            get(|| asset("text/css; charset=utf-8", STYLE)),
        )
}

async fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    (
        [
            (CONTENT_TYPE, content_type),
            (CACHE_CONTROL, "no-cache"),
            (CONTENT_SECURITY_POLICY, POLICY),
            (X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (X_FRAME_OPTIONS, "DENY"),
            (REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_page_loads_nothing_from_elsewhere_and_never_parses_data_as_html() {
        for asset in [super::PAGE, super::SCRIPT, super::STYLE] {
            for needle in ["http://", "https://", "//cdn", "@import", "url("] {
                assert!(!asset.contains(needle), "an asset names {needle}");
            }
        }
        assert!(!super::SCRIPT.contains("innerHTML"));
        assert!(!super::SCRIPT.contains("insertAdjacentHTML"));
    }
}
