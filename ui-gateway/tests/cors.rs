//! CORS as a browser sees it: preflights and actual requests over real HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use keelson_ui_gateway::{CorsConfig, GatewayConfig};
use reqwest::Method;
use support::{Mesh, assert_error};

const APP: &str = "https://app.example.test";

async fn with_cors() -> Mesh {
    Mesh::with_config(GatewayConfig {
        cors: CorsConfig {
            allowed_origins: vec![APP.to_owned()],
            max_age_s: 120,
            ..CorsConfig::default()
        },
        ..GatewayConfig::default()
    })
    .await
}

async fn preflight(mesh: &Mesh, origin: &str) -> reqwest::Response {
    mesh.client
        .request(Method::OPTIONS, mesh.url("/api/echo"))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap()
}

fn cors_headers(response: &reqwest::Response) -> Vec<String> {
    response
        .headers()
        .keys()
        .map(|k| k.as_str().to_owned())
        .filter(|k| k.starts_with("access-control-"))
        .collect()
}

#[tokio::test]
async fn preflight_from_an_allowed_origin_is_204_with_the_cors_headers() {
    let mesh = with_cors().await;
    let response = preflight(&mesh, APP).await;
    assert_eq!(response.status(), 204);
    let h = response.headers();
    assert_eq!(h["access-control-allow-origin"], APP);
    assert_eq!(h["access-control-allow-methods"], "GET, POST");
    let allowed = h["access-control-allow-headers"].to_str().unwrap();
    for needed in [
        "authorization",
        "content-type",
        "idempotency-key",
        "x-keelson-timeout-ms",
    ] {
        assert!(
            allowed.split(", ").any(|a| a == needed),
            "{needed} in {allowed}"
        );
    }
    assert_eq!(h["access-control-max-age"], "120");
    assert!(h["vary"].to_str().unwrap().contains("origin"));
    assert!(h.contains_key("x-request-id"));
}

#[tokio::test]
async fn preflight_from_another_origin_gets_no_cors_headers() {
    let mesh = with_cors().await;
    for origin in [
        "https://evil.example.test",
        "https://app.example.test.evil.test",
        "null",
    ] {
        let response = preflight(&mesh, origin).await;
        assert_eq!(response.status(), 204, "{origin}");
        assert!(
            cors_headers(&response).is_empty(),
            "{origin}: {:?}",
            response.headers()
        );
    }
}

#[tokio::test]
async fn actual_request_from_an_allowed_origin_may_read_the_gateway_headers() {
    let mesh = with_cors().await;
    let response = mesh
        .post("echo", "[1]")
        .header("origin", APP)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let h = response.headers();
    assert_eq!(h["access-control-allow-origin"], APP);
    let exposed = h["access-control-expose-headers"].to_str().unwrap();
    for name in ["x-request-id", "idempotent-replayed", "x-keelson-served-by"] {
        assert!(exposed.contains(name), "{name} in {exposed}");
    }
    // Errors too: a page must be able to read why its call failed.
    let response = mesh
        .post("nobody.serves.this", "{}")
        .header("origin", APP)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["access-control-allow-origin"], APP);
    assert_error(response, 404, "unknown_handler").await;

    let other = mesh
        .post("echo", "[1]")
        .header("origin", "https://evil.example.test")
        .send()
        .await
        .unwrap();
    assert_eq!(
        other.status(),
        200,
        "CORS is enforced by browsers, not here"
    );
    assert!(cors_headers(&other).is_empty());
}

#[tokio::test]
async fn cors_is_off_by_default() {
    let mesh = Mesh::start().await;
    let response = preflight(&mesh, APP).await;
    // Unchanged behaviour: OPTIONS is not a method of /api/echo.
    assert!(cors_headers(&response).is_empty());
    assert_error(response, 405, "method_not_allowed").await;
    let response = mesh
        .post("echo", "[1]")
        .header("origin", APP)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(cors_headers(&response).is_empty());
    assert!(!response.headers().contains_key("vary"));
}
