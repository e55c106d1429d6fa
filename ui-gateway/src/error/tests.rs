//! Status, code and body of every error kind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use axum::body::to_bytes;
use axum::http::header::CONTENT_TYPE;

fn reply(status: ReplyStatus, error: Option<(&str, &str)>) -> ApiError {
    ApiError::Reply {
        status,
        error: error.map(|(code, message)| ErrorInfo {
            code: code.into(),
            message: message.into(),
        }),
        served_by: "node-1".into(),
    }
}

#[test]
fn gateway_errors_have_distinct_statuses_and_codes() {
    let cases = [
        (ApiError::MalformedJson("x".into()), 400, "malformed_json"),
        (ApiError::BadBody("x".into()), 400, "bad_request"),
        (ApiError::BadTimeout, 400, "bad_timeout"),
        (
            ApiError::InvalidToken(AuthError::Rejected(crate::auth::TokenRejection::Expired)),
            401,
            "invalid_token",
        ),
        (ApiError::UnknownHandler("h".into()), 404, "unknown_handler"),
        (ApiError::InvalidHandlerName, 404, "unknown_handler"),
        (ApiError::NotFound, 404, "not_found"),
        (ApiError::MethodNotAllowed, 405, "method_not_allowed"),
        (
            ApiError::PayloadTooLarge { limit: 1 },
            413,
            "payload_too_large",
        ),
        (ApiError::Overloaded, 503, "overloaded"),
        (ApiError::Unavailable("x".into()), 503, "unavailable"),
        (ApiError::NotReady, 503, "not_ready"),
        (ApiError::Timeout, 504, "timeout"),
        (ApiError::BadReply("x".into()), 502, "bad_reply"),
        (ApiError::BadIdempotencyKey, 400, "bad_idempotency_key"),
        (ApiError::Internal("x".into()), 500, "internal"),
    ];
    for (error, status, code) in cases {
        let (s, c, _) = error.parts();
        assert_eq!((s.as_u16(), c.as_str()), (status, code), "{error:?}");
    }
}

#[test]
fn reply_statuses_map_to_http_with_the_reply_error_info() {
    let cases = [
        (ReplyStatus::BadRequest, 400),
        (ReplyStatus::Unauthorized, 401),
        (ReplyStatus::Forbidden, 403),
        (ReplyStatus::NotFound, 404),
        (ReplyStatus::Conflict, 409),
        (ReplyStatus::KeyReused, 422),
        (ReplyStatus::TooManyRequests, 429),
        (ReplyStatus::PayloadTooLarge, 413),
        (ReplyStatus::HandlerError, 500),
        (ReplyStatus::Unknown, 500),
    ];
    for (status, http) in cases {
        let (s, c, m) = reply(status, Some(("own_code", "own message"))).parts();
        assert_eq!(
            (s.as_u16(), c.as_str(), m.as_str()),
            (http, "own_code", "own message"),
            "{status:?}"
        );
    }
}

#[test]
fn reply_timeout_and_overload_keep_their_codes() {
    let (s, c, _) = reply(ReplyStatus::Timeout, Some(("late", "late"))).parts();
    assert_eq!((s.as_u16(), c.as_str()), (504, "timeout"));
    let (s, c, _) = reply(ReplyStatus::Overloaded, None).parts();
    assert_eq!((s.as_u16(), c.as_str()), (503, "overloaded"));
}

#[test]
fn handler_failure_without_details_is_generic() {
    let (s, c, m) = reply(ReplyStatus::HandlerError, None).parts();
    assert_eq!((s.as_u16(), c.as_str()), (500, "handler_error"));
    assert_eq!(m, "the handler failed");
    let (_, c, m) = reply(ReplyStatus::HandlerError, Some(("", ""))).parts();
    assert_eq!(
        (c.as_str(), m.as_str()),
        ("handler_error", "the handler failed")
    );
}

#[test]
fn internal_causes_are_not_shown_to_the_client() {
    for error in [
        ApiError::Internal("secret cause".into()),
        ApiError::BadReply("secret cause".into()),
        ApiError::Unavailable("secret cause".into()),
    ] {
        let (_, _, message) = error.parts();
        assert!(!message.contains("secret cause"), "{message}");
    }
}

#[test]
fn transport_errors_map_to_distinct_kinds() {
    assert!(matches!(
        ApiError::from(RequestError::Unroutable("h".into())),
        ApiError::UnknownHandler(h) if h == "h"
    ));
    assert!(matches!(
        ApiError::from(RequestError::Timeout),
        ApiError::Timeout
    ));
    assert!(matches!(
        ApiError::from(RequestError::Unavailable("x".into())),
        ApiError::Unavailable(_)
    ));
}

#[tokio::test]
async fn response_has_the_json_error_body() {
    let response = ApiError::UnknownHandler("nope".into()).into_response();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        response.headers().get(CONTENT_TYPE).unwrap(),
        "application/json"
    );
    let body = to_bytes(response.into_body(), 1 << 16).await.unwrap();
    let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        value,
        serde_json::json!({"error": {"code": "unknown_handler", "message": "no handler is named `nope`"}})
    );
}
