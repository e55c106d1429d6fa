//! The gateway as a client sees it: real HTTP against a gateway in front of the
//! in-memory transport and a fake logic server (see `support`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use keelson_ui_gateway::{GatewayConfig, Secret, issue_token};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use support::{Mesh, SECRET, assert_error, json_of};

fn token(secret: &str, user: &str) -> String {
    issue_token(&Secret::new(secret).unwrap(), user, Duration::from_secs(60)).unwrap()
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn echo_returns_the_body_byte_identical() {
    let mesh = Mesh::start().await;
    let body = "{\"b\" : 1,\n  \"a\":[1, 2.50, \"\\u00e9\"] }";
    let response = mesh.post("echo", body).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(response.bytes().await.unwrap(), body.as_bytes());
}

#[tokio::test]
async fn empty_body_is_json_null_and_empty_answer_is_null() {
    let mesh = Mesh::start().await;
    let response = mesh.post("echo", "").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "null");
    let response = mesh.post("empty", "{}").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "null");
}

#[tokio::test]
async fn anonymous_request_has_no_user() {
    let mesh = Mesh::start().await;
    let seen = json_of(mesh.post("whoami", "{}").send().await.unwrap()).await;
    assert!(seen["user"].is_null(), "{seen}");
}

#[tokio::test]
async fn token_user_is_propagated() {
    let mesh = Mesh::start().await;
    let response = mesh
        .post("whoami", "{}")
        .bearer_auth(token(SECRET, "alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(json_of(response).await["user"], "alice");
}

#[tokio::test]
async fn user_cannot_be_set_by_body_header_or_query() {
    let mesh = Mesh::start().await;
    let forge = || {
        mesh.client
            .post(mesh.url("/api/whoami?user=mallory&sub=mallory"))
            .header("x-keelson-user", "mallory")
            .header("x-user", "mallory")
            .body(r#"{"user":"mallory"}"#)
    };
    let seen = json_of(forge().send().await.unwrap()).await;
    assert!(seen["user"].is_null(), "{seen}");

    let signed = forge().bearer_auth(token(SECRET, "bob"));
    let seen = json_of(signed.send().await.unwrap()).await;
    assert_eq!(seen["user"], "bob", "{seen}");
}

#[tokio::test]
async fn token_signed_with_another_secret_is_401() {
    let mesh = Mesh::start().await;
    let response = mesh
        .post("whoami", "{}")
        .bearer_auth(token("some-other-secret", "alice"))
        .send()
        .await
        .unwrap();
    assert_error(response, 401, "invalid_token").await;
}

#[tokio::test]
async fn expired_token_is_401() {
    let mesh = Mesh::start().await;
    let claims = serde_json::json!({"sub": "alice", "iat": now_s() - 7200, "exp": now_s() - 3600});
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let response = mesh
        .post("whoami", "{}")
        .bearer_auth(expired)
        .send()
        .await
        .unwrap();
    assert_error(response, 401, "invalid_token").await;
}

#[tokio::test]
async fn malformed_authorization_header_is_401() {
    let mesh = Mesh::start().await;
    for value in [
        "Basic YWxpY2U6cHc=",
        "Bearer",
        "Bearer not-a-jwt",
        &token(SECRET, "alice"),
    ] {
        let response = mesh
            .post("whoami", "{}")
            .header("authorization", value)
            .send()
            .await
            .unwrap();
        assert_error(response, 401, "invalid_token").await;
    }
}

#[tokio::test]
async fn unknown_handler_is_404_at_once() {
    let mesh = Mesh::start().await;
    let begun = Instant::now();
    let response = mesh.post("nobody.serves.this", "{}").send().await.unwrap();
    assert_error(response, 404, "unknown_handler").await;
    // Unroutable is known at publish time; the 10 s deadline is not waited for.
    assert!(
        begun.elapsed() < Duration::from_secs(2),
        "{:?}",
        begun.elapsed()
    );
}

#[tokio::test]
async fn invalid_handler_name_is_404() {
    let mesh = Mesh::start().await;
    for name in [".echo", "a%20b", "%C3%A9", &"x".repeat(129)] {
        let response = mesh.post(name, "{}").send().await.unwrap();
        assert_error(response, 404, "unknown_handler").await;
    }
}

#[tokio::test]
async fn unknown_route_and_wrong_method_have_json_errors() {
    let mesh = Mesh::start().await;
    let response = mesh.client.get(mesh.url("/nope")).send().await.unwrap();
    assert_error(response, 404, "not_found").await;
    let response = mesh.client.get(mesh.url("/api/echo")).send().await.unwrap();
    assert_eq!(response.headers()["allow"], "POST");
    assert_error(response, 405, "method_not_allowed").await;
}

#[tokio::test]
async fn malformed_json_is_400() {
    let mesh = Mesh::start().await;
    for body in ["{\"a\":", "hello", "{} trailing", "\u{0}"] {
        let response = mesh.post("echo", body).send().await.unwrap();
        assert_error(response, 400, "malformed_json").await;
    }
}

#[tokio::test]
async fn body_over_the_limit_is_413() {
    let mesh = Mesh::start().await;
    let mut body = vec![b' '; 2 * 1024 * 1024];
    body[0] = b'"';
    body[2 * 1024 * 1024 - 1] = b'"';
    let response = mesh.post("echo", body).send().await.unwrap();
    assert_error(response, 413, "payload_too_large").await;
    // Just under the limit is fine.
    let mut body = vec![b' '; 1024 * 1024];
    body[0] = b'1';
    let response = mesh.post("echo", body.clone()).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.bytes().await.unwrap(), body);
}

#[tokio::test]
async fn bodies_past_the_gateways_buffer_budget_are_503_and_the_budget_comes_back() {
    let mesh = Mesh::with_config(GatewayConfig {
        max_buffered_body_bytes: 64 * 1024,
        ..GatewayConfig::default()
    })
    .await;
    let body = |len: usize| {
        let mut body = vec![b' '; len];
        body[0] = b'1';
        body
    };
    let response = mesh.post("echo", body(100 * 1024)).send().await.unwrap();
    assert_error(response, 503, "overloaded").await;
    // A body within it, and then another: what the first held was given back.
    for _ in 0..2 {
        let response = mesh.post("echo", body(60 * 1024)).send().await.unwrap();
        assert_eq!(response.status(), 200);
    }
}

#[tokio::test]
async fn silent_logic_server_gives_504_by_the_deadline() {
    let mut mesh = Mesh::start().await;
    let begun = Instant::now();
    let response = mesh
        .post("blackhole", "{}")
        .header("x-keelson-timeout-ms", "200")
        .send()
        .await
        .unwrap();
    let elapsed = begun.elapsed();
    assert_error(response, 504, "timeout").await;
    assert!(elapsed >= Duration::from_millis(200), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
    // The request did reach the server: the 504 is the deadline, not a lost message.
    mesh.wait_started().await;
}

#[tokio::test]
async fn bad_timeout_header_is_400() {
    let mesh = Mesh::start().await;
    for value in ["soon", "0", "-5"] {
        let response = mesh
            .post("echo", "{}")
            .header("x-keelson-timeout-ms", value)
            .send()
            .await
            .unwrap();
        assert_error(response, 400, "bad_timeout").await;
    }
}

#[tokio::test]
async fn deadline_reaches_the_envelope() {
    let mesh = Mesh::start().await;
    let before_ms = u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let response = mesh
        .post("whoami", "{}")
        .header("x-keelson-timeout-ms", "3000")
        .send()
        .await
        .unwrap();
    let deadline = json_of(response).await["deadline_unix_ms"]
        .as_u64()
        .unwrap();
    assert!(deadline >= before_ms + 3000, "{deadline} vs {before_ms}");
    assert!(
        deadline < before_ms + 3000 + 2000,
        "{deadline} vs {before_ms}"
    );
}

#[tokio::test]
async fn handler_failure_is_500_and_the_next_request_succeeds() {
    let mesh = Mesh::start().await;
    let response = mesh.post("fail", "{}").send().await.unwrap();
    assert_eq!(response.status(), 500);
    let body = json_of(response).await;
    assert_eq!(body["error"]["code"], "boom", "{body}");
    assert_eq!(body["error"]["message"], "it broke", "{body}");
    let response = mesh.post("echo", "[1]").send().await.unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn reply_statuses_keep_their_error_info() {
    let mesh = Mesh::start().await;
    let response = mesh.post("conflict", "{}").send().await.unwrap();
    assert_eq!(response.status(), 409);
    let body = json_of(response).await;
    assert_eq!(
        body["error"],
        serde_json::json!({"code": "stale", "message": "try again"})
    );
}

#[tokio::test]
async fn undecodable_reply_is_502() {
    let mesh = Mesh::start().await;
    let response = mesh.post("garbage", "{}").send().await.unwrap();
    assert_error(response, 502, "bad_reply").await;
}
