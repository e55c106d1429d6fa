//! The `X-Request-Id` of every exchange.
//!
//! The outermost layer of the gateway: it picks the id before anything else runs, so
//! the trace span, the request envelope and every response (errors, probes, unknown
//! routes included) carry the same one. A client-supplied id is kept when it is sane,
//! so a caller can correlate its own logs with the mesh's; anything else is replaced by
//! a fresh UUID v4 rather than refused, because a bad id is no reason to fail a call.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use std::fmt;

/// The header carrying the request id, in requests and responses.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Longest client-supplied id kept as is.
const MAX_LEN: usize = 128;

/// The id of one HTTP exchange; also the [`Request::id`](keelson_protocol::Request::id)
/// of the envelope it becomes. Placed in the request's extensions by the gateway.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(String);

impl RequestId {
    /// A fresh random id (UUID v4).
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }

    /// The id a client sent, if it is 1 to 128 visible ASCII characters.
    pub fn from_client(value: &HeaderValue) -> Option<Self> {
        let bytes = value.as_bytes();
        let sane = !bytes.is_empty()
            && bytes.len() <= MAX_LEN
            && bytes.iter().all(|b| b.is_ascii_graphic());
        // Visible ASCII is valid UTF-8, so `to_str` cannot fail once `sane` holds.
        sane.then(|| value.to_str().ok().map(|s| Self(s.to_owned())))
            .flatten()
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Chooses the request id, exposes it to inner layers (extension and header), and puts
/// it on the response, whatever produced that response.
pub(crate) async fn middleware(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(RequestId::from_client)
        .unwrap_or_else(RequestId::generate);
    // Both kinds of id are visible ASCII, which is always a valid header value.
    let value = HeaderValue::from_str(id.as_str()).ok();
    if let Some(value) = &value {
        request
            .headers_mut()
            .insert(REQUEST_ID_HEADER, value.clone());
    }
    request.extensions_mut().insert(id);
    // The trace context, read here too: one middleware fewer per request.
    crate::trace::attach_context(&mut request);
    let mut response = next.run(request).await;
    if let Some(value) = value {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn client(s: &[u8]) -> Option<RequestId> {
        RequestId::from_client(&HeaderValue::from_bytes(s).unwrap())
    }

    #[test]
    fn sane_ids_are_kept() {
        assert_eq!(client(b"abc-123").unwrap().as_str(), "abc-123");
        let longest = "x".repeat(MAX_LEN);
        assert_eq!(client(longest.as_bytes()).unwrap().as_str(), longest);
    }

    #[test]
    fn insane_ids_are_replaced() {
        assert!(client(b"").is_none());
        assert!(client("x".repeat(MAX_LEN + 1).as_bytes()).is_none());
        assert!(client(b"has space").is_none());
        assert!(client(b"tab\there").is_none());
        assert!(client(&[0xC3, 0xA9]).is_none());
    }

    #[test]
    fn generated_ids_are_distinct_uuids() {
        let a = RequestId::generate();
        let b = RequestId::generate();
        assert_ne!(a, b);
        assert!(uuid::Uuid::parse_str(a.as_str()).is_ok());
    }
}
