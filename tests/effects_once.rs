//! Effects happen once (issue 11), across processes on a real RabbitMQ: a reply that
//! cannot be delivered never makes a request run again, redeliveries and client
//! retries are answered from the outcome records, each test in a vhost of its own.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keelson_protocol::{Request, encode};
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::time::Duration;
use support::broker::{Vhost, amqp_transport};
use support::mesh::{Mesh, ServerSpec, post};
use support::unix_ms;
use support::{Process, http};

const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// A direct reply-to address naming a broker node that does not exist: a real
/// address from the broker (`amq.rabbitmq.reply-to.{base64 pid}.{key}`, the pid in
/// Erlang's external term format) with the node name in the pid replaced by another
/// of the same length.
async fn dead_reply_to(channel: &lapin::Channel) -> String {
    // Kept until the address is read: dropping the consumer cancels it.
    let _replies = channel
        .basic_consume(
            DIRECT_REPLY_TO.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .basic_publish(
            "".into(),
            queue.name().clone(),
            BasicPublishOptions::default(),
            b"probe",
            BasicProperties::default().with_reply_to(DIRECT_REPLY_TO.into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let probe = channel
        .basic_get(queue.name().clone(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the probe is in its queue");
    let address = probe
        .delivery
        .properties
        .reply_to()
        .clone()
        .expect("the broker expanded the reply-to")
        .to_string();
    let rest = address
        .strip_prefix(&format!("{DIRECT_REPLY_TO}."))
        .unwrap();
    let (pid, key) = rest.split_once('.').unwrap();
    let mut term = STANDARD.decode(pid).unwrap();
    // 131, a pid tag, then the node as an atom: tag 118 (or 100) and a 2-byte length.
    assert!(term[0] == 131 && matches!(term[2], 100 | 118), "{term:?}");
    let len = usize::from(u16::from_be_bytes([term[3], term[4]]));
    let node = &mut term[5..5 + len];
    let at = node.iter().position(|&b| b == b'@').unwrap();
    for b in &mut node[at + 1..] {
        *b = if *b == b'7' { b'3' } else { b'7' };
    }
    format!("{DIRECT_REPLY_TO}.{}.{key}", STANDARD.encode(&term))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_reply_address_names_a_missing_node_runs_once() {
    let vhost = Vhost::create("dead-reply");
    let mesh = Mesh::start(amqp_transport(&[vhost.url()]), 1, 1, 8).await;
    let client = http();

    let connection = Connection::connect(&vhost.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let reply_to = dead_reply_to(&channel).await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut request = Request::new(
        "crafted-1",
        "counter.increment",
        b"{}".to_vec(),
        unix_ms() + 20_000,
    );
    request.user = Some("victim".to_owned());
    channel
        .basic_publish(
            "keelson.requests".into(),
            "counter.increment".into(),
            BasicPublishOptions::default(),
            &encode(&request).unwrap(),
            // As a gateway publishes it: stamped with its (validated) broker user,
            // which the server trusts (everyone is `guest` here).
            BasicProperties::default()
                .with_reply_to(reply_to.as_str().into())
                .with_correlation_id("1".into())
                .with_user_id("guest".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();

    let token = mesh.token("victim");
    mesh.wait_for_counter(&client, &token, 1).await;
    // What must not happen, watched for a while: the request running again (the
    // counter moving on), the server's connection lost again and again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let out = post(
        &client,
        mesh.url(0, "counter.get"),
        String::new(),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(out.body, r#"{"value":1}"#, "the handler ran once: {out:?}");
    let log = mesh.servers[0].as_ref().unwrap().log_text();
    let lost = log.matches("lost the connection to broker").count();
    assert!(lost <= 1, "{lost} reconnections for one message:\n{log}");
    assert_eq!(
        vhost.messages(|q| q.starts_with("keelson.svc.")),
        0,
        "the message is settled"
    );
    drop(connection);
}

/// Restart, as a supervisor would, every logic server of `mesh` that has exited;
/// returns how many were restarted.
async fn restart_exited(mesh: &mut Mesh, spec: &ServerSpec) -> usize {
    let mut restarted = 0;
    for i in 0..mesh.servers.len() {
        let exited = mesh.servers[i].as_mut().is_some_and(Process::has_exited);
        if exited {
            mesh.servers[i] = None;
            mesh.add_server(spec.clone()).await;
            restarted += 1;
        }
    }
    restarted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_kills_its_server_is_dead_lettered_and_blames_nobody() {
    let vhost = Vhost::create("poison");
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    let mut spec = ServerSpec::new("logic").concurrency(64);
    spec.handlers.push("test.abort".to_owned());
    for _ in 0..2 {
        mesh.add_server(spec.clone()).await;
    }
    mesh.add_gateway().await;
    let client = http();

    let poison = tokio::spawn({
        let (client, url) = (client.clone(), mesh.url(0, "test.abort"));
        async move { post(&client, url, "{}".into(), None, None).await }
    });
    // Slow enough that every crash catches many of them in flight beside the poison.
    let limit = std::sync::Arc::new(tokio::sync::Semaphore::new(128));
    let normal: Vec<_> = (0..200)
        .map(|i| {
            let (client, url, limit) = (client.clone(), mesh.url(0, "test.slow"), limit.clone());
            tokio::spawn(async move {
                let _permit = limit.acquire().await.unwrap();
                let body = format!(r#"{{"ms":{}}}"#, 300 + i);
                (300 + i, post(&client, url, body, None, None).await)
            })
        })
        .collect();
    let mut crashes = 0;
    while !(poison.is_finished() && normal.iter().all(tokio::task::JoinHandle::is_finished)) {
        crashes += restart_exited(&mut mesh, &spec).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    crashes += restart_exited(&mut mesh, &spec).await;

    let poison = poison.await.unwrap();
    println!(
        "crashes: {crashes}, poison answered in {:?}",
        poison.elapsed
    );
    assert_eq!(poison.status, 500, "{poison:?}");
    assert!(poison.body.contains("delivery_limit"), "{poison:?}");
    assert!(
        (1..=5).contains(&crashes),
        "{crashes} crashes for one poison message (max_deliveries = 5)"
    );
    for task in normal {
        let (ms, out) = task.await.unwrap();
        assert_eq!(out.status, 200, "a bystander failed: {out:?}");
        assert_eq!(out.body, format!(r#"{{"slept_ms":{ms}}}"#));
    }
    assert_eq!(
        vhost.messages(|q| q == "keelson.dead-letter"),
        1,
        "only the poison is dead-lettered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_killed_under_counter_load_apply_each_increment_once() {
    let vhost = Vhost::create("kill-counters");
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    let spec = |node: &str| {
        let mut spec = ServerSpec::new(node).concurrency(16);
        spec.handlers.push("test.increment_slowly".to_owned());
        spec
    };
    for i in 1..=3 {
        mesh.add_server(spec(&format!("logic-{i}"))).await;
    }
    mesh.add_gateway().await;
    mesh.add_gateway().await;
    let client = http();
    let users: Vec<(String, String)> = (0..20)
        .map(|u| {
            let user = format!("user-{u}");
            let token = mesh.token(&user);
            (user, token)
        })
        .collect();

    // About 150 increments a second for 8 s, round robin over users and gateways;
    // each handler waits 200 ms after its write, the window in which a kill used to
    // leave a write replicated and its request to run again.
    let mut tick = tokio::time::interval(Duration::from_micros(6_667));
    let mut sent = Vec::new();
    let started = tokio::time::Instant::now();
    let mut killed = 0;
    for i in 0..1200usize {
        tick.tick().await;
        if killed < 2 && started.elapsed() > Duration::from_secs(2 + 3 * killed) {
            let victim = usize::try_from(killed).unwrap();
            mesh.kill_server(victim).await;
            mesh.add_server(spec("logic-r")).await;
            killed += 1;
        }
        let (client, url) = (client.clone(), mesh.url(i, "test.increment_slowly"));
        let (user, token) = users[i % users.len()].clone();
        sent.push(tokio::spawn(async move {
            let body = r#"{"ms":200}"#.to_owned();
            (user, post(&client, url, body, Some(&token), None).await)
        }));
    }
    let mut answered = std::collections::BTreeMap::<String, i64>::new();
    let mut unknown = std::collections::BTreeMap::<String, i64>::new();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for task in sent {
        let (user, out) = task.await.unwrap();
        *statuses.entry(out.status).or_default() += 1;
        let tally = if out.status == 200 {
            &mut answered
        } else {
            &mut unknown
        };
        *tally.entry(user).or_default() += 1;
    }
    println!("statuses: {statuses:?}");
    for (user, token) in &users {
        let ok = answered.get(user).copied().unwrap_or(0);
        let maybe = unknown.get(user).copied().unwrap_or(0);
        let value = mesh.settled_counter(&client, token, ok).await;
        assert!(
            value <= ok + maybe,
            "{user}: counter {value}, but {ok} increments answered and {maybe} unknown"
        );
    }
    assert_eq!(
        statuses.get(&200),
        Some(&1200),
        "every increment answered: {statuses:?}"
    );
}

/// A POST with an `Idempotency-Key`: status, the replay header, the body bytes.
async fn post_keyed(
    client: &reqwest::Client,
    url: String,
    token: &str,
    key: &str,
    body: &str,
) -> (u16, Option<String>, Vec<u8>) {
    let resp = client
        .post(url)
        .bearer_auth(token)
        .header("idempotency-key", key)
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let replayed = resp
        .headers()
        .get("idempotent-replayed")
        .map(|v| v.to_str().unwrap().to_owned());
    (status, replayed, resp.bytes().await.unwrap().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_makes_http_retries_safe_through_any_gateway() {
    let vhost = Vhost::create("idem-http");
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    mesh.add_server(ServerSpec::new("logic").extra("\n[logic_server.idempotency]\nttl_s = 3\n"))
        .await;
    mesh.add_gateway().await;
    mesh.add_gateway().await;
    let client = http();
    let token = mesh.token("alice");
    let inc = |g: usize| mesh.url(g, "counter.increment");

    let first = post_keyed(&client, inc(0), &token, "order-1", r#"{"by":5}"#).await;
    assert_eq!((first.0, first.1.as_deref()), (200, None), "{first:?}");
    // The retry through the other gateway: the stored response, byte for byte.
    let retry = post_keyed(&client, inc(1), &token, "order-1", r#"{"by":5}"#).await;
    assert_eq!(retry.0, 200);
    assert_eq!(retry.1.as_deref(), Some("true"), "marked as replayed");
    assert_eq!(retry.2, first.2, "byte for byte");
    mesh.wait_for_counter(&client, &token, 5).await;

    // The same key with another body: 422, nothing runs.
    let reused = post_keyed(&client, inc(1), &token, "order-1", r#"{"by":6}"#).await;
    assert_eq!(reused.0, 422, "{reused:?}");
    assert!(String::from_utf8_lossy(&reused.2).contains("idempotency_key_reused"));

    // The same key while the first request still runs: 409.
    let slow = mesh.url(0, "test.slow");
    let running = tokio::spawn({
        let (client, token, slow) = (client.clone(), token.clone(), slow.clone());
        async move { post_keyed(&client, slow, &token, "slow-1", r#"{"ms":1500}"#).await }
    });
    mesh.servers[0]
        .as_ref()
        .unwrap()
        .wait_for_log("test.slow started")
        .await;
    let busy = post_keyed(
        &client,
        mesh.url(1, "test.slow"),
        &token,
        "slow-1",
        r#"{"ms":1500}"#,
    )
    .await;
    assert_eq!(busy.0, 409, "{busy:?}");
    assert!(String::from_utf8_lossy(&busy.2).contains("request_in_progress"));
    assert_eq!(running.await.unwrap().0, 200);

    // After the TTL the key is forgotten: the same request runs again.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let later = post_keyed(&client, inc(0), &token, "order-1", r#"{"by":5}"#).await;
    assert_eq!((later.0, later.1.as_deref()), (200, None), "{later:?}");
    mesh.wait_for_counter(&client, &token, 10).await;

    // A malformed key is refused at the gateway.
    let bad = post_keyed(&client, inc(0), &token, "", "{}").await;
    assert_eq!(bad.0, 400);
    assert!(String::from_utf8_lossy(&bad.2).contains("bad_idempotency_key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_after_replicating_a_write_leaves_the_redelivery_to_its_record() {
    let vhost = Vhost::create("after-commit");
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    mesh.add_server(
        ServerSpec::new("dying").env("KEELSON_TEST_ABORT_AFTER_COMMIT", "counter.increment"),
    )
    .await;
    mesh.add_server(ServerSpec::new("survivor")).await;
    mesh.add_gateway().await;
    let client = http();
    let token = mesh.token("alice");

    // The queue alternates between the two servers: increments go on until the dying
    // one took one, replicated its effects and outcome, and died before replying.
    let mut answered = 0;
    let mut replayed = None;
    for _ in 0..20 {
        let resp = client
            .post(mesh.url(0, "counter.increment"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{resp:?}");
        answered += 1;
        if resp.headers().contains_key("idempotent-replayed") {
            replayed = Some(resp);
            break;
        }
    }
    let replayed = replayed.expect("the dying server took an increment");
    assert_eq!(
        replayed.headers()["x-keelson-served-by"],
        "dying",
        "the survivor answered with the dying server's recorded outcome"
    );
    let dying = mesh.servers[0].as_mut().unwrap();
    assert!(
        dying.exits_within(Duration::from_secs(5)).await,
        "it aborted"
    );
    // Each increment answered was applied once: the one whose server died included.
    mesh.wait_for_counter(&client, &token, answered).await;
}
