//! `POST /api/{handler}`: one HTTP call becomes one request envelope and back.
//!
//! The checks run cheapest first, so a request that will be refused costs little: the
//! handler name, the token, the headers, and only then the body is read (bounded by
//! `max_body_bytes` and `body_read_timeout_ms`) and checked to be JSON. The in-flight
//! slot (`max_in_flight`) is taken once the body is complete: a client that sends its
//! body slowly holds a connection, never a slot. The reply body
//! of a successful call is returned byte for byte; the gateway never re-serializes a
//! handler's JSON.

use crate::auth;
use crate::error::ApiError;
use crate::request_id::RequestId;
use crate::routes::AppState;
use crate::trace;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use keelson_protocol::transport::Message;
use keelson_protocol::{Reply, ReplyStatus, Request as Envelope, decode, encode};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Request header with which a client asks for a shorter deadline, in milliseconds.
pub(crate) const TIMEOUT_HEADER: &str = "x-keelson-timeout-ms";

/// Request header of a client's idempotency key (IETF draft-ietf-httpapi-idempotency-key-header).
pub(crate) const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// Response header set when the answer is the stored outcome of an earlier request
/// (a retry with the same `Idempotency-Key`, or a redelivery), not a new run.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// Longest idempotency key, in bytes.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// Trace-context headers carried from HTTP into the envelope, and their length bound.
const PROPAGATED_HEADERS: [&str; 2] = ["traceparent", "tracestate"];
const MAX_PROPAGATED_LEN: usize = 1024;

/// Longest handler name.
const MAX_HANDLER_LEN: usize = 128;

/// Whether `name` matches `^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`.
pub(crate) fn valid_handler_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    match bytes.split_first() {
        Some((first, rest)) => {
            bytes.len() <= MAX_HANDLER_LEN
                && first.is_ascii_alphanumeric()
                && rest
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        }
        None => false,
    }
}

/// The request's timeout: the configured one, lowered by `x-keelson-timeout-ms`.
fn timeout(headers: &HeaderMap, configured: Duration) -> Result<Duration, ApiError> {
    let Some(value) = headers.get(TIMEOUT_HEADER) else {
        return Ok(configured);
    };
    let ms = value
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|&ms| ms > 0)
        .ok_or(ApiError::BadTimeout)?;
    Ok(Duration::from_millis(ms).min(configured))
}

/// The client's idempotency key: 1 to 255 printable ASCII characters, given bare or as
/// a structured-field string (`"..."`, as the draft writes it).
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY_HEADER) else {
        return Ok(None);
    };
    let text = value
        .to_str()
        .map_err(|_| ApiError::BadIdempotencyKey)?
        .trim();
    let key = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(text);
    let printable = key.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN || !printable {
        return Err(ApiError::BadIdempotencyKey);
    }
    Ok(Some(key.to_owned()))
}

/// What a keyed request is, for telling a retry (same handler, same body) from a
/// misuse of the key: SHA-256 of the handler name and the body, in hex.
fn fingerprint(handler: &str, body: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update(handler.as_bytes());
    hash.update([0]);
    hash.update(body);
    hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The trace-context headers to propagate; malformed or oversized ones are dropped.
pub(crate) fn propagated(headers: &HeaderMap) -> BTreeMap<String, String> {
    PROPAGATED_HEADERS
        .iter()
        .filter_map(|&name| {
            let value = headers.get(name)?.to_str().ok()?;
            (value.len() <= MAX_PROPAGATED_LEN).then(|| (name.to_owned(), value.to_owned()))
        })
        .collect()
}

/// The body as the handler will see it: JSON, with an empty body meaning `null`.
fn json_body(body: Bytes) -> Result<Vec<u8>, ApiError> {
    if body.is_empty() {
        return Ok(b"null".to_vec());
    }
    // serde_json bounds recursion (128 levels), so deep nesting is an error here,
    // not a stack overflow.
    serde_json::from_slice::<serde::de::IgnoredAny>(&body)
        .map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    Ok(body.to_vec())
}

pub(crate) fn unix_ms_after(timeout: Duration) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(now.saturating_add(timeout).as_millis()).unwrap_or(u64::MAX)
}

