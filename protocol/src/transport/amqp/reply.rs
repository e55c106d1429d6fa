//! Replies, on connections of their own.
//!
//! A direct reply-to address names the broker node of its requester (RabbitMQ
//! encodes the requester's channel pid, with a hash of the node name, in the
//! address). RabbitMQ 3.10 crashes the publishing channel when that node is not
//! running (`{case_clause,error}` in `rabbit_channel:deliver_reply/2`) and closes
//! the whole connection with `541 INTERNAL_ERROR`. That happens by itself when a
//! requester's node stops while its requests wait in a queue, and any client can
//! cause it with a crafted `reply_to`. Published on the consumer's connection, such a
//! reply took the unacknowledged deliveries down with it, and they came back, were
//! answered again, and closed the connection again, in a loop.
//!
//! So a reply to a requester on another node than the one its delivery's connection
//! is attached to (which runs, since the delivery came through it) goes out on a
//! connection used for nothing else, one per requester node, opened on first use. A connection closed with `541` right after replies to one
//! node marks that node unreachable for [`DEAD_NODE_COOLDOWN`]: replies to it are
//! dropped meanwhile (their requester lost its connection with its node), so a node
//! that stays down costs at most one reconnection per cooldown, not one per queued
//! request. The deliveries stay on the consumer's connection and are acked as usual.

use super::config::BrokerUrl;
use super::shared::lock;
use super::topology;
use crate::transport::TransportError;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use futures_util::StreamExt;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Event};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

/// How long replies to a node whose replies crashed a connection are dropped.
pub(crate) const DEAD_NODE_COOLDOWN: Duration = Duration::from_secs(2);

/// The AMQP reply code with which RabbitMQ closes a connection whose channel crashed.
const INTERNAL_ERROR: u16 = 541;

const PREFIX: &str = "amq.rabbitmq.reply-to.";

/// The node part of a direct reply-to address (`reply@{hash}` on RabbitMQ 3.10), or
/// `None` for an address of another form (a named queue, another broker version):
/// those share one connection.
pub(crate) fn requester_node(reply_to: &str) -> Option<String> {
    let encoded = reply_to.strip_prefix(PREFIX)?;
    let pid = encoded.split('.').next()?;
    let term = STANDARD.decode(pid).ok()?;
    // External term format: 131, a pid tag (NEW_PID_EXT 88 or PID_EXT 103), then the
    // node as an atom: ATOM_UTF8_EXT 118 / ATOM_EXT 100 (2-byte length) or
    // SMALL_ATOM_UTF8_EXT 119 (1-byte length).
    let (&version, rest) = term.split_first()?;
    let (&tag, rest) = rest.split_first()?;
    if version != 131 || !matches!(tag, 88 | 103) {
        return None;
    }
    let (&atom, rest) = rest.split_first()?;
    let (len, rest) = match atom {
        100 | 118 => {
            let (len, rest) = rest.split_at_checked(2)?;
            (usize::from(u16::from_be_bytes([len[0], len[1]])), rest)
        }
        119 => {
            let (&len, rest) = rest.split_first()?;
            (usize::from(len), rest)
        }
        _ => return None,
    };
    let name = rest.get(..len)?;
    String::from_utf8(name.to_vec()).ok()
}

/// How long a reply waits, once its connection is found lost, to learn whether the
/// broker closed it with `541` (the watcher of the connection's events says so).
const VERDICT_WAIT: Duration = Duration::from_millis(200);

/// One reply connection and what its watcher concluded when it ended: `Some(true)`
/// when the broker closed it with `541` after a reply to a node that is not running.
struct Link {
    connection: Connection,
    channel: Channel,
    verdict: watch::Receiver<Option<bool>>,
}

impl Link {
    fn live(&self) -> bool {
        self.connection.status().connected() && self.channel.status().connected()
    }

    /// Whether it was lost to a `541`, waiting (bounded) for the watcher to say.
    async fn crashed(&mut self) -> bool {
        let verdict = tokio::time::timeout(VERDICT_WAIT, self.verdict.wait_for(Option::is_some));
        matches!(verdict.await, Ok(Ok(v)) if *v == Some(true))
    }
}

/// One requester node's reply connection.
#[derive(Default)]
struct Route {
    link: tokio::sync::Mutex<Option<Link>>,
    /// Replies to this node are dropped until then.
    dead_until: Mutex<Option<Instant>>,
}

impl Route {
    fn dead(&self) -> bool {
        lock(&self.dead_until).is_some_and(|until| Instant::now() < until)
    }

    fn mark_dead(&self, node: Option<&str>) {
        warn!(
            node = ?node,
            cooldown = ?DEAD_NODE_COOLDOWN,
            "the broker closed a reply connection (541) after replies to a node that is not running; replies to it are dropped for a while"
        );
        *lock(&self.dead_until) = Some(Instant::now() + DEAD_NODE_COOLDOWN);
    }
}

/// The reply connections of a transport.
pub(crate) struct Replies {
    brokers: Vec<BrokerUrl>,
    name: String,
    connect_timeout: Duration,
    routes: Mutex<HashMap<Option<String>, Arc<Route>>>,
}

impl fmt::Debug for Replies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Replies")
            .field("routes", &lock(&self.routes).len())
            .finish()
    }
}

