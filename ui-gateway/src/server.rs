//! The gateway as a running server: build it, bind it, serve until told to stop.

use crate::auth::{AuthConfig, Secret, TokenVerifier};
use crate::config::GatewayConfig;
use crate::connections::ConnectionStats;
use crate::metrics::MetricsRender;
use crate::routes::{self, AppState};
use axum::Router;
use keelson_protocol::Transport;
use std::future::Future;
use std::io;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Listen backlog of the gateway's socket.
pub const LISTEN_BACKLOG: u32 = 4096;

/// A UI gateway: HTTP on one side, a [`Transport`] on the other.
///
/// ```no_run
/// use keelson_protocol::transport::memory::MemoryTransport;
/// use keelson_ui_gateway::{Gateway, GatewayConfig, Secret};
/// use std::sync::Arc;
///
/// # async fn run() -> std::io::Result<()> {
/// let secret = Secret::new("dev-secret").expect("non-empty");
/// let gateway = Gateway::new(GatewayConfig::default(), secret, Arc::new(MemoryTransport::new()));
/// let listener = gateway.bind().await?;
/// gateway
///     .serve(listener, async {
///         let _ = tokio::signal::ctrl_c().await;
///     })
///     .await
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Gateway {
    state: AppState,
}

impl Gateway {
    /// A gateway with `config`, verifying HS256 tokens signed with `secret` under the
    /// default claim rules of [`AuthConfig`], sending requests over `transport`.
    pub fn new(config: GatewayConfig, secret: Secret, transport: Arc<dyn Transport>) -> Self {
        let verifier = TokenVerifier::hs256(secret, &AuthConfig::default());
        Self::with_verifier(config, verifier, transport)
    }

    /// A gateway with `config`, verifying tokens with `verifier` (usually
    /// [`TokenVerifier::from_config`]), sending requests over `transport`.
    pub fn with_verifier(
        config: GatewayConfig,
        verifier: TokenVerifier,
        transport: Arc<dyn Transport>,
    ) -> Self {
        Self {
            state: AppState::new(config, verifier, transport),
        }
    }

    /// Serve `GET /metrics` with `render` (the process's metrics recorder, which
    /// the gateway's own figures are recorded to). Without it the route answers 404.
    pub fn with_metrics(mut self, render: MetricsRender) -> Self {
        self.state.render = Some(render);
        self
    }

    /// The gateway's configuration.
    pub fn config(&self) -> &GatewayConfig {
        &self.state.config
    }

    /// The complete HTTP application, for tests or for embedding in another server.
    /// Routers from one gateway share its in-flight limit.
    pub fn router(&self) -> Router {
        routes::router(self.state.clone())
    }

    /// Bind a TCP listener on [`GatewayConfig::listen`], with a listen backlog of
    /// [`LISTEN_BACKLOG`] (the kernel caps it at `net.core.somaxconn`): a burst of
    /// connections waits there to be accepted, instead of half-completing handshakes
    /// the gateway never sees.
    pub async fn bind(&self) -> io::Result<TcpListener> {
        let mut last_error = None;
        for addr in tokio::net::lookup_host(&self.state.config.listen).await? {
            let socket = match addr {
                std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
            };
            socket.set_reuseaddr(true)?;
            match socket
                .bind(addr)
                .and_then(|()| socket.listen(LISTEN_BACKLOG))
            {
                Ok(listener) => return Ok(listener),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("`{}` names no address", self.state.config.listen),
            )
        }))
    }

    /// Serve HTTP on `listener` until `shutdown` completes, then shut down gracefully:
    /// stop accepting, let open connections finish, and return.
    ///
    /// Connections are served within the limits of [`GatewayConfig`] (see
    /// `connections.rs`). The wait for open connections is bounded by
    /// [`GatewayConfig::shutdown_timeout_ms`]; after it this returns `Ok(())` and the
    /// connections still open end when the tokio runtime shuts down.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> io::Result<()> {
        let grace = self.state.config.shutdown_timeout();
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "gateway listening");
        }
        crate::connections::serve(
            listener,
            self.router(),
            &self.state.config,
            self.state.connections.clone(),
            shutdown,
            grace,
        )
        .await
    }

    /// Figures of the connections this gateway serves.
    pub fn connections(&self) -> &ConnectionStats {
        &self.state.connections
    }
}