/// The handler of `POST /api/{handler}`.
pub(crate) async fn call(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let handler = match path {
        Ok(Path(name)) if valid_handler_name(&name) => name,
        _ => return Err(ApiError::InvalidHandlerName),
    };
    trace::record_handler(&handler);

    let trace_headers = match request.extensions_mut().remove::<trace::TraceContext>() {
        Some(context) => context.0,
        None => propagated(request.headers()),
    };
    let headers = request.headers();
    let user = auth::user_from_headers(&state.verifier, headers)?;
    let timeout = timeout(headers, state.config.request_timeout())?;
    let key = idempotency_key(headers)?;
    let job = crate::jobs::wants_job(headers)
        .then(|| crate::jobs::JobOptions::from_query(request.uri()))
        .transpose()?;
    let id = request
        .extensions()
        .get::<RequestId>()
        .cloned()
        .unwrap_or_else(RequestId::generate);

    let body_timeout = state.config.body_read_timeout();
    let body = tokio::time::timeout(
        body_timeout,
        read_body(
            request.into_body(),
            state.config.max_body_bytes,
            &state.body_budget,
        ),
    )
    .await
    .map_err(|_| ApiError::BodyTimeout {
        after_ms: u64::try_from(body_timeout.as_millis()).unwrap_or(u64::MAX),
    })??;
    // The body's share of `max_buffered_body_bytes`, held until the response.
    let (body, _body_budget) = body;
    // Held until the response is produced; refused at once rather than queued.
    let _permit = state
        .in_flight
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Overloaded)?;
    let body = json_body(body)?;
    // A job: the request asks a logic server to accept it (`keelson_protocol::job`).
    let (route, body) = match &job {
        Some(options) => (
            keelson_protocol::job::SUBMIT_ROUTE.to_owned(),
            options.submission(&handler, &body)?,
        ),
        None => (handler.clone(), body),
    };

    let deadline = Instant::now() + timeout;
    let mut envelope = Envelope::new(id.as_str(), route.as_str(), body, unix_ms_after(timeout));
    envelope.user = user;
    envelope.headers = trace_headers;
    if let Some(key) = key {
        envelope.idempotency_fingerprint = Some(fingerprint(&handler, &envelope.body));
        envelope.idempotency_key = Some(key);
    }
    // Tracing: the publish span, whose context the envelope and the message carry.
    let publish = trace::publish_span(&handler, &mut envelope.headers);
    let reply = tracing::Instrument::instrument(exchange(&state, envelope, deadline), publish)
        .await
        .map_err(|e| match e {
            ApiError::UnknownHandler(_) if job.is_some() => crate::jobs::no_job_service(),
            e => e,
        })?;
    let mut response = respond(reply);
    if job.is_some() && response.status() == StatusCode::ACCEPTED {
        response.headers_mut().insert(
            "preference-applied",
            HeaderValue::from_static("respond-async"),
        );
    }
    Ok(response)
}

/// Send `envelope` on its handler's route and await its reply until `deadline`.
pub(crate) async fn exchange(
    state: &AppState,
    envelope: Envelope,
    deadline: Instant,
) -> Result<Reply, ApiError> {
    let payload = encode(&envelope).map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut message = Message::new(payload);
    message.headers = envelope.headers;
    let reply_bytes = state
        .transport
        .request(&envelope.handler, message, deadline)
        .await?;
    let reply: Reply = decode(&reply_bytes).map_err(|e| ApiError::BadReply(e.to_string()))?;
    if reply.id != envelope.id {
        return Err(ApiError::BadReply(format!(
            "reply for request `{}` received for request `{}`",
            reply.id, envelope.id
        )));
    }
    Ok(reply)
}

