//! Connection supervision: connect, watch, reconnect.
//!
//! One supervisor task per transport owns the connection. It tries the configured
//! URLs in order (logging each one it skips), declares the topology again (the base,
//! then every service and fanout channel declared so far), opens the channels that
//! carry requests and publications, and only then publishes the new [`Link`]: a
//! live link always has its topology. On connection loss the link is marked lost at
//! once (requests waiting on it fail with `Unavailable`, consumers and subscriptions
//! detach and wait for the next link) and the next URL is tried after a short delay.
//!
//! lapin's own auto-recovery is deliberately not used: it is young (lapin#450), it
//! does not recover a channel the broker closed, and it cannot move to another URL.

use super::config::BrokerUrl;
use super::rpc;
use super::shared::{Shared, lock};
use super::topology::{self, DIRECT_REPLY_TO};
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Event};
use std::collections::HashSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

/// One live connection and the channels the transport keeps on it.
#[derive(Debug)]
pub(crate) struct Link {
    pub(crate) connection: Connection,
    /// Publishes requests (confirm mode) and consumes their replies by direct
    /// reply-to: both must happen on this one channel.
    pub(crate) rpc: Channel,
    /// Publishes broadcasts and dead letters (confirm mode).
    pub(crate) publisher: Channel,
    /// Fanout exchanges declared on this connection.
    pub(crate) fanouts: Mutex<HashSet<String>>,
    /// Which broker, for logs.
    pub(crate) broker: String,
    /// The node part of this connection's own direct reply-to addresses (see
    /// `reply.rs`): replies to requesters on this node are safe on any channel of it.
    pub(crate) reply_node: Option<Arc<str>>,
    lost: watch::Sender<Option<String>>,
}

impl Link {
    /// Mark this connection unusable: everything waiting on it gives up or moves on.
    pub(crate) fn mark_lost(&self, why: impl Into<String>) {
        let why = why.into();
        self.lost.send_if_modified(|lost| {
            if lost.is_none() {
                *lost = Some(why);
                true
            } else {
                false
            }
        });
    }

    /// Publish on the confirm-mode `publisher` channel to `exchange` (routing key
    /// "") and wait for the broker's confirm. `what` names the message in errors.
    pub(crate) async fn publish_confirmed(
        &self,
        exchange: lapin::types::ShortString,
        payload: &[u8],
        properties: lapin::BasicProperties,
        what: &str,
    ) -> Result<(), crate::transport::TransportError> {
        self.publish_confirmed_to(exchange, "".into(), payload, properties, what)
            .await
    }

    /// [`Link::publish_confirmed`] with a routing key.
    pub(crate) async fn publish_confirmed_to(
        &self,
        exchange: lapin::types::ShortString,
        routing_key: lapin::types::ShortString,
        payload: &[u8],
        properties: lapin::BasicProperties,
        what: &str,
    ) -> Result<(), crate::transport::TransportError> {
        let confirm = self
            .publisher
            .basic_publish(
                exchange,
                routing_key,
                lapin::options::BasicPublishOptions::default(),
                payload,
                properties,
            )
            .await
            .map_err(|e| {
                self.mark_lost(format!("publishing a {what}: {e}"));
                super::topology::error(&format!("publishing a {what}"), &e)
            })?;
        match confirm.await {
            Ok(lapin::Confirmation::Nack(_)) => Err(crate::transport::TransportError::Refused(
                format!("the broker did not accept the {what} (nack)"),
            )),
            Ok(_) => Ok(()),
            Err(e) => {
                self.mark_lost(format!("awaiting a {what} confirm: {e}"));
                Err(super::topology::error(
                    &format!("awaiting the {what} confirm"),
                    &e,
                ))
            }
        }
    }

    pub(crate) fn is_lost(&self) -> bool {
        self.lost.borrow().is_some()
    }

    /// Resolves once the link is lost. Cancel-safe.
    pub(crate) async fn lost(&self) {
        let mut rx = self.lost.subscribe();
        // The sender lives in `self`, so waiting cannot fail.
        let _ = rx.wait_for(Option::is_some).await;
    }

    fn lost_reason(&self) -> String {
        self.lost.borrow().clone().unwrap_or_default()
    }
}

/// Why no URL of a round of connection attempts could be used.
#[derive(Debug)]
pub(crate) struct RoundFailure {
    /// Every URL's failure, for the log and the error.
    pub(crate) why: String,
    /// A broker answered, but the topology that passive declarations check is missing
    /// there: a setup step to run, not a broker to wait for.
    pub(crate) missing_topology: Option<String>,
}

/// Why a connection could not be set up.
struct SetupError {
    why: String,
    missing_topology: bool,
}

impl From<String> for SetupError {
    fn from(why: String) -> Self {
        Self {
            why,
            missing_topology: false,
        }
    }
}

/// How long declaring the topology and opening the channels may take on a connection.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

