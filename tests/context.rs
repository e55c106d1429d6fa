//! Replicated per-user context across real logic-server processes on RabbitMQ.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use support::broker::{Vhost, amqp_transport};
use support::http;
use support::mesh::{Mesh, Outcome, ServerSpec, post};

fn value(body: &str) -> i64 {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["value"]
        .as_i64()
        .unwrap_or_else(|| panic!("no value in {body}"))
}

/// Increment each user's counter `times` times and add an item to their cart.
async fn write_users(mesh: &Mesh, users: &[(String, String)], times: usize) {
    let client = http();
    for (name, token) in users {
        for _ in 0..times {
            let out = call(mesh, &client, "counter.increment", token).await;
            assert_eq!(out.status, 200, "{out:?}");
        }
        let item = format!(r#"{{"item":"book-{name}","quantity":2}}"#);
        let out = post(&client, mesh.url(0, "cart.add"), item, Some(token), None).await;
        assert_eq!(out.status, 200, "{out:?}");
    }
}

/// Every user's counter equals `times` and their cart holds their book, read now
/// (no retry: the reading server must already have it).
async fn assert_users(mesh: &Mesh, users: &[(String, String)], times: i64) {
    let client = http();
    for (name, token) in users {
        let out = call(mesh, &client, "counter.get", token).await;
        assert_eq!(out.status, 200, "{out:?}");
        assert_eq!(
            value(&out.body),
            times,
            "counter of {name} via {:?}",
            out.served_by
        );
        let out = call(mesh, &client, "cart.list", token).await;
        let cart: Value = serde_json::from_str(&out.body).unwrap();
        assert_eq!(
            cart,
            json!({ "items": [{ "item": format!("book-{name}"), "quantity": 2 }] }),
            "cart of {name} via {:?}",
            out.served_by
        );
    }
}

/// POST `handler` through the first gateway, with no body, as the user of `token`.
async fn call(mesh: &Mesh, client: &reqwest::Client, handler: &str, token: &str) -> Outcome {
    post(
        client,
        mesh.url(0, handler),
        String::new(),
        Some(token),
        None,
    )
    .await
}

fn users(mesh: &Mesh, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let name = format!("user-{i}");
            let token = mesh.token(&name);
            (name, token)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_server_is_readable_through_another_within_100ms() {
    let vhost = Vhost::create("ctx-lag");
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    // Writers and readers are separate services, so each request's server is known.
    mesh.add_server(
        ServerSpec::new("writer").service("writers", &["counter.increment", "cart.add"]),
    )
    .await;
    mesh.add_server(ServerSpec::new("reader").service("readers", &["counter.get", "cart.list"]))
        .await;
    mesh.add_gateway().await;
    let token = mesh.token("alice");
    let client = http();
    let mut worst = Duration::ZERO;
    for expected in 1..=20 {
        let out = call(&mesh, &client, "counter.increment", &token).await;
        assert_eq!(out.served_by.as_deref(), Some("writer"));
        let written = Instant::now();
        loop {
            let out = call(&mesh, &client, "counter.get", &token).await;
            assert_eq!(out.served_by.as_deref(), Some("reader"));
            if value(&out.body) == expected {
                break;
            }
            assert!(
                written.elapsed() < Duration::from_millis(100),
                "write {expected} not visible through the other server after 100 ms"
            );
        }
        worst = worst.max(written.elapsed());
    }
    eprintln!("worst replication lag seen through HTTP: {worst:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_started_later_has_every_context_before_it_serves() {
    let vhost = Vhost::create("ctx-join");
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    mesh.add_server(
        ServerSpec::new("first").service("writers", &["counter.increment", "cart.add"]),
    )
    .await;
    mesh.add_gateway().await;
    let users = users(&mesh, 40);
    write_users(&mesh, &users, 3).await;
    // The reader starts only now; once it says ready it must answer from a complete
    // context: no retries below.
    mesh.add_server(ServerSpec::new("late").service("readers", &["counter.get", "cart.list"]))
        .await;
    assert_users(&mesh, &users, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_servers_one_after_another_loses_no_context() {
    let vhost = Vhost::create("ctx-roll");
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    let a = mesh.add_server(ServerSpec::new("a")).await;
    mesh.add_gateway().await;
    let users = users(&mesh, 20);
    write_users(&mesh, &users, 2).await;
    let b = mesh.add_server(ServerSpec::new("b")).await;
    mesh.stop_server(a).await;
    let c = mesh.add_server(ServerSpec::new("c")).await;
    mesh.stop_server(b).await;
    assert_users(&mesh, &users, 2).await;
    mesh.stop_server(c).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_increments_through_two_gateways_and_two_servers_all_count() {
    let vhost = Vhost::create("ctx-count");
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    mesh.add_server(ServerSpec::new("s1")).await;
    mesh.add_server(ServerSpec::new("s2")).await;
    mesh.add_gateway().await;
    mesh.add_gateway().await;
    let token = mesh.token("alice");
    let client = http();
    let n = 200;
    let mut tasks = Vec::new();
    for i in 0..n {
        let (client, token, url) = (
            client.clone(),
            token.clone(),
            mesh.url(i, "counter.increment"),
        );
        tasks.push(tokio::spawn(async move {
            post(&client, url, String::new(), Some(&token), None).await
        }));
    }
    let mut servers = BTreeSet::new();
    for t in tasks {
        let out = t.await.unwrap();
        assert_eq!(out.status, 200, "{out:?}");
        servers.insert(out.served_by.unwrap());
    }
    assert_eq!(
        servers.len(),
        2,
        "both servers must have taken increments: {servers:?}"
    );
    // Every server converges on exactly n: poll both until each reads n.
    let started = Instant::now();
    let mut seen = BTreeSet::new();
    while seen.len() < 2 {
        let out = call(&mesh, &client, "counter.get", &token).await;
        let v = value(&out.body);
        assert!(v <= n as i64, "counter overshot: {v}");
        if v == n as i64 {
            seen.insert(out.served_by.unwrap());
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "servers did not converge on {n}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_leaves_survivors_intact_and_a_restarted_server_catches_up() {
    let vhost = Vhost::create("ctx-kill");
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    let a = mesh.add_server(ServerSpec::new("a")).await;
    let b = mesh.add_server(ServerSpec::new("b")).await;
    mesh.add_gateway().await;
    let users = users(&mesh, 20);
    write_users(&mesh, &users, 2).await;
    mesh.kill_server(a).await;
    // Replication is asynchronous: the survivor may need a moment for the very last
    // writes; then it holds everything.
    mesh.wait_for_counter(&http(), &users.last().unwrap().1, 2)
        .await;
    assert_users(&mesh, &users, 2).await;
    let restarted = mesh.add_server(ServerSpec::new("a-restarted")).await;
    mesh.stop_server(b).await;
    assert_users(&mesh, &users, 2).await;
    mesh.stop_server(restarted).await;
}

/// A writer (`counter.increment`) and a reader (`counter.get`) with the given
/// `resync_interval_s`: one increment reaches both, then the reader's connection
/// drops and 20 more are broadcast while it is down, which never reach it through
/// the context channel. Returns the mesh and the user's token.
async fn writes_missed_by_a_reader(vhost: &Vhost, resync_interval_s: u64) -> (Mesh, String) {
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    mesh.add_server(ServerSpec::new("writer").service("writers", &["counter.increment"]))
        .await;
    mesh.add_server(
        ServerSpec::new("reader")
            .service("readers", &["counter.get"])
            .extra(&format!("resync_interval_s = {resync_interval_s}\n")),
    )
    .await;
    mesh.add_gateway().await;
    let token = mesh.token("alice");
    let client = http();
    let increment = || call(&mesh, &client, "counter.increment", &token);
    assert_eq!(increment().await.status, 200);
    mesh.wait_for_counter(&client, &token, 1).await;

    assert!(vhost.close_connections_of("reader") > 0);
    for _ in 0..20 {
        let out = increment().await;
        assert_eq!(out.status, 200, "{out:?}");
        assert_eq!(out.served_by.as_deref(), Some("writer"));
    }
    (mesh, token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_missed_writes_while_disconnected_gets_them_by_resync() {
    let vhost = Vhost::create("ctx-resync");
    let (mesh, token) = writes_missed_by_a_reader(&vhost, 1).await;
    let client = http();
    // Read through the reader at once (while the first resync is at most 1.2 s
    // away), then until the resync has brought the missed writes.
    let out = call(&mesh, &client, "counter.get", &token).await;
    assert_eq!(out.served_by.as_deref(), Some("reader"), "{out:?}");
    eprintln!(
        "the reader read {} right after the outage",
        value(&out.body)
    );
    mesh.wait_for_counter(&client, &token, 21).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_missed_writes_repairs_the_gap_within_two_heartbeats() {
    let vhost = Vhost::create("ctx-gap");
    // No periodic resync: only the gap detection can bring the missed writes.
    let (mesh, token) = writes_missed_by_a_reader(&vhost, 0).await;
    let client = http();
    let written = std::time::Instant::now();
    // The writer's next heartbeats (one a second) announce deltas the reader never
    // got; it pulls its peers' state at once.
    loop {
        let out = call(&mesh, &client, "counter.get", &token).await;
        if out.status == 200 && value(&out.body) == 21 {
            break;
        }
        assert!(
            written.elapsed() < Duration::from_millis(2_500),
            "the reader still reads {} after {:?}",
            out.body,
            written.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("gap repaired {:?} after the writes", written.elapsed());
    // Settled again, the two carry equal digests of their state in their heartbeats.
    mesh.wait_for_cluster(&client, "equal context digests", |table| {
        let digest = |node: &str| {
            table["nodes"]
                .as_array()
                .and_then(|nodes| nodes.iter().find(|n| n["node"] == node))
                .map(|n| n["digest"]["hash"].clone())
                .filter(|h| h.is_u64())
        };
        digest("writer").is_some() && digest("writer") == digest("reader")
    })
    .await;
}
