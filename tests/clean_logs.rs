//! What a client sends stays out of the logs: on a distributed mesh (RabbitMQ) at
//! the default level, a marker in a request to an unknown handler, in a token and
//! in a panicking handler's request appears in no process's output; a handler
//! panic is one log line, without a backtrace even with `RUST_BACKTRACE=1`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::broker::{Vhost, amqp_transport};
use support::http;
use support::mesh::{Mesh, ServerSpec};

const MARKER: &str = "MARKER-7f3a9c";

/// Resident size of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_data_stays_out_of_the_logs_and_a_panic_is_one_line() {
    let vhost = Vhost::create("cleanlogs");
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    let spec = ServerSpec::new("logic-1")
        .service("default", &["echo", "test.panic"])
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LOG", "info");
    mesh.add_server(spec).await;
    mesh.add_gateway().await;
    let token = mesh.token("alice");
    let client = http();
    let body = format!(r#"{{"note":"{MARKER}"}}"#);

    let unknown = client
        .post(mesh.url(0, "no.such.handler"))
        .bearer_auth(&token)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    let forged = client
        .post(mesh.url(0, "echo"))
        .bearer_auth(format!("{MARKER}.{MARKER}.{MARKER}"))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);

    let server = mesh.servers[0].as_ref().unwrap();
    let rss_before = rss_kib(server.pid());
    let panicked = client
        .post(mesh.url(0, "test.panic"))
        .bearer_auth(&token)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(panicked.status(), 500);
    server.wait_for_log("handler panicked").await;
    let rss_after = rss_kib(server.pid());

    let logs: Vec<(String, String)> = mesh
        .gateways
        .iter()
        .map(|g| ("gateway".to_owned(), g.log_text()))
        .chain(std::iter::once(("logic-1".to_owned(), server.log_text())))
        .collect();
    for (name, log) in &logs {
        assert!(!log.contains(MARKER), "{name} logged request data:\n{log}");
        // lapin's own warning prints the returned message whole (its body as a
        // list of byte values, where a text marker is not found as such).
        assert!(
            !log.contains("returned us a message"),
            "{name} logged a returned message whole:\n{log}"
        );
        let longest = log.lines().map(str::len).max().unwrap_or(0);
        assert!(
            longest < 1_000,
            "{name} logged a {longest}-byte line:\n{log}"
        );
    }
    let server_log = &logs[1].1;
    let panic_lines: Vec<_> = server_log
        .lines()
        .filter(|l| l.contains("panicked") || l.contains("was called"))
        .collect();
    assert_eq!(panic_lines.len(), 1, "{panic_lines:#?}");
    assert!(
        panic_lines[0].contains("test.panic was called"),
        "{server_log}"
    );
    assert!(
        panic_lines[0].contains("plugins/testing/src/lib.rs"),
        "the location: {server_log}"
    );
    assert!(!server_log.contains("stack backtrace"), "{server_log}");
    assert!(
        rss_after < rss_before + 30 * 1024,
        "resident size {rss_before} KiB before the panic, {rss_after} KiB after"
    );
    // The gateway said what happened to the returned request, in one line.
    assert!(
        logs[0].1.contains("the broker returned a request"),
        "{}",
        logs[0].1
    );
}
