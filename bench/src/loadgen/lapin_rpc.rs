//! Raw lapin RPC target (configuration B's client): publish to the request exchange
//! with `reply_to = amq.rabbitmq.reply-to`, await the reply by correlation id.
//!
//! One connection and one channel for every worker, as an RPC client multiplexes
//! them; direct reply-to requires publishing on the channel that consumes the reply
//! pseudo-queue, and consuming before the first publish. No publisher confirms, no
//! `mandatory`, no expiration: the least the broker path can cost. [`Extras`] adds
//! them one by one, to tell what each costs.

use super::Target;
use anyhow::Context as _;
use bytes::Bytes;
use futures_util::StreamExt as _;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::oneshot;

/// The direct reply-to pseudo-queue of RabbitMQ.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>>;

/// What the raw client adds to a bare publish, to measure what each of Keelson's
/// request properties costs the broker (diagnostics; configuration B uses none).
#[derive(Debug, Clone, Copy, Default)]
pub struct Extras {
    /// Publisher confirms: await the broker's ack of every request.
    pub confirm: bool,
    /// `mandatory`: the broker returns what no queue took.
    pub mandatory: bool,
    /// Per-message TTL (`expiration`), as Keelson sets from the deadline.
    pub expiration_ms: Option<u64>,
    /// A 36-byte `message_id`, as Keelson's UUIDs.
    pub message_id: bool,
}

/// RPC client over one lapin channel.
#[derive(Debug)]
pub struct LapinRpc {
    _connection: Connection,
    channel: Channel,
    pending: Pending,
    next_id: AtomicU64,
    exchange: ShortString,
    routing_key: ShortString,
    body: Bytes,
    timeout: Duration,
    extras: Extras,
}

impl LapinRpc {
    /// Connect to `url` and start consuming replies.
    pub async fn new(
        url: &str,
        exchange: &str,
        routing_key: &str,
        body: Bytes,
        timeout: Duration,
        extras: Extras,
    ) -> anyhow::Result<Self> {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .context("cannot connect to the broker")?;
        let channel = connection.create_channel().await?;
        if extras.confirm {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
        }
        let mut replies = channel
            .basic_consume(
                DIRECT_REPLY_TO.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .context("cannot consume amq.rabbitmq.reply-to")?;
        let pending: Pending = Arc::default();
        let waiting = pending.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = replies.next().await {
                let waiter = delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .and_then(|id| {
                        waiting
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .remove(id.as_str())
                    });
                if let Some(tx) = waiter {
                    let _ = tx.send(delivery.data);
                }
            }
        });
        Ok(Self {
            _connection: connection,
            channel,
            pending,
            next_id: AtomicU64::new(0),
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            body,
            timeout,
            extras,
        })
    }

    fn forget(&self, id: &str) {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }
}

impl Target for LapinRpc {
    type Conn = ();

    async fn connect(&self) -> anyhow::Result<()> {
        Ok(())
    }

    async fn call(&self, _: &mut ()) -> Result<(), String> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed).to_string();
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone(), tx);
        let mut properties = BasicProperties::default()
            .with_correlation_id(id.as_str().into())
            .with_reply_to(DIRECT_REPLY_TO.into());
        if let Some(ms) = self.extras.expiration_ms {
            properties = properties.with_expiration(ms.to_string().into());
        }
        if self.extras.message_id {
            properties = properties.with_message_id(format!("{id:0>36}").into());
        }
        let options = BasicPublishOptions {
            mandatory: self.extras.mandatory,
            ..BasicPublishOptions::default()
        };
        let published = self
            .channel
            .basic_publish(
                self.exchange.clone(),
                self.routing_key.clone(),
                options,
                &self.body,
                properties,
            )
            .await;
        let confirm = match published {
            Ok(confirm) => confirm,
            Err(e) => {
                self.forget(&id);
                return Err(format!("publish: {e}"));
            }
        };
        if self.extras.confirm {
            match confirm.await {
                Ok(Confirmation::Ack(None)) => {}
                Ok(other) => {
                    self.forget(&id);
                    return Err(format!("publish not confirmed: {other:?}"));
                }
                Err(e) => {
                    self.forget(&id);
                    return Err(format!("publisher confirm: {e}"));
                }
            }
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(data)) if data == self.body => Ok(()),
            Ok(Ok(data)) => Err(format!(
                "the reply is not the echoed body ({} bytes instead of {})",
                data.len(),
                self.body.len()
            )),
            Ok(Err(_)) => Err("the reply consumer ended".to_owned()),
            Err(_) => {
                self.forget(&id);
                Err(format!("no reply within {:?}", self.timeout))
            }
        }
    }
}
