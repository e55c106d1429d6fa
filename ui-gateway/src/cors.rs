//! CORS: letting browser apps served from other origins call the gateway.
//!
//! Off unless `gateway.cors.allowed_origins` names an origin; then, for a request
//! carrying `Origin`:
//!
//! * a preflight (`OPTIONS` with `Access-Control-Request-Method`) is answered here,
//!   204 with `Vary`, and, when the origin is allowed, `Access-Control-Allow-Origin`,
//!   `-Methods`, `-Headers` and `-Max-Age`. A preflight from another origin gets the
//!   same 204 without them: refusing is the browser's job, and answering every
//!   preflight alike tells a prober nothing about routes;
//! * any other request goes through, and its response gets
//!   `Access-Control-Allow-Origin` and `Access-Control-Expose-Headers` (request id,
//!   replay marker, serving node) when the origin is allowed.
//!
//! Written out rather than tower-http's `CorsLayer`, which answers every `OPTIONS`
//! request as a preflight with 200, whatever its origin.
//!
//! No `Access-Control-Allow-Credentials`: the gateway's identity is a bearer token the
//! app sends in `Authorization`, not a cookie.

use crate::api::{REPLAYED_HEADER, SERVED_BY_HEADER};
use crate::request_id::REQUEST_ID_HEADER;
use axum::extract::{Request, State};
use axum::http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN,
    VARY,
};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use std::sync::Arc;

/// The `[gateway.cors]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorsConfig {
    /// Origins whose pages may call the gateway, exactly as browsers send them:
    /// `scheme://host[:port]`, no path or trailing slash, e.g.
    /// `"https://app.example.com"`. `"*"` allows every origin. Empty (the default):
    /// CORS is off and no CORS header is ever sent.
    pub allowed_origins: Vec<String>,
    /// Request headers a page may send, answered to preflights.
    pub allowed_headers: Vec<String>,
    /// How long a browser may cache a preflight answer, in seconds.
    pub max_age_s: u64,
}

impl Default for CorsConfig {
    fn default() -> Self {
        Self {
            allowed_origins: Vec::new(),
            allowed_headers: [
                "authorization",
                "content-type",
                "idempotency-key",
                "x-keelson-timeout-ms",
                "x-request-id",
                "traceparent",
                "tracestate",
            ]
            .map(str::to_owned)
            .to_vec(),
            max_age_s: 600,
        }
    }
}

/// A `[gateway.cors]` value that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CorsConfigError {
    /// An entry of `allowed_origins` is not `*` or `scheme://host[:port]`.
    #[error(
        "gateway.cors.allowed_origins: `{0}` is not an origin; write `scheme://host[:port]` \
         (http or https, no path, no trailing slash) or `*`"
    )]
    BadOrigin(String),
    /// An entry of `allowed_headers` is not a valid header name.
    #[error("gateway.cors.allowed_headers: `{0}` is not a header name")]
    BadHeader(String),
}

impl CorsConfig {
    /// Whether CORS is on.
    pub fn enabled(&self) -> bool {
        !self.allowed_origins.is_empty()
    }

    /// Whether every origin and header name is well-formed.
    pub fn validate(&self) -> Result<(), CorsConfigError> {
        for origin in &self.allowed_origins {
            if origin != "*" && !is_origin(origin) {
                return Err(CorsConfigError::BadOrigin(origin.clone()));
            }
        }
        for header in &self.allowed_headers {
            if HeaderName::from_bytes(header.as_bytes()).is_err() {
                return Err(CorsConfigError::BadHeader(header.clone()));
            }
        }
        Ok(())
    }
}

fn is_origin(text: &str) -> bool {
    let Some((scheme, rest)) = text.split_once("://") else {
        return false;
    };
    let host_chars =
        |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']');
    matches!(scheme, "http" | "https") && !rest.is_empty() && rest.chars().all(host_chars)
}

/// What the middleware answers with, prepared once from the configuration.
#[derive(Debug)]
pub(crate) struct Cors {
    any_origin: bool,
    origins: Vec<String>,
    allow_headers: HeaderValue,
    max_age: HeaderValue,
}

/// The gateway's methods (`POST /api/..`, `GET` probes and `/cluster`).
const ALLOW_METHODS: &str = "GET, POST";
const PREFLIGHT_VARY: &str =
    "origin, access-control-request-method, access-control-request-headers";

