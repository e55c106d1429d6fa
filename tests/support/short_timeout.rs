//! A RabbitMQ node of a test's own with a short `consumer_timeout`
//! (`deploy/rabbitmq-node.sh`), for jobs that outlast the broker's timeout: started
//! fresh by the test (a node left by an earlier run is stopped first), stopped and
//! deleted on drop. The timeout is broker-wide in RabbitMQ 3.10, so it cannot be
//! shortened on the main broker without closing other tests' channels.
//!
//! Also the proof that the timeout is really short there: a plain lapin consumer
//! holding one delivery unacknowledged, timed until the broker closes its channel.

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::process::Command;
use std::time::{Duration, Instant};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/rabbitmq-node.sh");

/// The node's `consumer_timeout` (the script's default, set here explicitly).
pub const CONSUMER_TIMEOUT: Duration = Duration::from_millis(5000);

/// The node's `channel_tick_interval`: how often a channel compares its unacked
/// deliveries with `consumer_timeout` (60 s by default in 3.10.8, which would make
/// the broker close a held channel up to a minute late).
pub const CHANNEL_TICK: Duration = Duration::from_millis(1000);

/// The node, running with [`CONSUMER_TIMEOUT`] and [`CHANNEL_TICK`].
pub struct ShortTimeoutNode {
    pub name: String,
    pub port: u16,
}

impl ShortTimeoutNode {
    /// Start the node (blocking, about 10 s); fails the test with the script's output
    /// (and the node's log) when it cannot.
    pub fn start() -> Self {
        let started = Instant::now();
        let env = [
            (
                "KEELSON_NODE_CONSUMER_TIMEOUT_MS",
                CONSUMER_TIMEOUT.as_millis().to_string(),
            ),
            ("KEELSON_NODE_TICK_MS", CHANNEL_TICK.as_millis().to_string()),
        ];
        let said = super::run_script(SCRIPT, &["start"], &env);
        println!(
            "node with a short consumer timeout ready in {:.1?}: {}",
            started.elapsed(),
            said.trim()
        );
        let name = super::run_script(SCRIPT, &["node"], &[]).trim().to_owned();
        let port = super::run_script(SCRIPT, &["port"], &[])
            .trim()
            .parse()
            .expect("the script prints a port");
        Self { name, port }
    }

    /// `rabbitmqctl -q -n {node} args`; fails the test when it fails.
    pub fn ctl(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("rabbitmqctl");
        cmd.args(["-q", "-n", &self.name]).args(args);
        super::output_ok(&mut cmd, &format!("rabbitmqctl -n {} {args:?}", self.name))
    }

    /// How many channels of `vhost` the broker closed because a delivery waited for
    /// its acknowledgement longer than the consumer timeout, from the node's log:
    /// `Channel error on connection ... vhost: '{vhost}' ...` followed by
    /// `... precondition_failed: delivery acknowledgement on channel N timed out`.
    pub fn timeout_closures(&self, vhost: &str) -> usize {
        let log = super::run_script(SCRIPT, &["log"], &[]);
        let on_vhost = format!("vhost: '{vhost}'");
        let lines: Vec<&str> = log.lines().collect();
        lines
            .windows(2)
            .filter(|pair| {
                pair[0].contains("Channel error on connection")
                    && pair[0].contains(&on_vhost)
                    && pair[1].contains("delivery acknowledgement on channel")
                    && pair[1].contains("timed out")
            })
            .count()
    }

    /// A vhost of the test's own on this node, deleted on drop.
    pub fn vhost(&self, test: &str) -> NodeVhost<'_> {
        let name = format!("keelson-test-{test}-{}", uuid::Uuid::new_v4().simple());
        self.ctl(&["add_vhost", &name]);
        self.ctl(&["set_permissions", "-p", &name, "guest", ".*", ".*", ".*"]);
        NodeVhost { node: self, name }
    }
}

impl Drop for ShortTimeoutNode {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(SCRIPT).arg("stop").output();
    }
}

/// A vhost on the [`ShortTimeoutNode`].
pub struct NodeVhost<'a> {
    node: &'a ShortTimeoutNode,
    pub name: String,
}

impl NodeVhost<'_> {
    pub fn url(&self) -> String {
        format!(
            "amqp://guest:guest@127.0.0.1:{}/{}",
            self.node.port, self.name
        )
    }
}

impl Drop for NodeVhost<'_> {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.node.name, "delete_vhost", &self.name])
            .output();
    }
}

/// Publish one message to a queue of its own on `url`, take it with a plain lapin
/// consumer (manual acks) and hold it unacknowledged until the broker closes the
/// channel: how long after the delivery it was closed. Fails the test if the channel
/// is closed for another reason than the consumer timeout (`406
/// PRECONDITION_FAILED`), or is still open after `limit`.
pub async fn held_delivery_closed_after(url: &str, limit: Duration) -> Duration {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    let channel = conn.create_channel().await.unwrap();
    let queue = format!("held-{}", uuid::Uuid::new_v4().simple());
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            b"held",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("the message never came");
    let _held = first.expect("the consumer ended").expect("a delivery");
    let delivered = Instant::now();
    let ended = tokio::time::timeout(limit, consumer.next())
        .await
        .unwrap_or_else(|_| {
            panic!("the broker had not closed a channel holding a delivery after {limit:?}")
        });
    let took = delivered.elapsed();
    match ended {
        Some(Err(e))
            if matches!(e.kind(), lapin::ErrorKind::ProtocolError(err)
                if matches!(err.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED))) =>
        {
            println!("the broker closed a channel holding a delivery after {took:.1?}: {e}");
        }
        other => panic!("the held consumer ended otherwise: {other:?}"),
    }
    let _ = conn.close(200, "done".into()).await;
    took
}
