//! One tracing span per HTTP exchange.
//!
//! tower-http's `TraceLayer` opens the span; it sits inside the request-id layer so the
//! span carries the id the envelope will carry, and the `/api` handler fills in
//! `handler` once it has validated the name. The layer logs one `served` event per
//! response with its status and latency; failures are logged where their cause is
//! known (see [`crate::ApiError`]), so the layer's own failure hook stays silent.

use crate::request_id::RequestId;
use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response};
use std::time::Duration;
use tower_http::trace::TraceLayer;
use tracing::Span;
use tracing::field::Empty;

/// Wrap `router` in the per-request span layer.
pub(crate) fn instrument(router: Router) -> Router {
    router.layer(
        TraceLayer::new_for_http()
            .make_span_with(make_span)
            .on_request(())
            .on_response(on_response)
            .on_body_chunk(())
            .on_eos(())
            .on_failure(()),
    )
}

fn make_span(request: &Request<Body>) -> Span {
    let id = request
        .extensions()
        .get::<RequestId>()
        .map(RequestId::as_str)
        .unwrap_or_default();
    tracing::info_span!(
        "request",
        request_id = %id,
        method = %request.method(),
        path = %request.uri().path(),
        handler = Empty,
        status = Empty,
        latency_ms = Empty,
    )
}

fn on_response(response: &Response<Body>, latency: Duration, span: &Span) {
    let status = response.status().as_u16();
    let latency_ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
    span.record("status", status);
    span.record("latency_ms", latency_ms);
    // Status and latency are on the span, so every line of this request shows them.
    // Server errors are worth an operator's attention; a line per successful request
    // costs a tenth of the gateway's CPU, so it is debug (RUST_LOG=...=debug).
    if status >= 500 {
        tracing::warn!(parent: span, "served");
    } else {
        tracing::debug!(parent: span, "served");
    }
}

/// Record the handler name on the current request's span.
pub(crate) fn record_handler(handler: &str) {
    Span::current().record("handler", tracing::field::display(handler));
}
