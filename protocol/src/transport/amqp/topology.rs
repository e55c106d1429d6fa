//! The broker topology: names, arguments and idempotent declarations.
//!
//! `protocol/TOPOLOGY.md` documents the same for peers written in other languages;
//! keep both in step.
//!
//! Every declaration runs on a throwaway channel: a declaration the broker refuses
//! (`PRECONDITION_FAILED`, e.g. a queue that exists with another `x-queue-type`)
//! closes the channel it ran on, and must not take a channel that carries traffic
//! with it.

use super::super::TransportError;
use super::config::{AmqpConfig, QueueType};
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};
use std::collections::BTreeSet;

/// The address of the direct reply-to pseudo queue (RabbitMQ).
pub(crate) const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Fanout channel names that would collide with the fixed exchanges.
const RESERVED_CHANNELS: [&str; 2] = ["requests", "dead-letter"];

/// The names of everything the transport declares, all under one namespace.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    ns: String,
}

impl Names {
    pub(crate) fn new(namespace: &str) -> Self {
        Self {
            ns: namespace.to_owned(),
        }
    }

    /// Direct exchange the requests are published to, routing key = route.
    pub(crate) fn requests_exchange(&self) -> String {
        format!("{}.requests", self.ns)
    }

    /// Fanout exchange that rejected messages are published to.
    pub(crate) fn dead_letter_exchange(&self) -> String {
        format!("{}.dead-letter", self.ns)
    }

    /// Headers exchange the broker dead-letters service queues to (`x-dead-letter-exchange`);
    /// only messages over the delivery limit, or rejected without requeue by a foreign
    /// peer, go on to the dead-letter queue. Expired requests match no binding and vanish.
    pub(crate) fn broker_dead_letter_exchange(&self) -> String {
        format!("{}.dead-letter.broker", self.ns)
    }

    /// The durable queue holding dead letters.
    pub(crate) fn dead_letter_queue(&self) -> String {
        format!("{}.dead-letter", self.ns)
    }

    /// The queue of a service.
    pub(crate) fn service_queue(&self, service: &str) -> String {
        format!("{}.svc.{service}", self.ns)
    }

    /// The fanout exchange of a broadcast channel.
    pub(crate) fn fanout_exchange(&self, channel: &str) -> Result<String, TransportError> {
        if RESERVED_CHANNELS
            .iter()
            .any(|r| channel == *r || channel.starts_with(&format!("{r}.")))
        {
            return Err(TransportError::Refused(format!(
                "fanout channel name `{channel}` is reserved"
            )));
        }
        Ok(format!("{}.{channel}", self.ns))
    }
}

/// `s` as an AMQP short string (at most 255 bytes), or a clear error naming `what`.
pub(crate) fn short(what: &str, s: impl Into<String>) -> Result<ShortString, TransportError> {
    let s = s.into();
    let len = s.len();
    ShortString::try_new(s).map_err(|_| {
        TransportError::Refused(format!(
            "{what} is {len} bytes long; AMQP names are at most 255 bytes"
        ))
    })
}

/// A lapin error as a transport error: what the broker refused stays `Refused`;
/// anything else means the connection is not usable.
pub(crate) fn error(context: &str, e: &lapin::Error) -> TransportError {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(_) => TransportError::Refused(format!("{context}: {e}")),
        _ => TransportError::Disconnected(format!("{context}: {e}")),
    }
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Run `f` on a fresh channel of `connection`, closed afterwards.
async fn on_throwaway_channel<F, Fut>(connection: &Connection, f: F) -> Result<(), TransportError>
where
    F: FnOnce(Channel) -> Fut,
    Fut: std::future::Future<Output = Result<(), TransportError>>,
{
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| error("opening a channel", &e))?;
    let result = f(channel.clone()).await;
    if channel.status().connected() {
        // Best effort: a channel the broker already closed needs no close.
        let _ = channel.close(200, "OK".into()).await;
    }
    result
}

