//! The logic server's spans (OpenTelemetry when export is on, see
//! [`keelson_protocol::trace`]).
//!
//! | span | kind | parent |
//! | --- | --- | --- |
//! | `process` | consumer | the publish span of the request's sender (its `traceparent`) |
//! | `handler` | internal | `process` |
//! | `call` | producer | the calling `handler`; the callee's `process` is its child |
//! | `context apply` | consumer | none: *linked* to the span that wrote the delta |
//!
//! `process` exists with export off too: it carries `request_id`, `trace_id` and
//! `handler`, so every log line of the request shows them. The others are
//! [`Span::none`] then, which costs nothing.

use keelson_protocol::trace;
use keelson_protocol::{ReplyStatus, Request};
use std::collections::BTreeMap;
use tracing::Span;
use tracing::field::Empty;

/// The span of one request on this server, which continues the trace that the
/// request carries (its envelope's headers, else the message's); with export off, a
/// request without one is given a new trace id, written into its headers so that
/// its calls share it.
pub(crate) fn process_span(
    request: &mut Request,
    message_headers: &BTreeMap<String, String>,
) -> Span {
    take_message_trace(request, message_headers);
    if !trace::enabled() {
        // The trace id is a field from the start: one formatting of the fields.
        let carried = trace::carried(&mut request.headers);
        return tracing::info_span!(
            "process",
            request_id = %request.id,
            handler = %request.handler,
            trace_id = %trace::TraceIdHex(carried.trace_id),
        );
    }
    let span = tracing::info_span!(
        "process",
        request_id = %request.id,
        handler = %request.handler,
        trace_id = Empty,
        otel.name = %format_args!("{} process", request.handler),
        otel.kind = "consumer",
        otel.status_code = Empty,
    );
    trace::set_attribute(&span, "messaging.operation.type", "process");
    trace::set_attribute(
        &span,
        "messaging.destination.name",
        request.handler.as_str(),
    );
    trace::set_attribute(&span, "messaging.message.id", request.id.as_str());
    trace::set_attribute(&span, "keelson.attempt", request.attempt.to_string());
    trace::adopt(&span, &mut request.headers);
    span
}

/// A request that carries no trace context in its envelope takes the message's: a
/// peer in another language may set only the message headers.
fn take_message_trace(request: &mut Request, message_headers: &BTreeMap<String, String>) {
    if !request.headers.contains_key(trace::TRACEPARENT)
        && let Some(parent) = message_headers.get(trace::TRACEPARENT)
    {
        request
            .headers
            .insert(trace::TRACEPARENT.to_owned(), parent.clone());
        if let Some(state) = message_headers.get(trace::TRACESTATE) {
            request
                .headers
                .insert(trace::TRACESTATE.to_owned(), state.clone());
        }
    }
}

/// Mark the current `process` span failed when the handler's outcome is a server
/// error (500, 503, 504), with export on.
pub(crate) fn record_status(status: ReplyStatus) {
    if trace::enabled() && status.http_status() >= 500 {
        Span::current().record("otel.status_code", "ERROR");
    }
}

/// The span of the handler's own run, child of `process`; it carries the request's
/// id and trace id too (a JSON log line shows its current span's fields).
pub(crate) fn handler_span(handler: &str, request_id: &str) -> Span {
    if !trace::enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        "handler",
        otel.name = %handler,
        otel.kind = "internal",
        request_id = %request_id,
        trace_id = Empty,
        handler = %handler,
    );
    trace::record_trace_id(&span);
    span
}

/// The span of a handler-to-handler call, child of the calling handler's span.
pub(crate) fn call_span(handler: &str) -> Span {
    if !trace::enabled() {
        return Span::none();
    }
    tracing::info_span!(
        "call",
        otel.name = %format_args!("{handler} publish"),
        otel.kind = "producer",
        messaging.operation.type = "send",
        messaging.destination.name = %handler,
    )
}

/// The span of applying a peer's context delta, linked to the span of the request
/// that wrote it (the delta's `trace`); `None` with export off or without a link.
pub(crate) fn apply_span(origin: &str, traceparent: Option<&str>) -> Option<Span> {
    let traceparent = traceparent.filter(|_| trace::enabled())?;
    let span = tracing::info_span!(
        "context apply",
        otel.name = "context apply",
        otel.kind = "consumer",
        messaging.operation.type = "process",
        keelson.origin = %origin,
    );
    trace::link(&span, traceparent);
    Some(span)
}