type Events = Pin<Box<dyn futures_util::Stream<Item = Event> + Send>>;

/// Open a connection to `broker`, give it the whole topology, and open the
/// transport's channels.
async fn open(shared: &Arc<Shared>, broker: &BrokerUrl) -> Result<(Arc<Link>, Events), SetupError> {
    let properties = ConnectionProperties::default().with_connection_name(
        format!("keelson {} ({})", shared.node_id, shared.config.namespace).into(),
    );
    let timeout = shared.config.connect_timeout();
    let connecting = broker.connect(properties);
    let connection = tokio::time::timeout(timeout, connecting)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))??;
    // Subscribe before anything can fail, so that no error event is missed.
    let events: Events = Box::pin(connection.events_listener());
    // A broker that answered but is slow (loaded) gets more time; a dead socket
    // fails the declarations within two heartbeats anyway.
    let link = tokio::time::timeout(SETUP_TIMEOUT, set_up(shared, broker, connection))
        .await
        .map_err(|_| format!("declaring the topology took over {SETUP_TIMEOUT:?}"))??;
    Ok((link, events))
}

/// Give a new connection the whole topology and open the transport's channels.
async fn set_up(
    shared: &Arc<Shared>,
    broker: &BrokerUrl,
    connection: Connection,
) -> Result<Arc<Link>, SetupError> {
    let (services, fanouts) = {
        let registry = lock(&shared.registry);
        (registry.services.clone(), registry.fanouts.clone())
    };
    let declared = async {
        topology::declare_base(&connection, &shared.names, &shared.config).await?;
        for (service, routes) in &services {
            topology::declare_service(&connection, &shared.names, &shared.config, service, routes)
                .await?;
        }
        for exchange in &fanouts {
            topology::declare_fanout(&connection, &shared.names, &shared.config, exchange).await?;
        }
        Ok::<_, super::super::TransportError>(())
    };
    if let Err(e) = declared.await {
        let missing_topology = matches!(&e, super::super::TransportError::Refused(why)
            if why.starts_with(topology::MISSING_TOPOLOGY));
        // Not left open: the supervisor moves on to another URL or waits.
        let _ = connection.close(200, "OK".into()).await;
        return Err(SetupError {
            why: e.to_string(),
            missing_topology,
        });
    }
    let rpc = confirm_channel(&connection).await?;
    // Direct reply-to: consume before the first publish, on the publishing channel.
    let replies = rpc
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
        .map_err(|e| format!("consuming {DIRECT_REPLY_TO}: {e}"))?;
    let publisher = confirm_channel(&connection).await?;
    let reply_node = own_reply_node(&connection, &rpc).await;
    if reply_node.is_none() {
        debug!(
            "could not learn this connection's reply node; every reply takes a connection of its own"
        );
    }
    let link = Arc::new(Link {
        connection,
        rpc,
        publisher,
        fanouts: Mutex::new(fanouts.into_iter().collect()),
        broker: broker.redacted.clone(),
        reply_node,
        lost: watch::Sender::new(None),
    });
    tokio::spawn(rpc::read_replies(shared.clone(), link.clone(), replies));
    Ok(link)
}

/// The node part of this connection's direct reply-to addresses: a probe published on
/// `rpc` (which consumes direct reply-to) with `reply_to` set, to a queue of the
/// connection's own, comes back with the address the broker made of it. The queue is
/// declared and read on a channel of its own, so that a refusal cannot close `rpc`.
async fn own_reply_node(connection: &Connection, rpc: &Channel) -> Option<Arc<str>> {
    use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
    let probe = connection.create_channel().await.ok()?;
    let node = async {
        let queue = probe
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .ok()?;
        rpc.basic_publish(
            "".into(),
            queue.name().clone(),
            BasicPublishOptions::default(),
            b"",
            lapin::BasicProperties::default().with_reply_to(DIRECT_REPLY_TO.into()),
        )
        .await
        .ok()?
        .await
        .ok()?;
        let got = probe
            .basic_get(queue.name().clone(), BasicGetOptions { no_ack: true })
            .await
            .ok()??;
        let reply_to = got.delivery.properties.reply_to().clone()?;
        super::reply::requester_node(reply_to.as_str()).map(Arc::from)
    }
    .await;
    if probe.status().connected() {
        let _ = probe.close(200, "OK".into()).await;
    }
    node
}

async fn confirm_channel(connection: &Connection) -> Result<Channel, String> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| format!("opening a channel: {e}"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| format!("enabling publisher confirms: {e}"))?;
    Ok(channel)
}

