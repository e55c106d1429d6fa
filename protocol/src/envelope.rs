//! The envelopes that travel between gateways and logic servers.
//!
//! Each envelope is a MessagePack map with named fields (see [`crate::codec`]), so a
//! newer peer can add optional fields that an older one ignores. Every envelope starts
//! with `v`, the [`ProtocolVersion`] of its writer.
//!
//! Bodies are opaque bytes: the gateway puts the client's JSON there verbatim and the
//! handler's JSON answer comes back the same way. The codec therefore never parses
//! user-controlled structure, only the envelope's own fixed shape.
//!
//! Later envelopes (context deltas and snapshots, heartbeats, control messages) sit
//! beside these two, each with its own `v` and its own [`Envelope::KIND`].

use crate::version::ProtocolVersion;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A message type of the protocol.
pub trait Envelope: Serialize + DeserializeOwned {
    /// A short name used in error messages and logs, e.g. `"request"`.
    const KIND: &'static str;

    /// The protocol version the writer of this message spoke.
    fn version(&self) -> ProtocolVersion;
}

/// A call of one handler, published by a gateway (or the client API) and consumed by
/// exactly one logic server.
///
/// ```
/// use keelson_protocol::{Request, decode, encode};
///
/// let req = Request::new("r-1", "echo", br#"{"hi":1}"#.to_vec(), 1_700_000_000_000);
/// let bytes = encode(&req).unwrap();
/// let back: Request = decode(&bytes).unwrap();
/// assert_eq!(back, req);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Protocol version of the writer.
    pub v: ProtocolVersion,
    /// Unique id of this request; the reply carries the same id. The gateway uses the
    /// HTTP `X-Request-Id`.
    pub id: String,
    /// Name of the handler to run, e.g. `counter.increment`. Also the routing key.
    pub handler: String,
    /// The verified user this request acts for, or `None` when anonymous. Only a
    /// gateway that verified a token may set it.
    #[serde(default)]
    pub user: Option<String>,
    /// An opaque session id, when the client has one.
    #[serde(default)]
    pub session: Option<String>,
    /// Absolute deadline, milliseconds since the Unix epoch. Work not finished by then
    /// is abandoned; its reply would be discarded anyway.
    pub deadline_unix_ms: u64,
    /// 1 for the first attempt; a retry by the caller increments it.
    #[serde(default = "first_attempt")]
    pub attempt: u32,
    /// A caller-chosen key that makes retries of one logical operation recognisable
    /// (the HTTP `Idempotency-Key`). Scoped to `user` (or to the anonymous scope) by
    /// the logic server; without it, the request id is the key.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// A digest of what the keyed operation is (handler and body), so that the same
    /// key sent with another request is refused rather than answered with the first
    /// one's outcome. Set with `idempotency_key`. Since protocol 1.1; absent from
    /// the wire when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_fingerprint: Option<String>,
    /// Trace context and other propagated metadata (`traceparent`, ...).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The request body: UTF-8 JSON, as the client sent it.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// Next-version preview (feature `next-preview`, protocol 1.3): a scheduling
    /// hint. Older readers ignore it; newer readers of an older message see `None`.
    #[cfg(feature = "next-preview")]
    #[serde(default)]
    pub priority: Option<u8>,
}

fn first_attempt() -> u32 {
    1
}

impl Request {
    /// A first-attempt request with no user, session or headers.
    pub fn new(
        id: impl Into<String>,
        handler: impl Into<String>,
        body: Vec<u8>,
        deadline_unix_ms: u64,
    ) -> Self {
        Self {
            v: ProtocolVersion::CURRENT,
            id: id.into(),
            handler: handler.into(),
            user: None,
            session: None,
            deadline_unix_ms,
            attempt: 1,
            idempotency_key: None,
            idempotency_fingerprint: None,
            headers: BTreeMap::new(),
            body,
            #[cfg(feature = "next-preview")]
            priority: Some(0),
        }
    }
}

impl Envelope for Request {
    const KIND: &'static str = "request";
    fn version(&self) -> ProtocolVersion {
        self.v
    }
}

/// How a request ended, as the logic server saw it.
///
/// Each status maps to one HTTP status at the gateway; unknown statuses written by a
/// newer peer decode as [`ReplyStatus::Unknown`] (served as a handler failure) rather
/// than failing the whole reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ReplyStatus {
    /// The handler succeeded; `body` is its JSON answer.
    Ok,
    /// The handler rejected the input.
    BadRequest,
    /// The handler needs a verified user and the request had none.
    Unauthorized,
    /// The handler refused the verified user.
    Forbidden,
    /// No handler of that name on the server that took the request.
    NotFound,
    /// A client-visible conflict (e.g. a state precondition failed, or a request with
    /// the same idempotency key is still running).
    Conflict,
    /// The idempotency key was used before with another request (HTTP 422). Since
    /// protocol 1.1.
    KeyReused,
    /// A bound was reached (e.g. too many idempotency keys held for one user; HTTP
    /// 429). Since protocol 1.1.
    TooManyRequests,
    /// The user's context would exceed its size limit.
    PayloadTooLarge,
    /// The handler failed or panicked.
    HandlerError,
    /// The deadline passed while the handler ran.
    Timeout,
    /// The server could not take the work.
    Overloaded,
    /// A status this build does not know.
    #[serde(other)]
    Unknown,
}