/// Declare what every transport of the namespace shares: the request exchange and the
/// dead-letter exchanges and queue.
pub(crate) async fn declare_base(
    connection: &Connection,
    names: &Names,
    config: &AmqpConfig,
) -> Result<(), TransportError> {
    on_throwaway_channel(connection, |ch| async move {
        let requests = short("namespace", names.requests_exchange())?;
        ch.exchange_declare(
            requests,
            ExchangeKind::Direct,
            durable_exchange(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| error("declaring the request exchange", &e))?;
        let dlx = short("namespace", names.dead_letter_exchange())?;
        ch.exchange_declare(
            dlx.clone(),
            ExchangeKind::Fanout,
            durable_exchange(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| error("declaring the dead-letter exchange", &e))?;
        let broker_dlx = short("namespace", names.broker_dead_letter_exchange())?;
        ch.exchange_declare(
            broker_dlx.clone(),
            ExchangeKind::Headers,
            durable_exchange(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| error("declaring the broker dead-letter exchange", &e))?;
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), long(config.queue_type.as_str()));
        let dlq = short("namespace", names.dead_letter_queue())?;
        ch.queue_declare(dlq.clone(), durable(), args)
            .await
            .map_err(|e| error("declaring the dead-letter queue (another queue_type?)", &e))?;
        ch.queue_bind(
            dlq.clone(),
            dlx,
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| error("binding the dead-letter queue", &e))?;
        // What the broker dead-letters reaches the queue only for these reasons.
        for reason in ["delivery_limit", "rejected"] {
            let mut args = FieldTable::default();
            args.insert("x-match".into(), long("any-with-x"));
            args.insert("x-first-death-reason".into(), long(reason));
            ch.queue_bind(
                dlq.clone(),
                broker_dlx.clone(),
                "".into(),
                QueueBindOptions::default(),
                args,
            )
            .await
            .map_err(|e| error("binding the dead-letter queue", &e))?;
        }
        Ok(())
    })
    .await
}

/// The arguments of a service queue; identical on every declaration, or the broker
/// refuses it.
fn service_queue_args(names: &Names, config: &AmqpConfig) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long(config.queue_type.as_str()));
    args.insert(
        "x-dead-letter-exchange".into(),
        long(&names.broker_dead_letter_exchange()),
    );
    if config.queue_type == QueueType::Quorum
        && let Some(limit) = config.delivery_limit
    {
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(limit)),
        );
    }
    if let Some(ms) = config.queue_expires_ms {
        let ms = i64::try_from(ms).unwrap_or(i64::MAX).max(1);
        args.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
    }
    args
}

/// Declare the queue of `service` and bind it to the request exchange by each route.
pub(crate) async fn declare_service(
    connection: &Connection,
    names: &Names,
    config: &AmqpConfig,
    service: &str,
    routes: &BTreeSet<String>,
) -> Result<(), TransportError> {
    let queue = short("service name", names.service_queue(service))?;
    let routes = routes
        .iter()
        .map(|r| short("route", r.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    on_throwaway_channel(connection, |ch| async move {
        ch.queue_declare(queue.clone(), durable(), service_queue_args(names, config))
            .await
            .map_err(|e| {
                error(
                    &format!("declaring queue {queue} (exists with other arguments?)"),
                    &e,
                )
            })?;
        let exchange = short("namespace", names.requests_exchange())?;
        for route in routes {
            ch.queue_bind(
                queue.clone(),
                exchange.clone(),
                route.clone(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| error(&format!("binding queue {queue} to route {route}"), &e))?;
        }
        Ok(())
    })
    .await
}

/// Declare the fanout exchange named `exchange`.
pub(crate) async fn declare_fanout(
    connection: &Connection,
    exchange: &str,
) -> Result<(), TransportError> {
    let exchange = short("fanout channel name", exchange)?;
    on_throwaway_channel(connection, |ch| async move {
        ch.exchange_declare(
            exchange.clone(),
            ExchangeKind::Fanout,
            durable_exchange(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| error(&format!("declaring fanout exchange {exchange}"), &e))
    })
    .await
}

/// Delete the given queues and exchanges; what does not exist is skipped.
pub(crate) async fn delete(
    connection: &Connection,
    queues: &[String],
    exchanges: &[String],
) -> Result<(), TransportError> {
    for queue in queues {
        let queue = short("queue name", queue.clone())?;
        on_throwaway_channel(connection, |ch| async move {
            ch.queue_delete(queue.clone(), QueueDeleteOptions::default())
                .await
                .map(|_| ())
                .map_err(|e| error(&format!("deleting queue {queue}"), &e))
        })
        .await?;
    }
    for exchange in exchanges {
        let exchange = short("exchange name", exchange.clone())?;
        on_throwaway_channel(connection, |ch| async move {
            ch.exchange_delete(exchange.clone(), ExchangeDeleteOptions::default())
                .await
                .map_err(|e| error(&format!("deleting exchange {exchange}"), &e))
        })
        .await?;
    }
    Ok(())
}
