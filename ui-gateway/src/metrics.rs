//! The gateway's metrics and `GET /metrics`.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `keelson_gateway_requests_total` | counter | `handler`, `code` (HTTP status) |
//! | `keelson_gateway_request_duration_seconds` | histogram | `handler` |
//! | `keelson_gateway_requests_in_flight` | gauge | |
//! | `keelson_gateway_connections_open` | gauge | |
//! | `keelson_gateway_connections_refused_total` | counter | |
//!
//! The `handler` label takes only names a logic server announced in its heartbeat
//! or answered for, at most [`MAX_HANDLER_SERIES`] of them (past that, `other`);
//! every other name a client sends is `unknown`. So no client can grow the series
//! without bound. The handles of a handler's series are resolved once, when the name
//! is first learned, and read on each request from an [`ArcSwap`] snapshot: no lock
//! and no label formatting on the request path.
//!
//! The figures go to the process's `metrics` recorder (installed by the `keelson`
//! binary); the page itself is rendered by a [`MetricsRender`] the binary passes in.

use crate::routes::AppState;
use arc_swap::ArcSwap;
use axum::extract::{Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics::{Counter, Gauge, Histogram};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// Renders the process's metrics in the Prometheus text format (the `keelson`
/// binary makes one from its recorder). Cheap to clone.
#[derive(Clone)]
pub struct MetricsRender(Arc<dyn Fn() -> String + Send + Sync>);

impl MetricsRender {
    /// A renderer calling `render` for each scrape.
    pub fn new(render: impl Fn() -> String + Send + Sync + 'static) -> Self {
        Self(Arc::new(render))
    }

    /// The page: every metric of the process, in the Prometheus text format.
    pub fn render(&self) -> String {
        (self.0)()
    }
}

impl std::fmt::Debug for MetricsRender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsRender")
    }
}

/// Most handler names with series of their own; later ones share `other`.
pub const MAX_HANDLER_SERIES: usize = 256;

/// The content type of the Prometheus text format.
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Statuses the gateway answers `/api` with, each with a counter resolved on first
/// use; any other status is resolved per request (it does not happen in practice).
const CODES: [u16; 20] = [
    200, 201, 202, 204, 400, 401, 403, 404, 405, 408, 409, 413, 415, 422, 429, 500, 502, 503, 504,
    505,
];

/// A response extension set by `api::call` when a logic server answered for the
/// handler: its name is then worth a series of its own.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HandlerAnswered;

/// The series of one `handler` label value.
#[derive(Debug)]
pub(crate) struct HandlerSeries {
    label: Arc<str>,
    duration: Histogram,
    codes: [OnceLock<Counter>; CODES.len()],
}

impl HandlerSeries {
    fn new(label: &str) -> Self {
        let label: Arc<str> = Arc::from(label);
        Self {
            duration: metrics::histogram!(
                "keelson_gateway_request_duration_seconds",
                "handler" => label.to_string()
            ),
            label,
            codes: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    fn record(&self, status: StatusCode, seconds: f64) {
        self.duration.record(seconds);
        let code = status.as_u16();
        let counter = |code: u16| {
            metrics::counter!(
                "keelson_gateway_requests_total",
                "handler" => self.label.to_string(),
                "code" => code.to_string()
            )
        };
        match CODES.iter().position(|&c| c == code) {
            Some(i) => self.codes[i].get_or_init(|| counter(code)).increment(1),
            None => counter(code).increment(1),
        }
    }
}

/// The gateway's metric handles.
pub(crate) struct GatewayMetrics {
    handlers: ArcSwap<HashMap<Box<str>, Arc<HandlerSeries>>>,
    unknown: Arc<HandlerSeries>,
    other: Arc<HandlerSeries>,
    in_flight: Gauge,
    connections_open: Gauge,
    connections_refused: Counter,
}

impl std::fmt::Debug for GatewayMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayMetrics")
            .field("handlers", &self.handlers.load().len())
            .finish_non_exhaustive()
    }
}

impl GatewayMetrics {
    pub(crate) fn new() -> Self {
        Self {
            handlers: ArcSwap::default(),
            unknown: Arc::new(HandlerSeries::new("unknown")),
            other: Arc::new(HandlerSeries::new("other")),
            in_flight: metrics::gauge!("keelson_gateway_requests_in_flight"),
            connections_open: metrics::gauge!("keelson_gateway_connections_open"),
            connections_refused: metrics::counter!("keelson_gateway_connections_refused_total"),
        }
    }

