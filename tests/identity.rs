//! Only gateways assert identity (issue 12), on a real RabbitMQ with real processes,
//! in a vhost of its own: the logic server runs as a logic-role broker user and
//! trusts only the gateway-role user's requests to name a user. Requests forged
//! straight onto the request exchange, by a logic-role user and by a random user,
//! are dead-lettered with the reason and answered 403 (a user they may not assert)
//! or 400 (a routing key that is not their handler); the victim's counter never
//! moves and the handler never runs. The gateway-role user's request is served.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use futures_util::StreamExt;
use keelson_protocol::{Reply, ReplyStatus, Request, decode, encode};
use lapin::options::{BasicConsumeOptions, BasicGetOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::time::Duration;
use support::broker::{BrokerUser, Vhost, amqp_transport, confirmed_channel};
use support::http;
use support::mesh::{Mesh, ServerSpec};
use support::unix_ms;

/// A connection as one broker user, with a confirm-mode channel that consumes its
/// direct replies.
struct Publisher {
    _connection: Connection,
    channel: Channel,
    replies: lapin::Consumer,
}

impl Publisher {
    async fn connect(url: &str) -> Self {
        let (connection, channel) = confirmed_channel(url).await;
        let replies = channel
            .basic_consume(
                "amq.rabbitmq.reply-to".into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        Self {
            _connection: connection,
            channel,
            replies,
        }
    }

    /// Publish `request` on `keelson.requests` with `routing_key` (and `user_id` when
    /// given) and return its reply.
    async fn ask(&mut self, routing_key: &str, request: &Request, user_id: Option<&str>) -> Reply {
        let mut properties = BasicProperties::default()
            .with_reply_to("amq.rabbitmq.reply-to".into())
            .with_correlation_id(request.id.as_str().into());
        if let Some(user) = user_id {
            properties = properties.with_user_id(user.into());
        }
        let confirm = self
            .channel
            .basic_publish(
                "keelson.requests".into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &encode(request).unwrap(),
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "the broker took {}", request.id);
        let delivery = tokio::time::timeout(Duration::from_secs(15), self.replies.next())
            .await
            .unwrap_or_else(|_| panic!("no reply to {}", request.id))
            .unwrap()
            .unwrap();
        decode(&delivery.data).unwrap()
    }
}

fn request(id: &str, handler: &str, user: Option<&str>) -> Request {
    let mut r = Request::new(id, handler, b"{}".to_vec(), unix_ms() + 15_000);
    r.user = user.map(str::to_owned);
    r
}

fn assert_refused(reply: &Reply, status: ReplyStatus, code: &str) {
    assert_eq!(reply.status, status, "{reply:?}");
    assert_eq!(reply.error.as_ref().unwrap().code, code, "{reply:?}");
}

/// Every dead letter of the vhost: (request id, reason). They stay in the queue
/// (taken unacknowledged, given back when the connection closes).
async fn dead_letters(url: &str) -> Vec<(String, String)> {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut letters = Vec::new();
    while let Some(m) = channel
        .basic_get(
            "keelson.dead-letter".into(),
            BasicGetOptions { no_ack: false },
        )
        .await
        .unwrap()
    {
        let request: Request = decode(&m.delivery.data).unwrap();
        let reason = match m
            .delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-keelson-dead-letter-reason"))
        {
            Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            other => panic!("a dead letter without a reason: {other:?}"),
        };
        letters.push((request.id, reason));
    }
    let _ = connection.close(200, "OK".into()).await;
    letters.sort();
    letters
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_identities_and_routes_are_dead_lettered_and_the_gateways_served() {
    let vhost = Vhost::create("identity");
    let gateway_user = BrokerUser::create(&vhost, "gateway");
    let logic_user = BrokerUser::create(&vhost, "logic");
    let random_user = BrokerUser::create(&vhost, "random");

    let mut mesh = Mesh::new(amqp_transport(&[logic_user.url()]));
    let mut handlers: Vec<&str> = support::mesh::ALL_HANDLERS.to_vec();
    handlers.push("test.panic");
    let server = mesh
        .add_server(
            ServerSpec::new("logic")
                .service("default", &handlers)
                .logic(&format!(
                    "trusted_publishers = [\"{}\"]\n",
                    gateway_user.name
                )),
        )
        .await;
    mesh.transport = amqp_transport(&[gateway_user.url()]);
    mesh.add_gateway().await;
    let client = http();
    let victim = mesh.token("victim");

    // The forgery matrix: a logic-role user and a random user, each with its own
    // validated user_id, and the random one without any.
    let mut logic = Publisher::connect(&logic_user.url()).await;
    let mut random = Publisher::connect(&random_user.url()).await;
    let forged = [
        (&mut logic, Some(logic_user.name.as_str()), "logic"),
        (&mut random, Some(random_user.name.as_str()), "random"),
    ];
    for (publisher, user_id, who) in forged {
        let reply = publisher
            .ask(
                "counter.increment",
                &request(&format!("{who}-user"), "counter.increment", Some("victim")),
                user_id,
            )
            .await;
        assert_refused(&reply, ReplyStatus::Forbidden, "untrusted_publisher");
        let reply = publisher
            .ask(
                "echo",
                &request(&format!("{who}-route"), "test.panic", None),
                user_id,
            )
            .await;
        assert_refused(&reply, ReplyStatus::BadRequest, "route_mismatch");
    }
    let reply = random
        .ask(
            "counter.increment",
            &request("unstamped-user", "counter.increment", Some("victim")),
            None,
        )
        .await;
    assert_refused(&reply, ReplyStatus::Forbidden, "untrusted_publisher");
    // Anonymous requests are taken from anyone who may publish.
    let reply = random
        .ask(
            "echo",
            &request("random-anonymous", "echo", None),
            Some(&random_user.name),
        )
        .await;
    assert_eq!(reply.status, ReplyStatus::Ok, "{reply:?}");

    mesh.wait_for_counter(&client, &victim, 0).await;
    let letters = dead_letters(&vhost.url()).await;
    let ids: Vec<&str> = letters.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "logic-route",
            "logic-user",
            "random-route",
            "random-user",
            "unstamped-user"
        ],
        "{letters:?}"
    );
    for (id, reason) in &letters {
        let expected = if id.ends_with("-route") {
            "route mismatch: published on route `echo` but the envelope names handler `test.panic`"
        } else {
            "untrusted publisher: a request naming a user from"
        };
        assert!(reason.starts_with(expected), "{id}: {reason}");
    }
    // An operator's replay would publish it under a trusted name: it is refused, and
    // the dead letter stays.
    let config = mesh
        .scratch
        .write("dlq.toml", &amqp_transport(&[vhost.url()]));
    let replay = tokio::process::Command::new(env!("CARGO_BIN_EXE_keelson"))
        .args(["dlq", "replay", "logic-user", "--config"])
        .arg(&config)
        .env_remove("KEELSON__TRANSPORT__KIND")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&replay.stderr);
    assert!(!replay.status.success(), "{stderr}");
    assert!(
        stderr.contains("it was refused for its origin (untrusted publisher"),
        "{stderr}"
    );
    assert_eq!(dead_letters(&vhost.url()).await.len(), 5);

    let log = mesh.servers[server].as_ref().unwrap().log_text();
    assert_eq!(
        log.matches("dead-lettering a refused request").count(),
        5,
        "{log}"
    );
    assert!(!log.contains("handler panicked"), "test.panic ran: {log}");

    // The broker itself refuses a user_id that is not the connection's user.
    let channel = random._connection.create_channel().await.unwrap();
    let spoofed = channel
        .basic_publish(
            "keelson.requests".into(),
            "counter.increment".into(),
            BasicPublishOptions::default(),
            &encode(&request("spoofed", "counter.increment", Some("victim"))).unwrap(),
            BasicProperties::default().with_user_id(gateway_user.name.as_str().into()),
        )
        .await;
    if let Ok(published) = spoofed {
        let _ = published.await;
    }
    // The broker's channel.close arrives on its own: wait for it, bounded.
    let asked = std::time::Instant::now();
    while channel.status().connected() {
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "the broker closes a channel that publishes another user's user_id"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The gateway-role user's request is served, as is the gateway's own.
    let mut gateway = Publisher::connect(&gateway_user.url()).await;
    let reply = gateway
        .ask(
            "counter.increment",
            &request("gateway-user", "counter.increment", Some("victim")),
            Some(&gateway_user.name),
        )
        .await;
    assert_eq!(reply.status, ReplyStatus::Ok, "{reply:?}");
    let out = support::mesh::post(
        &client,
        mesh.url(0, "counter.increment"),
        String::new(),
        Some(&victim),
        None,
    )
    .await;
    assert_eq!(out.status, 200, "{out:?}");
    mesh.wait_for_counter(&client, &victim, 2).await;
}
