//! Request/reply over the request exchange and direct reply-to.
//!
//! A request is published, `mandatory` and with publisher confirms, on the link's
//! rpc channel, the same channel that consumes `amq.rabbitmq.reply-to`. The broker
//! answers the publish with a confirm; a mandatory message that no queue took is
//! returned first, so "no service bound" is known as soon as the confirm arrives.
//! Replies carry the request's correlation id; [`read_replies`] hands each to the
//! request awaiting it, and drops replies nobody awaits any longer.

use super::super::{Message, RequestError};
use super::connection::Link;
use super::headers;
use super::shared::{Shared, lock};
use super::topology::DIRECT_REPLY_TO;
use bytes::Bytes;
use futures_util::StreamExt;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Confirmation};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::debug;

/// How much earlier than its deadline a request expires on its queue, at most.
const MAX_EXPIRY_MARGIN: Duration = Duration::from_millis(50);

/// The longest a request waits past its deadline for the broker to have dropped it.
const MAX_EXPIRY_GRACE: Duration = Duration::from_millis(250);

/// Removes the pending entry however the request ends (reply, deadline, error, or the
/// caller dropping the future), so that a late reply finds nothing and nothing leaks.
struct PendingSlot<'a> {
    shared: &'a Shared,
    correlation_id: String,
}

impl Drop for PendingSlot<'_> {
    fn drop(&mut self) {
        lock(&self.shared.pending).remove(&self.correlation_id);
    }
}

