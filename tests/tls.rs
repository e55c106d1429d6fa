//! TLS to the broker (issue "Hard edges", item 5), with real processes and a RabbitMQ
//! node of the test's own that listens only in TLS (`deploy/rabbitmq-tls.sh`), on
//! certificates the test generates (rcgen):
//!
//! * a gateway and a logic server on `amqps://` with `tls_ca_file` serve a request,
//!   and again after the broker closed every connection;
//! * a process trusting another CA is refused, and says the broker certificate is not
//!   trusted, naming `transport.tls_ca_file`; one that reaches the broker by a name
//!   its certificate does not hold says which names it holds;
//! * a client certificate logs in by SASL EXTERNAL as the user of its CN;
//! * `password_file` gives the password of a user the test made.
//!
//! Needs binaries built with the `tls` feature (a default feature of the package). A
//! node that cannot be started fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[cfg(not(feature = "tls"))]
compile_error!("tests/tls.rs needs the `tls` feature of the keelson package (on by default)");

mod support;

use std::path::Path;
use std::time::{Duration, Instant};
use support::broker::amqp_transport;
use support::mesh::{Mesh, ServerSpec, gateway_toml, post};
use support::tls::{CLIENT_CN, Certs, TlsNode};
use support::{Scratch, http};

/// `[transport]` on `url` with `extra` settings and a namespace of its own.
fn transport(url: &str, namespace: &str, extra: &str) -> String {
    format!(
        "{}namespace = \"{namespace}\"\n{extra}",
        amqp_transport(&[url.to_owned()])
    )
}

fn path_key(key: &str, path: &Path) -> String {
    format!("{key} = '{}'\n", path.display())
}

/// A logic server and a gateway on `transport`; fails the test unless a request
/// through them is served (200).
async fn serve(transport: String, what: &str) -> Mesh {
    let mut mesh = Mesh::new(transport);
    mesh.add_server(ServerSpec::new("logic-1")).await;
    mesh.add_gateway().await;
    let out = post(&http(), mesh.url(0, "echo"), "{}".into(), None, None).await;
    assert_eq!(
        out.status, 200,
        "{what}: no answer through the gateway: {out:?}"
    );
    mesh
}

/// Run a gateway on `transport` that must not start: returns its log (standard error)
/// once it exited, failing the test if it served or kept running.
async fn refused(scratch: &Scratch, name: &str, transport: &str) -> String {
    let config = scratch.write(&format!("{name}.toml"), &gateway_toml(transport));
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_ui-gateway"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .unwrap_or_else(|_| panic!("{name}: the gateway neither served nor exited in 30 s"))
        .expect("cannot run the gateway");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success() && !stdout.contains("listening on "),
        "{name}: the gateway started ({}):\n{stdout}\n{stderr}",
        out.status
    );
    println!(
        "{name}: the gateway exited ({}); its log:\n{stderr}",
        out.status
    );
    stderr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_private_ca_client_certificates_and_password_files() {
    let scratch = Scratch::new();
    let certs = Certs::generate(scratch.path());
    let node = TlsNode::start(&certs);
    let url = |user: &str, host: &str| format!("amqps://{user}@{host}:{}/%2f", node.port);
    let ca = path_key("tls_ca_file", &certs.ca);

    // Private CA, user and password in the URL.
    let mut mesh = serve(
        transport(&url("guest:guest", "127.0.0.1"), "tls-ca", &ca),
        "tls_ca_file",
    )
    .await;

    // The broker drops every connection: both processes come back on their own.
    node.ctl(&["close_all_connections", "keelson test: simulated outage"]);
    let client = http();
    let started = Instant::now();
    loop {
        let out = post(&client, mesh.url(0, "echo"), "{}".into(), None, None).await;
        if out.status == 200 && started.elapsed() > Duration::from_millis(200) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "not served again 20 s after close_all_connections: {out:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for p in mesh.servers.iter().flatten().chain(&mesh.gateways) {
        p.wait_for_log("lost the connection to broker").await;
    }
    mesh.stop_server(0).await;
    drop(mesh);

    // Trusting another CA: refused, with the setting to check.
    let log = refused(
        &scratch,
        "other-ca",
        &transport(
            &url("guest:guest", "127.0.0.1"),
            "tls-other",
            &path_key("tls_ca_file", &certs.other_ca),
        ),
    )
    .await;
    assert!(
        log.contains("broker certificate not trusted")
            && log.contains("check transport.tls_ca_file"),
        "another CA, the log:\n{log}"
    );

    // The right CA, but a name the certificate does not hold (127.0.0.2 reaches the
    // node too).
    let log = refused(
        &scratch,
        "mismatch",
        &transport(&url("guest:guest", "127.0.0.2"), "tls-name", &ca),
    )
    .await;
    assert!(
        log.contains("broker certificate name mismatch")
            && log.contains("the certificate is for localhost, 127.0.0.1, the URL names 127.0.0.2"),
        "a name mismatch, the log:\n{log}"
    );

    // A client certificate, SASL EXTERNAL: the broker user is the CN, no password.
    node.add_user(CLIENT_CN, &uuid::Uuid::new_v4().to_string());
    let client_cert = format!(
        "{ca}{}{}",
        path_key("tls_cert_file", &certs.client_cert),
        path_key("tls_key_file", &certs.client_key)
    );
    let mesh = serve(
        transport(
            // The user the certificate logs in as (its CN): requests carry it.
            &format!("amqps://keelson-tls-client@127.0.0.1:{}/%2f", node.port),
            "tls-ext",
            &client_cert,
        ),
        "client certificate",
    )
    .await;
    let connections = node.ctl(&["list_connections", "user", "auth_mechanism", "ssl"]);
    assert!(
        connections
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == [CLIENT_CN, "EXTERNAL", "true"]),
        "no EXTERNAL connection as {CLIENT_CN}:\n{connections}"
    );
    drop(mesh);

    // password_file: a user the test made, its password only in a file.
    let password = uuid::Uuid::new_v4().simple().to_string();
    node.add_user("keelson-pw", &password);
    let file = scratch.write("broker-password", &format!("{password}\n"));
    let mesh = serve(
        transport(
            &url("keelson-pw", "127.0.0.1"),
            "tls-pw",
            &format!("{ca}{}", path_key("password_file", &file)),
        ),
        "password_file",
    )
    .await;
    drop(mesh);
    let wrong = scratch.write("wrong-password", "not-it\n");
    let log = refused(
        &scratch,
        "wrong-password",
        &transport(
            &url("keelson-pw", "127.0.0.1"),
            "tls-pw",
            &format!("{ca}{}", path_key("password_file", &wrong)),
        ),
    )
    .await;
    assert!(
        !log.contains(&password) && log.contains("127.0.0.1"),
        "a wrong password, the log:\n{log}"
    );

    drop(node);
}
