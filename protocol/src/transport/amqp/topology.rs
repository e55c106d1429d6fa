//! The broker topology: names, arguments and idempotent declarations.
//!
//! `protocol/TOPOLOGY.md` documents the same for peers written in other languages;
//! keep both in step.
//!
//! With `declare_topology = false` ([`Mode::Passive`]) the exchanges and durable
//! queues are declared passively: nothing is created, no configure right is needed,
//! and what does not exist is named in one [`TransportError::Refused`] that says how
//! to declare it (`keelson topology declare`). Bindings of a service queue to its
//! routes are still made (they need write on the queue and read on the exchange).
//!
//! Every declaration runs on a throwaway channel: a declaration the broker refuses
//! (`PRECONDITION_FAILED`, e.g. a queue that exists with another `x-queue-type`)
//! closes the channel it ran on, and must not take a channel that carries traffic
//! with it.

use super::super::TransportError;
use super::config::{AmqpConfig, QueueType};
use super::delay;
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};
use std::collections::BTreeSet;

/// The address of the direct reply-to pseudo queue (RabbitMQ).
pub(crate) const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Fanout channel names that would collide with the fixed exchanges.
const RESERVED_CHANNELS: [&str; 3] = ["requests", "dead-letter", "lease"];

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

    /// The namespace every name starts with.
    pub(crate) fn namespace(&self) -> &str {
        &self.ns
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

    /// Headers exchange that delayed messages are published to (routing key = their
    /// route); it routes each to the delay queue of its level (see `delay.rs`).
    pub(crate) fn delay_exchange(&self) -> String {
        format!("{}.delay", self.ns)
    }

    /// The delay queue holding delays of `level_s` to twice that, in seconds; it
    /// dead-letters what expires to the request exchange.
    pub(crate) fn delay_queue(&self, level_s: u32) -> String {
        format!("{}.delay.{level_s}", self.ns)
    }

    /// The queue of a service.
    pub(crate) fn service_queue(&self, service: &str) -> String {
        format!("{}.svc.{service}", self.ns)
    }

    /// The quorum queue of a lease (see `lease.rs`).
    pub(crate) fn lease_queue(&self, name: &str) -> String {
        format!("{}.lease.{name}", self.ns)
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

/// Whether a process creates the topology or only checks that it exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Declare everything, creating what is missing (`declare_topology = true`).
    Declare,
    /// Passive declarations: check that the exchanges and durable queues exist.
    Passive,
}

impl Mode {
    pub(crate) fn of(config: &AmqpConfig) -> Self {
        if config.declare_topology {
            Mode::Declare
        } else {
            Mode::Passive
        }
    }
}

/// The start of the error of a passive declaration that found something missing;
/// the supervisor tells it from other setup failures by it.
pub(crate) const MISSING_TOPOLOGY: &str = "the broker topology of namespace";

/// An exchange or a durable queue, for passive declarations.
pub(crate) enum Entity {
    Exchange(ShortString),
    Queue(ShortString),
}

/// Whether the broker refused with `404 NOT_FOUND` (a passive declaration of something
/// that does not exist).
fn is_not_found(e: &lapin::Error) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(err)
        if matches!(err.kind(), AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)))
}

