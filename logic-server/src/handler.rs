//! The handler API: what a plugin author implements.

use crate::call::Caller;
use crate::context::{ContextError, UserContext};
use crate::resource::{Plugin, Resources};
use async_trait::async_trait;
use bytes::Bytes;
use keelson_protocol::ReplyStatus;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::sync::Arc;
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

/// A successful answer: a JSON document (or none, for 204), a success status and
/// response headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    body: Bytes,
    status: u16,
    headers: Vec<(String, String)>,
}

/// The statuses a handler may answer with on success.
const SUCCESS_STATUSES: [u16; 4] = [200, 201, 202, 204];

impl Response {
    /// Serialize `value` as the JSON answer (200).
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self, HandlerError> {
        serde_json::to_vec(value)
            .map(Self::raw_json)
            .map_err(|e| HandlerError::internal(format!("cannot serialize the response: {e}")))
    }

    /// Answer with bytes that already are JSON (e.g. the request body, unchanged).
    pub fn raw_json(body: impl Into<Bytes>) -> Self {
        Self {
            body: body.into(),
            status: 200,
            headers: Vec::new(),
        }
    }

    /// 201 Created: `value` as JSON, and `Location: location`.
    pub fn created<T: Serialize + ?Sized>(
        location: impl Into<String>,
        value: &T,
    ) -> Result<Self, HandlerError> {
        Self::json(value)?
            .with_status(201)?
            .with_header("location", location)
    }

    /// 202 Accepted: `value` as JSON (the work goes on after the answer).
    pub fn accepted<T: Serialize + ?Sized>(value: &T) -> Result<Self, HandlerError> {
        Self::json(value)?.with_status(202)
    }

    /// 204 No Content: no body.
    pub fn no_content() -> Self {
        Self {
            body: Bytes::new(),
            status: 204,
            headers: Vec::new(),
        }
    }

    /// The same answer with another success status: 200, 201, 202 or 204 (a 204
    /// drops the body). Errors are [`HandlerError`]s, not statuses.
    pub fn with_status(mut self, status: u16) -> Result<Self, HandlerError> {
        if !SUCCESS_STATUSES.contains(&status) {
            return Err(HandlerError::internal(format!(
                "a handler answered with status {status}; a success is one of {SUCCESS_STATUSES:?} and a failure a HandlerError"
            )));
        }
        if status == 204 {
            self.body = Bytes::new();
        }
        self.status = status;
        Ok(self)
    }

    /// The same answer with the response header `name: value` added. Names are
    /// lower-cased; the gateway's own headers (`content-type`, `content-length`,
    /// `x-request-id`, hop-by-hop ones, anything starting with `x-keelson-`) cannot be
    /// set, nor values that are not visible ASCII.
    pub fn with_header(
        mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<Self, HandlerError> {
        let name = name.into().to_ascii_lowercase();
        let value = value.into();
        keelson_protocol::check_response_header(&name, &value).map_err(HandlerError::internal)?;
        self.headers.push((name, value));
        Ok(self)
    }

    /// The JSON bytes (empty for 204).
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The success status.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The response headers the handler set.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// The JSON bytes.
    pub fn into_body(self) -> Bytes {
        self.body
    }

    /// Body, status and headers.
    pub fn into_parts(self) -> (Bytes, u16, Vec<(String, String)>) {
        (self.body, self.status, self.headers)
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
    /// The deadline passed, e.g. waiting for another handler (HTTP 504).
    #[error("timed out: {0}")]
    Timeout(String),
    /// A dependency could not take the work now (HTTP 503); the caller may retry.
    #[error("unavailable: {0}")]
    Unavailable(String),
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
            Self::Timeout(m) => (ReplyStatus::Timeout, "timeout", m.clone()),
            Self::Unavailable(m) => (ReplyStatus::Overloaded, "unavailable", m.clone()),
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

/// What the requests of one server share.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The plugins' resources.
    pub(crate) resources: Arc<Resources>,
    /// Sends the calls of [`RequestCtx::caller`].
    pub(crate) client: keelson_protocol::client::Client,
    /// The node id of the server.
    pub(crate) node: Arc<str>,
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
    /// What every request of the server shares: the plugins' resources and the
    /// client for calls (one reference count per request).
    pub(crate) shared: Arc<Shared>,
    pub(crate) deadline_unix_ms: u64,
    pub(crate) caller: std::sync::OnceLock<Caller>,
    /// Set when the request runs as a background job.
    pub(crate) job: Option<crate::job_ctx::JobCtx>,
}

impl RequestCtx {
    /// The node id of the server running the handler.
    pub fn node(&self) -> &str {
        &self.shared.node
    }

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

    /// The job this request runs as (`POST /api/{handler}` with `Prefer:
    /// respond-async`), or `None` for an interactive request.
    pub fn job(&self) -> Option<&crate::job_ctx::JobCtx> {
        self.job.as_ref()
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

    /// The resources of plugin `P`: set up at start when an enabled handler takes
    /// them (with the [`Res`](crate::Res) extractor), else an internal error.
    pub fn resource<P: Plugin>(&self) -> Result<Arc<P>, HandlerError> {
        self.shared.resources.get::<P>().ok_or_else(|| {
            HandlerError::internal(format!(
                "plugin `{}` is not set up on this server: no enabled handler takes it",
                P::NAME
            ))
        })
    }

    /// Calls to other handlers as this request's user, within its deadline.
    pub fn caller(&self) -> &Caller {
        // Built on first use: most requests call nobody.
        self.caller.get_or_init(|| {
            Caller::new(
                self.shared.client.clone(),
                self.id.clone(),
                self.user.clone(),
                self.deadline,
                self.deadline_unix_ms,
                self.headers.clone(),
            )
        })
    }

    /// Call the handler `handler` with `body` and read its answer as `Out` (see
    /// [`Caller::call`]).
    pub async fn call<In, Out>(&self, handler: &str, body: &In) -> Result<Out, HandlerError>
    where
        In: Serialize + ?Sized,
        Out: DeserializeOwned,
    {
        self.caller().call(handler, body).await
    }
}
