//! Rolling upgrade with zero failed requests: logic servers are replaced one at a
//! time under steady traffic, from this build to the next version's (protocol 1.3,
//! an added optional envelope field) and from the previous release's (protocol 1.0,
//! without outcome records) to this one; a draining server answers what it holds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::broker::{Vhost, amqp_transport};
use support::mesh::{Mesh, Outcome, ServerSpec, node_state, post};
use support::{Bin, http};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Before,
    During,
    After,
}

struct Sent {
    phase: Phase,
    handler: &'static str,
    user: usize,
    outcome: Outcome,
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

/// Which builds a rolling upgrade goes between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upgrade {
    /// This build to the next version's.
    ToNext,
    /// The previous release's to this build; one gateway of each.
    FromPrevious,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_upgrade_under_steady_traffic_fails_no_request_and_loses_no_write() {
    rolling_upgrade(Upgrade::ToNext).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_upgrade_from_the_previous_release_fails_no_request_and_loses_no_write() {
    rolling_upgrade(Upgrade::FromPrevious).await;
}

async fn rolling_upgrade(upgrade: Upgrade) {
    let vhost = Vhost::create("upgrade");
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    let mut old = Vec::new();
    for name in ["v1-a", "v1-b", "v1-c"] {
        let spec = match upgrade {
            Upgrade::ToNext => ServerSpec::new(name),
            Upgrade::FromPrevious => ServerSpec::new(name).previous_version(),
        };
        old.push(mesh.add_server(spec).await);
    }
    match upgrade {
        Upgrade::ToNext => mesh.add_gateway().await,
        Upgrade::FromPrevious => mesh.add_gateway_of(Bin::PreviousGateway).await,
    };
    mesh.add_gateway().await;
    let client = http();
    let users: Vec<String> = (0..8)
        .map(|i| mesh.token(&format!("upgrader-{i}")))
        .collect();

    if upgrade == Upgrade::ToNext {
        // A handler only the new version hosts: a clear error while none runs.
        let out = post(
            &client,
            mesh.url(0, "test.next"),
            "{}".into(),
            None,
            Some(2000),
        )
        .await;
        assert_eq!(out.status, 404, "{out:?}");
    }

    // Steady traffic, about 200 requests/s, half of them context writes.
    let phase = Arc::new(std::sync::Mutex::new(Phase::Before));
    let stop = Arc::new(AtomicBool::new(false));
    let urls: Vec<(String, String)> = (0..2)
        .map(|g| (mesh.url(g, "echo"), mesh.url(g, "counter.increment")))
        .collect();
    let traffic = {
        let (phase, stop, client, users) =
            (phase.clone(), stop.clone(), client.clone(), users.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            let mut tasks = Vec::new();
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let current = *phase.lock().unwrap();
                let (echo, incr) = urls[n % 2].clone();
                let (handler, url, user) = if n.is_multiple_of(2) {
                    ("echo", echo, 0)
                } else {
                    ("counter.increment", incr, (n / 2) % users.len())
                };
                let (client, token) = (client.clone(), users[user].clone());
                tasks.push(tokio::spawn(async move {
                    let token = (handler != "echo").then_some(token);
                    let outcome =
                        post(&client, url, "{}".into(), token.as_deref(), Some(10_000)).await;
                    Sent {
                        phase: current,
                        handler,
                        user,
                        outcome,
                    }
                }));
                n += 1;
            }
            let mut sent = Vec::new();
            for t in tasks {
                sent.push(t.await.unwrap());
            }
            sent
        })
    };

    tokio::time::sleep(Duration::from_secs(2)).await; // the baseline being measured
    *phase.lock().unwrap() = Phase::During;
    let upgrade_started = Instant::now();
    for (i, server) in old.into_iter().enumerate() {
        // The procedure of deploy/rolling-upgrade.sh: signal, wait for the exit,
        // start the new build, wait until the cluster shows it up, go on.
        mesh.stop_server(server).await;
        let node = format!("v2-{i}");
        let spec = match upgrade {
            Upgrade::ToNext => ServerSpec::new(&node).next_version(),
            // The previous release's gateway and servers do not stamp requests with
            // the broker-validated publisher: the new servers take them for the
            // upgrade (README, "Upgrading without failed requests").
            Upgrade::FromPrevious => {
                ServerSpec::new(&node).logic("trust_unstamped_requests = true\n")
            }
        };
        mesh.add_server(spec).await;
        mesh.wait_for_cluster(&client, &format!("{node} up"), |t| {
            node_state(t, &node).as_deref() == Some("up")
        })
        .await;
    }
    let upgrade_took = upgrade_started.elapsed();
    *phase.lock().unwrap() = Phase::After;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let sent = traffic.await.unwrap();