/// At most the first 100 bytes of `s`, cut at a character boundary, so a message id
/// stays a valid AMQP short string whatever the node id.
pub(crate) fn short_prefix(s: &str) -> &str {
    let mut end = s.len().min(100);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn unavailable(why: impl Into<String>) -> RequestError {
    RequestError::Unavailable(why.into())
}

pub(crate) async fn request(
    shared: &Shared,
    route: &str,
    message: Message,
    deadline: Instant,
) -> Result<Bytes, RequestError> {
    if shared.is_closed() {
        return Err(unavailable("transport closed"));
    }
    let Some(link) = shared.live_link() else {
        return Err(unavailable("not connected to a broker"));
    };
    let remaining = deadline.saturating_duration_since(Instant::now());
    if remaining.is_zero() {
        return Err(RequestError::Timeout);
    }
    // No queue can be bound by a key longer than a short string.
    let Ok(routing_key) = ShortString::try_new(route) else {
        return Err(RequestError::Unroutable(route.to_owned()));
    };
    let correlation_id = shared.next_correlation_id();
    let (tx, rx) = oneshot::channel();
    lock(&shared.pending).insert(correlation_id.clone(), tx);
    let _slot = PendingSlot {
        shared,
        correlation_id: correlation_id.clone(),
    };
    // The message expires on its queue at the deadline, a little before in fact: the
    // broker drops expired messages on a timer, which may fire late under load, and a
    // consumer attaching in between would still get the stale request. Taken in its
    // last few milliseconds, a request could not be answered in time anyway.
    let margin = (remaining / 10).min(MAX_EXPIRY_MARGIN);
    let expiration_ms = u64::try_from((remaining - margin).as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    let expiration = expiration_ms.to_string();
    // Each `into()` below is a short string that cannot pass 255 bytes: a UUID, digits,
    // a constant, the namespace (at most 100 bytes, checked at start).
    let properties = BasicProperties::default()
        // Unique without a random number per message: node id plus the counter.
        .with_message_id(format!("{}-{correlation_id}", short_prefix(&shared.node_id)).into())
        .with_correlation_id(correlation_id.into())
        .with_reply_to(DIRECT_REPLY_TO.into())
        .with_expiration(expiration.into())
        // The broker refuses the publish unless this is our connection's user, so the
        // server can trust it (see `origin.rs`); checked at start: 1 to 255 bytes.
        .with_user_id(shared.broker_user.as_str().into())
        .with_headers(headers::to_table(&message.headers));
    let exchange: ShortString = shared.names.requests_exchange().into();
    let publish = publish_confirmed(&link, exchange, routing_key, &message.payload, properties);
    // One timer for the whole request: reset below rather than created twice.
    let timer = tokio::time::sleep_until(deadline);
    tokio::pin!(timer);
    let confirmation = tokio::select! {
        c = publish => c?,
        () = &mut timer => return Err(RequestError::Timeout),
        () = link.lost() => return Err(unavailable("connection to the broker lost")),
        () = shared.closed() => return Err(unavailable("transport closed")),
    };
    match confirmation {
        Confirmation::Ack(None) | Confirmation::NotRequested => {}
        Confirmation::Ack(Some(returned)) => {
            // One line, without the message: its body and headers are the
            // client's (lapin's own warning, which prints them, is filtered out).
            tracing::info!(
                route,
                reply_code = returned.reply_code,
                reason = %returned.reply_text,
                "the broker returned a request: no service is bound to its route"
            );
            return Err(RequestError::Unroutable(route.to_owned()));
        }
        Confirmation::Nack(_) => {
            return Err(unavailable("the broker did not accept the request (nack)"));
        }
    }
    // The broker counts the expiry from when it queued the message, a little after
    // `remaining` was measured but before the confirm arrived. Giving up no earlier
    // than `expiration` after the confirm means that once this returns `Timeout`, the
    // broker can no longer deliver the request. It costs the confirm latency, bounded.
    let expired_by = Instant::now() + Duration::from_millis(expiration_ms);
    let give_up = expired_by.clamp(deadline, deadline + MAX_EXPIRY_GRACE);
    timer.as_mut().reset(give_up);
    tokio::select! {
        reply = rx => reply.map_err(|_| unavailable("reply slot dropped")),
        () = &mut timer => Err(RequestError::Timeout),
        () = link.lost() => Err(unavailable("connection to the broker lost")),
        () = shared.closed() => Err(unavailable("transport closed")),
    }
}

/// Publish on the link's rpc channel, `mandatory`, and wait for the broker's confirm
/// (a return comes first, in `Confirmation::Ack(Some(..))`). Requests and enqueued
/// messages go out this way.
pub(crate) async fn publish_confirmed(
    link: &Link,
    exchange: ShortString,
    routing_key: ShortString,
    payload: &[u8],
    properties: BasicProperties,
) -> Result<Confirmation, RequestError> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let confirm = match link
        .rpc
        .basic_publish(exchange, routing_key, options, payload, properties)
        .await
    {
        Ok(confirm) => confirm,
        Err(e) => {
            // The rpc channel is the link's: without it no request can be made.
            link.mark_lost(format!("publishing on the rpc channel: {e}"));
            return Err(unavailable(format!("publishing the message: {e}")));
        }
    };
    confirm.await.map_err(|e| {
        link.mark_lost(format!("awaiting a publisher confirm: {e}"));
        unavailable(format!("awaiting the publisher confirm: {e}"))
    })
}

/// Hand every reply arriving on the link's direct reply-to consumer to the request
/// awaiting it. Ends with the consumer; the link is then unusable for requests.
pub(crate) async fn read_replies(
    shared: Arc<Shared>,
    link: Arc<Link>,
    mut replies: lapin::Consumer,
) {
    while let Some(item) = replies.next().await {
        match item {
            Ok(delivery) => {
                let waiter = delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .and_then(|id| lock(&shared.pending).remove(id.as_str()));
                match waiter {
                    // The requester may give up just now: that is a late reply too.
                    Some(tx) => {
                        let _ = tx.send(Bytes::from(delivery.data));
                    }
                    None => debug!("discarding a reply nobody awaits (late or unknown)"),
                }
            }
            Err(e) => {
                link.mark_lost(format!("the reply consumer failed: {e}"));
                return;
            }
        }
    }
    link.mark_lost("the reply consumer ended");
}
