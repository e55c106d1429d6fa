//! Keelson's UI gateway: HTTP in, a [`Request`](keelson_protocol::Request) envelope out
//! over the transport, the [`Reply`](keelson_protocol::Reply) back to HTTP.
//!
//! The gateway is the thin edge of the mesh. It terminates HTTP, verifies who the
//! caller is, turns `POST /api/{handler}` into a request envelope routed by the handler
//! name, waits for the one reply until the request's deadline, and maps that reply (or
//! the reason there is none) to an HTTP response. It runs no handler code and holds no
//! user state: any number of gateways can run behind any load balancer, and a request
//! can land on any of them. Per-user state lives with the logic servers.
//!
//! ```text
//! client ──HTTP──▶ request_id ─▶ trace ─▶ api::call ──Transport::request──▶ logic server
//!                                           │ (limits, token, deadline, JSON check)
//! client ◀──JSON── error::ApiError / reply body ◀────────── Reply ──────────┘
//! ```
//!
//! What it guarantees to clients:
//!
//! * every response, error or not, carries an `X-Request-Id`, and the same id is the
//!   [`Request::id`](keelson_protocol::Request::id) the logic server sees;
//! * every error has the body `{"error":{"code":"...","message":"..."}}`, one status per
//!   kind of failure (see [`ApiError`]);
//! * the user of a request comes only from a verified `Authorization: Bearer` token
//!   (HS256 with the mesh's secret, or RS256/ES256 with keys from a JWKS file; see
//!   [`TokenVerifier`]); no header, query or body field can set it;
//! * a request never waits past its deadline, and above
//!   [`GatewayConfig::max_in_flight`] requests are refused at once rather than queued.
//!
//! The root binary builds a [`Gateway`] from [`GatewayConfig`], a [`TokenVerifier`]
//! built by [`TokenVerifier::from_config`] from [`AuthConfig`], and a transport, then calls [`Gateway::bind`] and
//! [`Gateway::serve`].

#![warn(missing_docs)]

mod api;
mod auth;
mod cluster;
mod config;
mod connections;
mod cors;
mod dashboard;
mod dead_letters;
mod error;
mod jobs;
mod metrics;
mod request_id;
mod routes;
mod server;
mod trace;

pub use api::SERVED_BY_HEADER;
pub use auth::{
    AuthConfig, AuthError, MAX_SUBJECT_BYTES, MAX_TOKEN_BYTES, MISS_RELOAD_INTERVAL, Secret,
    TokenAlgorithm, TokenRejection, TokenVerifier, issue_token, issue_token_for, verify_token,
};
pub use config::GatewayConfig;
pub use connections::ConnectionStats;
pub use cors::{CorsConfig, CorsConfigError};
pub use error::ApiError;
pub use metrics::{MAX_HANDLER_SERIES, MetricsRender, TEXT_FORMAT, describe_metrics};
pub use request_id::{REQUEST_ID_HEADER, RequestId};
pub use server::Gateway;
