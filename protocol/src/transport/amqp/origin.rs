//! Who published a delivery and on which route, as the broker vouches for it.
//!
//! Every request this transport publishes carries `user_id` = the connection's broker
//! user, and RabbitMQ refuses a publish whose `user_id` differs from the
//! connection's user (unless that user has the `impersonator` tag): so a delivery's
//! `user_id` names its publisher. A request published on the request exchange also
//! carries its route: the routing key.
//!
//! A consumer sometimes places a copy of a delivery back on its queue through the
//! default exchange (hand-back, counted redelivery, a paused consumer's buffer): the
//! copy is published by the consumer's connection, so the original's publisher and
//! route travel in two headers, stamped with `user_id` = the copier's user. They are
//! believed only on a default-exchange delivery whose `user_id` is this transport's
//! own broker user: a copy by a server of the same principal. Anyone else's copy, or
//! a message published straight into the queue, has no route and its own publisher.

use super::super::Publisher;
use super::shared::Shared;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// On a copy: the broker user who published the original (absent: unknown).
pub(crate) const PUBLISHER_HEADER: &str = "x-keelson-publisher";
/// On a copy: the route the original was published on (absent: none).
pub(crate) const ROUTE_HEADER: &str = "x-keelson-route";

/// A delivery's publisher and route.
#[derive(Debug, Clone)]
pub(crate) struct Origin {
    pub(crate) publisher: Publisher,
    pub(crate) route: Option<String>,
}

fn header(headers: Option<&FieldTable>, key: &str) -> Option<String> {
    match headers?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

impl Origin {
    /// The origin of a delivery that came through `exchange` with `routing_key`.
    pub(crate) fn of(
        shared: &Shared,
        exchange: &str,
        routing_key: &str,
        properties: &BasicProperties,
    ) -> Self {
        let user = properties.user_id().as_ref().map(|u| u.as_str().to_owned());
        let headers = properties.headers().as_ref();
        if exchange.is_empty() && user.as_deref() == Some(shared.broker_user.as_str()) {
            // A copy placed back by a server of our own principal.
            return Self {
                publisher: header(headers, PUBLISHER_HEADER)
                    .map_or(Publisher::Unknown, Publisher::User),
                route: header(headers, ROUTE_HEADER),
            };
        }
        let publisher = user.map_or(Publisher::Unknown, Publisher::User);
        let route = (exchange == shared.names.requests_exchange()).then(|| routing_key.to_owned());
        Self { publisher, route }
    }

    /// Stamp a copy of the delivery: `user_id` = our broker user, the origin in the
    /// headers (any such header the message carried is replaced or removed).
    pub(crate) fn stamp(
        &self,
        shared: &Shared,
        properties: BasicProperties,
        headers: FieldTable,
    ) -> BasicProperties {
        let mut table = headers.inner().clone();
        table.remove(PUBLISHER_HEADER);
        table.remove(ROUTE_HEADER);
        if let Publisher::User(user) = &self.publisher {
            table.insert(PUBLISHER_HEADER.into(), long(user));
        }
        if let Some(route) = &self.route {
            table.insert(ROUTE_HEADER.into(), long(route));
        }
        let headers = FieldTable::from(table);
        let properties = properties.with_headers(headers);
        match ShortString::try_new(shared.broker_user.as_str()) {
            Ok(user) => properties.with_user_id(user),
            // Checked at start (at most 255 bytes); without `user_id` the copy is
            // simply not believed.
            Err(_) => properties,
        }
    }
}
