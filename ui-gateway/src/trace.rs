//! One tracing span per HTTP exchange.
//!
//! tower-http's `TraceLayer` opens the span; it sits inside the request-id layer so the
//! span carries the id the envelope will carry, and the `/api` handler fills in
//! `handler` once it has validated the name. The layer logs one `served` event per
//! response with its status and latency; failures are logged where their cause is
//! known (see [`crate::ApiError`]), so the layer's own failure hook stays silent.
//!
//! The span is also the request's OpenTelemetry server span: it continues the
//! client's `traceparent` or starts a trace ([`keelson_protocol::trace::adopt`]), and
//! carries `trace_id` beside `request_id`, so every log line of the request shows
//! both. With export off nothing else is done per request.

use crate::request_id::RequestId;
use axum::Router;
use axum::body::Body;
use axum::http::{Request, Response};
use keelson_protocol::trace::{TRACEPARENT, TraceIdHex, TraceParent};
use std::collections::BTreeMap;
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

/// The trace context a request carries on: the client's `traceparent` and
/// `tracestate` when well-formed (see [`crate::api`]); with export off, a new trace
/// when the client sent none, so that the logs of every process the request
/// reaches share one trace id. Placed in the request's extensions.
#[derive(Debug, Clone, Default)]
pub(crate) struct TraceContext(
    pub(crate) BTreeMap<String, String>,
    /// Its `traceparent`, parsed (once per request).
    pub(crate) Option<TraceParent>,
);

/// Place the request's [`TraceContext`] in its extensions; run by the request-id
/// middleware, before the span is made.
pub(crate) fn attach_context(request: &mut Request<Body>) {
    let mut headers = crate::api::propagated(request.headers());
    let parent = if keelson_protocol::trace::enabled() {
        let parent = headers.get(TRACEPARENT).and_then(|v| TraceParent::parse(v));
        if parent.is_none() {
            // The server span starts the trace (the sampler decides).
            headers.clear();
        }
        parent
    } else {
        // Fills in a new trace when the client's is missing or malformed.
        Some(keelson_protocol::trace::carried(&mut headers))
    };
    request
        .extensions_mut()
        .insert(TraceContext(headers, parent));
}

fn make_span(request: &Request<Body>) -> Span {
    let id = request
        .extensions()
        .get::<RequestId>()
        .map(RequestId::as_str)
        .unwrap_or_default();
    let context = request.extensions().get::<TraceContext>();
    if !keelson_protocol::trace::enabled() {
        // The trace id is a field from the start: one formatting of the fields.
        let trace_id = context.and_then(|c| c.1).map(|tp| TraceIdHex(tp.trace_id));
        return tracing::info_span!(
            "request",
            request_id = %id,
            trace_id = trace_id.map(tracing::field::display),
            method = %request.method(),
            path = %request.uri().path(),
            handler = Empty,
            status = Empty,
            latency_ms = Empty,
        );
    }
    // The span's name is its route (low cardinality); the path is an attribute.
    let route = match request.uri().path() {
        p if p.starts_with("/api/") => "/api/{handler}",
        p @ ("/healthz" | "/readyz" | "/cluster") => p,
        _ => "",
    };
    let name = format!("{} {route}", request.method());
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        trace_id = Empty,
        method = %request.method(),
        path = %request.uri().path(),
        handler = Empty,
        status = Empty,
        latency_ms = Empty,
        otel.name = name.trim_end(),
        otel.kind = "server",
        otel.status_code = Empty,
    );
    let mut headers = context.map(|c| c.0.clone()).unwrap_or_default();
    keelson_protocol::trace::adopt(&span, &mut headers);
    span
}

fn on_response(response: &Response<Body>, latency: Duration, span: &Span) {
    let status = response.status().as_u16();
    let latency_ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
    span.record("status", status);
    span.record("latency_ms", latency_ms);
    if status >= 500 && keelson_protocol::trace::enabled() {
        span.record("otel.status_code", "ERROR");
    }
    // Status and latency are on the span, so every line of this request shows them.
    // Server errors are worth an operator's attention; a line per successful request
    // costs a tenth of the gateway's CPU, so it is debug (RUST_LOG=...=debug).
    if status >= 500 {
        tracing::warn!(parent: span, "served");
    } else {
        tracing::debug!(parent: span, "served");
    }
}

/// The span of the request's publish (an OpenTelemetry producer span, child of the
/// current request span); with export on, `headers` are set to its trace context so
/// that the logic server's span becomes its child.
pub(crate) fn publish_span(handler: &str, headers: &mut BTreeMap<String, String>) -> Span {
    if !keelson_protocol::trace::enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "publish",
        otel.name = %format_args!("{handler} publish"),
        otel.kind = "producer",
        messaging.operation.type = "send",
        messaging.destination.name = %handler,
    );
    keelson_protocol::trace::inject(&span, headers);
    span
}

/// Record the handler name on the current request's span.
pub(crate) fn record_handler(handler: &str) {
    Span::current().record("handler", tracing::field::display(handler));
}
