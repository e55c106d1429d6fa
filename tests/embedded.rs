//! The embedded mesh as a user meets it: the real `keelson` binary, real HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::{Bin, Process, Scratch, embedded_config, http, token};

async fn start(scratch: &Scratch, extra: &str) -> (Process, std::path::PathBuf) {
    let config = scratch.write("keelson.toml", &embedded_config(extra));
    let log = scratch.path().join("keelson.log");
    (
        Process::start(Bin::Keelson, &config, &log, &[]).await,
        config,
    )
}

async fn error_code(resp: reqwest::Response) -> String {
    let body: Value = resp.json().await.expect("error bodies are JSON");
    body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.code in {body}"))
        .to_owned()
}

#[tokio::test]
async fn echo_returns_the_body_unchanged() {
    let scratch = Scratch::new();
    let (node, _) = start(&scratch, "").await;
    let body = r#"{"hi":1,"nested":{"b":[1,2,3],"a":"x"}}"#;
    let resp = http()
        .post(node.url("echo"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));
    assert_eq!(resp.text().await.unwrap(), body);
}

#[tokio::test]
async fn counters_are_per_user_and_need_a_token() {
    let scratch = Scratch::new();
    let (node, config) = start(&scratch, "").await;
    let alice = token(&config, "alice");
    let bob = token(&config, "bob");
    let client = http();
    for expected in 1..=3 {
        let resp = client
            .post(node.url("counter.increment"))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.json::<Value>().await.unwrap(),
            json!({ "value": expected })
        );
    }
    let resp = client
        .post(node.url("counter.increment"))
        .bearer_auth(&bob)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({ "value": 1 }));
    let resp = client
        .post(node.url("counter.get"))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({ "value": 3 }));

    // Anonymous requests have no context.
    let resp = client
        .post(node.url("counter.increment"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn the_readme_handler_works_as_written() {
    let scratch = Scratch::new();
    let (node, config) = start(&scratch, "").await;
    let alice = token(&config, "alice");
    for visits in 1..=2 {
        let resp = http()
            .post(node.url("hello"))
            .bearer_auth(&alice)
            .body(r#"{"name":"Ada"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.json::<Value>().await.unwrap(),
            json!({ "text": "hello, Ada", "visits": visits })
        );
    }
    let resp = http()
        .post(node.url("hello"))
        .body(r#"{"name":"Ada"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "anonymous");
    let resp = http()
        .post(node.url("hello"))
        .bearer_auth(&alice)
        .body(r#"{"nom":"Ada"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "bad body");
}

#[tokio::test]
async fn the_user_comes_only_from_a_verified_token() {
    let scratch = Scratch::new();
    let (node, config) = start(&scratch, "").await;
    let client = http();
    let resp = client
        .post(format!("{}?user=mallory", node.url("test.whoami")))
        .header("x-keelson-user", "mallory")
        .header("x-user", "mallory")
        .body(r#"{"user":"mallory"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({ "user": null }));
    let resp = client
        .post(node.url("test.whoami"))
        .bearer_auth(token(&config, "alice"))
        .header("x-keelson-user", "mallory")
        .body(r#"{"user":"mallory"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({ "user": "alice" })
    );
}

#[tokio::test]
async fn bad_requests_get_json_errors_with_the_right_status() {
    let scratch = Scratch::new();
    let (node, _) = start(&scratch, "").await;
    let client = http();

    let resp = client
        .post(node.url("nope"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp.headers().contains_key("x-request-id"));
    assert_eq!(error_code(resp).await, "unknown_handler");

    let resp = client
        .post(node.url("echo"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(error_code(resp).await, "malformed_json");

    let big = format!("\"{}\"", "a".repeat(2 * 1024 * 1024));
    let resp = client
        .post(node.url("echo"))
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(error_code(resp).await, "payload_too_large");

    // A token signed with another secret.
    let other = scratch.write(
        "other.toml",
        &embedded_config("").replace(support::SECRET, "another-secret-entirely-0123456789"),
    );
    let resp = client
        .post(node.url("echo"))
        .bearer_auth(token(&other, "alice"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(error_code(resp).await, "invalid_token");

    let resp = client
        .post(node.url("echo"))
        .bearer_auth("not.a.token")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn a_panicking_handler_gives_500_and_the_server_lives_on() {
    let scratch = Scratch::new();
    let (node, _) = start(&scratch, "").await;
    let client = http();
    let resp = client.post(node.url("test.panic")).send().await.unwrap();
    assert_eq!(resp.status(), 500);
    assert_eq!(error_code(resp).await, "handler_panicked");
    let resp = client.post(node.url("test.fail")).send().await.unwrap();
    assert_eq!(resp.status(), 500);
    let body: Value = resp.json().await.unwrap();
    assert!(
        !body.to_string().contains("always fails"),
        "an internal cause leaked to the client: {body}"
    );
    let resp = client
        .post(node.url("echo"))
        .body("[1]")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "[1]");
}

#[tokio::test]
async fn a_request_past_its_deadline_gets_504_in_time() {
    let scratch = Scratch::new();
    let (node, _) = start(&scratch, "").await;
    let started = Instant::now();
    let resp = http()
        .post(node.url("test.slow"))
        .header("x-keelson-timeout-ms", "300")
        .body(r#"{"ms": 3000}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    assert_eq!(error_code(resp).await, "timeout");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn health_and_readiness() {
    let scratch = Scratch::new();
    let (node, _) = start(&scratch, "").await;
    let base = node.base_url.clone().unwrap();
    let resp = http().get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let resp = http().get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_and_exits_zero() {
    let scratch = Scratch::new();
    let (node, _) = start(&scratch, "").await;
    let url = node.url("test.slow");
    let in_flight =
        tokio::spawn(async move { http().post(url).body(r#"{"ms": 800}"#).send().await });
    node.wait_for_log("test.slow started").await;
    let status = node.terminate(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status:?}");
    let resp = in_flight
        .await
        .unwrap()
        .expect("the in-flight request failed");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.json::<Value>().await.unwrap(),
        json!({ "slept_ms": 800 })
    );
}

#[tokio::test]
async fn a_bad_config_names_the_file_the_key_and_what_was_expected() {
    let scratch = Scratch::new();
    let config = scratch.write(
        "bad.toml",
        &embedded_config("").replace("request_timeout_ms = 5000", "request_timeout_ms = \"soon\""),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keelson"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml"), "{err}");
    assert!(err.contains("gateway.request_timeout_ms"), "{err}");
    assert!(err.contains("expected"), "{err}");

    let config = scratch.write("unknown.toml", &embedded_config("[gateway2]\nlisten = 1\n"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keelson"))
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown.toml") && err.contains("gateway2"),
        "{err}"
    );
}