/// The HTTP response to a logic server's reply.
pub(crate) fn respond(reply: Reply) -> Response {
    let replayed = reply.replayed;
    // A server that took the request but hosts no such handler does not make the
    // name a handler's (metrics label it `unknown`).
    let answered = !(reply.status == ReplyStatus::NotFound
        && reply
            .error
            .as_ref()
            .is_some_and(|e| e.code == "unknown_handler"));
    let mut response = match reply.status {
        ReplyStatus::Ok => ok_response(
            reply.body,
            reply.http_status,
            &reply.headers,
            &reply.served_by,
        ),
        status => ApiError::Reply {
            status,
            error: reply.error,
            served_by: reply.served_by,
        }
        .into_response(),
    };
    if replayed {
        response
            .headers_mut()
            .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    }
    if answered {
        response
            .extensions_mut()
            .insert(crate::metrics::HandlerAnswered);
    }
    response
}

/// How much of an over-limit body is read and dropped so that the client receives the
/// 413 instead of a connection reset (a server that closes a socket with unread data
/// makes the kernel reset it, and the client loses the response).
const DRAIN_LIMIT: usize = 16 * 1024 * 1024;
/// How long draining an over-limit body may take.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(2);

/// Read the body, refusing it past `limit` bytes with 413, and with 503 when the
/// bodies held by the gateway would pass `budget` (one permit per KiB); returns the
/// body and its permits.
async fn read_body(
    body: axum::body::Body,
    limit: usize,
    budget: &Arc<Semaphore>,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), ApiError> {
    use futures_util::StreamExt as _;
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut seen = 0usize;
    let mut held: Option<OwnedSemaphorePermit> = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadBody(e.to_string()))?;
        seen = seen.saturating_add(chunk.len());
        // Permits for the KiB this chunk starts (bodies under 1 KiB take one).
        let kib_now = seen.div_ceil(1024);
        let kib_held = held.as_ref().map_or(0, OwnedSemaphorePermit::num_permits);
        if kib_now > kib_held && seen <= limit {
            let more = u32::try_from(kib_now - kib_held).unwrap_or(u32::MAX);
            let permit = budget
                .clone()
                .try_acquire_many_owned(more)
                .map_err(|_| ApiError::Overloaded)?;
            match held.as_mut() {
                Some(h) => h.merge(permit),
                None => held = Some(permit),
            }
        }
        if seen > limit {
            let _ = tokio::time::timeout(DRAIN_TIME, async {
                while let Some(Ok(chunk)) = stream.next().await {
                    seen = seen.saturating_add(chunk.len());
                    if seen > DRAIN_LIMIT {
                        break;
                    }
                }
            })
            .await;
            return Err(ApiError::PayloadTooLarge { limit });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok((Bytes::from(buf), held))
}

/// Response header naming the logic server that produced the answer, for operators
/// tracing a request through the mesh.
pub const SERVED_BY_HEADER: &str = "x-keelson-served-by";

