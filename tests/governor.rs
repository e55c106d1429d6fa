//! Self-throttling across real processes on RabbitMQ: a busy server pauses its
//! intake, its peer takes the work, and it resumes once its load falls; a server
//! whose requests wait for a thread narrows its intake window, and widens it again
//! once they start promptly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};
use support::broker::{Vhost, amqp_transport};
use support::http;
use support::mesh::{Mesh, ServerSpec, node_state, node_window, post};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_server_pauses_its_intake_its_peer_serves_and_it_resumes() {
    let vhost = Vhost::create("governor");
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    mesh.add_gateway().await;
    let client = http();
    // Three of the busy server's four slots held for 4 s, then a peer: it pauses.
    let (busy, slow) = mesh.pause_a_busy_server(&client, 4000).await;
    let busy_log = || mesh.servers[busy].as_ref().unwrap();

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_requests_wait_for_a_thread_narrows_its_window_then_widens_it() {
    let vhost = Vhost::create("window");
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    // One worker thread, and handlers that hold it for 20 ms each: requests taken
    // beyond the first wait inside the server. The shipped window settings; the
    // pause is kept out of it.
    let no_pause = "\n[logic_server.governor]\nhigh_watermark = 1.0\nlow_watermark = 0.9\n";
    mesh.add_server(
        ServerSpec::new("cramped")
            .concurrency(16)
            .env("TOKIO_WORKER_THREADS", "1")
            .extra(no_pause),
    )
    .await;
    mesh.add_server(ServerSpec::new("roomy").concurrency(16).extra(no_pause))
        .await;
    mesh.add_gateway().await;
    let client = http();
    mesh.wait_for_cluster(&client, "both servers at their full window", |t| {
        node_window(t, "cramped") == Some(16) && node_window(t, "roomy") == Some(16)
    })
    .await;

    let spins: Vec<_> = (0..64)
        .map(|i| {
            let (client, url) = (client.clone(), mesh.url(0, "test.spin"));
            tokio::spawn(async move {
                // Sent over 640 ms: a steady stream, not one burst.
                tokio::time::sleep(Duration::from_millis(10 * i)).await;
                post(&client, url, r#"{"us":20000}"#.into(), None, None).await
            })
        })
        .collect();
    mesh.wait_for_cluster(&client, "the cramped server's window narrowed", |t| {
        node_window(t, "cramped").is_some_and(|w| w < 16)
    })
    .await;
    let mut served = std::collections::HashMap::<String, usize>::new();
    for t in spins {
        let out = t.await.unwrap();
        assert_eq!(out.status, 200, "{out:?}");
        *served.entry(out.served_by.unwrap_or_default()).or_default() += 1;
    }
    assert!(served.get("roomy").is_some_and(|n| *n > 0), "{served:?}");

    // Requests that start at once, arriving faster than one at a time: the window
    // fills and widens back to the concurrency.
    let started = Instant::now();
    loop {
        let burst: Vec<_> = (0..32)
            .map(|_| {
                let (client, url) = (client.clone(), mesh.url(0, "echo"));
                tokio::spawn(async move { post(&client, url, "{}".into(), None, None).await })
            })
            .collect();
        for t in burst {
            assert_eq!(t.await.unwrap().status, 200);
        }
        let table = mesh.cluster(&client).await;
        if node_window(&table, "cramped") == Some(16) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the window never widened back: {table}"
        );
    }
}
