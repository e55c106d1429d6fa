//! The handler API: what a plugin author implements.

use crate::context::{ContextError, UserContext};
use async_trait::async_trait;
use bytes::Bytes;
use keelson_protocol::ReplyStatus;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use tokio::time::Instant;

/// A request handler.
///
/// The server calls [`Handler::call`] once per request, each call in its own task,
/// possibly many at once, so handlers must be `Send + Sync` and keep any shared state
/// behind synchronisation. Contract:
///
/// * the call is abandoned (its future dropped) when the request's deadline passes;
/// * a panic is caught and answered as a handler failure (HTTP 500); the server goes on;
/// * a request may be delivered more than once (a server died mid-request), so a
///   handler with side effects should be idempotent, keyed by
///   [`RequestCtx::idempotency_key`] where the caller sends one.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handle one request.
    async fn call(&self, req: RequestCtx) -> Result<Response, HandlerError>;
}

/// A successful answer: a JSON document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    body: Bytes,
}

impl Response {
    /// Serialize `value` as the JSON answer.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self, HandlerError> {
        serde_json::to_vec(value)
            .map(|v| Self { body: v.into() })
            .map_err(|e| HandlerError::internal(format!("cannot serialize the response: {e}")))
    }

    /// Answer with bytes that already are JSON (e.g. the request body, unchanged).
    pub fn raw_json(body: impl Into<Bytes>) -> Self {
        Self { body: body.into() }
    }

    /// The JSON bytes.
    pub fn into_body(self) -> Bytes {
        self.body
    }
}

/// Why a handler did not succeed. Each variant maps to one HTTP status at the gateway.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandlerError {
    /// The input is wrong (HTTP 400).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The handler needs a verified user (HTTP 401).
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The user may not do this (HTTP 403).
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// The thing asked for does not exist (HTTP 404).
    #[error("not found: {0}")]
    NotFound(String),
    /// The state does not allow it (HTTP 409).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The user's context would grow past its limit (HTTP 413).
    #[error("too large: {0}")]
    TooLarge(String),
    /// Anything else (HTTP 500). The message is logged, the caller sees a generic one.
    #[error("internal error: {0}")]
    Internal(String),
}

impl HandlerError {
    /// A 400 with a message the caller sees.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest(message.into())
    }

    /// A 500; `message` is logged, not shown.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::Internal(message.into())
    }

    /// The reply status, error code and caller-visible message for this error.
    pub fn to_reply_parts(&self) -> (ReplyStatus, &'static str, String) {
        match self {
            Self::BadRequest(m) => (ReplyStatus::BadRequest, "bad_request", m.clone()),
            Self::Unauthorized(m) => (ReplyStatus::Unauthorized, "unauthorized", m.clone()),
            Self::Forbidden(m) => (ReplyStatus::Forbidden, "forbidden", m.clone()),
            Self::NotFound(m) => (ReplyStatus::NotFound, "not_found", m.clone()),
            Self::Conflict(m) => (ReplyStatus::Conflict, "conflict", m.clone()),
            Self::TooLarge(m) => (ReplyStatus::PayloadTooLarge, "context_too_large", m.clone()),
            Self::Internal(_) => (
                ReplyStatus::HandlerError,
                "handler_failed",
                "the handler failed".to_owned(),
            ),
        }
    }
}

impl From<ContextError> for HandlerError {
    fn from(e: ContextError) -> Self {
        match e {
            ContextError::TooLarge { .. } | ContextError::StoreFull { .. } => {
                HandlerError::TooLarge(e.to_string())
            }
            ContextError::NotANumber { .. } => HandlerError::Conflict(e.to_string()),
            _ => HandlerError::Internal(e.to_string()),
        }
    }
}

/// Everything a handler knows about the request it serves.
#[derive(Debug)]
pub struct RequestCtx {
    pub(crate) id: String,
    pub(crate) handler: String,
    pub(crate) user: Option<String>,
    pub(crate) deadline: Instant,
    pub(crate) attempt: u32,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) headers: BTreeMap<String, String>,
    pub(crate) body: Bytes,
    pub(crate) context: Option<UserContext>,
}

impl RequestCtx {
    /// The request id (the gateway's `X-Request-Id`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The name this handler was called by.
    pub fn handler(&self) -> &str {
        &self.handler
    }

    /// The verified user, or `None` for an anonymous request.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The verified user, or [`HandlerError::Unauthorized`] for an anonymous request.
    pub fn require_user(&self) -> Result<&str, HandlerError> {
        self.user().ok_or_else(|| {
            HandlerError::Unauthorized(format!("`{}` needs a signed-in user", self.handler))
        })
    }

    /// When the caller stops waiting. The server abandons the call at that instant.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// 1 for a first attempt; more when the caller retried.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The caller's idempotency key, if it sent one.
    pub fn idempotency_key(&self) -> Option<&str> {
        self.idempotency_key.as_deref()
    }

    /// Propagated metadata (trace context).
    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.headers
    }

    /// The raw JSON body.
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The body parsed as `T`, or a 400 saying what is wrong with it. An empty body
    /// reads as JSON `null`.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        let body: &[u8] = if self.body.is_empty() {
            b"null"
        } else {
            &self.body
        };
        serde_json::from_slice(body)
            .map_err(|e| HandlerError::bad_request(format!("invalid body: {e}")))
    }

    /// The context of the request's user; [`HandlerError::Unauthorized`] when the
    /// request is anonymous. A handler reaches no other user's context.
    pub fn context(&self) -> Result<&UserContext, HandlerError> {
        self.context.as_ref().ok_or_else(|| {
            HandlerError::Unauthorized(format!("`{}` needs a signed-in user", self.handler))
        })
    }
}
