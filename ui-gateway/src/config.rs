//! The gateway's section of the configuration.
//!
//! Defaults live in one place, the [`Default`] impl, and `#[serde(default)]` fills any
//! key a TOML file leaves out from it. Unknown keys are refused so that a typo is an
//! error instead of a silently ignored setting.

use crate::cors::CorsConfig;
use serde::Deserialize;
use std::time::Duration;

/// Longest deadline the gateway gives a request, whatever the configuration says; it
/// keeps deadline arithmetic far from overflow. One day.
pub(crate) const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

/// How the HTTP side of the gateway behaves.
///
/// ```
/// use keelson_ui_gateway::GatewayConfig;
///
/// let config = GatewayConfig {
///     listen: "0.0.0.0:8080".into(),
///     ..GatewayConfig::default()
/// };
/// assert_eq!(config.request_timeout_ms, 10_000);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Address and port to listen on, e.g. `"127.0.0.1:8080"` or `"0.0.0.0:8080"`.
    pub listen: String,
    /// Deadline given to each request, in milliseconds: the logic server abandons the
    /// work after it and the client gets 504. A client may ask for less with the
    /// `x-keelson-timeout-ms` header, never for more. Capped at one day.
    pub request_timeout_ms: u64,
    /// Largest request body accepted, in bytes; a larger one gets 413.
    pub max_body_bytes: usize,
    /// Most bytes of request bodies this gateway holds at once (bodies being read
    /// and requests in flight); a body that would pass it gets 503 `overloaded`.
    /// Bounds the memory that many slow or large bodies can take.
    pub max_buffered_body_bytes: usize,
    /// Most `/api` requests this gateway serves at once; above it a request gets 503
    /// `overloaded` at once instead of queueing. Health probes are not counted.
    pub max_in_flight: usize,
    /// On shutdown, how long open connections may take to finish, in milliseconds;
    /// after it the gateway stops waiting for them.
    pub shutdown_timeout_ms: u64,
    /// A connection must send a complete request head (request line and headers)
    /// within this many milliseconds of being accepted or of its previous response,
    /// else it is closed: this closes slow-header, silent and idle keep-alive
    /// connections.
    pub header_read_timeout_ms: u64,
    /// A connection with no request being handled and no byte sent or received for
    /// this many milliseconds is closed: a client that stops reading its response.
    pub idle_timeout_ms: u64,
    /// A request's body must arrive whole within this many milliseconds of its head,
    /// else the client gets 408 `body_timeout` and the connection is closed.
    pub body_read_timeout_ms: u64,
    /// Most connections open at once; one past it is closed as soon as it is
    /// accepted. Lowered at start to fit the open-file limit (keeping 64 descriptors
    /// for the rest), which the shipped systemd unit sets with `LimitNOFILE`.
    pub max_connections: usize,
    /// Most connections open at once from one client IP address; 0 for no bound. Set
    /// 0 (or the proxy's share) when every client comes through one reverse proxy.
    pub max_connections_per_client: usize,
    /// CORS for browser apps on other origins (`[gateway.cors]`); off by default.
    pub cors: CorsConfig,
    /// Serve the live cluster page `GET /dashboard` (and its script and style under
    /// `/dashboard/`); `false` answers them 404. It shows what `GET /cluster` and
    /// `GET /metrics` already show, no request data.
    pub dashboard: bool,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".to_owned(),
            request_timeout_ms: 10_000,
            max_body_bytes: 1_048_576,
            max_buffered_body_bytes: 256 * 1024 * 1024,
            max_in_flight: 1024,
            shutdown_timeout_ms: 5_000,
            header_read_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            body_read_timeout_ms: 30_000,
            max_connections: 10_000,
            max_connections_per_client: 256,
            cors: CorsConfig::default(),
            dashboard: true,
        }
    }
}

impl GatewayConfig {
    /// The deadline given to each request, capped at one day.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms).min(MAX_REQUEST_TIMEOUT)
    }

    /// How long graceful shutdown waits for open connections.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }

    /// How long a connection may take to send a request head (at least 1 ms).
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms.max(1)).min(MAX_REQUEST_TIMEOUT)
    }

    /// How long a connection may stay idle (at least 1 ms).
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms.max(1)).min(MAX_REQUEST_TIMEOUT)
    }

    /// How long a request's body may take to arrive (at least 1 ms).
    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_millis(self.body_read_timeout_ms.max(1)).min(MAX_REQUEST_TIMEOUT)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<GatewayConfig, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn defaults_fill_missing_keys() {
        let config = parse(r#"{"listen":"0.0.0.0:9000"}"#).unwrap();
        assert_eq!(config.listen, "0.0.0.0:9000");
        assert_eq!(config.request_timeout_ms, 10_000);
        assert_eq!(config.max_body_bytes, 1_048_576);
        assert_eq!(config.max_in_flight, 1024);
        assert_eq!(config.shutdown_timeout_ms, 5_000);
        assert_eq!(parse("{}").unwrap(), GatewayConfig::default());
    }

    #[test]
    fn unknown_key_is_refused_by_name() {
        let err = parse(r#"{"request_timeout":5}"#).unwrap_err();
        assert!(err.to_string().contains("request_timeout"), "{err}");
    }

    #[test]
    fn wrong_type_is_refused() {
        assert!(parse(r#"{"max_in_flight":"many"}"#).is_err());
    }

    #[test]
    fn request_timeout_is_capped() {
        let config = GatewayConfig {
            request_timeout_ms: u64::MAX,
            ..GatewayConfig::default()
        };
        assert_eq!(config.request_timeout(), MAX_REQUEST_TIMEOUT);
        assert_eq!(
            GatewayConfig::default().request_timeout(),
            Duration::from_secs(10)
        );
    }
}
