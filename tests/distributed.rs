//! The distributed mesh: real `ui-gateway` and `logic-server` processes on a real
//! RabbitMQ, each test in a vhost of its own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::broker::{Vhost, amqp_transport};
use support::mesh::{Mesh, Outcome};
use support::{Bin, Process, SECRET, Scratch, http};

async fn post(
    client: &reqwest::Client,
    url: String,
    body: String,
    timeout_ms: Option<u64>,
) -> Outcome {
    support::mesh::post(client, url, body, None, timeout_ms).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_and_three_servers_answer_every_request_and_share_the_work() {
    let vhost = Vhost::create("share");
    let mesh = Mesh::start(amqp_transport(&[vhost.url()]), 3, 2, 16).await;
    let client = http();
    let limit = Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = Vec::new();
    for i in 0..300 {
        let (client, limit) = (client.clone(), limit.clone());
        let url = mesh.url(i, "echo");
        tasks.push(tokio::spawn(async move {
            let _permit = limit.acquire().await.unwrap();
            let body = format!(r#"{{"i":{i}}}"#);
            (body.clone(), post(&client, url, body, None).await)
        }));
    }
    let mut served_by = BTreeMap::new();
    for t in tasks {
        let (sent, out) = t.await.unwrap();
        assert_eq!(out.status, 200, "{out:?}");
        assert_eq!(out.body, sent);
        *served_by
            .entry(out.served_by.expect("no served-by header"))
            .or_insert(0) += 1;
    }
    let nodes: BTreeSet<_> = served_by.keys().cloned().collect();
    let expected: BTreeSet<_> = (1..=3).map(|i| format!("logic-{i}")).collect();
    assert_eq!(nodes, expected, "work per server: {served_by:?}");
}

/// Sum of unacknowledged deliveries on the vhost's channels.
fn unacked(vhost: &Vhost) -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_channels",
            "-p",
            &vhost.name,
            "messages_unacknowledged",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<usize>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_server_holding_requests_loses_none() {
    let vhost = Vhost::create("kill9");
    let mut mesh = Mesh::start(amqp_transport(&[vhost.url()]), 3, 1, 6).await;
    let client = http();
    let sent = 18;
    let mut tasks = Vec::new();
    for i in 0..sent {
        let client = client.clone();
        let url = mesh.url(i, "test.slow");
        tasks.push(tokio::spawn(async move {
            post(&client, url, r#"{"ms":1500}"#.to_owned(), None).await
        }));
    }
    // Wait until the servers hold the requests, unacknowledged.
    let deadline = Instant::now() + Duration::from_secs(10);
    while unacked(&vhost) < sent {
        assert!(
            Instant::now() < deadline,
            "the servers never held all {sent} requests"
        );
    }
    let victim = mesh.servers[0].take().unwrap();
    victim.kill9().await;

    let (mut answered, mut failed) = (0, 0);
    for t in tasks {
        let out = t.await.unwrap();
        if out.status == 200 && out.body == r#"{"slept_ms":1500}"# {
            answered += 1;
            assert_ne!(
                out.served_by.as_deref(),
                Some("logic-1"),
                "the dead server answered?"
            );
        } else {
            failed += 1;
            eprintln!("failed request: {out:?}");
        }
    }
    eprintln!("kill -9: sent {sent}, answered {answered}, failed {failed}");
    assert_eq!((answered, failed), (sent, 0), "requests were lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn components_recover_from_lost_broker_connections_and_nothing_hangs() {
    let vhost = Vhost::create("outage");
    let mesh = Mesh::start(amqp_transport(&[vhost.url()]), 2, 1, 8).await;
    let client = http();
    let connections_before = vhost.connection_count();
    let timeout_ms = 2000;
    let url = mesh.url(0, "echo");

    // Steady traffic until 20 requests succeeded.
    let mut outcomes = Vec::new();
    while outcomes
        .iter()
        .filter(|o: &&Outcome| o.status == 200)
        .count()
        < 20
    {
        outcomes.push(post(&client, url.clone(), "1".to_owned(), Some(timeout_ms)).await);
    }
    vhost.close_all_connections();
    let outage = Instant::now();
    // Keep sending until both servers have served again after the outage.
    let mut served_after = BTreeSet::new();
    let mut during = Vec::new();
    while served_after.len() < 2 {
        assert!(
            outage.elapsed() < Duration::from_secs(10),
            "not recovered within 10 s; outcomes since the outage: {during:?}"
        );
        let out = post(&client, url.clone(), "1".to_owned(), Some(timeout_ms)).await;
        if out.status == 200 {
            served_after.insert(out.served_by.clone().unwrap());
        }
        during.push(out);
    }
    let recovered_in = outage.elapsed();
    eprintln!(
        "recovered in {recovered_in:?} after {} requests",
        during.len()
    );
    for out in outcomes.iter().chain(&during) {
        assert!(
            matches!(out.status, 200 | 503 | 504),
            "a request failed otherwise than 503/504: {out:?}"
        );
        assert!(
            out.elapsed < Duration::from_millis(timeout_ms + 1000),
            "a request hung past its deadline: {out:?}"
        );
    }
    assert!(vhost.connection_count() >= connections_before.min(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_server_stopped_requests_fail_within_their_deadline() {
    let vhost = Vhost::create("stopped");
    let mut mesh = Mesh::start(amqp_transport(&[vhost.url()]), 1, 1, 4).await;
    let client = http();
    let ok = post(&client, mesh.url(0, "echo"), "{}".to_owned(), None).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    let server = mesh.servers[0].take().unwrap();
    let status = server.terminate(Duration::from_secs(15)).await;
    assert!(status.success(), "logic server exit status {status:?}");
    for _ in 0..3 {
        let out = post(&client, mesh.url(0, "echo"), "{}".to_owned(), Some(1000)).await;
        assert!(matches!(out.status, 503 | 504), "{out:?}");
        assert!(out.elapsed < Duration::from_millis(1500), "{out:?}");
        let body: Value = serde_json::from_str(&out.body).unwrap();
        assert!(body["error"]["code"].is_string(), "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_broker_in_the_list_is_skipped_and_said_so() {
    let vhost = Vhost::create("urls");
    let dead = "amqp://guest:guest@127.0.0.1:1/%2f".to_owned();
    let mesh = Mesh::start(amqp_transport(&[dead, vhost.url()]), 1, 1, 4).await;
    let client = http();
    let out = post(&client, mesh.url(0, "echo"), r#"{"a":1}"#.to_owned(), None).await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.body, r#"{"a":1}"#);
    for p in mesh.gateways.iter().chain(mesh.servers.iter().flatten()) {
        let log = p.log_text();
        let skipped = log
            .lines()
            .any(|l| l.contains("skipping") && l.contains("127.0.0.1:1"));
        assert!(
            skipped,
            "the log does not say the dead broker was skipped:\n{log}"
        );
        assert!(
            !log.contains("guest:guest@"),
            "a password was logged:\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_distributed_configs_serve_the_embedded_examples() {
    let vhost = Vhost::create("shipped");
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let scratch = Scratch::new();
    let url = vhost.url();
    let envs = [
        ("KEELSON__TRANSPORT__URLS", url.as_str()),
        ("KEELSON__GATEWAY__LISTEN", "127.0.0.1:0"),
        ("KEELSON__AUTH__SECRET", SECRET),
    ];
    let server = Process::start(
        Bin::LogicServer,
        &root.join("config/logic-server.toml"),
        &scratch.path().join("logic.log"),
        &envs,
    )
    .await;
    let gateway = Process::start(
        Bin::Gateway,
        &root.join("config/gateway.toml"),
        &scratch.path().join("gateway.log"),
        &envs,
    )
    .await;
    let client = http();
    let resp = client
        .post(gateway.url("echo"))
        .body(r#"{"hi":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.text().await.unwrap(), r#"{"hi":1}"#);
    let token_config = scratch.write("token.toml", &format!("[auth]\nsecret = \"{SECRET}\"\n"));
    let alice = support::token(&token_config, "alice");
    for expected in 1..=3 {
        let resp = client
            .post(gateway.url("counter.increment"))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.json::<Value>().await.unwrap(),
            json!({ "value": expected })
        );
    }
    let resp = client
        .post(gateway.url("nope"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let resp = client
        .post(gateway.url("echo"))
        .body("{bad")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(gateway.terminate(Duration::from_secs(10)).await.success());
    assert!(server.terminate(Duration::from_secs(15)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_service_queue_is_declared_again_and_served() {
    let vhost = Vhost::create("queue-deleted");
    let mesh = Mesh::start(amqp_transport(&[vhost.url()]), 1, 1, 16).await;
    let client = http();
    let echo = || post(&client, mesh.url(0, "echo"), "{}".into(), None);
    assert_eq!(echo().await.status, 200);
    // The broker cancels the server's consumer; the server declares its queue again
    // (bindings included) and consumes, while its governor ticks every 100 ms.
    vhost.delete_queue("keelson.svc.default");
    let started = Instant::now();
    loop {
        let out = echo().await;
        if out.status == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "not served again after the queue was deleted: {out:?}"
        );
    }
}
