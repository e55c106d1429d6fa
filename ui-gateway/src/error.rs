//! Every way a gateway response can fail, and the HTTP response each becomes.
//!
//! One variant per kind of failure (STYLE.md), so each has its own status and code.
//! Every error response has the body `{"error":{"code":"...","message":"..."}}` with
//! `content-type: application/json`. Errors the client caused are described to it
//! verbatim; internal ones get a generic message and their cause goes to the log.

use crate::auth::AuthError;
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use keelson_protocol::transport::RequestError;
use keelson_protocol::{ErrorInfo, ReplyStatus};
use serde::Serialize;

/// Why the gateway could not answer with the handler's result.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    /// 400 `malformed_json`: the body is not JSON.
    #[error("the request body is not valid JSON: {0}")]
    MalformedJson(String),
    /// 400 `bad_request`: the body could not be read (other than being too large).
    #[error("cannot read the request body: {0}")]
    BadBody(String),
    /// 400 `bad_idempotency_key`: the `Idempotency-Key` header is empty, too long, or
    /// not printable ASCII.
    #[error("Idempotency-Key must be 1 to 255 printable ASCII characters")]
    BadIdempotencyKey,
    /// 400 `bad_query`: the query string has an unknown or malformed parameter.
    #[error("{0}")]
    BadQuery(String),
    /// 400 `bad_timeout`: the `x-keelson-timeout-ms` header is not a positive integer.
    #[error("x-keelson-timeout-ms must be a positive integer of milliseconds")]
    BadTimeout,
    /// 401 `invalid_token`: the `Authorization` header or its token is not acceptable;
    /// the message names the rule it broke (e.g. "token expired", "wrong audience").
    #[error("invalid bearer token: {0}")]
    InvalidToken(#[source] AuthError),
    /// 404 `unknown_handler`: the name is invalid or no logic server serves it.
    #[error("no handler is named `{0}`")]
    UnknownHandler(String),
    /// 404 `unknown_handler`: the name in the path is not a valid handler name.
    #[error(
        "handler names are 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
    )]
    InvalidHandlerName,
    /// 404 `not_found`: no such route on the gateway.
    #[error("no such route")]
    NotFound,
    /// 405 `method_not_allowed`: the route exists with another method.
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// 413 `payload_too_large`: the body exceeds `max_body_bytes`.
    #[error("the request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// 408 `body_timeout`: the body did not arrive whole within `body_read_timeout_ms`.
    #[error("the request body did not arrive within {after_ms} ms")]
    BodyTimeout {
        /// The configured bound.
        after_ms: u64,
    },
    /// 503 `overloaded`: this gateway already serves `max_in_flight` requests.
    #[error("the gateway is overloaded; retry later")]
    Overloaded,
    /// 503 `unavailable`: the transport cannot carry the request now.
    #[error("transport unavailable: {0}")]
    Unavailable(String),
    /// 503 `not_ready`: readiness probe while the transport is not ready.
    #[error("the gateway's transport is not ready")]
    NotReady,
    /// 504 `timeout`: no reply before the deadline.
    #[error("no reply before the deadline")]
    Timeout,
    /// 502 `bad_reply`: the reply could not be decoded or does not match the request.
    #[error("undecodable or mismatched reply: {0}")]
    BadReply(String),
    /// 500 `internal`: a fault in the gateway itself.
    #[error("internal error: {0}")]
    Internal(String),
    /// The logic server answered with a failure status.
    #[error("the handler replied {status:?}")]
    Reply {
        /// The reply's status; never [`ReplyStatus::Ok`].
        status: ReplyStatus,
        /// The reply's error details, if it had any.
        error: Option<ErrorInfo>,
        /// The logic server that answered, for the log.
        served_by: String,
    },
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    /// The HTTP status, stable machine-readable code, and client-facing message.
    pub fn parts(&self) -> (StatusCode, String, String) {
        use ApiError as E;
        let own = |status, code: &str| (status, code.to_owned(), self.to_string());
        let generic =
            |status, code: &str, message: &str| (status, code.to_owned(), message.to_owned());
        match self {
            E::MalformedJson(_) => own(StatusCode::BAD_REQUEST, "malformed_json"),
            E::BadBody(_) => own(StatusCode::BAD_REQUEST, "bad_request"),
            E::BadTimeout => own(StatusCode::BAD_REQUEST, "bad_timeout"),
            E::BadQuery(_) => own(StatusCode::BAD_REQUEST, "bad_query"),
            E::BadIdempotencyKey => own(StatusCode::BAD_REQUEST, "bad_idempotency_key"),
            E::InvalidToken(_) => own(StatusCode::UNAUTHORIZED, "invalid_token"),
            E::UnknownHandler(_) | E::InvalidHandlerName => {
                own(StatusCode::NOT_FOUND, "unknown_handler")
            }
            E::NotFound => own(StatusCode::NOT_FOUND, "not_found"),
            E::MethodNotAllowed => own(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            E::PayloadTooLarge { .. } => own(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            E::BodyTimeout { .. } => own(StatusCode::REQUEST_TIMEOUT, "body_timeout"),
            E::Overloaded => own(StatusCode::SERVICE_UNAVAILABLE, "overloaded"),
            E::Unavailable(_) => generic(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the mesh cannot take requests right now; retry later",
            ),
            E::NotReady => own(StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
            E::Timeout => own(StatusCode::GATEWAY_TIMEOUT, "timeout"),
            E::BadReply(_) => generic(
                StatusCode::BAD_GATEWAY,
                "bad_reply",
                "the logic server sent a reply the gateway cannot read",
            ),
            E::Internal(_) => generic(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error in the gateway",
            ),
            E::Reply { status, error, .. } => reply_parts(*status, error.as_ref()),
        }
    }

    fn log(&self, http: StatusCode) {
        match self {
            ApiError::BadReply(cause) => tracing::error!(%cause, "bad reply from logic server"),
            ApiError::Internal(cause) => tracing::error!(%cause, "internal gateway error"),
            ApiError::Unavailable(cause) => tracing::warn!(%cause, "transport unavailable"),
            ApiError::InvalidToken(cause) => tracing::info!(%cause, "token refused"),
            ApiError::Reply {
                status,
                error,
                served_by,
            } if http.is_server_error() => {
                let code = error.as_ref().map_or("", |e| e.code.as_str());
                let message = error.as_ref().map_or("", |e| e.message.as_str());
                tracing::warn!(?status, code, message, %served_by, "handler failed");
            }
            _ => {}
        }
    }
}

/// The HTTP status of a failed reply status (the mapping is the protocol's).
fn status_of(status: ReplyStatus) -> StatusCode {
    StatusCode::from_u16(status.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

/// The HTTP side of a failed [`Reply`](keelson_protocol::Reply): the status is fixed
/// by the reply status, code and message come from the reply's [`ErrorInfo`] when it
/// has them, except for timeouts and overload, whose codes clients rely on.
fn reply_parts(status: ReplyStatus, error: Option<&ErrorInfo>) -> (StatusCode, String, String) {
    use ReplyStatus as R;
    let (code, message) = match status {
        R::BadRequest => ("bad_request", "bad request"),
        R::Unauthorized => ("unauthorized", "a user is required"),
        R::Forbidden => ("forbidden", "not allowed for this user"),
        R::NotFound => ("unknown_handler", "no such handler"),
        R::Conflict => ("conflict", "conflict"),
        R::KeyReused => (
            "idempotency_key_reused",
            "this Idempotency-Key was used with another request",
        ),
        R::TooManyRequests => ("too_many_requests", "a limit was reached; retry later"),
        R::PayloadTooLarge => ("payload_too_large", "too large"),
        R::Timeout => {
            let message = "the handler did not finish before the deadline";
            return (status_of(status), "timeout".into(), message.into());
        }
        R::Overloaded => {
            let message = "the logic servers are overloaded; retry later";
            return (status_of(status), "overloaded".into(), message.into());
        }
        R::Ok => {
            let message = "the logic server sent a reply the gateway cannot read";
            return (StatusCode::BAD_GATEWAY, "bad_reply".into(), message.into());
        }
        // HandlerError, Unknown, and statuses added after this build.
        _ => ("handler_error", "the handler failed"),
    };
    let http = status_of(status);
    let code = error
        .map(|e| e.code.as_str())
        .filter(|c| !c.is_empty())
        .unwrap_or(code);
    let message = error
        .map(|e| e.message.as_str())
        .filter(|m| !m.is_empty())
        .unwrap_or(message);
    (http, code.to_owned(), message.to_owned())
}

impl From<RequestError> for ApiError {
    fn from(error: RequestError) -> Self {
        match error {
            RequestError::Unroutable(handler) => ApiError::UnknownHandler(handler),
            RequestError::Timeout => ApiError::Timeout,
            RequestError::Unavailable(cause) => ApiError::Unavailable(cause),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        ApiError::InvalidToken(error)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message) = self.parts();
        self.log(status);
        let body = ErrorBody {
            error: ErrorDetail {
                code: &code,
                message: &message,
            },
        };
        let mut response = (status, Json(body)).into_response();
        if matches!(self, ApiError::BodyTimeout { .. }) {
            // The rest of the body may still come: the connection cannot be reused.
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        response
    }
}

#[cfg(test)]
mod tests;
