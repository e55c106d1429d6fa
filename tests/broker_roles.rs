//! Least privilege on the broker (issue 12, "Hard edges", item 3), on a real
//! RabbitMQ with real processes, in vhosts of the test's own: `deploy/broker-setup.sh`
//! creates the role users (with a prefix of this test's own), the operator declares
//! the topology with `keelson topology declare`, and a logic server and a gateway
//! with `declare_topology = false` serve an authenticated request with no configure
//! right on the namespace; the logic server's user may delay background work. The gateway-role user can neither declare nor delete the
//! request exchange, nor read the dead-letter queue. A logic server that only checks
//! the topology, on a vhost where nobody declared it, stops at start and says what is
//! missing and what to run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use keelson_protocol::transport::{Message, Publisher, ServiceSpec};
use lapin::options::{BasicConsumeOptions, ExchangeDeclareOptions, ExchangeDeleteOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use std::time::Duration;
use support::broker::{RoleUsers, Vhost};
use support::mesh::{Mesh, ServerSpec, post};
use support::{Scratch, http};

const NS: &str = "roles";

/// `keelson topology declare` with `config`; its standard output.
fn declare_topology(config: &std::path::Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keelson"))
        .args(["topology", "declare", "--service", "extra", "--config"])
        .arg(config)
        .output()
        .expect("cannot run keelson topology declare");
    assert!(
        out.status.success(),
        "keelson topology declare failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether `e` is the broker's `403 ACCESS_REFUSED`.
fn refused(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(err)
        if matches!(err.kind(), AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_users_run_the_mesh_on_a_topology_the_operator_declared() {
    let vhost = Vhost::create("roles");
    let secrets = Scratch::new();
    let users = RoleUsers::set_up(&vhost, NS, &secrets.path().join("secrets"));

    // The operator declares everything, twice (idempotent).
    let scratch = Scratch::new();
    let operator = scratch.write(
        "operator.toml",
        &users.passive_transport(&vhost, NS, "operator"),
    );
    let first = declare_topology(&operator);
    for name in [
        "roles.requests",
        "roles.dead-letter (queue)",
        "roles.svc.default (queue)",
        "roles.svc.extra (queue)",
        "roles.control",
        "roles.context",
    ] {
        assert!(
            first.lines().any(|l| l == format!("declared {name}")),
            "{name} not declared:\n{first}"
        );
    }
    assert_eq!(declare_topology(&operator), first);

    let mut mesh = Mesh::new(users.passive_transport(&vhost, NS, "logic"));
    // With a singleton: its lease queue is declared by the logic user itself.
    let singleton_file = scratch.path().join("singleton.jsonl");
    mesh.add_server(
        ServerSpec::new("logic")
            .logic(&format!(
                "trusted_publishers = [\"{}\", \"{}\"]\nsingletons = [\"test.singleton\"]\n",
                users.name("gateway"),
                users.name("operator")
            ))
            .extra(&format!(
                "\n[logic_server.singleton_settings.\"test.singleton\"]\npath = \"{}\"\n",
                singleton_file.display()
            )),
    )
    .await;
    mesh.transport = users.passive_transport(&vhost, NS, "gateway");
    mesh.add_gateway().await;
    let client = http();
    let token = mesh.token("alice");
    let outcome = post(
        &client,
        mesh.url(0, "counter.increment"),
        r#"{"by": 2}"#.to_owned(),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(outcome.status, 200, "{outcome:?}");
    assert!(outcome.body.contains('2'), "{outcome:?}");
    // The logic user may declare and consume its lease queue: the singleton runs.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&singleton_file)
        .unwrap_or_default()
        .contains("\"start\"")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the singleton did not start under the logic user"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // It may not read the dead-letter queue (below), yet counts what waits there
    // (a passive declaration needs no right).
    let table = mesh.cluster(&client).await;
    assert_eq!(table["dead_letters"]["waiting"], 0, "{table}");

    // A snapshot holds every user's context: the gateway's broker user, which may
    // publish requests, asks the logic server for one and is refused (dead-lettered,
    // no chunk sent), where a peer's request is answered.
    let gateway_config = scratch.write(
        "gateway-transport.toml",
        &users.passive_transport(&vhost, NS, "gateway"),
    );
    let gateway_transport = keelson::settings::load_with_env(
        &keelson::settings::Source::File(gateway_config),
        Some(Default::default()),
    )
    .expect("the gateway's transport section loads")
    .transport
    .build("snooper")
    .await
    .expect("the gateway user's transport connects");
    let ask = keelson_protocol::encode(&keelson_protocol::context::SnapshotRequest {
        v: keelson_protocol::ProtocolVersion::CURRENT,
        requester: "snooper".into(),
        after: None,
        max_users: 100,
    })
    .unwrap();
    let snapshot = gateway_transport.request(
        keelson_protocol::context::SNAPSHOT_ROUTE,
        keelson_protocol::transport::Message::new(ask),
        tokio::time::Instant::now() + Duration::from_secs(30),
    );
    let dead_lettered = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while vhost.messages(|q| q == "roles.dead-letter") == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the snapshot request was not dead-lettered"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        answer = snapshot => panic!("the gateway's broker user got a context snapshot: {:?}", answer.map(|chunk| chunk.len())),
        () = dead_lettered => {}
    }
    gateway_transport.close().await;

    // A logic server's broker user puts delayed background work on a queue (write on
    // the delay exchange), and it arrives from that user on the route's queue.
    let logic_config = scratch.write(
        "logic-transport.toml",
        &users.passive_transport(&vhost, NS, "logic"),
    );
    let logic_transport = keelson::settings::load_with_env(
        &keelson::settings::Source::File(logic_config),
        Some(Default::default()),
    )
    .expect("the logic server's transport section loads")
    .transport
    .build("jobs")
    .await
    .expect("the logic user's transport connects");
    logic_transport
        .declare_service(&ServiceSpec {
            name: "extra".into(),
            routes: vec!["_job.roles".into()],
        })
        .await
        .expect("the logic user binds a route to the declared queue");
    let mut jobs = logic_transport.consume("extra", 1).await.unwrap();
    logic_transport
        .enqueue(
            "_job.roles",
            Message::new(&b"later"[..]),
            Duration::from_millis(200),
        )
        .await
        .expect("the logic user may publish delayed work");
    let job = tokio::time::timeout(Duration::from_secs(10), jobs.next())
        .await
        .expect("the delayed job did not arrive within 10 s")
        .unwrap()
        .unwrap();
    assert_eq!(job.payload, &b"later"[..]);
    assert_eq!(job.publisher(), &Publisher::User(users.name("logic")));
    job.ack().await.unwrap();
    logic_transport.close().await;

    // What the gateway's broker user may not do.
    let gateway = Connection::connect(
        &users.url(&vhost, "gateway"),
        ConnectionProperties::default(),
    )
    .await
    .expect("the gateway user connects");
    let ch = gateway.create_channel().await.unwrap();
    let declared = ch
        .exchange_declare(
            "roles.requests".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(
        declared.as_ref().is_err_and(refused),
        "declare: {declared:?}"
    );
    let ch = gateway.create_channel().await.unwrap();
    let deleted = ch
        .exchange_delete("roles.requests".into(), ExchangeDeleteOptions::default())
        .await;
    assert!(deleted.as_ref().is_err_and(refused), "delete: {deleted:?}");
    let ch = gateway.create_channel().await.unwrap();
    let consumed = ch
        .basic_consume(
            "roles.dead-letter".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert!(
        consumed.as_ref().is_err_and(refused),
        "consume the dead-letter queue: {:?}",
        consumed.map(|_| ())
    );
    let _ = gateway.close(200, "OK".into()).await;

    // Passive declarations on a vhost where the topology was never declared.
    let bare = Vhost::create("roles-bare");
    users.add_vhost(&bare, NS);
    let config = scratch.write(
        "bare-logic.toml",
        &format!(
            "{}\n[logic_server]\nservice = \"default\"\nhandlers = [\"echo\"]\n",
            users.passive_transport(&bare, NS, "logic")
        ),
    );
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_logic-server"))
        .arg("--config")
        .arg(&config)
        .env_remove("KEELSON__TRANSPORT__KIND")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .expect("the logic server stops at start")
        .expect("cannot run logic-server");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it ran: {stderr}");
    for needle in [
        "exchange roles.requests",
        "queue roles.dead-letter",
        "is not declared: missing",
        "keelson topology declare",
    ] {
        assert!(stderr.contains(needle), "no {needle:?} in:\n{stderr}");
    }
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains(
            "cannot start the amqp transport: broker refused the operation: the broker topology"
        ),
        "the error is not the process's last word: {last}"
    );
    drop(mesh);
}

/// A topology declared without the operator and job queues (as a `keelson topology
/// declare` older than `keelson context get` leaves it): the logic server serves
/// without operator requests and jobs, and after the broker drops its connection it comes back and
/// serves again (the refused queue is not declared again on every reconnection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_the_operator_queue_reconnects_after_an_outage() {
    let vhost = Vhost::create("roles-no-operator");
    let secrets = Scratch::new();
    let users = RoleUsers::set_up(&vhost, NS, &secrets.path().join("secrets"));
    let scratch = Scratch::new();
    let operator = scratch.write(
        "operator.toml",
        &users.passive_transport(&vhost, NS, "operator"),
    );
    declare_topology(&operator);
    vhost.delete_queue("roles.svc._keelson.operator");
    // Nor the job queues (a `keelson topology declare` older than background jobs).
    for queue in [
        "roles.svc._keelson.jobs",
        "roles.svc._jobs.default",
        "roles.svc._jobwatches.default",
    ] {
        vhost.delete_queue(queue);
    }

    let mut mesh = Mesh::new(users.passive_transport(&vhost, NS, "logic"));
    mesh.add_server(ServerSpec::new("logic").logic(&format!(
        "trusted_publishers = [\"{}\"]\n",
        users.name("gateway")
    )))
    .await;
    mesh.transport = users.passive_transport(&vhost, NS, "gateway");
    mesh.add_gateway().await;
    let client = http();
    let echo = || post(&client, mesh.url(0, "echo"), "{}".into(), None, None);
    assert_eq!(echo().await.status, 200);
    // A job finds no server to take it: a clear 503, not a hang.
    let job = client
        .post(mesh.url(0, "echo"))
        .header("prefer", "respond-async")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(job.status(), 503);

    vhost.close_all_connections();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let outcome = echo().await;
        if outcome.status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no answer 30 s after the outage: {outcome:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(mesh);
}
