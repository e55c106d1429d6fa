//! The transport abstraction: the messaging patterns of the mesh, independent of any
//! broker.
//!
//! A [`Transport`] carries four patterns:
//!
//! * **request/reply** ([`Transport::request`]): a message is routed by its route (the
//!   handler name) to the service queue bound for it, consumed by exactly one
//!   consumer, and its reply is awaited until a deadline;
//! * **competing consumption** ([`Transport::consume`]): every message of a service
//!   queue goes to exactly one of its consumers, each consumer holding at most
//!   `prefetch` unsettled deliveries; deliveries are settled by ack, requeue, or
//!   reject-to-dead-letter; intake can be paused and resumed;
//! * **fanout broadcast** ([`Transport::broadcast`] / [`Transport::subscribe`]): every
//!   current subscriber of a channel receives every message published after it
//!   subscribed (context deltas, heartbeats, control);
//! * **dead letters** ([`Transport::consume_dead_letters`]): what consumers rejected,
//!   with the reason in the [`DEAD_LETTER_REASON_HEADER`] header.
//!
//! Which implementation runs is chosen by configuration alone, through
//! [`TransportConfig`]. Every implementation passes the same conformance suite
//! (`conformance` feature, [`crate::transport_conformance_tests!`]).

mod config;
mod delivery;
mod error;
pub mod lease;
pub mod memory;
mod memory_lease;
mod window;

#[cfg(feature = "amqp")]
pub mod amqp;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use config::{MemoryConfig, TransportConfig};
pub use delivery::{Delivery, Outcome, Publisher, Replier, Settle};
pub use error::{RequestError, TransportError};
pub use lease::{Fence, Lease, LeaseEvent};

#[cfg(feature = "amqp")]
pub use amqp::{AmqpConfig, AmqpTransport, QueueType};

use async_trait::async_trait;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::fmt;
use tokio::time::Instant;

/// Message metadata carried beside the payload (AMQP headers).
pub type Headers = BTreeMap<String, String>;

/// Header set on a dead-lettered message: why it was rejected.
pub const DEAD_LETTER_REASON_HEADER: &str = "x-keelson-dead-letter-reason";

/// The longest delay [`Transport::enqueue`] holds a message for; a longer one is
/// shortened to it. (On AMQP the longest delay queue holds delays up to 8,192 s.)
pub const MAX_ENQUEUE_DELAY: std::time::Duration = std::time::Duration::from_secs(2 * 60 * 60);

/// Header counting how many times a message reached a consumer (see
/// [`Delivery::deliveries`]); absent on a first delivery.
pub const DELIVERIES_HEADER: &str = "x-keelson-deliveries";

/// A message as the transport carries it: opaque payload plus headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    /// The encoded envelope.
    pub payload: Bytes,
    /// Metadata; keys are lowercase by convention.
    pub headers: Headers,
}

impl Message {
    /// A message with no headers.
    pub fn new(payload: impl Into<Bytes>) -> Self {
        Self {
            payload: payload.into(),
            headers: Headers::new(),
        }
    }
}

/// A service: one queue, consumed by the logic servers hosting that service, bound by
/// the routes (handler names) they serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// Service name; the queue is named after it.
    pub name: String,
    /// Routes (handler names) whose requests land on this queue.
    pub routes: Vec<String>,
}

