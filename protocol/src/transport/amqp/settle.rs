//! Replying to and settling one AMQP delivery.
//!
//! Each [`AmqpSettle`] holds a clone of the channel its delivery came on. lapin closes
//! a channel when its last handle goes, and closing a channel requeues what it holds
//! unacknowledged: so the channel of a dropped or paused consumer stays open exactly
//! as long as one of its deliveries is unsettled, and a handler still working on a
//! delivery can ack it after its consumer is gone.
//!
//! After a connection loss the channel is dead and the broker requeues the delivery
//! by itself; acking it then fails (`Ok(false)` or an error from lapin). That is not
//! an error for the caller: the message comes again, to this or another consumer.

use super::super::{DEAD_LETTER_REASON_HEADER, Outcome, Settle, TransportError};
use super::origin::Origin;
use super::shared::Shared;
use super::topology;
use async_trait::async_trait;
use bytes::Bytes;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Acker, BasicProperties, Channel};
use std::fmt;
use std::sync::Arc;
use tokio::sync::OwnedSemaphorePermit;
use tracing::debug;

pub(crate) struct AmqpSettle {
    pub(crate) shared: Arc<Shared>,
    /// Keeps the delivery's channel open until this is settled (see the module doc).
    pub(crate) channel: Channel,
    pub(crate) acker: Acker,
    pub(crate) reply_to: Option<ShortString>,
    pub(crate) correlation_id: Option<ShortString>,
    pub(crate) message_id: Option<ShortString>,
    pub(crate) expiration: Option<ShortString>,
    /// Persistent (2) or not: a copy of an enqueued job must survive a broker
    /// restart as the original would have.
    pub(crate) delivery_mode: Option<u8>,
    /// Who published it and on which route; a copy keeps them.
    pub(crate) origin: Origin,
    /// The node part of the delivery's connection's own reply addresses.
    pub(crate) local_node: Option<Arc<str>>,
    /// Payload and headers as received, to dead-letter them unchanged.
    pub(crate) payload: Bytes,
    pub(crate) headers: Option<FieldTable>,
    /// The queue it came from, for logs.
    pub(crate) queue: String,
    /// The consumer's prefetch slot this delivery occupies until settled.
    pub(crate) permit: std::sync::Mutex<Option<OwnedSemaphorePermit>>,
}

impl fmt::Debug for AmqpSettle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpSettle")
            .field("queue", &self.queue)
            .field("channel", &self.channel.id())
            .field("expects_reply", &self.reply_to.is_some())
            .finish_non_exhaustive()
    }
}

/// Log an ack or nack that did not reach the broker: the channel died, so the broker
/// requeues the message and it comes again.
fn redelivery_coming(queue: &str, what: &str, result: &lapin::Result<bool>) {
    match result {
        Ok(true) => {}
        Ok(false) => debug!("{what} on {queue}: its channel is closed; redelivery coming"),
        Err(e) => debug!("{what} on {queue} failed ({e}); redelivery coming"),
    }
}

impl AmqpSettle {
    async fn ack(&self) {
        let result = self.acker.ack(BasicAckOptions::default()).await;
        redelivery_coming(&self.queue, "ack", &result);
    }

    async fn requeue(&self) {
        let result = self
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await;
        redelivery_coming(&self.queue, "requeue", &result);
    }