/// Wait until `link` is lost or the transport closed; returns why.
async fn watch_link(shared: &Shared, link: &Link, mut events: Events) -> String {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = shared.closed() => return "transport closed".into(),
            () = link.lost() => return link.lost_reason(),
            event = events.next() => match event {
                // Channel errors are reported here too; only a dead connection counts.
                Some(Event::Error(e)) if !link.connection.status().connected() => {
                    return e.to_string();
                }
                Some(Event::Error(e)) => debug!(error = %e, "a channel of the broker connection failed"),
                Some(Event::ConnectionBlocked(why)) => {
                    warn!("the broker {} blocks publishing: {why}", link.broker);
                }
                Some(Event::ConnectionUnblocked) => info!("the broker {} unblocked publishing", link.broker),
                Some(_) => {}
                None => return "connection event stream ended".into(),
            },
            _ = tick.tick() => {
                if !link.connection.status().connected() {
                    return "connection no longer connected".into();
                }
            }
        }
    }
}

/// The supervisor task: connects, watches, reconnects, until the transport closes.
///
/// `first_round` learns whether one of the URLs answered in the first round of
/// attempts (or why none did).
pub(crate) async fn supervise(
    shared: Arc<Shared>,
    first_round: oneshot::Sender<Result<(), RoundFailure>>,
) {
    let mut first_round = Some(first_round);
    // Resolved here, once: the process's recorder (if any) is installed by now.
    let connected_gauge = metrics::gauge!("keelson_broker_connected");
    let reconnections = metrics::counter!("keelson_broker_reconnections_total");
    let mut connections_made = 0u64;
    connected_gauge.set(0.0);
    let count = shared.brokers.len();
    let mut start = 0;
    let mut backoff = shared.config.backoff();
    'supervise: while !shared.is_closed() {
        let mut failures = Vec::new();
        let mut missing_topology = None;
        let mut connected = None;
        for k in 0..count {
            let index = (start + k) % count;
            let Some(broker) = shared.brokers.get(index) else {
                continue;
            };
            let outcome = tokio::select! {
                outcome = open(&shared, broker) => outcome,
                () = shared.closed() => break 'supervise,
            };
            match outcome {
                Ok(opened) => {
                    connected = Some((index, opened));
                    break;
                }
                Err(SetupError {
                    why,
                    missing_topology: missing,
                }) => {
                    warn!("skipping broker {}: {why}", broker.redacted);
                    if missing {
                        missing_topology.get_or_insert_with(|| why.clone());
                    }
                    failures.push(format!("{}: {why}", broker.redacted));
                }
            }
        }
        let Some((index, (link, events))) = connected else {
            let delay = backoff
                .next()
                .unwrap_or(Duration::from_millis(shared.config.reconnect_max_ms));
            warn!("no broker reachable; trying again in {delay:?}");
            if let Some(tx) = first_round.take() {
                let _ = tx.send(Err(RoundFailure {
                    why: failures.join("; "),
                    missing_topology,
                }));
            }
            tokio::select! {
                () = tokio::time::sleep(delay) => continue,
                () = shared.closed() => break,
            }
        };
        info!(
            "connected to broker {} (namespace {})",
            link.broker, shared.config.namespace
        );
        backoff = shared.config.backoff();
        shared.set_link(Some(link.clone()));
        connected_gauge.set(1.0);
        if connections_made > 0 {
            reconnections.increment(1);
        }
        connections_made += 1;
        if let Some(tx) = first_round.take() {
            let _ = tx.send(Ok(()));
        }
        let why = watch_link(&shared, &link, events).await;
        link.mark_lost(why.clone());
        shared.set_link(None);
        connected_gauge.set(0.0);
        if shared.is_closed() {
            close_connection(&link).await;
            break;
        }
        warn!(
            "lost the connection to broker {}: {why}; reconnecting",
            link.broker
        );
        // Not awaited: a half-dead socket may take long to close.
        tokio::spawn(async move { close_connection(&link).await });
        start = (index + 1) % count;
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(shared.config.reconnect_min_ms)) => {}
            () = shared.closed() => break,
        }
    }
    shared.set_link(None);
    connected_gauge.set(0.0);
    debug!(
        "supervisor of namespace {} stopped",
        shared.config.namespace
    );
}

async fn close_connection(link: &Link) {
    if link.connection.status().connected() {
        let closing = link.connection.close(200, "transport closed".into());
        if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(2), closing).await {
            debug!(error = %e, "closing the broker connection");
        }
    }
}

/// Open a short-lived connection to the first broker that answers (used to delete the
/// topology after the transport closed).
pub(crate) async fn connect_once(shared: &Shared) -> Result<Connection, String> {
    let mut failures = Vec::new();
    for broker in &shared.brokers {
        let attempt = broker.connect(ConnectionProperties::default());
        match tokio::time::timeout(shared.config.connect_timeout(), attempt).await {
            Ok(Ok(connection)) => return Ok(connection),
            Ok(Err(e)) => failures.push(format!("{}: {e}", broker.redacted)),
            Err(_) => failures.push(format!("{}: no answer", broker.redacted)),
        }
    }
    Err(failures.join("; "))
}
