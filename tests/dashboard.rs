//! The dashboard in a real browser (Debian's headless Chromium) against a real mesh
//! on RabbitMQ: two logic servers and a gateway in a vhost of the test's own. The
//! page shows both servers, shows one paused while its governor pauses it and up
//! again once it resumes, counts the dead letters waiting, and shows the handler
//! that answered traffic, from the gateway's `/metrics`. A screenshot of the paused
//! cluster is left at `target/test-outputs/dashboard.png`.
//!
//! With background jobs running and finished, the Jobs panel shows the cluster's
//! counts by state (from the logic servers' heartbeats) and the servers table how
//! many each server runs (screenshot: `target/test-outputs/dashboard-jobs.png`).
//!
//! With a schedule firing every second, the "Leases and schedules" panel shows the
//! scheduler's lease and its holder, and the schedule with its slots and leader
//! (screenshot: `target/test-outputs/dashboard-schedules.png`).
//!
//! The script's arithmetic (Prometheus text parsing, rates, error shares, p99 from
//! histogram buckets) is checked in the same browser on a fixture page.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::json;
use std::path::Path;
use std::time::Duration;
use support::broker::{Vhost, amqp_transport, confirmed_channel, dead_letter};
use support::browser::{dump_dom, screenshot, test_outputs};
use support::http;
use support::mesh::{Mesh, ServerSpec, node_state, post, schedule_spec};

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