impl ReplyStatus {
    /// The HTTP status a gateway answers a reply of this status with (for a
    /// success, 200 unless the reply names another).
    pub fn http_status(self) -> u16 {
        match self {
            Self::Ok => 200,
            Self::BadRequest => 400,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::Conflict => 409,
            Self::PayloadTooLarge => 413,
            Self::KeyReused => 422,
            Self::TooManyRequests => 429,
            Self::Overloaded => 503,
            Self::Timeout => 504,
            Self::HandlerError | Self::Unknown => 500,
        }
    }
}

/// A machine-readable error code and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// Stable, snake_case code, e.g. `unknown_handler`.
    pub code: String,
    /// Human-readable explanation, safe to show to the caller.
    pub message: String,
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// Protocol version of the writer.
    pub v: ProtocolVersion,
    /// The id of the request this answers.
    pub id: String,
    /// How the request ended.
    pub status: ReplyStatus,
    /// On [`ReplyStatus::Ok`], the handler's JSON answer; empty otherwise.
    #[serde(with = "serde_bytes", default)]
    pub body: Vec<u8>,
    /// On any other status, what went wrong.
    #[serde(default)]
    pub error: Option<ErrorInfo>,
    /// Node id of the logic server that produced the reply.
    #[serde(default)]
    pub served_by: String,
    /// The reply was not produced now: it is the recorded outcome of an earlier
    /// delivery or request with the same idempotency key. Since protocol 1.1; absent
    /// from the wire when `false`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replayed: bool,
    /// On [`ReplyStatus::Ok`], the success status the handler chose (201, 202, 204);
    /// absent means 200. Since protocol 1.2; an older gateway answers 200.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u16>,
    /// Response headers the handler set (e.g. `Location`), as name/value pairs. Since
    /// protocol 1.2; absent from the wire when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
}

impl Reply {
    /// A successful reply carrying a JSON body.
    pub fn ok(id: impl Into<String>, body: Vec<u8>, served_by: impl Into<String>) -> Self {
        Self {
            v: ProtocolVersion::CURRENT,
            id: id.into(),
            status: ReplyStatus::Ok,
            body,
            error: None,
            served_by: served_by.into(),
            replayed: false,
            http_status: None,
            headers: Vec::new(),
        }
    }

    /// A failed reply.
    pub fn error(
        id: impl Into<String>,
        status: ReplyStatus,
        code: impl Into<String>,
        message: impl Into<String>,
        served_by: impl Into<String>,
    ) -> Self {
        Self {
            v: ProtocolVersion::CURRENT,
            id: id.into(),
            status,
            body: Vec::new(),
            error: Some(ErrorInfo {
                code: code.into(),
                message: message.into(),
            }),
            served_by: served_by.into(),
            replayed: false,
            http_status: None,
            headers: Vec::new(),
        }
    }
}

impl Envelope for Reply {
    const KIND: &'static str = "reply";
    fn version(&self) -> ProtocolVersion {
        self.v
    }
}

/// Most response headers one reply may set.
pub const MAX_RESPONSE_HEADERS: usize = 32;

/// Whether a handler may set the response header `name: value` (`name` lower-case):
/// a token of letters, digits and `-`, not one the gateway owns (framing, hop-by-hop,
/// CORS, request ids, `x-keelson-*`), a value of visible ASCII, spaces and tabs, at
/// most 4 KiB. The logic server checks what a handler sets; the gateway checks again
/// what a reply carries, since any broker peer can publish one.
pub fn check_response_header(name: &str, value: &str) -> Result<(), String> {
    const OWNED: [&str; 11] = [
        "content-type",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "x-request-id",
        "date",
        "server",
    ];
    let token = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !token {
        return Err(format!(
            "response header name `{}` is not a lower-case token (letters, digits, `-`, at most 64)",
            name.escape_default()
        ));
    }
    if OWNED.contains(&name)
        || name.starts_with("x-keelson-")
        || name.starts_with("access-control-")
        || name.starts_with("proxy-")
    {
        return Err(format!(
            "response header `{name}` is set by the gateway, not by handlers"
        ));
    }
    if value.len() > 4096
        || !value
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
    {
        return Err(format!(
            "the value of response header `{name}` must be at most 4096 bytes of visible ASCII"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod header_tests {
    use super::check_response_header;

    #[test]
    fn handlers_set_ordinary_headers_but_not_the_gateways_own_or_broken_ones() {
        assert!(check_response_header("location", "/api/orders/7").is_ok());
        assert!(check_response_header("cache-control", "no-store").is_ok());
        for (name, value) in [
            ("content-length", "1"),
            ("x-keelson-served-by", "me"),
            ("access-control-allow-origin", "*"),
            ("Location", "/x"),
            ("bad name", "x"),
            ("", "x"),
            ("location", "a\r\nset-cookie: x"),
            ("location", "caf\u{e9}"),
        ] {
            assert!(
                check_response_header(name, value).is_err(),
                "{name}: {value:?}"
            );
        }
    }
}