    /// Publish the message with `reason` to the dead-letter exchange and wait for the
    /// broker to take it.
    async fn dead_letter(&self, reason: String) -> Result<(), TransportError> {
        let link = self.shared.live_link().ok_or_else(|| {
            TransportError::Disconnected("cannot dead-letter while disconnected".into())
        })?;
        let mut headers = self.headers.clone().unwrap_or_default();
        headers.insert(
            DEAD_LETTER_REASON_HEADER.into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        let mut properties = BasicProperties::default()
            .with_headers(headers)
            .with_delivery_mode(super::enqueue::PERSISTENT);
        if let Some(id) = &self.message_id {
            properties = properties.with_message_id(id.clone());
        }
        let exchange = topology::short("namespace", self.shared.names.dead_letter_exchange())?;
        link.publish_confirmed(exchange, &self.payload, properties, "dead letter")
            .await
    }
}

/// Place a copy of a message (`payload`, `properties` with `headers`) at the back of
/// `queue` through the default exchange and wait for the broker to take it. The
/// caller then acks the original: the message goes back to the queue without the
/// broker counting a delivery or marking it redelivered. The copy keeps the
/// original's `origin` (see `origin.rs`).
pub(crate) async fn republish(
    shared: &Shared,
    queue: &str,
    payload: &[u8],
    properties: BasicProperties,
    headers: FieldTable,
    origin: &Origin,
) -> Result<(), TransportError> {
    let link = shared.live_link().ok_or_else(|| {
        TransportError::Disconnected("cannot republish while disconnected".into())
    })?;
    let queue = topology::short("queue name", queue)?;
    link.publish_confirmed_to(
        "".into(),
        queue,
        payload,
        origin.stamp(shared, properties, headers),
        "republished message",
    )
    .await
}

/// An `Outcome::Republish` of the delivery `acker` holds: a copy, then an ack; if the
/// copy cannot be placed, a requeue (counted, but nothing is lost).
pub(crate) async fn republish_then_ack(
    shared: &Shared,
    queue: &str,
    acker: &Acker,
    payload: &[u8],
    properties: BasicProperties,
    headers: FieldTable,
    origin: &Origin,
) {
    match republish(shared, queue, payload, properties, headers, origin).await {
        Ok(()) => {
            let result = acker.ack(BasicAckOptions::default()).await;
            redelivery_coming(queue, "ack of a republished message", &result);
        }
        Err(e) => {
            debug!("republishing on {queue} failed ({e}); requeueing instead");
            let result = acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await;
            redelivery_coming(queue, "requeue", &result);
        }
    }
}

/// The properties a copy of a delivery keeps: everything but the headers, which the
/// caller sets.
pub(crate) fn copy_properties(
    reply_to: Option<&ShortString>,
    correlation_id: Option<&ShortString>,
    message_id: Option<&ShortString>,
    expiration: Option<&ShortString>,
    delivery_mode: Option<u8>,
) -> BasicProperties {
    let mut properties = BasicProperties::default();
    if let Some(v) = reply_to {
        properties = properties.with_reply_to(v.clone());
    }
    if let Some(v) = correlation_id {
        properties = properties.with_correlation_id(v.clone());
    }
    if let Some(v) = message_id {
        properties = properties.with_message_id(v.clone());
    }
    // The original time to live again, from now: the requester's deadline is in the
    // envelope, and the server refuses the request past it.
    if let Some(v) = expiration {
        properties = properties.with_expiration(v.clone());
    }
    if let Some(mode) = delivery_mode {
        properties = properties.with_delivery_mode(mode);
    }
    properties
}

#[async_trait]
impl Settle for AmqpSettle {
    async fn reply(&self, payload: Bytes) -> Result<(), TransportError> {
        let Some(reply_to) = &self.reply_to else {
            return Ok(());
        };
        let mut properties = BasicProperties::default();
        if let Some(id) = &self.correlation_id {
            properties = properties.with_correlation_id(id.clone());
        }
        let node = super::reply::requester_node(reply_to.as_str());
        if node.is_none() || node.as_deref() != self.local_node.as_deref() {
            // Its requester's node may not be running: not on this delivery's
            // connection (see `reply.rs`).
            return self
                .shared
                .replies
                .publish(node, reply_to, properties, &payload)
                .await;
        }
        // The requester is on the node this connection is attached to, which runs.
        // Not mandatory, no confirm: a reply to a requester that is gone is dropped
        // by the broker, which is what the contract asks for.
        self.channel
            .basic_publish(
                "".into(),
                reply_to.clone(),
                BasicPublishOptions::default(),
                &payload,
                properties,
            )
            .await
            .map(|_| ())
            .map_err(|e| topology::error("publishing a reply", &e))
    }

    async fn settle(&self, outcome: Outcome) -> Result<(), TransportError> {
        // Settled (or about to be): the slot is free, also for a delivery acked
        // before its reply (`Delivery::ack_then_reply`), which the broker no longer
        // counts either.
        let _slot = self.permit.lock().unwrap_or_else(|p| p.into_inner()).take();
        match outcome {
            Outcome::Ack => self.ack().await,
            Outcome::Requeue => self.requeue().await,
            Outcome::Republish { headers } => {
                let properties = copy_properties(
                    self.reply_to.as_ref(),
                    self.correlation_id.as_ref(),
                    self.message_id.as_ref(),
                    self.expiration.as_ref(),
                    self.delivery_mode,
                );
                republish_then_ack(
                    &self.shared,
                    &self.queue,
                    &self.acker,
                    &self.payload,
                    properties,
                    super::headers::to_table(&headers),
                    &self.origin,
                )
                .await;
            }
            Outcome::Reject { reason } => {
                if let Err(e) = self.dead_letter(reason).await {
                    // Not dead-lettered: put it back rather than lose it.
                    self.requeue().await;
                    return Err(e);
                }
                // Dead-lettered, then removed: if this ack is lost, the message comes
                // again and is dead-lettered twice, never lost.
                self.ack().await;
            }
        }
        Ok(())
    }

    fn abandon(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to nack from: the broker requeues it when the channel closes.
            return;
        };
        let acker = self.acker.clone();
        let channel = self.channel.clone();
        let queue = self.queue.clone();
        runtime.spawn(async move {
            let result = acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await;
            redelivery_coming(&queue, "requeue of a dropped delivery", &result);
            drop(channel);
        });
    }
}
