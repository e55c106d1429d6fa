//! Background work: a message put on the queue bound to its route for a consumer to
//! take later, persistent and confirmed, now or after a delay (`delay.rs`).
//!
//! It goes out like a request (`rpc.rs`): on the link's rpc channel, `mandatory`, in
//! confirm mode, stamped with the connection's broker user, so that "no queue bound"
//! is known when the confirm arrives and the consumer sees the same publisher and
//! route. Unlike a request it has no `reply_to` and no expiry on its service queue,
//! and it is persistent (`delivery_mode = 2`).

use super::super::{MAX_ENQUEUE_DELAY, Message, RequestError};
use super::delay::{self, DELAY_HEADER};
use super::headers;
use super::rpc::{publish_confirmed, short_prefix};
use super::shared::Shared;
use lapin::types::ShortString;
use lapin::{BasicProperties, Confirmation};
use std::time::Duration;

/// AMQP `delivery_mode` of a message the broker writes to disk.
pub(crate) const PERSISTENT: u8 = 2;

/// How long an enqueue waits for the broker's confirm (a broker that blocks
/// publishers, e.g. on a memory alarm, may never send it).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

fn unavailable(why: impl Into<String>) -> RequestError {
    RequestError::Unavailable(why.into())
}

/// The delay as a per-message `expiration`: milliseconds, rounded up so that the
/// message never arrives before its delay.
fn expiration_ms(delay: Duration) -> u128 {
    delay.as_millis() + u128::from(!delay.subsec_nanos().is_multiple_of(1_000_000))
}

pub(crate) async fn enqueue(
    shared: &Shared,
    route: &str,
    message: Message,
    delay: Duration,
) -> Result<(), RequestError> {
    if shared.is_closed() {
        return Err(unavailable("transport closed"));
    }
    let Some(link) = shared.live_link() else {
        return Err(unavailable("not connected to a broker"));
    };
    // No queue can be bound by a key longer than a short string.
    let Ok(routing_key) = ShortString::try_new(route) else {
        return Err(RequestError::Unroutable(route.to_owned()));
    };
    let delay = delay.min(MAX_ENQUEUE_DELAY);
    let mut message_headers = message.headers;
    // Marks of an earlier trip through a delay queue (a consumer re-enqueueing what
    // it received) are not this message's.
    headers::strip_delay_marks(&mut message_headers);
    // Each `into()` below is a short string that cannot pass 255 bytes: digits, a
    // prefix cut at 100 bytes, the broker user (checked at start: 1 to 255 bytes).
    let mut properties = BasicProperties::default()
        .with_message_id(
            format!(
                "{}-{}",
                short_prefix(&shared.node_id),
                shared.next_correlation_id()
            )
            .into(),
        )
        .with_delivery_mode(PERSISTENT)
        // The consumer trusts it as it trusts a request's (see `origin.rs`); it
        // survives dead-lettering out of a delay queue.
        .with_user_id(shared.broker_user.as_str().into());
    let level = (!delay.is_zero()).then(|| delay::level_of(delay));
    let exchange = match level {
        None => shared.names.requests_exchange(),
        Some(level) => {
            message_headers.insert(DELAY_HEADER.to_owned(), level.to_string());
            properties = properties.with_expiration(expiration_ms(delay).to_string().into());
            shared.names.delay_exchange()
        }
    };
    let properties = properties.with_headers(headers::to_table(&message_headers));
    let exchange: ShortString = exchange.into();
    let publish = publish_confirmed(&link, exchange, routing_key, &message.payload, properties);
    let confirmation = tokio::select! {
        c = tokio::time::timeout(CONFIRM_TIMEOUT, publish) => match c {
            Ok(c) => c?,
            Err(_) => return Err(unavailable(format!(
                "the broker sent no publisher confirm within {CONFIRM_TIMEOUT:?}"
            ))),
        },
        () = link.lost() => return Err(unavailable("connection to the broker lost")),
        () = shared.closed() => return Err(unavailable("transport closed")),
    };
    match (confirmation, level) {
        (Confirmation::Ack(None) | Confirmation::NotRequested, _) => Ok(()),
        (Confirmation::Ack(Some(returned)), None) => {
            // One line, without the message (its body and headers are the caller's).
            tracing::info!(
                route,
                reply_code = returned.reply_code,
                reason = %returned.reply_text,
                "the broker returned an enqueued message: no service is bound to its route"
            );
            Err(RequestError::Unroutable(route.to_owned()))
        }
        (Confirmation::Ack(Some(_)), Some(level)) => Err(unavailable(format!(
            "the broker returned a delayed message: the delay queue {} is missing \
             (declare the topology again)",
            shared.names.delay_queue(level)
        ))),
        (Confirmation::Nack(_), _) => {
            Err(unavailable("the broker did not accept the message (nack)"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expiration_never_comes_before_the_delay() {
        assert_eq!(expiration_ms(Duration::from_millis(1_500)), 1_500);
        assert_eq!(expiration_ms(Duration::from_micros(1_500_001)), 1_501);
        assert_eq!(expiration_ms(Duration::from_nanos(1)), 1);
    }
}