/// A transport: the only way components of the mesh talk to each other.
///
/// Implementations are cheap to share (`Arc<dyn Transport>`) and safe to call from
/// many tasks at once. All methods are cancel-safe unless they say otherwise.
#[async_trait]
pub trait Transport: Send + Sync + fmt::Debug + 'static {
    /// Declare the queue of `service` and bind it to each of its routes.
    ///
    /// Idempotent: declaring the same service again (with the same or more routes) is
    /// not an error; bindings are only ever added.
    async fn declare_service(&self, service: &ServiceSpec) -> Result<(), TransportError>;

    /// Publish `message` on `route` and wait for the one reply to it until `deadline`.
    ///
    /// * [`RequestError::Unroutable`] at once when no queue is bound for `route`;
    /// * [`RequestError::Timeout`] when no reply arrived before `deadline`; the message
    ///   expires on its queue at the deadline and a reply arriving later is discarded;
    /// * [`RequestError::Unavailable`] when the transport cannot carry traffic now.
    ///
    /// A request that finds a queue but no consumer waits there until a consumer
    /// takes it or its deadline passes.
    async fn request(
        &self,
        route: &str,
        message: Message,
        deadline: Instant,
    ) -> Result<Bytes, RequestError>;

    /// Put `message` on the queue bound to `route` for a consumer to take later; no
    /// reply is awaited (background jobs). The message is persistent and confirmed:
    /// once this returns `Ok`, the broker holds it, and it waits on its queue while no
    /// consumer runs (on AMQP, durable queues keep it across a broker restart). It
    /// carries this transport's [`Transport::publisher`] and no expiry.
    ///
    /// Its consumer sees it with the same payload and headers, [`Delivery::route`] =
    /// `route`, [`Delivery::publisher`] = this transport's publisher, no reply
    /// expected ([`Delivery::expects_reply`] false), not redelivered.
    ///
    /// With a non-zero `delay`, the message reaches the queue of `route` only after
    /// about `delay` (at most [`MAX_ENQUEUE_DELAY`]; on AMQP: parked in a delay queue
    /// whose expiry dead-letters it to `route`; it may come late, by less than the
    /// delay itself, or 2 s for a delay under a second: see `TOPOLOGY.md`,
    /// "Background work"). The route is checked when the message reaches it: a
    /// delayed message whose route has no queue then is lost. Closing an in-process
    /// transport drops the delayed messages it holds.
    ///
    /// * [`RequestError::Unroutable`] when `delay` is zero and no queue is bound for
    ///   `route`;
    /// * [`RequestError::Unavailable`] when the transport cannot carry it now (the
    ///   broker did not confirm it: it may or may not be queued).
    async fn enqueue(
        &self,
        route: &str,
        message: Message,
        delay: std::time::Duration,
    ) -> Result<(), RequestError> {
        let _ = (route, message, delay);
        Err(RequestError::Unavailable(
            "this transport cannot queue background work".to_owned(),
        ))
    }

    /// Start consuming the queue of `service`, holding at most `prefetch` unsettled
    /// deliveries at a time (`prefetch` is at least 1).
    ///
    /// The service must have been declared with [`Transport::declare_service`].
    async fn consume(
        &self,
        service: &str,
        prefetch: u16,
    ) -> Result<Box<dyn Consumer>, TransportError>;

    /// Publish `message` to every current subscriber of the fanout `channel`.
    ///
    /// Publishing to a channel nobody subscribes to succeeds and the message is gone.
    async fn broadcast(&self, channel: &str, message: Message) -> Result<(), TransportError>;

    /// Subscribe to the fanout `channel`: every message broadcast after this returns is
    /// delivered to the subscription, in publish order per publisher.
    async fn subscribe(&self, channel: &str) -> Result<Box<dyn Subscription>, TransportError>;

    /// Consume the dead-letter queue: messages rejected with [`Delivery::reject`],
    /// carrying their reason in [`DEAD_LETTER_REASON_HEADER`].
    async fn consume_dead_letters(
        &self,
        prefetch: u16,
    ) -> Result<Box<dyn Consumer>, TransportError>;

    /// How many dead letters wait in the dead-letter queue now: the messages ready to
    /// be read, not those a reader (`keelson dlq`) holds at this instant. `Ok(None)`
    /// when this transport cannot tell (the default, so that a transport written
    /// before this method still builds).
    ///
    /// It needs no right on the queue (on AMQP a passive declaration, which the
    /// broker allows every user), so a gateway's least-privilege broker user may ask.
    async fn dead_letters_waiting(&self) -> Result<Option<u64>, TransportError> {
        Ok(None)
    }

    /// Join the line of candidates for the lease `name` (see [`lease`]): at most one
    /// candidate in the whole mesh holds it at a time, with a fencing token greater
    /// than every earlier holder's. `name` is 1–100 characters of `[a-z0-9._-]`.
    ///
    /// The default refuses (a transport written before leases still builds).
    async fn lease(&self, name: &str) -> Result<Box<dyn Lease>, TransportError> {
        Err(TransportError::Refused(format!(
            "this transport has no leases (lease `{name}`)"
        )))
    }

    /// Who this transport's own publications come from, as its consumers see it
    /// ([`Delivery::publisher`]): [`Publisher::Local`] for an in-process transport,
    /// the broker user for AMQP. Every request it publishes carries this identity.
    fn publisher(&self) -> Publisher;

    /// Whether the transport can carry traffic now (used by readiness probes).
    fn is_ready(&self) -> bool;

    /// Close the transport: consumers and subscriptions end (their `next` returns
    /// `None`), pending requests fail with [`RequestError::Unavailable`].
    async fn close(&self);
}

/// The receiving end of a service queue (see [`Transport::consume`]).
///
/// Every message of the queue is delivered to exactly one consumer. A delivery stays
/// with its consumer until settled ([`Delivery::ack`], [`Delivery::requeue`],
/// [`Delivery::reject`]); dropping it unsettled, or closing the transport, requeues it,
/// so at-least-once delivery holds: a consumer must expect redeliveries.
#[async_trait]
pub trait Consumer: Send + fmt::Debug {
    /// The next delivery; waits while none is available, while `prefetch` deliveries
    /// are unsettled, or while paused. `None` once the transport is closed.
    ///
    /// Cancel-safe: dropping the future never loses a message.
    async fn next(&mut self) -> Option<Result<Delivery, TransportError>>;

    /// Stop intake: after this returns, no new message is assigned to this consumer
    /// and peers receive them instead. Deliveries already handed out stay valid.
    async fn pause(&mut self) -> Result<(), TransportError>;

    /// Resume intake after [`Consumer::pause`]. Resuming a running consumer is a no-op.
    async fn resume(&mut self) -> Result<(), TransportError>;

    /// Whether intake is paused.
    fn is_paused(&self) -> bool;

    /// Narrow or widen the intake window: how many deliveries may be unsettled at
    /// once, clamped to `1..=prefetch` (the prefetch given to [`Transport::consume`]);
    /// returns the window set. A narrower window holds from now on: no delivery is
    /// handed out while as many as the window are unsettled, and the transport does
    /// not take more than the window from the queue, so the rest stays there for
    /// peers (a transport may take nothing new until every delivery handed out
    /// before the change is settled, as AMQP does). Deliveries already handed out
    /// stay valid.
    async fn set_window(&mut self, window: u16) -> Result<u16, TransportError>;

    /// The intake window (the prefetch until [`Consumer::set_window`] changes it).
    fn window(&self) -> u16;
}

/// The receiving end of a fanout channel (see [`Transport::subscribe`]).
#[async_trait]
pub trait Subscription: Send + fmt::Debug {
    /// The next broadcast message; `None` once the transport is closed.
    ///
    /// Cancel-safe.
    async fn next(&mut self) -> Option<Message>;
}