/// The text (up to its first child tag) of the cell of class `class` in the row
/// that starts `<tr {row}`.
fn cell_of(dom: &str, row: &str, class: &str) -> String {
    let at = dom
        .find(&format!("<tr {row}"))
        .unwrap_or_else(|| panic!("no row {row}:\n{dom}"));
    let row_html = &dom[at..at + dom[at..].find("</tr>").expect("a row ends")];
    let marker = format!(r#"class="{class}">"#);
    let cell = row_html
        .find(&marker)
        .unwrap_or_else(|| panic!("no {class} cell in the row {row}: {row_html}"));
    let rest = &row_html[cell + marker.len()..];
    rest[..rest.find('<').expect("a cell ends")].to_owned()
}

/// The "Jobs running" cell of `node`'s row in the servers table.
fn jobs_running_of(dom: &str, node: &str) -> String {
    cell_of(dom, &format!(r#"data-node="{node}""#), "num jobs-running")
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
    // No singleton, no schedule: the panel says so in one line.
    assert!(
        dom.contains(r#"<p id="leased-empty" class="empty">"#)
            && dom.contains(r#"<div class="pair" id="leased-pair" hidden="">"#),
        "{dom}"
    );
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_jobs_by_state_and_the_jobs_each_server_runs() {
    let vhost = Vhost::create("dashboard-jobs");
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    // Two job slots a server: three long jobs keep both servers busy.
    for node in ["worker-a", "worker-b"] {
        mesh.add_server(
            ServerSpec::new(node)
                .service("default", &["test.job", "echo"])
                .extra("[logic_server.jobs]\nconcurrency = 2\n"),
        )
        .await;
    }
    mesh.add_gateway().await;
    let client = http();
    let dashboard = format!("{}/dashboard", mesh.gateways[0].base_url.clone().unwrap());
    let alice = mesh.token("alice");

    // Before any job, the panel says there is none yet (or zeros once counted).
    let dom = dump_dom(&dashboard, BUDGET).await;
    assert!(
        ["–", "0"].contains(&text_of(&dom, "jobs-running").as_str()),
        "{dom}"
    );

    // Four quick jobs to their end, three long ones left running.
    let mut quick = Vec::new();
    for _ in 0..4 {
        let id = mesh
            .submit_job(&client, 0, "test.job", &json!({"ms": 10}), Some(&alice))
            .await;
        quick.push(id);
    }
    for id in &quick {
        let status = mesh.wait_for_job(&client, 0, id, Some(&alice)).await;
        assert_eq!(status["state"], "succeeded", "{status}");
    }
    for _ in 0..3 {
        mesh.submit_job(&client, 0, "test.job", &json!({"ms": 20000}), Some(&alice))
            .await;
    }

    // Servers count their job records every 10 s; the heartbeats carry the counts.
    let table = mesh
        .wait_for_cluster_within(
            &client,
            "3 jobs running and 4 succeeded",
            Duration::from_secs(30),
            |t| {
                let running_here: u64 = t["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|n| n["jobs"]["running_here"].as_u64().unwrap_or(0))
                    .sum();
                t["jobs"]["running"] == 3 && t["jobs"]["succeeded"] == 4 && running_here == 3
            },
        )
        .await;
    assert_eq!(table["jobs"]["queued"], 0, "{table}");

    let dom = dump_dom(&dashboard, BUDGET).await;
    assert_eq!(text_of(&dom, "jobs-running"), "3", "{dom}");
    assert_eq!(text_of(&dom, "jobs-succeeded"), "4", "{dom}");
    assert_eq!(text_of(&dom, "jobs-queued"), "0", "{dom}");
    assert_eq!(text_of(&dom, "jobs-failed"), "0", "{dom}");
    assert_eq!(text_of(&dom, "jobs-cancelled"), "0", "{dom}");
    assert!(
        text_of(&dom, "jobs-hint").contains("counted by worker-"),
        "{}",
        text_of(&dom, "jobs-hint")
    );
    // Per server: two slots each, three jobs in all.
    let per_server: Vec<u64> = ["worker-a", "worker-b"]
        .iter()
        .map(|n| jobs_running_of(&dom, n).parse().unwrap())
        .collect();
    assert_eq!(per_server.iter().sum::<u64>(), 3, "{per_server:?}");
    assert!(per_server.iter().all(|n| *n <= 2), "{per_server:?}");
    screenshot(
        &dashboard,
        &test_outputs().join("dashboard-jobs.png"),
        BUDGET,
    )
    .await;

    drop(vhost);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_scheduler_lease_and_the_schedule_it_fires() {
    let vhost = Vhost::create("dashboard-schedules");
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    let record = mesh.scratch.path().join("record.jsonl");
    for node in ["sched-a", "sched-b"] {
        mesh.add_server(schedule_spec(node, &record)).await;
    }
    mesh.add_gateway().await;
    let client = http();
    let dashboard = format!("{}/dashboard", mesh.gateways[0].base_url.clone().unwrap());

    // One of the servers leads and has fired a slot.
    let table = mesh
        .wait_for_cluster_within(
            &client,
            "the scheduler lease held and a slot of tick fired",
            Duration::from_secs(30),
            |t| {
                let leader = t["leases"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|l| l["name"] == "scheduler")
                    .map(|l| l["node"].clone());
                let tick = &t["schedules"][0];
                leader.is_some_and(|l| l.is_string() && tick["leader"] == l)
                    && tick["last_slot"].is_string()
            },
        )
        .await;
    let leader = table["schedules"][0]["leader"].as_str().unwrap().to_owned();
    assert!(["sched-a", "sched-b"].contains(&leader.as_str()), "{table}");

    let dom = dump_dom(&dashboard, BUDGET).await;
    let lease = r#"data-lease="scheduler""#;
    assert_eq!(cell_of(&dom, lease, "node"), "scheduler", "{dom}");
    assert_eq!(cell_of(&dom, lease, "lease-holder"), leader, "{dom}");
    let token: u64 = cell_of(&dom, lease, "num mono").parse().unwrap();
    assert!(token > 0, "{dom}");
    let tick = r#"data-schedule="tick""#;
    assert_eq!(cell_of(&dom, tick, "node"), "tick", "{dom}");
    assert_eq!(
        cell_of(&dom, tick, "sub schedule-handler"),
        "test.record",
        "{dom}"
    );
    assert_eq!(
        cell_of(&dom, tick, "mono schedule-cron"),
        "* * * * * *",
        "{dom}"
    );
    assert_eq!(cell_of(&dom, tick, "sub schedule-timezone"), "UTC", "{dom}");
    assert_eq!(cell_of(&dom, tick, "schedule-leader"), leader, "{dom}");
    for slot in ["mono schedule-last", "mono schedule-next"] {
        let text = cell_of(&dom, tick, slot);
        assert!(
            text.len() == 20 && text.ends_with('Z') && text.contains('T'),
            "{slot}: {text}"
        );
    }
    assert!(
        ["leases-empty", "schedules-empty", "leased-empty"]
            .iter()
            .all(|id| dom.contains(&format!(r#"<p id="{id}" class="empty" hidden="">"#))),
        "the panel still says it is empty:\n{dom}"
    );
    screenshot(
        &dashboard,
        &test_outputs().join("dashboard-schedules.png"),
        BUDGET,
    )
    .await;

    drop(vhost);
}
