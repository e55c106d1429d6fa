//! Handler-to-handler calls: [`Caller`].
//!
//! A handler calls another over the transport, as the same user, within what is
//! left of its own deadline, with its trace context: the call is a request like any
//! other, served by whichever server hosts the handler (this one, another process,
//! another machine). A cycle (a handler that ends up calling itself) cannot hang:
//! every call in it shares the first request's deadline and the first caller gets a
//! 504 then.
//!
//! The nested request's id is the caller's id followed by `.1`, `.2`, ... in call
//! order, so when the calling request is delivered again (its server died) and its
//! handler repeats a call, the callee answers from its outcome record instead of
//! applying its effects twice.

use crate::handler::HandlerError;
use keelson_protocol::client::{CallError, Client};
use keelson_protocol::transport::RequestError;
use keelson_protocol::{ReplyStatus, Request};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use tokio::time::Instant;

/// Calls to other handlers on behalf of the request being served.
#[derive(Clone)]
pub struct Caller {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    parent_id: String,
    user: Option<String>,
    deadline: Instant,
    deadline_unix_ms: u64,
    headers: BTreeMap<String, String>,
    calls: AtomicU32,
}

impl fmt::Debug for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Caller")
            .field("parent", &self.inner.parent_id)
            .field("user", &self.inner.user)
            .finish()
    }
}

impl Caller {
    pub(crate) fn new(
        client: Client,
        parent_id: String,
        user: Option<String>,
        deadline: Instant,
        deadline_unix_ms: u64,
        headers: BTreeMap<String, String>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                client,
                parent_id,
                user,
                deadline,
                deadline_unix_ms,
                headers,
                calls: AtomicU32::new(0),
            }),
        }
    }

    /// Call `handler` with `body` (as JSON) and read its answer as `Out`. The
    /// callee's failure comes back as the same kind of [`HandlerError`] (its 400 is
    /// a 400 here, its timeout a 504); a failure of the callee itself (its 500) is an
    /// internal error here.
    pub async fn call<In, Out>(&self, handler: &str, body: &In) -> Result<Out, HandlerError>
    where
        In: Serialize + ?Sized,
        Out: DeserializeOwned,
    {
        let body = serde_json::to_vec(body).map_err(|e| {
            HandlerError::internal(format!("cannot serialize the body for `{handler}`: {e}"))
        })?;
        let answer = self.call_json(handler, body).await?;
        let answer: &[u8] = if answer.is_empty() { b"null" } else { &answer };
        serde_json::from_slice(answer).map_err(|e| {
            HandlerError::internal(format!("cannot read the answer of `{handler}`: {e}"))
        })
    }

    /// Like [`Caller::call`], with the body and answer as JSON bytes.
    pub async fn call_json(&self, handler: &str, body: Vec<u8>) -> Result<Vec<u8>, HandlerError> {
        let inner = &self.inner;
        let n = inner.calls.fetch_add(1, Ordering::Relaxed) + 1;
        let mut request = Request::new(
            format!("{}.{n}", inner.parent_id),
            handler,
            body,
            inner.deadline_unix_ms,
        );
        request.user = inner.user.clone();
        request.headers = inner.headers.clone();
        // Tracing: the call's span is the callee's parent (see crate::trace).
        let span = crate::trace::call_span(handler);
        keelson_protocol::trace::inject(&span, &mut request.headers);
        let sent = inner.client.send(&request, inner.deadline);
        let reply = match tracing::Instrument::instrument(sent, span).await {
            Ok(reply) => reply,
            Err(CallError::Request(RequestError::Timeout)) => {
                return Err(HandlerError::Timeout(format!(
                    "`{handler}` did not answer before the deadline"
                )));
            }
            Err(CallError::Request(RequestError::Unroutable(_))) => {
                return Err(HandlerError::Unavailable(format!(
                    "no server hosts the handler `{handler}`"
                )));
            }
            Err(e) => {
                return Err(HandlerError::Unavailable(format!(
                    "cannot call `{handler}`: {e}"
                )));
            }
        };
        let message = || {
            reply
                .error
                .as_ref()
                .map_or_else(String::new, |e| e.message.clone())
        };
        Err(match reply.status {
            ReplyStatus::Ok => return Ok(reply.body),
            ReplyStatus::BadRequest => HandlerError::BadRequest(message()),
            ReplyStatus::Unauthorized => HandlerError::Unauthorized(message()),
            ReplyStatus::Forbidden => HandlerError::Forbidden(message()),
            ReplyStatus::NotFound => HandlerError::NotFound(message()),
            ReplyStatus::Conflict | ReplyStatus::KeyReused => HandlerError::Conflict(message()),
            ReplyStatus::PayloadTooLarge => HandlerError::TooLarge(message()),
            ReplyStatus::Timeout => HandlerError::Timeout(message()),
            ReplyStatus::Overloaded | ReplyStatus::TooManyRequests => {
                HandlerError::Unavailable(message())
            }
            status => HandlerError::internal(format!(
                "`{handler}` failed ({status:?}): {}",
                reply
                    .error
                    .as_ref()
                    .map_or("no message", |e| e.code.as_str())
            )),
        })
    }
}
