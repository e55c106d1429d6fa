//! The dashboard in a real browser (Debian's headless Chromium) against a real mesh
//! on RabbitMQ: two logic servers and a gateway in a vhost of the test's own. The
//! page shows both servers, shows one paused while its governor pauses it and up
//! again once it resumes, counts the dead letters waiting, and shows the handler
//! that answered traffic, from the gateway's `/metrics`. A screenshot of the paused
//! cluster is left at `target/test-outputs/dashboard.png`.
//!
//! The script's arithmetic (Prometheus text parsing, rates, error shares, p99 from
//! histogram buckets) is checked in the same browser on a fixture page.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::time::Duration;
use support::broker::{Vhost, amqp_transport, confirmed_channel, dead_letter};
use support::browser::{dump_dom, screenshot, test_outputs};
use support::http;
use support::mesh::{Mesh, node_state, post};

/// Page time the browser gives the dashboard before reading it: a few polls.
const BUDGET: Duration = Duration::from_millis(2500);

/// The text of the element with `id` in `dom` (up to its first child tag).
fn text_of(dom: &str, id: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element #{id} in the page:\n{dom}"));
    let rest = &dom[at..];
    let start = rest.find('>').expect("a tag ends") + 1;
    let end = rest[start..].find('<').map_or(rest.len(), |e| start + e);
    rest[start..end].to_owned()
}

/// The row of `node` in the servers table says `state`.
fn shows(dom: &str, node: &str, state: &str) -> bool {
    dom.contains(&format!(r#"<tr data-node="{node}" data-state="{state}">"#))
}

#[tokio::test]
async fn the_dashboard_script_computes_rates_error_shares_and_p99() {
    let page = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dashboard-logic.html");
    let dom = dump_dom(
        &format!("file://{}", page.display()),
        Duration::from_millis(500),
    )
    .await;
    let result = text_of(&dom, "result");
    assert!(result.starts_with("PASS"), "{result}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_both_servers_a_pause_and_the_dead_letters() {
    let vhost = Vhost::create("dashboard");
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    mesh.add_gateway().await;
    let client = http();
    let base = mesh.gateways[0].base_url.clone().unwrap();
    let dashboard = format!("{base}/dashboard");

    // One dead letter waiting (the gateway declared the dead-letter queue).
    let (_connection, channel) = confirmed_channel(&vhost.url()).await;
    dead_letter(&channel, b"\xc1 not a request", "test: dashboard").await;

    // A busy server and its peer; the busy one's governor pauses it for about 8 s.
    let (_, slow) = mesh.pause_a_busy_server(&client, 8000).await;
    mesh.wait_for_cluster(&client, "busy paused, peer up, a dead letter", |t| {
        node_state(t, "busy").as_deref() == Some("paused")
            && node_state(t, "peer").as_deref() == Some("up")
            && t["dead_letters"]["waiting"] == 1
    })
    .await;

    // Traffic while the busy server is paused: its peer answers it.
    for _ in 0..20 {
        let out = post(&client, mesh.url(0, "echo"), "{}".into(), None, None).await;
        assert_eq!(out.status, 200, "{out:?}");
    }
    let dom = dump_dom(&dashboard, BUDGET).await;
    assert!(
        shows(&dom, "busy", "paused"),
        "busy not shown paused:\n{dom}"
    );
    assert!(shows(&dom, "peer", "up"), "peer not shown up:\n{dom}");
    assert_eq!(text_of(&dom, "sum-paused"), "1");
    assert_eq!(text_of(&dom, "sum-up"), "1");
    assert_eq!(text_of(&dom, "sum-dead-letters"), "1");
    // Per-handler figures, from the gateway's /metrics.
    assert!(dom.contains(r#"<tr data-handler="echo">"#), "{dom}");
    // Handlers the servers offer but nobody called get no row.
    assert!(!dom.contains(r#"data-handler="cart.add""#), "{dom}");
    assert!(
        text_of(&dom, "status-text").starts_with("live"),
        "{}",
        text_of(&dom, "status-text")
    );
    screenshot(&dashboard, &test_outputs().join("dashboard.png"), BUDGET).await;

    // The slow requests finish, the busy server resumes, and the page follows.
    for t in slow {
        let out = t.await.unwrap();
        assert_eq!(out.status, 200, "{out:?}");
    }
    mesh.wait_for_cluster(&client, "busy up again", |t| {
        node_state(t, "busy").as_deref() == Some("up")
    })
    .await;
    let dom = dump_dom(&dashboard, BUDGET).await;
    assert!(shows(&dom, "busy", "up"), "busy not shown up again:\n{dom}");
    assert!(shows(&dom, "peer", "up"), "peer not shown up:\n{dom}");
    assert_eq!(text_of(&dom, "sum-paused"), "0");

    drop(vhost);
}