/// The handler's JSON, verbatim (an empty answer is `null`), with the success status
/// it chose (200 when none, or one that is not a success status a handler may
/// choose) and the response headers it set. 204 has no body. A reply may come from
/// any broker peer: headers the gateway owns or cannot send are dropped (and
/// logged), never sent.
fn ok_response(
    body: Vec<u8>,
    status: Option<u16>,
    headers: &[(String, String)],
    served_by: &str,
) -> Response {
    let status = match status {
        Some(s @ (201 | 202 | 204)) => StatusCode::from_u16(s).unwrap_or(StatusCode::OK),
        _ => StatusCode::OK,
    };
    let mut response = if status == StatusCode::NO_CONTENT {
        StatusCode::NO_CONTENT.into_response()
    } else {
        let body = if body.is_empty() {
            b"null".to_vec()
        } else {
            body
        };
        (
            status,
            [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            body,
        )
            .into_response()
    };
    for (name, value) in headers.iter().take(keelson_protocol::MAX_RESPONSE_HEADERS) {
        let checked = keelson_protocol::check_response_header(name, value).and_then(|()| {
            let name =
                axum::http::HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?;
            let value = HeaderValue::from_str(value).map_err(|e| e.to_string())?;
            Ok((name, value))
        });
        match checked {
            Ok((name, value)) => {
                response.headers_mut().append(name, value);
            }
            Err(e) => {
                tracing::warn!(served_by, error = %e, "dropping a response header a logic server set")
            }
        }
    }
    // A node id that is not a valid header value is simply not shown.
    if let Ok(value) = HeaderValue::from_str(served_by) {
        response.headers_mut().insert(SERVED_BY_HEADER, value);
    }
    response
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn handler_names() {
        for good in [
            "echo",
            "counter.increment",
            "a",
            "A-b_c.9",
            &"x".repeat(128),
        ] {
            assert!(valid_handler_name(good), "{good}");
        }
        for bad in ["", ".echo", "-x", "_x", "a/b", "a b", "é", &"x".repeat(129)] {
            assert!(!valid_handler_name(bad), "{bad}");
        }
    }

    #[test]
    fn timeout_header_lowers_never_raises() {
        let configured = Duration::from_secs(10);
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(TIMEOUT_HEADER, HeaderValue::from_str(v).unwrap());
            h
        };
        assert_eq!(timeout(&HeaderMap::new(), configured).unwrap(), configured);
        assert_eq!(
            timeout(&with("200"), configured).unwrap(),
            Duration::from_millis(200)
        );
        assert_eq!(timeout(&with("99999999"), configured).unwrap(), configured);
        for bad in ["0", "-1", "soon", "1.5", ""] {
            assert!(
                matches!(timeout(&with(bad), configured), Err(ApiError::BadTimeout)),
                "{bad}"
            );
        }
    }

    #[test]
    fn idempotency_keys() {
        let with = |v: &[u8]| {
            let mut h = HeaderMap::new();
            h.insert(IDEMPOTENCY_KEY_HEADER, HeaderValue::from_bytes(v).unwrap());
            h
        };
        assert_eq!(idempotency_key(&HeaderMap::new()).unwrap(), None);
        assert_eq!(
            idempotency_key(&with(b"k-1")).unwrap().as_deref(),
            Some("k-1")
        );
        assert_eq!(
            idempotency_key(&with(b"\"8e03978e\"")).unwrap().as_deref(),
            Some("8e03978e")
        );
        for bad in [&b""[..], b"\"\"", &[b'x'; 256], b"caf\xc3\xa9", b"a\tb"] {
            assert!(
                matches!(
                    idempotency_key(&with(bad)),
                    Err(ApiError::BadIdempotencyKey)
                ),
                "{bad:?}"
            );
        }
        assert_ne!(fingerprint("a", b"1"), fingerprint("a", b"2"));
        assert_ne!(fingerprint("a", b"1"), fingerprint("b", b"1"));
        assert_eq!(fingerprint("a", b"1").len(), 64);
    }

    #[test]
    fn json_bodies() {
        assert_eq!(json_body(Bytes::new()).unwrap(), b"null");
        assert_eq!(
            json_body(Bytes::from_static(b" {\"a\" : 1} ")).unwrap(),
            b" {\"a\" : 1} "
        );
        assert!(matches!(
            json_body(Bytes::from_static(b"{\"a\":")),
            Err(ApiError::MalformedJson(_))
        ));
        let deep = "[".repeat(100_000);
        assert!(json_body(Bytes::from(deep)).is_err());
    }

    #[test]
    fn only_trace_context_is_propagated() {
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_static("00-abc-def-01"));
        h.insert("x-keelson-user", HeaderValue::from_static("mallory"));
        h.insert(
            "tracestate",
            HeaderValue::from_str(&"x".repeat(2000)).unwrap(),
        );
        let p = propagated(&h);
        assert_eq!(p.len(), 1);
        assert_eq!(p["traceparent"], "00-abc-def-01");
    }
}
