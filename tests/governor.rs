//! Self-throttling across real processes on RabbitMQ: a busy server pauses its
//! intake, its peer takes the work, and it resumes once its load falls.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};
use support::broker::{Vhost, amqp_transport};
use support::http;
use support::mesh::{Mesh, ServerSpec, node_state, post};

/// A governor that reacts within a second to the busy ratio alone (CPU figures on a
/// shared test machine would make the test depend on its neighbours).
const GOVERNED: &str = r#"
[logic_server.governor]
sample_ms = 100
smoothing = 1.0
high_watermark = 0.5
low_watermark = 0.3
min_pause_ms = 500
use_busy = true
use_process_cpu = false
use_system_cpu = false
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_server_pauses_its_intake_its_peer_serves_and_it_resumes() {
    let vhost = Vhost::create("governor");
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    let busy = mesh
        .add_server(ServerSpec::new("busy").concurrency(4).extra(GOVERNED))
        .await;
    mesh.add_gateway().await;
    let client = http();

    // Three of its four slots busy for 4 s: a busy ratio of 0.75.
    let slow: Vec<_> = (0..3)
        .map(|_| {
            let (client, url) = (client.clone(), mesh.url(0, "test.slow"));
            tokio::spawn(
                async move { post(&client, url, r#"{"ms":4000}"#.into(), None, None).await },
            )
        })
        .collect();
    // A peer arrives; the busy server may now pause (it is no longer the last one).
    mesh.add_server(ServerSpec::new("peer").concurrency(4))
        .await;
    let busy_log = || mesh.servers[busy].as_ref().unwrap();
    busy_log().wait_for_log("pausing intake").await;

    // While paused: the cluster shows it (by the next heartbeat), and new requests
    // go to the peer.
    mesh.wait_for_cluster(&client, "busy paused", |t| {
        node_state(t, "busy").as_deref() == Some("paused")
            && node_state(t, "peer").as_deref() == Some("up")
    })
    .await;
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_keelson"))
        .args(["status", "--listen-ms", "1500", "--config"])
        .arg(mesh.scratch.path().join("gateway-0.toml"))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let busy_row = table
        .lines()
        .find(|l| l.starts_with("busy "))
        .unwrap_or_default();
    assert!(busy_row.contains("PAUSED"), "keelson status:\n{table}");

    for _ in 0..20 {
        let out = post(&client, mesh.url(0, "echo"), "{}".into(), None, None).await;
        assert_eq!(out.status, 200, "{out:?}");
        assert_eq!(
            out.served_by.as_deref(),
            Some("peer"),
            "a paused server took a request"
        );
    }

    // The slow requests finish (none failed across the pause), the load falls, and
    // the server resumes and serves again.
    for t in slow {
        let out = t.await.unwrap();
        assert_eq!(out.status, 200, "{out:?}");
        assert_eq!(out.served_by.as_deref(), Some("busy"));
    }
    busy_log().wait_for_log("resuming intake").await;
    let started = Instant::now();
    loop {
        let out = post(&client, mesh.url(0, "echo"), "{}".into(), None, None).await;
        assert_eq!(out.status, 200, "{out:?}");
        if out.served_by.as_deref() == Some("busy") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the resumed server never served"
        );
    }
}
