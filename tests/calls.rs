//! Handler-to-handler calls through real processes, on the embedded mesh (memory
//! transport) and on a distributed one (RabbitMQ), and a plugin whose set-up fails.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use std::time::{Duration, Instant};
use support::broker::{Vhost, amqp_transport};
use support::mesh::{Mesh, Outcome, ServerSpec, post};
use support::{Bin, Process, Scratch, embedded_config, http, token};

const CALL_HANDLERS: &[&str] = &["test.relay", "test.cycle", "test.meta"];

/// What a user observes: a call carries the user, a nested id and the deadline; a
/// cycle is answered 504 at the deadline.
async fn check_calls(url: impl Fn(&str) -> String, token: &str) {
    let client = http();
    let relay = json!({"handler": "test.meta", "body": null}).to_string();
    let out: Outcome = post(&client, url("test.relay"), relay, Some(token), Some(3_000)).await;
    assert_eq!(out.status, 200, "{out:?}");
    let body: Value = serde_json::from_str(&out.body).unwrap();
    assert_eq!(body["user"], "alice", "{body}");
    assert!(body["id"].as_str().unwrap().ends_with(".1"), "{body}");
    let left = body["left_ms"].as_u64().unwrap();
    assert!(
        left > 0 && left <= 3_000,
        "the caller's deadline is carried: {body}"
    );

    let started = Instant::now();
    let out = post(
        &client,
        url("test.cycle"),
        "{}".into(),
        Some(token),
        Some(1_000),
    )
    .await;
    assert_eq!(out.status, 504, "{out:?}");
    assert!(
        started.elapsed() < Duration::from_millis(2_500),
        "a cycle ends at its deadline: {:?}",
        started.elapsed()
    );
    // The server is not stuck: the next request is served.
    let relay = json!({"handler": "test.meta"}).to_string();
    let out = post(&client, url("test.relay"), relay, Some(token), Some(3_000)).await;
    assert_eq!(out.status, 200, "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_carry_user_and_deadline_and_a_cycle_ends_504_on_the_embedded_mesh() {
    let scratch = Scratch::new();
    let handlers = CALL_HANDLERS
        .iter()
        .map(|h| format!("\"{h}\""))
        .collect::<Vec<_>>();
    let config = embedded_config("").replace(
        "handlers = [",
        &format!("handlers = [{}, ", handlers.join(", ")),
    );
    let config = scratch.write("keelson.toml", &config);
    let mesh = Process::start(Bin::Keelson, &config, &scratch.path().join("k.log"), &[]).await;
    check_calls(|h| mesh.url(h), &token(&config, "alice")).await;
    mesh.terminate(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_go_across_processes_on_amqp() {
    let vhost = Vhost::create("calls");
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    // Two servers: a call is served by whichever takes it, in the same process or
    // the other.
    for i in 1..=2 {
        let spec = ServerSpec::new(&format!("logic-{i}")).service("default", CALL_HANDLERS);
        mesh.add_server(spec).await;
    }
    mesh.add_gateway().await;
    let token = mesh.token("alice");
    check_calls(|h| mesh.url(0, h), &token).await;
}

/// Start `keelson` with `test.fragile` enabled and `settings` as the `fragile`
/// plugin's section; it must fail to start. Returns the config file and stderr.
fn start_fragile(scratch: &Scratch, settings: &str) -> (std::path::PathBuf, String) {
    let config = embedded_config(&format!("\n[logic_server.plugins.fragile]\n{settings}\n"))
        .replace("handlers = [", "handlers = [\"test.fragile\", ");
    let config = scratch.write("keelson.toml", &config);
    let out = std::process::Command::new(Bin::Keelson.path())
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    (config, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn a_plugin_whose_setup_fails_stops_the_process_naming_the_plugin_and_the_cause() {
    let scratch = Scratch::new();
    let (_, stderr) = start_fragile(&scratch, "fail = true");
    assert!(
        stderr.contains("plugin `fragile` failed to set up"),
        "{stderr}"
    );
    assert!(
        stderr.contains("cannot open the ledger at /nonexistent/ledger.db"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_plugin_settings_mistake_names_the_file_the_key_and_the_plugin() {
    let scratch = Scratch::new();
    let (config, stderr) = start_fragile(&scratch, "fial = true");
    assert!(stderr.contains(&config.display().to_string()), "{stderr}");
    assert!(stderr.contains("logic_server.plugins.fragile"), "{stderr}");
    assert!(stderr.contains("unknown field `fial`"), "{stderr}");
}