    /// The series of `name`, a handler a logic server hosts: its own while fewer
    /// than [`MAX_HANDLER_SERIES`] names have one, else `other`.
    pub(crate) fn learn(&self, name: &str) -> Arc<HandlerSeries> {
        if let Some(series) = self.handlers.load().get(name) {
            return series.clone();
        }
        if self.handlers.load().len() >= MAX_HANDLER_SERIES {
            return self.other.clone();
        }
        // Rare (once per handler name): copy the table with the name added.
        let series = Arc::new(HandlerSeries::new(name));
        self.handlers.rcu(|table| {
            let mut table = HashMap::clone(table);
            if table.len() < MAX_HANDLER_SERIES {
                table
                    .entry(Box::from(name))
                    .or_insert_with(|| series.clone());
            }
            table
        });
        self.handlers
            .load()
            .get(name)
            .cloned()
            .unwrap_or_else(|| self.other.clone())
    }

    /// The series a finished `/api` request counts in.
    fn series(&self, name: Option<&str>, answered: bool) -> Arc<HandlerSeries> {
        let Some(name) = name.filter(|n| crate::api::valid_handler_name(n)) else {
            return self.unknown.clone();
        };
        if let Some(series) = self.handlers.load().get(name) {
            return series.clone();
        }
        if answered {
            self.learn(name)
        } else {
            self.unknown.clone()
        }
    }
}

/// Counts and times every `/api/{handler}` request (a route layer of that route).
pub(crate) async fn middleware(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    let metrics = &state.metrics;
    let started = Instant::now();
    // A reference count, not a copy of the path.
    let uri = request.uri().clone();
    metrics.in_flight.increment(1.0);
    // Decremented when dropped, so a request whose client went away counts too.
    let _in_flight = InFlight(&metrics.in_flight);
    let response = next.run(request).await;
    let answered = response.extensions().get::<HandlerAnswered>().is_some();
    metrics
        .series(uri.path().strip_prefix("/api/"), answered)
        .record(response.status(), started.elapsed().as_secs_f64());
    response
}

struct InFlight<'a>(&'a Gauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// `GET /metrics`: the process's metrics in the Prometheus text format (404 when
/// the process serves none).
pub(crate) async fn metrics_page(State(state): State<AppState>) -> Response {
    let metrics = &state.metrics;
    let Some(render) = &state.render else {
        return crate::error::ApiError::NotFound.into_response();
    };
    // Connection figures are kept by the accept loop; read them at scrape time.
    let connections = &state.connections;
    metrics.connections_open.set(connections.open() as f64);
    metrics.connections_refused.absolute(connections.refused());
    (
        [(CONTENT_TYPE, HeaderValue::from_static(TEXT_FORMAT))],
        render.render(),
    )
        .into_response()
}

/// Registers the HELP text of the gateway's metrics with the process's recorder.
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "keelson_gateway_requests_total",
        "Requests to /api/{handler} answered, by handler and HTTP status"
    );
    describe_histogram!(
        "keelson_gateway_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time from a request's arrival at the gateway to its response, by handler"
    );
    describe_gauge!(
        "keelson_gateway_requests_in_flight",
        "Requests to /api/{handler} being served now"
    );
    describe_gauge!(
        "keelson_gateway_connections_open",
        "HTTP connections open now"
    );
    describe_counter!(
        "keelson_gateway_connections_refused_total",
        "HTTP connections refused (over max_connections or the per-address bound, or accept errors)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handler_labels_are_bounded_and_only_for_hosted_handlers() {
        let metrics = GatewayMetrics::new();
        // A name nobody answered for, or not a handler name, is `unknown`.
        assert_eq!(&*metrics.series(Some("made.up"), false).label, "unknown");
        assert_eq!(&*metrics.series(Some("a/b"), true).label, "unknown");
        assert_eq!(&*metrics.series(None, true).label, "unknown");
        // A name a server answered for gets its own series, and keeps it.
        assert_eq!(&*metrics.series(Some("echo"), true).label, "echo");
        assert_eq!(&*metrics.series(Some("echo"), false).label, "echo");
        for i in 0..MAX_HANDLER_SERIES * 2 {
            metrics.learn(&format!("h{i}"));
        }
        assert_eq!(metrics.handlers.load().len(), MAX_HANDLER_SERIES);
        assert_eq!(&*metrics.series(Some("late.one"), true).label, "other");
        assert_eq!(&*metrics.series(Some("echo"), true).label, "echo");
    }
}
