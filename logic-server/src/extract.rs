//! Extractors: the arguments of a handler function, each taken from the request.
//!
//! A handler function (see [`handler!`](crate::handler)) takes any number of
//! extractors, in any order:
//!
//! | extractor | gives | when it cannot |
//! |---|---|---|
//! | [`Json<T>`] | the body parsed as `T` | 400, saying what is wrong |
//! | [`Body`] | the body's JSON bytes, as sent | never fails |
//! | [`User`] | the verified user | 401 |
//! | `Option<User>` | the verified user, or `None` | never fails |
//! | [`Context`] | the user's context | 401 |
//! | [`Res<P>`] | plugin `P`'s resources ([`Plugin`]) | never (set up at start) |
//! | [`Meta`] | request id, deadline, attempt, idempotency key, headers | never fails |
//! | [`Caller`] | calls to other handlers, as this request's user | never fails |
//! | `Option<JobCtx>` | the job this request runs as ([`JobCtx`]), or `None` | never fails |
//!
//! When several fail, the caller hears about the one that matters first whatever
//! the argument order: a missing user (401) before a bad body (400).

use crate::call::Caller;
use crate::context::UserContext;
use crate::handler::{HandlerError, RequestCtx};
#[cfg(doc)]
use crate::job_ctx::JobCtx;
use crate::resource::{Plugin, PluginDecl};
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::ops::Deref;
use std::sync::Arc;
use tokio::time::Instant;

/// The job a request runs as, or `None` for an interactive request.
impl FromRequest for Option<crate::job_ctx::JobCtx> {
    fn from_request(req: &RequestCtx) -> Result<Self, HandlerError> {
        Ok(req.job().cloned())
    }
}

/// Something a handler function takes as an argument, built from the request.
pub trait FromRequest: Sized + Send + 'static {
    /// Build it, or say why the request cannot be served.
    fn from_request(req: &RequestCtx) -> Result<Self, HandlerError>;

    /// The plugins this extractor needs set up at start ([`Res`] adds its own).
    fn plugins(_out: &mut Vec<PluginDecl>) {}
}

/// The body, parsed from JSON as `T`. An empty body reads as `null`, or as `{}`
/// when `T` does not take `null` (a struct whose fields all have defaults).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Json<T>(pub T);

impl<T: DeserializeOwned + Send + 'static> FromRequest for Json<T> {
    fn from_request(req: &RequestCtx) -> Result<Self, HandlerError> {
        let body = req.body();
        // The gateway sends `null` for an empty HTTP body.
        let absent = body.is_empty() || body.trim_ascii() == b"null";
        let body: &[u8] = if body.is_empty() { b"null" } else { body };
        match serde_json::from_slice(body) {
            Ok(value) => Ok(Json(value)),
            Err(_) if absent => serde_json::from_slice(b"{}")
                .map(Json)
                .map_err(|e| HandlerError::bad_request(format!("a body is required: {e}"))),
            Err(e) => Err(HandlerError::bad_request(format!("invalid body: {e}"))),
        }
    }
}

/// The body's bytes, as the client sent them (JSON, checked by the gateway; empty
/// when there was none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Body(pub bytes::Bytes);

impl FromRequest for Body {
    fn from_request(req: &RequestCtx) -> Result<Self, HandlerError> {
        Ok(Body(req.body().clone()))
    }
}

/// The verified user; an anonymous request is answered 401. Take `Option<User>`
/// for handlers that also serve anonymous requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User(pub String);

impl Deref for User {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl FromRequest for User {
    fn from_request(req: &RequestCtx) -> Result<Self, HandlerError> {
        req.require_user().map(|u| User(u.to_owned()))
    }
}

impl FromRequest for Option<User> {
    fn from_request(req: &RequestCtx) -> Result<Self, HandlerError> {
        Ok(req.user().map(|u| User(u.to_owned())))
    }
}

/// The context of the request's user (see [`UserContext`]); an anonymous request
/// is answered 401.
#[derive(Debug, Clone)]
pub struct Context(pub UserContext);

impl Deref for Context {
    type Target = UserContext;
    fn deref(&self) -> &UserContext {
        &self.0
    }
}

impl FromRequest for Context {
    fn from_request(req: &RequestCtx) -> Result<Self, HandlerError> {
        req.context().map(|c| Context(c.clone()))
    }
}

/// The resources of plugin `P`, shared by every request (see [`Plugin`]).
#[derive(Debug)]
pub struct Res<P>(pub Arc<P>);

impl<P> Deref for Res<P> {
    type Target = P;
    fn deref(&self) -> &P {
        &self.0
    }
}

impl<P: Plugin> FromRequest for Res<P> {
    fn from_request(req: &RequestCtx) -> Result<Self, HandlerError> {
        req.resource::<P>().map(Res)
    }

    fn plugins(out: &mut Vec<PluginDecl>) {
        out.push(PluginDecl::of::<P>());
    }
}

/// What the request says about itself.
#[derive(Debug, Clone)]
pub struct Meta {
    /// The request id (the gateway's `X-Request-Id`).
    pub id: String,
    /// The name the handler was called by.
    pub handler: String,
    /// When the caller stops waiting; the call is abandoned then.
    pub deadline: Instant,
    /// 1 for a first attempt; more when the caller retried.
    pub attempt: u32,
    /// The caller's `Idempotency-Key`, if it sent one.
    pub idempotency_key: Option<String>,
    /// Propagated metadata (trace context).
    pub headers: BTreeMap<String, String>,
}

impl FromRequest for Meta {
    fn from_request(req: &RequestCtx) -> Result<Self, HandlerError> {
        Ok(Meta {
            id: req.id().to_owned(),
            handler: req.handler().to_owned(),
            deadline: req.deadline(),
            attempt: req.attempt(),
            idempotency_key: req.idempotency_key().map(str::to_owned),
            headers: req.headers().clone(),
        })
    }
}

impl FromRequest for Caller {
    fn from_request(req: &RequestCtx) -> Result<Self, HandlerError> {
        Ok(req.caller().clone())
    }
}

/// How much a failed extraction matters to the caller: the lowest is reported.
pub(crate) fn rank(e: &HandlerError) -> u8 {
    match e {
        HandlerError::Unauthorized(_) => 0,
        HandlerError::Forbidden(_) => 1,
        HandlerError::BadRequest(_) => 2,
        _ => 3,
    }
}

/// Extract `T`, keeping in `worst` the failure that matters most so far.
#[doc(hidden)]
pub fn extract<T: FromRequest>(req: &RequestCtx, worst: &mut Option<HandlerError>) -> Option<T> {
    match T::from_request(req) {
        Ok(t) => Some(t),
        Err(e) => {
            if worst.as_ref().is_none_or(|w| rank(&e) < rank(w)) {
                *worst = Some(e);
            }
            None
        }
    }
}
