//! The logic server's admin listener (`[logic_server] admin_listen`): a small HTTP
//! server beside the broker connection, for Prometheus and for probes.
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /metrics` | the process's metrics, Prometheus text format |
//! | `GET /healthz` | 200 `{"status":"ok"}` while the process runs (liveness) |
//! | `GET /readyz` | 200 `{"status":"ready"}` once the server consumes (after its context join); 503 `{"status":"starting"}` before, `{"status":"draining"}` once it stops taking requests |
//! | anything else | 404 `{"error":{"code":"not_found",...}}` |
//!
//! It listens before the server starts (so `/readyz` answers 503 while the context
//! joins) and stops last, with the transport, so that probes see the drain.

use anyhow::Context as _;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use keelson_logic_server::ServerStats;
use keelson_ui_gateway::{MetricsRender, TEXT_FORMAT};
use serde_json::json;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use tokio::net::TcpListener;

/// What the admin routes read.
#[derive(Debug, Clone)]
struct AdminState {
    render: Option<MetricsRender>,
    /// Set once the logic server started.
    server: Arc<OnceLock<Arc<ServerStats>>>,
}

/// A bound admin listener, not yet serving.
#[derive(Debug)]
pub struct AdminListener {
    listener: TcpListener,
    state: AdminState,
}

impl AdminListener {
    /// Bind `addr` (the value of `logic_server.admin_listen`).
    pub async fn bind(addr: &str, render: Option<MetricsRender>) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr).await.with_context(|| {
            format!("logic_server.admin_listen: cannot listen on `{addr}` (expected a free host:port, e.g. 127.0.0.1:9464)")
        })?;
        Ok(Self {
            listener,
            state: AdminState {
                render,
                server: Arc::default(),
            },
        })
    }

    /// The bound address (the port chosen when the configuration says 0).
    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.listener
            .local_addr()
            .context("the admin listener has no address")
    }

    /// Where `/readyz` learns that the server started.
    pub fn readiness(&self) -> Arc<OnceLock<Arc<ServerStats>>> {
        self.state.server.clone()
    }

    /// Serve until the task is aborted.
    pub async fn serve(self) {
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .fallback(not_found)
            .with_state(self.state);
        if let Err(e) = axum::serve(self.listener, app).await {
            tracing::warn!(error = %e, "the admin listener stopped");
        }
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    match &state.render {
        Some(render) => ([(CONTENT_TYPE, TEXT_FORMAT)], render.render()).into_response(),
        None => not_found().await,
    }
}

async fn healthz() -> Response {
    axum::Json(json!({"status": "ok"})).into_response()
}

async fn readyz(State(state): State<AdminState>) -> Response {
    let (status, word) = match state.server.get() {
        None => (StatusCode::SERVICE_UNAVAILABLE, "starting"),
        Some(stats) if stats.is_ready() => (StatusCode::OK, "ready"),
        Some(_) => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
    };
    (status, axum::Json(json!({"status": word}))).into_response()
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"error": {"code": "not_found", "message": "no such route"}})),
    )
        .into_response()
}