impl Cors {
    /// The layer's state, or `None` when CORS is off. Malformed entries (the
    /// configuration loader refuses them; this is for embedders) are left out.
    pub(crate) fn new(config: &CorsConfig) -> Option<Arc<Self>> {
        if !config.enabled() {
            return None;
        }
        let headers: Vec<&str> = config
            .allowed_headers
            .iter()
            .map(String::as_str)
            .filter(|h| HeaderName::from_bytes(h.as_bytes()).is_ok())
            .collect();
        Some(Arc::new(Self {
            any_origin: config.allowed_origins.iter().any(|o| o == "*"),
            origins: config.allowed_origins.clone(),
            allow_headers: HeaderValue::from_str(&headers.join(", "))
                .unwrap_or(HeaderValue::from_static("")),
            max_age: HeaderValue::from(config.max_age_s),
        }))
    }

    fn allows(&self, origin: &HeaderValue) -> bool {
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        self.any_origin || self.origins.iter().any(|o| o.eq_ignore_ascii_case(origin))
    }
}

/// The CORS middleware; installed only when CORS is on.
pub(crate) async fn middleware(
    State(cors): State<Arc<Cors>>,
    request: Request,
    next: Next,
) -> Response {
    let origin = request.headers().get(ORIGIN).cloned();
    let allowed = origin.filter(|o| cors.allows(o));
    let preflight = request.method() == Method::OPTIONS
        && request.headers().contains_key(ORIGIN)
        && request
            .headers()
            .contains_key(ACCESS_CONTROL_REQUEST_METHOD);
    if preflight {
        let mut response = StatusCode::NO_CONTENT.into_response();
        let headers = response.headers_mut();
        headers.insert(VARY, HeaderValue::from_static(PREFLIGHT_VARY));
        if let Some(origin) = allowed {
            headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            headers.insert(
                ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static(ALLOW_METHODS),
            );
            headers.insert(ACCESS_CONTROL_ALLOW_HEADERS, cors.allow_headers.clone());
            headers.insert(ACCESS_CONTROL_MAX_AGE, cors.max_age.clone());
        }
        return response;
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    // The answer depends on Origin, so caches must key on it, allowed or not.
    headers.append(VARY, HeaderValue::from_static("origin"));
    if let Some(origin) = allowed {
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        let exposed = [
            REQUEST_ID_HEADER.as_str(),
            REPLAYED_HEADER,
            SERVED_BY_HEADER,
        ]
        .join(", ");
        if let Ok(exposed) = HeaderValue::from_str(&exposed) {
            headers.insert(ACCESS_CONTROL_EXPOSE_HEADERS, exposed);
        }
    }
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn off_by_default_and_origins_are_validated() {
        assert!(!CorsConfig::default().enabled());
        assert!(Cors::new(&CorsConfig::default()).is_none());
        let with = |origins: &[&str]| CorsConfig {
            allowed_origins: origins.iter().map(|o| (*o).to_owned()).collect(),
            ..CorsConfig::default()
        };
        for good in [
            "https://app.example.com",
            "http://localhost:3000",
            "*",
            "http://[::1]:8080",
        ] {
            assert!(with(&[good]).validate().is_ok(), "{good}");
        }
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://a/b",
            "ftp://x",
            "https://",
        ] {
            assert_eq!(
                with(&[bad]).validate(),
                Err(CorsConfigError::BadOrigin(bad.to_owned())),
                "{bad}"
            );
        }
        let bad_header = CorsConfig {
            allowed_headers: vec!["no spaces".into()],
            ..with(&["*"])
        };
        assert!(matches!(
            bad_header.validate(),
            Err(CorsConfigError::BadHeader(_))
        ));
    }

    #[test]
    fn origins_match_exactly_ignoring_ascii_case() {
        let cors = Cors::new(&CorsConfig {
            allowed_origins: vec!["https://app.example.com".into()],
            ..CorsConfig::default()
        })
        .unwrap();
        let allows = |o: &str| cors.allows(&HeaderValue::from_str(o).unwrap());
        assert!(allows("https://app.example.com"));
        assert!(allows("HTTPS://APP.example.com"));
        assert!(!allows("https://app.example.com.evil.test"));
        assert!(!allows("http://app.example.com"));
        assert!(!allows("null"));
    }
}
