//! Fanout broadcast: `broadcast(channel)` publishes to the fanout exchange
//! `{namespace}.{channel}`; each subscription is an exclusive, auto-delete,
//! server-named queue bound to it, consumed without acks.
//!
//! A broadcast is at-most-once per subscriber: what is published while a subscriber
//! is disconnected does not reach it (its queue went with its connection). After a
//! reconnection the subscription binds a new queue and goes on; the users of
//! broadcasts (context deltas, heartbeats) recover by snapshots and repetition.

use super::super::{Message, Subscription, TransportError};
use super::connection::Link;
use super::headers;
use super::shared::{Shared, lock};
use super::topology;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, warn};

/// Delay before subscribing again after a failed attempt on a live connection.
const RETRY_DELAY: Duration = Duration::from_millis(500);

/// Make sure the fanout exchange of `channel` exists on `link`, and is declared again
/// on every later connection. Returns the exchange name.
async fn ensure_exchange(
    shared: &Shared,
    link: &Link,
    channel: &str,
) -> Result<String, TransportError> {
    let exchange = shared.names.fanout_exchange(channel)?;
    let known = lock(&link.fanouts).contains(&exchange);
    if !known {
        topology::declare_fanout(&link.connection, &shared.names, &shared.config, &exchange)
            .await?;
        lock(&shared.registry).fanouts.insert(exchange.clone());
        lock(&link.fanouts).insert(exchange.clone());
    }
    Ok(exchange)
}

/// Publish `message` to every current subscriber of `channel`.
pub(crate) async fn broadcast(
    shared: &Shared,
    channel: &str,
    message: Message,
) -> Result<(), TransportError> {
    if shared.is_closed() {
        return Err(TransportError::Closed);
    }
    let link = shared
        .live_link()
        .ok_or_else(|| TransportError::Disconnected("not connected to a broker".into()))?;
    let exchange = topology::short(
        "fanout channel name",
        ensure_exchange(shared, &link, channel).await?,
    )?;
    let properties = BasicProperties::default().with_headers(headers::to_table(&message.headers));
    link.publish_confirmed(exchange, &message.payload, properties, "broadcast")
        .await
}

struct Attached {
    link: Arc<Link>,
    /// Held so the channel stays open: the consumer alone does not own it.
    _channel: Channel,
    stream: lapin::Consumer,
}

pub(crate) struct AmqpSubscription {
    shared: Arc<Shared>,
    channel: String,
    attached: Option<Attached>,
}

impl fmt::Debug for AmqpSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpSubscription")
            .field("channel", &self.channel)
            .field("attached", &self.attached.is_some())
            .finish()
    }
}

impl AmqpSubscription {
    /// Subscribe to `channel`; bound before this returns if the transport is connected.
    pub(crate) async fn open(shared: Arc<Shared>, channel: &str) -> Result<Self, TransportError> {
        // Checked even while disconnected, so a bad name fails now.
        shared.names.fanout_exchange(channel)?;
        let mut sub = Self {
            shared,
            channel: channel.to_owned(),
            attached: None,
        };
        if let Some(link) = sub.shared.live_link() {
            sub.attached = Some(sub.attach(link).await?);
        }
        Ok(sub)
    }

    async fn attach(&self, link: Arc<Link>) -> Result<Attached, TransportError> {
        let exchange = ensure_exchange(&self.shared, &link, &self.channel).await?;
        let exchange = topology::short("fanout channel name", exchange)?;
        let channel = link
            .connection
            .create_channel()
            .await
            .map_err(|e| topology::error("opening a subscription channel", &e))?;
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        let queue = channel
            .queue_declare("".into(), options, FieldTable::default())
            .await
            .map_err(|e| topology::error("declaring a subscription queue", &e))?;
        let queue = queue.name().clone();
        channel
            .queue_bind(
                queue.clone(),
                exchange,
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| topology::error("binding a subscription queue", &e))?;
        let consume = BasicConsumeOptions {
            no_ack: true,
            exclusive: true,
            ..BasicConsumeOptions::default()
        };
        let stream = channel
            .basic_consume(queue, "".into(), consume, FieldTable::default())
            .await
            .map_err(|e| topology::error("consuming a subscription queue", &e))?;
        Ok(Attached {
            link,
            _channel: channel,
            stream,
        })
    }

    /// Subscribe again on the next live link; `None` once the transport is closed.
    async fn reattach(&self) -> Option<Attached> {
        loop {
            let link = self.shared.wait_link().await?;
            match self.attach(link).await {
                Ok(attached) => return Some(attached),
                Err(e) => {
                    warn!("cannot subscribe to {} yet: {e}; retrying", self.channel);
                    tokio::select! {
                        () = tokio::time::sleep(RETRY_DELAY) => {}
                        () = self.shared.closed() => return None,
                    }
                }
            }
        }
    }
}

enum Event {
    Message(Message),
    Detach(String),
    Closed,
}

#[async_trait]
impl Subscription for AmqpSubscription {
    async fn next(&mut self) -> Option<Message> {
        loop {
            if self.shared.is_closed() {
                self.attached = None;
                return None;
            }
            if self.attached.as_ref().is_none_or(|a| a.link.is_lost()) {
                self.attached = None;
                self.attached = Some(self.reattach().await?);
            }
            let event = {
                let attached = self.attached.as_mut()?;
                let link = attached.link.clone();
                tokio::select! {
                    item = attached.stream.next() => match item {
                        Some(Ok(d)) => Event::Message(Message {
                            headers: headers::from_table(d.properties.headers().as_ref()),
                            payload: Bytes::from(d.data),
                        }),
                        Some(Err(e)) => Event::Detach(format!("subscription failed: {e}")),
                        None => Event::Detach("subscription cancelled".into()),
                    },
                    () = link.lost() => Event::Detach("connection lost".into()),
                    () = self.shared.closed() => Event::Closed,
                }
            };
            match event {
                Event::Message(m) => return Some(m),
                Event::Closed => return None,
                Event::Detach(why) => {
                    debug!("subscription to {} detached: {why}", self.channel);
                    self.attached = None;
                }
            }
        }
    }
}
