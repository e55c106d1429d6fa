//! A message handed to a consumer, and how it is settled.

use super::{Headers, TransportError};
use async_trait::async_trait;
use bytes::Bytes;
use std::fmt;

/// Who published a message, as far as the transport can vouch for it.
///
/// A logic server accepts a request's `user` only from a publisher it trusts (a
/// gateway): see `ARCHITECTURE.md`, "Only gateways assert identity".
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Publisher {
    /// A component of this very process (the memory transport): trusted by
    /// construction, since nothing outside the process can publish on it.
    Local,
    /// A broker user, validated by the broker (RabbitMQ refuses a publish whose
    /// `user_id` property differs from the connection's user).
    User(String),
    /// Nothing vouches for the publisher (e.g. an AMQP message without `user_id`).
    Unknown,
}

impl fmt::Display for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Local => f.write_str("this process"),
            Self::User(user) => write!(f, "broker user `{user}`"),
            Self::Unknown => f.write_str("an unvalidated publisher"),
        }
    }
}

/// How a delivery ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done: remove it from the queue.
    Ack,
    /// Not processed: put it back for any consumer (marked redelivered).
    Requeue,
    /// Unprocessable: move it to the dead-letter queue with this reason; never retried.
    Reject {
        /// Why, for the operator reading the dead-letter queue.
        reason: String,
    },
    /// Put a copy at the back of the queue, with `headers` replacing the message's
    /// own, not marked redelivered and not counted by the broker as a delivery (a
    /// RabbitMQ quorum queue counts every requeue toward its `x-delivery-limit` before
    /// 4.3); then remove this one. At least once: if the copy cannot be placed, the
    /// message is requeued instead.
    Republish {
        /// The copy's headers.
        headers: Headers,
    },
}

/// The transport-specific half of a [`Delivery`]: how to reply and settle.
///
/// Implemented by each transport; handler code never sees it.
#[async_trait]
pub trait Settle: Send + Sync + fmt::Debug {
    /// Publish `payload` to the requester's reply address, if the message has one.
    /// A reply nobody awaits any longer is discarded without error.
    async fn reply(&self, payload: Bytes) -> Result<(), TransportError>;

    /// Settle the delivery. Called at most once.
    async fn settle(&self, outcome: Outcome) -> Result<(), TransportError>;

    /// The delivery was dropped unsettled: requeue it without waiting.
    fn abandon(&self);
}

/// A message taken from a service queue by one consumer.
///
/// Settle it exactly once: [`ack`](Delivery::ack), [`requeue`](Delivery::requeue) or
/// [`reject`](Delivery::reject). Dropping it unsettled requeues it.
#[derive(Debug)]
pub struct Delivery {
    /// The encoded envelope.
    pub payload: Bytes,
    /// Message headers.
    pub headers: Headers,
    /// Whether this message was delivered before (requeued or its consumer died).
    pub redelivered: bool,
    /// Whether the sender awaits a reply.
    pub expects_reply: bool,
    publisher: Publisher,
    route: Option<String>,
    settle: Option<Box<dyn Settle>>,
}

impl Delivery {
    /// Assemble a delivery; used by transport implementations.
    pub fn new(
        payload: Bytes,
        headers: Headers,
        redelivered: bool,
        expects_reply: bool,
        settle: Box<dyn Settle>,
    ) -> Self {
        Self {
            payload,
            headers,
            redelivered,
            expects_reply,
            publisher: Publisher::Unknown,
            route: None,
            settle: Some(settle),
        }
    }

    /// Set who published the message and the route it was published on; used by
    /// transport implementations (without it: [`Publisher::Unknown`], no route).
    #[must_use]
    pub fn with_origin(mut self, publisher: Publisher, route: Option<String>) -> Self {
        self.publisher = publisher;
        self.route = route;
        self
    }

    /// Who published the message. Copies a consumer places back on its queue
    /// ([`Delivery::hand_back`], [`Delivery::count_redelivery`]) keep the original's.
    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// The route (handler name) the message was published on, when the transport
    /// knows it: a request's envelope must name the same handler. `None` for a
    /// message placed on the queue by another way (e.g. straight into an AMQP queue
    /// through the default exchange), which has no route to compare.
    pub fn route(&self) -> Option<&str> {
        self.route.as_deref()
    }

