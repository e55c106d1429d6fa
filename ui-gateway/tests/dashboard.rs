//! The dashboard's HTTP side on a real socket: the page and its assets, their
//! headers, the switch in the configuration, and the dead-letter count it shows
//! (from `GET /cluster`). What the page renders is checked in a real browser by the
//! workspace's `tests/dashboard.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use keelson_protocol::Transport;
use keelson_protocol::transport::{Message, ServiceSpec};
use keelson_ui_gateway::GatewayConfig;
use std::time::{Duration, Instant};
use support::{Mesh, assert_error, json_of};

#[tokio::test]
async fn the_page_and_its_assets_are_served_self_contained_with_a_strict_policy() {
    let mesh = Mesh::start().await;
    let page = mesh
        .client
        .get(mesh.url("/dashboard"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let policy = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(policy.contains("default-src 'none'"), "{policy}");
    assert!(policy.contains("script-src 'self'"), "{policy}");
    assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
    assert_eq!(page.headers()["x-content-type-options"], "nosniff");
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let html = page.text().await.unwrap();
    // Everything it loads comes from beside it on this gateway.
    assert!(html.contains(r#"src="dashboard/dashboard.js""#), "{html}");
    assert!(html.contains(r#"href="dashboard/dashboard.css""#), "{html}");
    for (path, kind) in [
        ("/dashboard/dashboard.js", "text/javascript; charset=utf-8"),
        ("/dashboard/dashboard.css", "text/css; charset=utf-8"),
    ] {
        let asset = mesh.client.get(mesh.url(path)).send().await.unwrap();
        assert_eq!(asset.status(), 200, "{path}");
        assert_eq!(asset.headers()["content-type"], kind, "{path}");
        assert!(!asset.text().await.unwrap().is_empty(), "{path}");
    }
}

#[tokio::test]
async fn dashboard_false_answers_404_with_a_json_error() {
    let config = GatewayConfig {
        dashboard: false,
        ..GatewayConfig::default()
    };
    let mesh = Mesh::with_config(config).await;
    for path in [
        "/dashboard",
        "/dashboard/dashboard.js",
        "/dashboard/dashboard.css",
    ] {
        let response = mesh.client.get(mesh.url(path)).send().await.unwrap();
        assert_error(response, 404, "not_found").await;
    }
    // The cluster table stays: scripts use it.
    let cluster = mesh.client.get(mesh.url("/cluster")).send().await.unwrap();
    assert_eq!(cluster.status(), 200);
}

#[tokio::test]
async fn the_cluster_counts_the_dead_letters_waiting() {
    let mesh = Mesh::start().await;
    let waiting = |mesh: &Mesh| {
        let request = mesh.client.get(mesh.url("/cluster")).send();
        async move { json_of(request.await.unwrap()).await["dead_letters"]["waiting"].clone() }
    };
    assert_eq!(waiting(&mesh).await, 0);

    // Two requests a consumer rejects: two dead letters.
    let spec = ServiceSpec {
        name: "poisoned".into(),
        routes: vec!["poisoned".into()],
    };
    mesh.transport.declare_service(&spec).await.unwrap();
    let mut consumer = mesh.transport.consume("poisoned", 2).await.unwrap();
    for i in 0..2 {
        let transport = mesh.transport.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
            let _ = transport
                .request("poisoned", Message::new(format!("{i}")), deadline)
                .await;
        });
        let delivery = consumer.next().await.unwrap().unwrap();
        delivery.reject("test: poisoned").await.unwrap();
    }

    // The gateway asks again at most once a second.
    let started = Instant::now();
    loop {
        let now = waiting(&mesh).await;
        if now == 2 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "/cluster never counted 2 dead letters: {now}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
