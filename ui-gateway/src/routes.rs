//! The gateway's routes and the layers around them.
//!
//! | route | answer |
//! | --- | --- |
//! | `POST /api/{handler}` | the handler's reply (see [`crate::api`]) |
//! | `GET /healthz` | 200 `{"status":"ok"}` while the process serves (liveness) |
//! | `GET /readyz` | 200 `{"status":"ready"}` when the transport can carry traffic, else 503 `not_ready` |
//! | `GET /cluster` | the logic servers heard on the control channel (see [`crate::cluster`]) |
//! | `GET /dashboard` | the live cluster page, unless `gateway.dashboard = false` (see [`crate::dashboard`]) |
//! | `GET /metrics` | the process's metrics, Prometheus text format (see [`crate::metrics`]) |
//! | anything else | 404 `not_found`, or 405 `method_not_allowed` on a known path |
//!
//! Layers, outermost first: request id, CORS (when `gateway.cors` is on, see
//! [`crate::cors`]), trace span, body limit. All routes sit inside
//! all of them, so every response (probes and unknown routes too) has an
//! `X-Request-Id` and a span.

use crate::api;
use crate::auth::TokenVerifier;
use crate::config::GatewayConfig;
use crate::cors::{self, Cors};
use crate::error::ApiError;
use crate::request_id;
use crate::trace;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router, middleware};
use keelson_protocol::Transport;
use serde_json::json;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// What every route handler shares. Cheap to clone; holds no per-user state.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    /// The gateway's configuration.
    pub(crate) config: Arc<GatewayConfig>,
    /// Verifies bearer tokens.
    pub(crate) verifier: TokenVerifier,
    /// Carries requests to the logic servers.
    pub(crate) transport: Arc<dyn Transport>,
    /// One permit per `/api` request being served (`max_in_flight`).
    pub(crate) in_flight: Arc<Semaphore>,
    /// One permit per KiB of request bodies held (`max_buffered_body_bytes`).
    pub(crate) body_budget: Arc<Semaphore>,
    /// Logic servers heard on the control channel.
    pub(crate) cluster: Arc<crate::cluster::Cluster>,
    /// Figures of the open connections.
    pub(crate) connections: Arc<crate::connections::ConnectionStats>,
    /// The dead-letter count, cached.
    pub(crate) dead_letters: Arc<crate::dead_letters::DeadLetters>,
    /// The gateway's metric handles.
    pub(crate) metrics: Arc<crate::metrics::GatewayMetrics>,
    /// Renders `GET /metrics`; none: the route answers 404.
    pub(crate) render: Option<crate::metrics::MetricsRender>,
}

impl AppState {
    pub(crate) fn new(
        config: GatewayConfig,
        verifier: TokenVerifier,
        transport: Arc<dyn Transport>,
    ) -> Self {
        // The semaphore's own ceiling is far above any sane setting; clamp rather
        // than panic on an absurd one.
        let body_kib = config
            .max_buffered_body_bytes
            .div_ceil(1024)
            .min(Semaphore::MAX_PERMITS);
        let permits = config.max_in_flight.min(Semaphore::MAX_PERMITS);
        let cluster = Arc::new(crate::cluster::Cluster::default());
        let metrics = Arc::new(crate::metrics::GatewayMetrics::new());
        // Listening needs a runtime; a gateway built outside one (unit tests of the
        // router) simply shows an empty cluster.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(cluster.clone().listen(transport.clone(), metrics.clone()));
        }
        Self {
            config: Arc::new(config),
            verifier,
            transport,
            in_flight: Arc::new(Semaphore::new(permits)),
            body_budget: Arc::new(Semaphore::new(body_kib)),
            cluster,
            connections: Arc::default(),
            dead_letters: Arc::default(),
            metrics,
            render: None,
        }
    }
}

/// The complete router: routes, fallbacks and layers, with `state` applied.
pub(crate) fn router(state: AppState) -> Router {
    let config = state.config.clone();
    let body_limit = DefaultBodyLimit::max(config.max_body_bytes);
    let api_route = post(api::call).route_layer(middleware::from_fn_with_state(
        state.clone(),
        crate::metrics::middleware,
    ));
    let routes = Router::new()
        .route("/api/{handler}", api_route)
        .route("/metrics", get(crate::metrics::metrics_page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/cluster", get(crate::cluster::cluster))
        .route(
            "/jobs/{id}",
            get(crate::jobs::status).delete(crate::jobs::cancel),
        )
        .merge(crate::dashboard::routes(config.dashboard))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(body_limit)
        .with_state(state);
    let app = trace::instrument(routes);
    // Inside the request id, so that preflight answers carry one too.
    let app = match Cors::new(&config.cors) {
        Some(cors) => app.layer(middleware::from_fn_with_state(cors, cors::middleware)),
        None => app,
    };
    app.layer(middleware::from_fn(request_id::middleware))
}

/// Liveness: the process is serving HTTP.
async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: the transport can carry requests now.
async fn readyz(State(state): State<AppState>) -> Response {
    if state.transport.is_ready() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        ApiError::NotReady.into_response()
    }
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