/// Declare each of `entities` passively, each on a channel of its own (a 404 closes
/// the channel); fails naming every one that does not exist.
async fn check_exist(
    connection: &Connection,
    names: &Names,
    entities: Vec<Entity>,
) -> Result<(), TransportError> {
    let mut missing = Vec::new();
    for entity in entities {
        let found = on_throwaway_channel(connection, |ch| async move {
            let (what, result) = match entity {
                Entity::Exchange(name) => {
                    let options = ExchangeDeclareOptions {
                        passive: true,
                        ..ExchangeDeclareOptions::default()
                    };
                    let what = format!("exchange {name}");
                    // The broker ignores the kind of a passive declaration.
                    let result = ch
                        .exchange_declare(
                            name,
                            ExchangeKind::Direct,
                            options,
                            FieldTable::default(),
                        )
                        .await;
                    (what, result)
                }
                Entity::Queue(name) => {
                    let options = QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    };
                    let what = format!("queue {name}");
                    let result = ch
                        .queue_declare(name, options, FieldTable::default())
                        .await
                        .map(|_| ());
                    (what, result)
                }
            };
            match result {
                Ok(()) => Ok(None),
                Err(e) if is_not_found(&e) => Ok(Some(what)),
                Err(e) => Err(error(&format!("checking that {what} exists"), &e)),
            }
        })
        .await?;
        missing.extend(found);
    }
    if missing.is_empty() {
        return Ok(());
    }
    Err(TransportError::Refused(format!(
        "{MISSING_TOPOLOGY} `{ns}` is not declared: missing on this broker and vhost: \
         {list}. With `declare_topology = false` processes only check that it exists: \
         declare it once with the operator's broker user, `keelson topology declare \
         --config FILE` (and `--service NAME` for each service), or set \
         `declare_topology = true`",
        ns = names.namespace(),
        list = missing.join(", "),
    )))
}

pub(crate) fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

pub(crate) fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

pub(crate) fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// How many messages are ready in `queue`, by a passive declaration (no right
/// needed); `None` when the queue does not exist.
pub(crate) async fn ready_messages(
    connection: &Connection,
    queue: ShortString,
) -> Result<Option<u64>, TransportError> {
    on_throwaway_channel(connection, |ch| async move {
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        match ch
            .queue_declare(queue, options, FieldTable::default())
            .await
        {
            Ok(q) => Ok(Some(u64::from(q.message_count()))),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(error("counting the messages of a queue", &e)),
        }
    })
    .await
}

/// Run `f` on a fresh channel of `connection`, closed afterwards.
async fn on_throwaway_channel<T, F, Fut>(connection: &Connection, f: F) -> Result<T, TransportError>
where
    F: FnOnce(Channel) -> Fut,
    Fut: std::future::Future<Output = Result<T, TransportError>>,
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

/// Declare what every transport of the namespace shares: the request exchange, the
/// dead-letter exchanges and queue, and the delay exchange and queues (in
/// [`Mode::Passive`]: check that they exist).
pub(crate) async fn declare_base(
    connection: &Connection,
    names: &Names,
    config: &AmqpConfig,
) -> Result<(), TransportError> {
    if Mode::of(config) == Mode::Passive {
        let entities = vec![
            Entity::Exchange(short("namespace", names.requests_exchange())?),
            Entity::Exchange(short("namespace", names.dead_letter_exchange())?),
            Entity::Exchange(short("namespace", names.broker_dead_letter_exchange())?),
            Entity::Queue(short("namespace", names.dead_letter_queue())?),
        ];
        let entities = entities
            .into_iter()
            .chain(delay::entities(names)?)
            .collect();
        return check_exist(connection, names, entities).await;
    }
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
        delay::declare(&ch, names, config).await
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

/// Declare the queue of `service` (in [`Mode::Passive`]: check that it exists) and bind
/// it to the request exchange by each route.
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
    let mode = Mode::of(config);
    if mode == Mode::Passive {
        check_exist(connection, names, vec![Entity::Queue(queue.clone())]).await?;
    }
    on_throwaway_channel(connection, |ch| async move {
        if mode == Mode::Declare {
            ch.queue_declare(queue.clone(), durable(), service_queue_args(names, config))
                .await
                .map_err(|e| {
                    error(
                        &format!("declaring queue {queue} (exists with other arguments?)"),
                        &e,
                    )
                })?;
        }
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

/// Declare the fanout exchange named `exchange` (in [`Mode::Passive`]: check that it
/// exists).
pub(crate) async fn declare_fanout(
    connection: &Connection,
    names: &Names,
    config: &AmqpConfig,
    exchange: &str,
) -> Result<(), TransportError> {
    let exchange = short("fanout channel name", exchange)?;
    if Mode::of(config) == Mode::Passive {
        return check_exist(connection, names, vec![Entity::Exchange(exchange)]).await;
    }
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