    let failed: Vec<&Sent> = sent.iter().filter(|s| s.outcome.status != 200).collect();
    let mut per_phase: BTreeMap<Phase, Vec<Duration>> = BTreeMap::new();
    for s in &sent {
        per_phase
            .entry(s.phase)
            .or_default()
            .push(s.outcome.elapsed);
    }
    for (p, lat) in &per_phase {
        eprintln!(
            "{p:?}: {} requests, p50 {:?}, p99 {:?}",
            lat.len(),
            percentile(lat.clone(), 0.5),
            percentile(lat.clone(), 0.99)
        );
    }
    eprintln!(
        "upgrade of 3 servers took {upgrade_took:?}; {} requests, {} failed",
        sent.len(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} requests failed, e.g. {:?}",
        failed.len(),
        sent.len(),
        failed.first().map(|s| (&s.handler, &s.outcome))
    );

    // No context write lost: each user's counter equals its successful increments.
    let mut expected = vec![0i64; users.len()];
    for s in sent.iter().filter(|s| s.handler == "counter.increment") {
        expected[s.user] += 1;
    }
    for (user, token) in users.iter().enumerate() {
        mesh.wait_for_counter(&client, token, expected[user]).await;
    }

    if upgrade == Upgrade::ToNext {
        // Every server now runs the new version, and the new handler is served.
        let out = post(&client, mesh.url(1, "test.next"), "{}".into(), None, None).await;
        assert_eq!(out.status, 200, "{out:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_handler_reaches_the_one_server_hosting_it_while_versions_are_mixed() {
    let vhost = Vhost::create("skew");
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    mesh.add_server(ServerSpec::new("old-1")).await;
    mesh.add_server(ServerSpec::new("old-2")).await;
    mesh.add_gateway().await;
    mesh.add_server(ServerSpec::new("new-1").next_version())
        .await;
    let client = http();
    // The old servers must know who hosts it: wait for the new one's heartbeat to
    // reach the cluster view, as the gateway's /cluster shows it.
    let table = mesh
        .wait_for_cluster(&client, "three servers up", |t| {
            ["old-1", "old-2", "new-1"]
                .iter()
                .all(|n| node_state(t, n).as_deref() == Some("up"))
        })
        .await;
    let versions: Vec<&str> = table["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["version"].as_str().unwrap())
        .collect();
    assert!(
        versions.iter().any(|v| v.ends_with("+next")),
        "{versions:?}"
    );
    for _ in 0..30 {
        let out = post(
            &client,
            mesh.url(0, "test.next"),
            "{}".into(),
            None,
            Some(5000),
        )
        .await;
        assert_eq!(out.status, 200, "{out:?}");
        assert_eq!(out.served_by.as_deref(), Some("new-1"));
        // Old and new versions serve the shared handlers side by side.
        let out = post(
            &client,
            mesh.url(0, "echo"),
            r#"{"v":1}"#.into(),
            None,
            None,
        )
        .await;
        assert_eq!(out.body, r#"{"v":1}"#);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_every_slow_request_once_and_exits_zero_within_the_drain_timeout() {
    let vhost = Vhost::create("drain");
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    let a = mesh
        .add_server(ServerSpec::new("draining").concurrency(4))
        .await;
    mesh.add_gateway().await;
    let client = http();
    let slow: Vec<_> = (0..4)
        .map(|_| {
            let (client, url) = (client.clone(), mesh.url(0, "test.slow"));
            tokio::spawn(
                async move { post(&client, url, r#"{"ms":1500}"#.into(), None, None).await },
            )
        })
        .collect();
    let started = Instant::now();
    loop {
        let log = mesh.servers[a].as_ref().unwrap().log_text();
        if log.matches("test.slow started").count() == 4 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the slow requests never all started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b = mesh.add_server(ServerSpec::new("peer")).await;
    let log_a = mesh.servers[a].as_ref().unwrap().log.clone();
    let sigterm = Instant::now();
    mesh.stop_server(a).await; // asserts exit status 0
    let took = sigterm.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "drain took {took:?}, past drain_timeout_ms = 5000"
    );
    for t in slow {
        let out = t.await.unwrap();
        assert_eq!(out.status, 200, "{out:?}");
        assert_eq!(out.served_by.as_deref(), Some("draining"));
    }
    let log_a = std::fs::read_to_string(log_a).unwrap();
    assert_eq!(
        log_a.matches("test.slow started").count(),
        4,
        "a request ran twice"
    );
    let log_b = mesh.servers[b].as_ref().unwrap().log_text();
    assert_eq!(
        log_b.matches("test.slow started").count(),
        0,
        "a drained request was redelivered:\n{log_b}"
    );
}
