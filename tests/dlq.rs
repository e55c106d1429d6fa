//! `keelson dlq` (issue 11) against real processes on a real RabbitMQ, each test in a
//! vhost of its own: dead letters are listed without being removed, shown in full,
//! re-driven to their handler once, and purged only when asked with `--yes`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use keelson_protocol::transport::{DELIVERIES_HEADER, Message};
use keelson_protocol::{Reply, ReplyStatus, Request, Transport, TransportConfig, decode, encode};
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use support::broker::{Vhost, amqp_transport, confirmed_channel, dead_letter};
use support::mesh::{Mesh, post};
use support::unix_ms;
use support::{Scratch, http};

/// What one `keelson dlq` run printed, and its exit status.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn dlq(config: &Path, args: &[&str]) -> Run {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_keelson"))
        .arg("dlq")
        .args(args)
        .arg("--config")
        .arg(config)
        .env_remove("KEELSON__TRANSPORT__KIND")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("keelson dlq did not finish within 60 s")
        .expect("cannot run keelson dlq");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `keelson dlq list --json`, which must succeed.
async fn listed(config: &Path) -> Vec<Value> {
    let run = dlq(config, &["list", "--json"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    serde_json::from_str::<Vec<Value>>(&run.stdout).expect("list --json prints an array")
}

fn ids(letters: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = letters
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// Poll `list --json` until it holds `count` dead letters (a logic server dead-letters
/// right after it replied); fails the test after 10 s.
async fn wait_for_dead_letters(config: &Path, count: usize) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let letters = listed(config).await;
        if letters.len() == count {
            return letters;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {count} dead letters: {letters:?}"
        );
    }
}

async fn connect(transport_toml: &str) -> Arc<dyn Transport> {
    // The `[transport]` section's keys, as a `TransportConfig`.
    let section = transport_toml
        .trim_start()
        .trim_start_matches("[transport]");
    let config: TransportConfig = toml::from_str(section).unwrap();
    config.build("dlq-test").await.unwrap()
}

/// A request for `handler` by `user` that claims to have been delivered 6 times: the
/// logic server (max_deliveries = 5) answers with an error and dead-letters it.
async fn poison(transport: &dyn Transport, id: &str, handler: &str, user: &str) {
    let mut request = Request::new(id, handler, b"{}".to_vec(), unix_ms() + 20_000);
    request.user = Some(user.to_owned());
    let mut message = Message::new(encode(&request).unwrap());
    message
        .headers
        .insert(DELIVERIES_HEADER.to_owned(), "6".to_owned());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let reply = transport.request(handler, message, deadline).await.unwrap();
    let reply: Reply = decode(&reply).unwrap();
    assert_eq!(reply.status, ReplyStatus::HandlerError, "{reply:?}");
    assert_eq!(reply.error.unwrap().code, "delivery_limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_shown_and_replayed_once() {
    let vhost = Vhost::create("dlq-replay");
    let transport_toml = amqp_transport(&[vhost.url()]);
    let mesh = Mesh::start(transport_toml.clone(), 1, 1, 8).await;
    let config = mesh.scratch.write("dlq.toml", &transport_toml);
    let client = http();
    let transport = connect(&transport_toml).await;
    poison(transport.as_ref(), "r-alice", "counter.increment", "alice").await;
    poison(transport.as_ref(), "r-bob", "echo", "bob").await;

    // Listing removes nothing: the same two, again and again.
    let letters = wait_for_dead_letters(&config, 2).await;
    assert_eq!(ids(&letters), ["r-alice", "r-bob"]);
    let run = dlq(&config, &["list"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    let mut lines = run.stdout.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["ID", "HANDLER", "USER", "DELIVERIES", "REASON"]);
    let alice = lines
        .find(|l| l.starts_with("r-alice "))
        .unwrap_or_else(|| panic!("no row for r-alice:\n{}", run.stdout));
    let cells: Vec<&str> = alice.split_whitespace().collect();
    assert_eq!(cells[..4], ["r-alice", "counter.increment", "alice", "6"]);
    assert!(
        alice.contains("delivered 6 times without an outcome"),
        "{alice}"
    );
    let letters = listed(&config).await;
    assert_eq!(ids(&letters), ["r-alice", "r-bob"]);
    let alice = letters.iter().find(|d| d["id"] == "r-alice").unwrap();
    assert_eq!(alice["deliveries"], 6);
    assert_eq!(alice["request"]["handler"], "counter.increment");
    assert_eq!(alice["request"]["user"], "alice");
    assert!(alice["request"]["deadline_unix_ms"].as_u64().unwrap() > 0);
    assert!(
        alice["reason"]
            .as_str()
            .unwrap()
            .contains("max_deliveries = 5"),
        "{alice}"
    );

    let run = dlq(&config, &["show", "r-alice"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    for expected in [
        "id              r-alice\n",
        "handler         counter.increment\n",
        "user            alice\n",
        "deliveries      6\n",
        "body            {}\n",
        "  x-keelson-deliveries: 6\n",
        "  x-keelson-dead-letter-reason: delivered 6 times",
    ] {
        assert!(
            run.stdout.contains(expected),
            "no {expected:?} in\n{}",
            run.stdout
        );
    }

    // Refused by the server before its handler ran (a deadline past the server's
    // 300 s limit): exit status 2, and the dead letter stays for a later replay.
    let run = dlq(&config, &["replay", "r-bob", "--timeout-ms", "400000"]).await;
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stdout.starts_with("replayed r-bob: bad_request"),
        "{run:?}"
    );
    assert!(run.stdout.contains("deadline_out_of_range"), "{run:?}");
    assert!(
        run.stdout.contains("kept in the dead-letter queue"),
        "{run:?}"
    );
    assert_eq!(ids(&listed(&config).await), ["r-alice", "r-bob"]);

    // The poisoned increment never ran; replayed, it runs once.
    let token = mesh.token("alice");
    mesh.wait_for_counter(&client, &token, 0).await;
    let run = dlq(&config, &["replay", "r-alice"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.starts_with("replayed r-alice: ok"), "{run:?}");
    assert!(run.stdout.contains(r#"{"value":1}"#), "{run:?}");
    mesh.wait_for_counter(&client, &token, 1).await;
    assert_eq!(ids(&listed(&config).await), ["r-bob"]);
    // Gone for good: replaying it again is an unknown id, and the counter stays.
    let run = dlq(&config, &["replay", "r-alice"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    let out = post(
        &client,
        mesh.url(0, "counter.get"),
        String::new(),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(out.body, r#"{"value":1}"#, "{out:?}");

    for args in [["show", "nope"], ["replay", "nope"]] {
        let run = dlq(&config, &args).await;
        assert_eq!(run.code, Some(1), "{args:?}: {run:?}");
        assert!(
            run.stderr.contains("no dead letter has the id `nope`"),
            "{args:?}: {run:?}"
        );
        assert!(!run.stderr.contains("panicked"), "{run:?}");
    }
    assert_eq!(ids(&listed(&config).await), ["r-bob"]);
    transport.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreplayable_dead_letters_stay_until_purged_with_yes() {
    let vhost = Vhost::create("dlq-purge");
    // Quorum queues: dead letters go back as copies, which the broker does not count
    // toward a delivery limit.
    let transport_toml = format!(
        "{}queue_type = \"quorum\"\n",
        amqp_transport(&[vhost.url()])
    );
    let scratch = Scratch::new();
    let config = scratch.write("dlq.toml", &transport_toml);
    // Declares the topology, the dead-letter exchange and queue included.
    let transport = connect(&transport_toml).await;
    let (connection, channel) = confirmed_channel(&vhost.url()).await;
    let mut request = Request::new(
        "r-parked",
        "nobody.home",
        b"{\"x\":1}".to_vec(),
        unix_ms() + 1000,
    );
    request.user = Some("carol".to_owned());
    dead_letter(&channel, &encode(&request).unwrap(), "test: parked").await;
    dead_letter(&channel, b"\xc1 not a request", "undecodable request: test").await;

    for _ in 0..3 {
        let letters = wait_for_dead_letters(&config, 2).await;
        assert!(
            letters.iter().all(|d| d["reason"].is_string()),
            "{letters:?}"
        );
    }
    let letters = listed(&config).await;
    let garbage = letters.iter().find(|d| d["request"].is_null()).unwrap();
    let garbage_id = garbage["id"].as_str().unwrap().to_owned();
    assert_eq!(garbage_id.len(), 12, "{garbage}");
    assert!(
        garbage_id.chars().all(|c| c.is_ascii_hexdigit()),
        "{garbage}"
    );
    assert_eq!(garbage["size"], 15);
    let run = dlq(&config, &["list"]).await;
    let row = run
        .stdout
        .lines()
        .find(|l| l.starts_with(&garbage_id))
        .unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1..4], ["?", "-", "1"], "{}", run.stdout);

    let run = dlq(&config, &["show", &garbage_id]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stdout.contains("size            15 bytes\n"), "{run:?}");
    assert!(run.stdout.contains("undecodable     "), "{run:?}");

    // Nobody serves `nobody.home`: it stays, and so does what cannot be decoded.
    let run = dlq(&config, &["replay", "r-parked"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr
            .contains("no queue is bound for the route `nobody.home`"),
        "{run:?}"
    );
    assert!(
        run.stderr.contains("stays in the dead-letter queue"),
        "{run:?}"
    );
    let run = dlq(&config, &["replay", &garbage_id]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("cannot be replayed"), "{run:?}");
    let letters = listed(&config).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    let parked = letters.iter().find(|d| d["id"] == "r-parked").unwrap();
    assert_eq!(parked["reason"], "test: parked");
    assert_eq!(parked["request"]["body"], "{\"x\":1}");

    let run = dlq(&config, &["purge"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("--yes"), "{run:?}");
    assert_eq!(listed(&config).await.len(), 2);
    let run = dlq(&config, &["purge", "--yes"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.stdout, "purged 2 dead letters\n");
    let run = dlq(&config, &["list"]).await;
    assert_eq!(run.stdout, "(no dead letters)\n", "{run:?}");
    assert!(listed(&config).await.is_empty());
    drop(connection);
    transport.close().await;
}

#[tokio::test]
async fn on_the_memory_transport_the_queue_is_the_commands_own_and_empty() {
    let scratch = Scratch::new();
    let config = scratch.write("memory.toml", "[transport]\nkind = \"memory\"\n");
    let run = dlq(&config, &["list"]).await;
    assert_eq!(run.code, Some(0), "{run:?}");
    assert_eq!(run.stdout, "(no dead letters)\n");
    assert!(run.stderr.contains("memory transport"), "{run:?}");
    assert!(listed(&config).await.is_empty());
    let run = dlq(&config, &["replay", "r-1"]).await;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr.contains("no dead letter has the id `r-1`"),
        "{run:?}"
    );
}
