//! systemd readiness (sd-notify): real `logic-server` and `ui-gateway` processes on
//! RabbitMQ, with `NOTIFY_SOCKET` pointing at a Unix datagram socket of the test,
//! as systemd's would for a `Type=notify` unit.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use support::broker::{Vhost, amqp_transport};
use support::mesh::{Mesh, ServerSpec, gateway_toml, post};
use support::{Bin, http};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixDatagram;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// The watchdog interval the tests ask for: pings every 150 ms.
const WATCHDOG_USEC: &str = "300000";

/// The service manager's end: the socket a process under test notifies.
struct Notify {
    socket: UnixDatagram,
}

impl Notify {
    fn bind(dir: &Path) -> (Self, String) {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("cannot bind the notify socket");
        (Self { socket }, path.display().to_string())
    }

    /// The next notification (one datagram: `KEY=VALUE` lines); fails the test when
    /// none comes before `deadline`.
    async fn next(&self, deadline: Instant, waiting_for: &str) -> String {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout_at(deadline, self.socket.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no notification while waiting for {waiting_for}"))
            .expect("cannot read the notify socket");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Read notifications until one holds the line `line`; returns how many
    /// `WATCHDOG=1` pings came on the way.
    async fn wait_for(&self, line: &str, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        let mut pings = 0;
        loop {
            let message = self.next(deadline, line).await;
            if message.lines().any(|l| l == line) {
                return pings;
            }
            pings += message.lines().filter(|l| *l == "WATCHDOG=1").count();
        }
    }
}

/// Start `bin --config config` with the notify socket and a watchdog, its log in
/// `log`; standard output is handed back to read.
fn spawn(bin: Bin, config: &Path, log: &Path, socket: &str) -> Child {
    Command::new(bin.path())
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .env("NOTIFY_SOCKET", socket)
        .env("WATCHDOG_USEC", WATCHDOG_USEC)
        .env_remove("WATCHDOG_PID")
        .env_remove("KEELSON__TRANSPORT__KIND")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin:?}: {e}"))
}

fn sigterm(child: &Child) {
    let pid = child.id().expect("still running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

/// After READY=1: pings at half the interval, then STOPPING=1 on SIGTERM and a
/// clean exit.
async fn pings_then_stops(notify: &Notify, mut child: Child, log: &Path) {
    // Pings every 150 ms: at least 4 in 1.5 s, read as they come.
    let deadline = Instant::now() + Duration::from_millis(1500);
    let mut pings = 0;
    while Instant::now() < deadline && pings < 4 {
        let message = notify.next(deadline, "WATCHDOG=1").await;
        pings += message.lines().filter(|l| *l == "WATCHDOG=1").count();
    }
    assert!(pings >= 4, "only {pings} watchdog pings in 1.5 s");
    sigterm(&child);
    notify.wait_for("STOPPING=1", Duration::from_secs(10)).await;
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("no exit within 20 s of SIGTERM")
        .unwrap();
    assert!(
        status.success(),
        "exit {status:?}; log:\n{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logic_server_is_ready_when_it_serves_pings_the_watchdog_and_says_it_stops() {
    let vhost = Vhost::create("sd-logic");
    let transport = amqp_transport(&[vhost.url()]);
    let mut mesh = Mesh::new(transport.clone());
    mesh.add_gateway().await;
    let client = http();
    // No server yet: the handler is unknown.
    let before = post(&client, mesh.url(0, "echo"), "{}".into(), None, None).await;
    assert_eq!(before.status, 404, "{before:?}");

    let (notify, socket) = Notify::bind(mesh.scratch.path());
    let config = mesh.scratch.write(
        "logic.toml",
        &format!(
            "{transport}\n[node]\nid = \"sd-logic\"\n\n[logic_server]\nhandlers = [\"echo\"]\n\n[logic_server.context]\njoin_timeout_ms = 1000\n"
        ),
    );
    let log = mesh.scratch.path().join("logic.log");
    let child = spawn(Bin::LogicServer, &config, &log, &socket);
    notify.wait_for("READY=1", Duration::from_secs(30)).await;
    // Right after READY=1 the server takes requests.
    let after = post(
        &client,
        mesh.url(0, "echo"),
        r#"{"a":1}"#.into(),
        None,
        None,
    )
    .await;
    assert_eq!(after.status, 200, "{after:?}");
    assert_eq!(after.served_by.as_deref(), Some("sd-logic"));
    pings_then_stops(&notify, child, &log).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_is_ready_when_it_listens_pings_the_watchdog_and_says_it_stops() {
    let vhost = Vhost::create("sd-gateway");
    let transport = amqp_transport(&[vhost.url()]);
    let mut mesh = Mesh::new(transport.clone());
    mesh.add_server(ServerSpec::new("sd-peer")).await;

    let (notify, socket) = Notify::bind(mesh.scratch.path());
    let config = mesh
        .scratch
        .write("gateway.toml", &gateway_toml(&transport));
    let log = mesh.scratch.path().join("gateway.log");
    let mut child = spawn(Bin::Gateway, &config, &log, &socket);
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    notify.wait_for("READY=1", Duration::from_secs(30)).await;
    // By READY=1 the gateway has said where it listens, and answers there.
    let line = tokio::time::timeout(Duration::from_secs(1), lines.next_line())
        .await
        .expect("no listening line by READY=1")
        .unwrap()
        .expect("standard output closed");
    let base = line
        .split_once("listening on ")
        .map(|(_, url)| url.trim().to_owned())
        .unwrap_or_else(|| panic!("unexpected first line: {line}"));
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let out = post(
        &http(),
        format!("{base}/api/echo"),
        "[1]".into(),
        None,
        None,
    )
    .await;
    assert_eq!(out.status, 200, "{out:?}");
    assert_eq!(out.body, "[1]");
    pings_then_stops(&notify, child, &log).await;
}