    /// Send `payload` to whoever awaits the reply. Does not settle the delivery: the
    /// contract is reply first, then ack, so that a crash in between leads to a
    /// redelivery rather than a lost answer.
    pub async fn reply(&self, payload: impl Into<Bytes>) -> Result<(), TransportError> {
        match &self.settle {
            Some(s) if self.expects_reply => s.reply(payload.into()).await,
            _ => Ok(()),
        }
    }

    /// Remove the message from the queue.
    pub async fn ack(self) -> Result<(), TransportError> {
        self.finish(Outcome::Ack).await
    }

    /// Put the message back on its queue for any consumer.
    pub async fn requeue(self) -> Result<(), TransportError> {
        self.finish(Outcome::Requeue).await
    }

    /// Move the message to the dead-letter queue with `reason`; it is never retried.
    pub async fn reject(self, reason: impl Into<String>) -> Result<(), TransportError> {
        self.finish(Outcome::Reject {
            reason: reason.into(),
        })
        .await
    }

    /// How many times this message has reached a consumer, this time included, as
    /// counted in [`super::DELIVERIES_HEADER`] (1 when absent). Hand-backs do not count.
    pub fn deliveries(&self) -> u32 {
        self.headers
            .get(super::DELIVERIES_HEADER)
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(1)
            .max(1)
    }

    /// Give the message back to the queue for any consumer without counting a
    /// delivery: work this consumer took but never began (intake paused, window
    /// narrowed, drain, a handler only a peer hosts).
    pub async fn hand_back(self) -> Result<(), TransportError> {
        let headers = self.headers.clone();
        self.finish(Outcome::Republish { headers }).await
    }

    /// Count a redelivery: a copy at the back of the queue carrying
    /// [`Delivery::deliveries`] + 1, so that the count survives on queues whose broker
    /// does not keep one (classic queues, the memory transport).
    pub async fn count_redelivery(self) -> Result<(), TransportError> {
        let mut headers = self.headers.clone();
        let next = self.deliveries().saturating_add(1);
        headers.insert(super::DELIVERIES_HEADER.to_owned(), next.to_string());
        self.finish(Outcome::Republish { headers }).await
    }

    /// Acknowledge now and answer later through the returned [`Replier`]: for a read
    /// that may take long (a job's status held by `?wait=`), which must not hold its
    /// delivery that long (a broker closes the channel of a delivery unacknowledged
    /// past its `consumer_timeout`). Lost with its server, such a read costs its
    /// requester a retry after its deadline, nothing else.
    pub async fn ack_then_reply(mut self) -> Result<Replier, TransportError> {
        let expects_reply = self.expects_reply;
        match self.settle.take() {
            Some(settle) => {
                settle.settle(Outcome::Ack).await?;
                Ok(Replier {
                    settle: Some(settle),
                    expects_reply,
                })
            }
            None => Ok(Replier {
                settle: None,
                expects_reply,
            }),
        }
    }

    /// Settle with an explicit outcome.
    pub async fn finish(mut self, outcome: Outcome) -> Result<(), TransportError> {
        match self.settle.take() {
            Some(s) => s.settle(outcome).await,
            None => Ok(()),
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(s) = self.settle.take() {
            s.abandon();
        }
    }
}

/// The reply address of a delivery acknowledged before its answer (see
/// [`Delivery::ack_then_reply`]).
#[derive(Debug)]
pub struct Replier {
    settle: Option<Box<dyn Settle>>,
    expects_reply: bool,
}

impl Replier {
    /// Send `payload` to whoever awaits the reply (nothing when nobody does).
    pub async fn reply(&self, payload: impl Into<Bytes>) -> Result<(), TransportError> {
        match &self.settle {
            Some(s) if self.expects_reply => s.reply(payload.into()).await,
            _ => Ok(()),
        }
    }
}
