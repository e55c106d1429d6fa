//! What an operator relies on: request ids, probes, trace context, the in-flight
//! limit, and bounded graceful shutdown. Real HTTP, in-memory transport (see `support`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use keelson_protocol::Transport;
use keelson_ui_gateway::GatewayConfig;
use std::time::{Duration, Instant};
use support::{Mesh, assert_error, json_of};

fn request_id(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("x-request-id")
        .expect("every response has an X-Request-Id")
        .to_str()
        .unwrap()
        .to_owned()
}

fn is_uuid(id: &str) -> bool {
    uuid::Uuid::parse_str(id).is_ok()
}

#[tokio::test]
async fn every_response_has_a_request_id() {
    let mesh = Mesh::start().await;
    let responses = [
        mesh.post("echo", "{}").send().await.unwrap(),
        mesh.post("echo", "{").send().await.unwrap(),
        mesh.post("nobody", "{}").send().await.unwrap(),
        mesh.post("echo", vec![b' '; 2 << 20]).send().await.unwrap(),
        mesh.post("fail", "{}").send().await.unwrap(),
        mesh.client.get(mesh.url("/healthz")).send().await.unwrap(),
        mesh.client.get(mesh.url("/readyz")).send().await.unwrap(),
        mesh.client
            .get(mesh.url("/no/such/route"))
            .send()
            .await
            .unwrap(),
        mesh.client
            .delete(mesh.url("/api/echo"))
            .send()
            .await
            .unwrap(),
    ];
    let mut ids: Vec<String> = responses.iter().map(request_id).collect();
    assert!(ids.iter().all(|id| is_uuid(id)), "{ids:?}");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), responses.len(), "ids are fresh per request");
}

#[tokio::test]
async fn supplied_request_id_is_kept_and_becomes_the_envelope_id() {
    let mesh = Mesh::start().await;
    let response = mesh
        .post("whoami", "{}")
        .header("x-request-id", "client-chosen-42")
        .send()
        .await
        .unwrap();
    assert_eq!(request_id(&response), "client-chosen-42");
    assert_eq!(json_of(response).await["id"], "client-chosen-42");

    let response = mesh
        .client
        .get(mesh.url("/nope"))
        .header("x-request-id", "on-errors-too")
        .send()
        .await
        .unwrap();
    assert_eq!(request_id(&response), "on-errors-too");
}

#[tokio::test]
async fn unsafe_request_id_is_replaced() {
    let mesh = Mesh::start().await;
    for bad in ["has spaces", &"x".repeat(129)] {
        let response = mesh
            .post("whoami", "{}")
            .header("x-request-id", bad)
            .send()
            .await
            .unwrap();
        let id = request_id(&response);
        assert!(is_uuid(&id), "{id}");
        assert_eq!(json_of(response).await["id"], id.as_str());
    }
}

#[tokio::test]
async fn trace_context_is_propagated_and_nothing_else() {
    let mesh = Mesh::start().await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let response = mesh
        .post("whoami", "{}")
        .header("traceparent", traceparent)
        .header("tracestate", "vendor=opaque")
        .header("x-keelson-user", "mallory")
        .send()
        .await
        .unwrap();
    let seen = json_of(response).await;
    assert_eq!(
        seen["headers"],
        serde_json::json!({"traceparent": traceparent, "tracestate": "vendor=opaque"})
    );
}

#[tokio::test]
async fn probes_follow_the_transport() {
    let mesh = Mesh::start().await;
    let health = mesh.client.get(mesh.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(json_of(health).await, serde_json::json!({"status": "ok"}));
    let ready = mesh.client.get(mesh.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(json_of(ready).await, serde_json::json!({"status": "ready"}));

    mesh.transport.close().await;

    let ready = mesh.client.get(mesh.url("/readyz")).send().await.unwrap();
    assert_error(ready, 503, "not_ready").await;
    let health = mesh.client.get(mesh.url("/healthz")).send().await.unwrap();
    assert_eq!(
        health.status(),
        200,
        "liveness does not depend on the transport"
    );
    let call = mesh.post("echo", "{}").send().await.unwrap();
    assert_error(call, 503, "unavailable").await;
}

#[tokio::test]
async fn above_max_in_flight_requests_are_refused_at_once() {
    let mut mesh = Mesh::with_config(GatewayConfig {
        max_in_flight: 1,
        ..GatewayConfig::default()
    })
    .await;
    let first = tokio::spawn(mesh.post("slow", r#"{"n":1}"#).send());
    // The fake server has the first request: it is in flight at the gateway.
    mesh.wait_started().await;

    let begun = Instant::now();
    let second = mesh.post("echo", "{}").send().await.unwrap();
    assert_error(second, 503, "overloaded").await;
    assert!(
        begun.elapsed() < Duration::from_secs(2),
        "refused, not queued"
    );
    let health = mesh.client.get(mesh.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200, "probes are not counted");

    mesh.release.add_permits(1);
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.text().await.unwrap(), r#"{"n":1}"#);
    // The slot is free again.
    let third = mesh.post("echo", "{}").send().await.unwrap();
    assert_eq!(third.status(), 200);
}

#[tokio::test]
async fn graceful_shutdown_is_bounded() {
    let mut mesh = Mesh::with_config(GatewayConfig {
        shutdown_timeout_ms: 300,
        ..GatewayConfig::default()
    })
    .await;
    // A request that will hold its connection open for the whole 10 s deadline.
    let stuck = tokio::spawn(mesh.post("blackhole", "{}").send());
    mesh.wait_started().await;

    let begun = Instant::now();
    mesh.shut_down();
    let server = mesh.server.take().unwrap();
    let result = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returned within the shutdown bound");
    result.unwrap().unwrap();
    let elapsed = begun.elapsed();
    assert!(elapsed >= Duration::from_millis(300), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    stuck.abort();
}

#[tokio::test]
async fn idle_gateway_shuts_down_promptly() {
    let mut mesh = Mesh::with_config(GatewayConfig {
        shutdown_timeout_ms: 60_000,
        ..GatewayConfig::default()
    })
    .await;
    let response = mesh.post("echo", "{}").send().await.unwrap();
    assert_eq!(response.status(), 200);
    drop(response);
    mesh.shut_down();
    let server = mesh.server.take().unwrap();
    let result = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("no open request: no waiting for the timeout");
    result.unwrap().unwrap();
}
