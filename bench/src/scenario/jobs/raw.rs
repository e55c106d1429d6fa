//! The raw lapin side: persistent messages published with confirms to a durable
//! queue, consumed and acked by two consumers.

use super::{BODY, DONE_TIMEOUT, IN_FLIGHT, ONE_BY_ONE, SEND_TIMEOUT, Sends, Side, WARMUP};
use super::{done_stats, per_s, send_all, send_stats};
use crate::broker;
use crate::scenario::special::{Disturbance, Settings};
use anyhow::Context as _;
use futures_util::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// A persistent `{}` message to `queue`, its number in `message_id`, awaiting the
/// broker's confirm.
struct Publish {
    channel: Channel,
    queue: String,
}

impl Sends for Publish {
    type Conn = ();
    type Out = ();

    async fn connect(&self) -> anyhow::Result<()> {
        Ok(())
    }

    async fn send(&self, _: &mut (), i: usize) -> Result<(), String> {
        let publish = async {
            let confirm = self
                .channel
                .basic_publish(
                    "".into(),
                    self.queue.as_str().into(),
                    BasicPublishOptions::default(),
                    BODY,
                    BasicProperties::default()
                        .with_delivery_mode(2)
                        .with_message_id(i.to_string().into()),
                )
                .await
                .map_err(|e| format!("publish: {e}"))?;
            match confirm.await {
                Ok(Confirmation::Ack(None)) => Ok(()),
                other => Err(format!("publish not confirmed: {other:?}")),
            }
        };
        tokio::time::timeout(SEND_TIMEOUT, publish)
            .await
            .unwrap_or_else(|_| Err(format!("no confirm within {SEND_TIMEOUT:?}")))
    }
}

/// The raw side: a publishing channel, and two consumers reporting each delivery's
/// number and arrival.
struct Raw {
    connections: Vec<Connection>,
    publish: Arc<Publish>,
    consumed: mpsc::UnboundedReceiver<(usize, Instant)>,
}

impl Raw {
    /// Connect, declare `queue`, and start the two consumers.
    async fn start(url: &str, queue: &str, prefetch: u16) -> anyhow::Result<Self> {
        let connect = || Connection::connect(url, ConnectionProperties::default());
        let publisher = connect().await.context("cannot connect to the broker")?;
        let channel = publisher.create_channel().await?;
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("classic".into()),
        );
        channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                arguments,
            )
            .await
            .with_context(|| format!("cannot declare {queue}"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let (tx, consumed) = mpsc::unbounded_channel();
        let mut connections = vec![publisher];
        for c in 0..2 {
            let connection = connect().await.context("cannot connect a consumer")?;
            let ch = connection.create_channel().await?;
            ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
            let mut deliveries = ch
                .basic_consume(
                    queue.into(),
                    format!("raw-{c}").as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            let tx = tx.clone();
            // Ends when its connection closes.
            tokio::spawn(async move {
                while let Some(Ok(d)) = deliveries.next().await {
                    let at = Instant::now();
                    if let Some(i) = d
                        .properties
                        .message_id()
                        .as_ref()
                        .and_then(|id| id.as_str().parse().ok())
                    {
                        let _ = tx.send((i, at));
                    }
                    let _ = d.ack(BasicAckOptions::default()).await;
                }
            });
            connections.push(connection);
        }
        Ok(Self {
            connections,
            publish: Arc::new(Publish {
                channel,
                queue: queue.to_owned(),
            }),
            consumed,
        })
    }

    /// Publish `n`, `in_flight` at once, and wait until the consumers had every
    /// confirmed one.
    async fn batch(&mut self, n: usize, in_flight: usize, watched: &[u32]) -> anyhow::Result<Side> {
        let disturbance = Disturbance::begin(watched)?;
        let (sent, elapsed) = send_all(self.publish.clone(), n, in_flight).await?;
        let mut arrived: Vec<Option<Instant>> = vec![None; n];
        let expected = sent.iter().filter(|s| s.out.is_ok()).count();
        let deadline = tokio::time::Instant::now() + DONE_TIMEOUT;
        let mut got = 0;
        while got < expected {
            match tokio::time::timeout_at(deadline, self.consumed.recv()).await {
                Ok(Some((i, at))) => {
                    if let Some(slot) = arrived.get_mut(i).filter(|s| s.is_none()) {
                        *slot = Some(at);
                        got += 1;
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        let other_cores = disturbance.other_cores(watched)?;
        let done: Vec<Result<Duration, String>> = sent
            .iter()
            .zip(&arrived)
            .map(|(s, a)| match (&s.out, a) {
                (Err(e), _) => Err(e.clone()),
                (Ok(()), Some(at)) => Ok(at.saturating_duration_since(s.at)),
                (Ok(()), None) => Err(format!("not consumed within {DONE_TIMEOUT:?}")),
            })
            .collect();
        let first = sent.first().map(|s| s.at);
        let last = arrived.iter().flatten().max().copied();
        let done_elapsed = match (first, last) {
            (Some(f), Some(l)) => l.saturating_duration_since(f),
            _ => Duration::ZERO,
        };
        Ok(Side {
            count: n,
            in_flight,
            sent_per_s: per_s(n, elapsed),
            send: send_stats(&sent)?,
            done: done_stats(&done)?,
            done_per_s: per_s(n, done_elapsed),
            other_cores,
        })
    }

    /// Close its connections (which ends the consumers).
    async fn close(self) {
        for c in self.connections {
            let _ = c.close(200, "OK".into()).await;
        }
    }
}

/// Start the raw side on `queue`; run the warm-up, `n` messages at [`IN_FLIGHT`],
/// then [`ONE_BY_ONE`] one at a time.
pub(super) async fn side(
    url: &str,
    queue: &str,
    settings: &Settings,
    n: usize,
) -> anyhow::Result<[Side; 2]> {
    let mut watched = vec![std::process::id()];
    watched.extend(broker::local_pid(broker::port(url)));
    let mut raw = Raw::start(url, queue, settings.prefetch).await?;
    let outcome = async {
        raw.batch(WARMUP, IN_FLIGHT, &watched).await?;
        Ok([
            raw.batch(n, IN_FLIGHT, &watched).await?,
            raw.batch(ONE_BY_ONE, 1, &watched).await?,
        ])
    }
    .await;
    raw.close().await;
    outcome
}