impl Replies {
    pub(crate) fn new(brokers: Vec<BrokerUrl>, name: String, connect_timeout: Duration) -> Self {
        Self {
            brokers,
            name,
            connect_timeout,
            routes: Mutex::default(),
        }
    }

    /// Publish `payload` to `reply_to`, whose requester is on `node` (its
    /// [`requester_node`]), (default exchange, not mandatory, no confirm:
    /// a reply is at most once). Dropped without error while the requester's node is
    /// marked unreachable.
    ///
    /// Replies to one node go one at a time through its route: a connection found
    /// lost is only replaced once it is known whether a `541` closed it, so replies
    /// queued behind the one that crashed it are dropped rather than each opening a
    /// connection that the broker closes again.
    pub(crate) async fn publish(
        &self,
        node: Option<String>,
        reply_to: &ShortString,
        properties: BasicProperties,
        payload: &[u8],
    ) -> Result<(), TransportError> {
        let route = lock(&self.routes).entry(node.clone()).or_default().clone();
        // The lock is held to check and replace the connection, not to publish:
        // replies to one node go out concurrently on its channel.
        let (channel, mut verdict) = {
            let mut link = route.link.lock().await;
            if let Some(lost) = link.as_mut().filter(|l| !l.live()) {
                if lost.crashed().await && !route.dead() {
                    route.mark_dead(node.as_deref());
                }
                *link = None;
            }
            if route.dead() {
                debug!(node = ?node, "dropping a reply to a node that is not running");
                return Ok(());
            }
            let current = match link.as_mut() {
                Some(l) => l,
                None => link.insert(self.open(&route, node.as_deref()).await?),
            };
            (current.channel.clone(), current.verdict.clone())
        };
        let published = channel
            .basic_publish(
                "".into(),
                reply_to.clone(),
                BasicPublishOptions::default(),
                payload,
                properties,
            )
            .await;
        let Err(e) = published else { return Ok(()) };
        // The connection died under this reply: if a 541 closed it, its requester's
        // node is not running and nobody awaits the reply.
        let crashed = tokio::time::timeout(VERDICT_WAIT, verdict.wait_for(Option::is_some));
        if matches!(crashed.await, Ok(Ok(v)) if *v == Some(true)) {
            return Ok(());
        }
        Err(topology::error("publishing a reply", &e))
    }

    async fn open(&self, route: &Arc<Route>, node: Option<&str>) -> Result<Link, TransportError> {
        let mut failures = Vec::new();
        for broker in &self.brokers {
            let properties =
                ConnectionProperties::default().with_connection_name(self.name.clone().into());
            let attempt = broker.connect(properties);
            let connection = match tokio::time::timeout(self.connect_timeout, attempt).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    failures.push(format!("{}: {e}", broker.redacted));
                    continue;
                }
                Err(_) => {
                    failures.push(format!("{}: no answer", broker.redacted));
                    continue;
                }
            };
            let events = connection.events_listener();
            let channel = match connection.create_channel().await {
                Ok(ch) => ch,
                Err(e) => {
                    failures.push(format!("{}: {e}", broker.redacted));
                    continue;
                }
            };
            let (tx, verdict) = watch::channel(None);
            tokio::spawn(watch_link(
                Arc::downgrade(route),
                node.map(str::to_owned),
                events,
                tx,
            ));
            return Ok(Link {
                connection,
                channel,
                verdict,
            });
        }
        Err(TransportError::Disconnected(format!(
            "no broker reachable for replies: {}",
            failures.join("; ")
        )))
    }

    /// Close every reply connection.
    pub(crate) async fn close(&self) {
        let routes: Vec<Arc<Route>> = lock(&self.routes).values().cloned().collect();
        for route in routes {
            if let Some(link) = route.link.lock().await.take()
                && link.connection.status().connected()
            {
                let _ = link.connection.close(200, "transport closed".into()).await;
            }
        }
    }
}

/// Watch a reply connection until it ends, and say why: closed by the broker with
/// `541` (the replies to its node crashed it: that node is marked unreachable for
/// a while) or otherwise.
async fn watch_link(
    route: std::sync::Weak<Route>,
    node: Option<String>,
    events: impl futures_util::Stream<Item = Event>,
    verdict: watch::Sender<Option<bool>>,
) {
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        let Event::Error(e) = event else { continue };
        let crashed = matches!(e.kind(), lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == INTERNAL_ERROR);
        if crashed && let Some(route) = route.upgrade() {
            route.mark_dead(node.as_deref());
        }
        verdict.send_replace(Some(crashed));
        if crashed {
            return;
        }
    }
    verdict.send_replace(Some(false));
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_node_is_read_from_a_direct_reply_to_address() {
        // As RabbitMQ 3.10.8 wrote it on this machine.
        let address = "amq.rabbitmq.reply-to.g1h2AA1yZXBseUA5MjQ4ODg0AABYbwAAAABrC9cP.cLL8yL9naXce2cW5CQWZRg==";
        assert_eq!(requester_node(address).as_deref(), Some("reply@9248884"));
        for other in [
            "amq.rabbitmq.reply-to",
            "amq.rabbitmq.reply-to.!!!.x",
            "amq.rabbitmq.reply-to.AAAA.x",
            "some-queue",
            "amq.rabbitmq.reply-to.g1h2AA1y.x",
        ] {
            assert_eq!(requester_node(other), None, "{other}");
        }
    }
}
