//! The AMQP transport: the mesh across processes and machines on RabbitMQ (lapin).
//!
//! Chosen by `kind = "amqp"` in the `[transport]` section ([`AmqpConfig`]). The
//! topology it declares, and the message properties it uses, are documented in
//! `protocol/TOPOLOGY.md` so that a peer in another language can join.
//!
//! How the parts fit:
//!
//! * `connection.rs`: the supervisor task owning the connection; reconnects through
//!   the URL list and declares the topology again before traffic resumes;
//! * `topology.rs`: names, arguments, idempotent declarations;
//! * `rpc.rs`: requests (confirms, `mandatory`, expiry) and direct reply-to;
//! * `enqueue.rs`: background work (persistent, confirmed) and `delay.rs`, the delay
//!   queues that hold delayed messages until they expire onto their route;
//! * `consumer.rs` and `settle.rs`: competing consumers, ack/requeue/reject;
//! * `reply.rs`: replies, on connections of their own (one per requester node);
//! * `fanout.rs`: broadcast and subscriptions;
//! * `shared.rs`: the state they share; `headers.rs`: header conversion;
//! * `tls.rs` (feature `tls`): the rustls connector of `amqps://` URLs, and TLS
//!   failures explained in terms of the settings.
//!
//! Consumers and subscriptions handed out survive reconnections: they detach from a
//! lost connection and attach to the next one by themselves. While disconnected,
//! `request` fails at once with [`RequestError::Unavailable`] and `is_ready` is false.

mod config;
mod connection;
mod consumer;
mod delay;
mod enqueue;
mod fanout;
mod headers;
mod lease;
mod origin;
mod reply;
mod rpc;
mod settle;
mod shared;
#[cfg(feature = "tls")]
mod tls;
mod topology;

pub use config::{AmqpConfig, QueueType, redact};

use super::{
    Consumer, Message, Publisher, RequestError, ServiceSpec, Subscription, Transport,
    TransportError,
};
use async_trait::async_trait;
use bytes::Bytes;
use shared::{Shared, lock};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::warn;

/// How long `close` waits for the connection to close cleanly.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// A transport on a RabbitMQ broker. Clones share one connection; dropping the last
/// clone closes it, as [`Transport::close`] does.
#[derive(Clone)]
pub struct AmqpTransport {
    handle: Arc<Handle>,
}

/// Owned by the [`AmqpTransport`] clones only, so that dropping the last one stops
/// the supervisor (consumers and the supervisor hold [`Shared`], not this).
struct Handle {
    shared: Arc<Shared>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.close();
    }
}

impl fmt::Debug for AmqpTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = &self.handle.shared;
        f.debug_struct("AmqpTransport")
            .field("namespace", &shared.config.namespace)
            .field("brokers", &shared.brokers)
            .field("ready", &shared.is_ready())
            .finish()
    }
}

impl AmqpTransport {
    /// Start the transport and wait until it is connected, or until every URL failed
    /// once (then the error lists why each did, and nothing keeps running).
    ///
    /// `node_id` names this process in the broker's connection list.
    pub async fn connect(config: AmqpConfig, node_id: &str) -> Result<Self, TransportError> {
        let (transport, first_round) = Self::spawn(config, node_id)?;
        match first_round.await {
            Ok(Ok(())) => Ok(transport),
            Ok(Err(failure)) => {
                transport.close().await;
                Err(match failure.missing_topology {
                    // The message says what is missing and how to declare it.
                    Some(missing) => TransportError::Refused(
                        missing
                            .strip_prefix("broker refused the operation: ")
                            .unwrap_or(&missing)
                            .to_owned(),
                    ),
                    None => TransportError::Disconnected(format!(
                        "no broker reachable: {}",
                        failure.why
                    )),
                })
            }
            Err(_) => Err(TransportError::Closed),
        }
    }

    /// Start the transport without waiting: it connects in the background and
    /// [`Transport::is_ready`] tells when it can carry traffic. Fails only on invalid
    /// settings, or outside a tokio runtime.
    pub fn start(config: AmqpConfig, node_id: &str) -> Result<Self, TransportError> {
        Self::spawn(config, node_id).map(|(transport, _)| transport)
    }

    fn spawn(
        config: AmqpConfig,
        node_id: &str,
    ) -> Result<
        (
            Self,
            oneshot::Receiver<Result<(), connection::RoundFailure>>,
        ),
        TransportError,
    > {
        let brokers = config.brokers()?;
        check_one_user(&brokers)?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            TransportError::Disconnected("the AMQP transport needs a tokio runtime".into())
        })?;
        let shared = Arc::new(Shared::new(config, node_id, brokers));
        let (tx, rx) = oneshot::channel();
        let supervisor = runtime.spawn(connection::supervise(shared.clone(), tx));
        let handle = Arc::new(Handle {
            shared,
            supervisor: Mutex::new(Some(supervisor)),
        });
        Ok((Self { handle }, rx))
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// The namespace every exchange and queue name starts with.
    pub fn namespace(&self) -> &str {
        &self.shared().config.namespace
    }

    /// Declare the namespace's topology, creating what is missing, whatever
    /// `declare_topology` says: the base (request and dead-letter exchanges, the
    /// dead-letter queue and its bindings, the delay exchange and queues), the queues of `services` with the
    /// arguments their logic servers use (unbound: each server binds its own routes),
    /// and the fanout exchanges of `channels`. Idempotent. `keelson topology declare`
    /// runs it with the operator's broker user, so that processes with
    /// `declare_topology = false` need no configure right on any of it. Returns the
    /// names declared.
    pub async fn declare_topology(
        &self,
        services: &[String],
        channels: &[&str],
    ) -> Result<Vec<String>, TransportError> {
        let shared = self.shared();
        let link = shared
            .wait_link_within(shared.config.connect_timeout())
            .await
            .ok_or_else(|| TransportError::Disconnected("not connected to a broker".into()))?;
        let config = AmqpConfig {
            declare_topology: true,
            ..shared.config.clone()
        };
        let names = &shared.names;
        let connection = &link.connection;
        topology::declare_base(connection, names, &config).await?;
        let mut declared = vec![
            names.requests_exchange(),
            names.dead_letter_exchange(),
            names.broker_dead_letter_exchange(),
            format!("{} (queue)", names.dead_letter_queue()),
            names.delay_exchange(),
        ];
        declared.extend(
            delay::LEVELS_S
                .iter()
                .map(|&level| format!("{} (queue)", names.delay_queue(level))),
        );
        for service in services {
            topology::declare_service(connection, names, &config, service, &Default::default())
                .await?;
            declared.push(format!("{} (queue)", names.service_queue(service)));
        }
        for channel in channels {
            let exchange = names.fanout_exchange(channel)?;
            topology::declare_fanout(connection, names, &config, &exchange).await?;
            declared.push(exchange);
        }
        Ok(declared)
    }

    /// Close the transport, then delete every queue and exchange it declared: its
    /// service queues, the dead-letter queue and exchanges, the delay queues and
    /// exchange, the request exchange and its fanout exchanges (subscription queues go with the connection). For tests
    /// and ephemeral meshes: other transports of the same namespace lose them too.
    pub async fn delete_topology(&self) -> Result<(), TransportError> {
        // Closed first, so that no consumer of this transport declares them again.
        self.close().await;
        let shared = self.shared();
        let names = &shared.names;
        let (mut queues, mut exchanges) = {
            let registry = lock(&shared.registry);
            let queues: Vec<String> = registry
                .services
                .keys()
                .map(|s| names.service_queue(s))
                .chain(registry.leases.iter().cloned())
                .collect();
            (queues, registry.fanouts.iter().cloned().collect::<Vec<_>>())
        };
        queues.push(names.dead_letter_queue());
        let (delay_queues, delay_exchange) = delay::names_to_delete(names);
        queues.extend(delay_queues);
        exchanges.extend([
            names.requests_exchange(),
            names.dead_letter_exchange(),
            names.broker_dead_letter_exchange(),
            delay_exchange,
        ]);
        let connection = connection::connect_once(shared)
            .await
            .map_err(|why| TransportError::Disconnected(format!("no broker reachable: {why}")))?;
        let result = topology::delete(&connection, &queues, &exchanges).await;
        let _ = connection.close(200, "OK".into()).await;
        result
    }
}

/// Every URL must name the same broker user: it is the `user_id` the requests carry,
/// which the broker checks against the connection's user.
fn check_one_user(brokers: &[config::BrokerUrl]) -> Result<(), TransportError> {
    let mut users = brokers.iter().map(|b| &b.uri.authority.userinfo.username);
    let first = users.next();
    if let Some(first) = first {
        if first.is_empty() || first.len() > 255 {
            return Err(TransportError::Refused(format!(
                "invalid [transport] settings for amqp: the broker user in `urls` must be 1 to 255 bytes long, got {} bytes",
                first.len()
            )));
        }
        if users.any(|u| u != first) {
            return Err(TransportError::Refused(
                "invalid [transport] settings for amqp: every URL in `urls` must name the same broker user (requests carry it as their validated `user_id`)"
                    .into(),
            ));
        }
    }
    Ok(())
}

#[async_trait]
impl Transport for AmqpTransport {
    async fn declare_service(&self, service: &ServiceSpec) -> Result<(), TransportError> {
        let shared = self.shared();
        if shared.is_closed() {
            return Err(TransportError::Closed);
        }
        // Checked before it is remembered: a bad name must not poison reconnections.
        topology::short("service name", shared.names.service_queue(&service.name))?;
        for route in &service.routes {
            topology::short("route", route.clone())?;
        }
        let (before, routes) = {
            let mut registry = lock(&shared.registry);
            let before = registry.services.get(&service.name).cloned();
            let routes = registry.services.entry(service.name.clone()).or_default();
            routes.extend(service.routes.iter().cloned());
            (before, routes.clone())
        };
        // Remembered: declared again on every connection, this one included once up.
        let link = shared
            .wait_link_within(shared.config.connect_timeout())
            .await
            .ok_or_else(|| {
                TransportError::Disconnected(format!(
                    "not connected to a broker; service {} will be declared on connection",
                    service.name
                ))
            })?;
        let declared = topology::declare_service(
            &link.connection,
            &shared.names,
            &shared.config,
            &service.name,
            &routes,
        )
        .await;
        if let Err(TransportError::Refused(_)) = &declared {
            // Refused (no right, or missing where only checked): forgotten again,
            // or every reconnection would fail on it and never come up.
            let mut registry = lock(&shared.registry);
            match before {
                Some(before) => registry.services.insert(service.name.clone(), before),
                None => registry.services.remove(&service.name),
            };
        }
        declared
    }

    async fn request(
        &self,
        route: &str,
        message: Message,
        deadline: Instant,
    ) -> Result<Bytes, RequestError> {
        rpc::request(self.shared(), route, message, deadline).await
    }

    async fn enqueue(
        &self,
        route: &str,
        message: Message,
        delay: Duration,
    ) -> Result<(), RequestError> {
        enqueue::enqueue(self.shared(), route, message, delay).await
    }

    async fn consume(
        &self,
        service: &str,
        prefetch: u16,
    ) -> Result<Box<dyn Consumer>, TransportError> {
        let shared = self.shared();
        if shared.is_closed() {
            return Err(TransportError::Closed);
        }
        if !lock(&shared.registry).services.contains_key(service) {
            return Err(TransportError::UnknownService(service.to_owned()));
        }
        let consumer =
            consumer::AmqpConsumer::open(shared.clone(), Some(service.to_owned()), prefetch)
                .await?;
        Ok(Box::new(consumer))
    }

    async fn broadcast(&self, channel: &str, message: Message) -> Result<(), TransportError> {
        fanout::broadcast(self.shared(), channel, message).await
    }

    async fn subscribe(&self, channel: &str) -> Result<Box<dyn Subscription>, TransportError> {
        let shared = self.shared();
        if shared.is_closed() {
            return Err(TransportError::Closed);
        }
        Ok(Box::new(
            fanout::AmqpSubscription::open(shared.clone(), channel).await?,
        ))
    }

    async fn lease(&self, name: &str) -> Result<Box<dyn super::Lease>, TransportError> {
        let shared = self.shared();
        if shared.is_closed() {
            return Err(TransportError::Closed);
        }
        super::lease::check_lease_name(name).map_err(TransportError::Refused)?;
        Ok(Box::new(lease::AmqpLease::start(shared.clone(), name)?))
    }

    async fn consume_dead_letters(
        &self,
        prefetch: u16,
    ) -> Result<Box<dyn Consumer>, TransportError> {
        let shared = self.shared();
        if shared.is_closed() {
            return Err(TransportError::Closed);
        }
        Ok(Box::new(
            consumer::AmqpConsumer::open(shared.clone(), None, prefetch).await?,
        ))
    }

    async fn dead_letters_waiting(&self) -> Result<Option<u64>, TransportError> {
        let shared = self.shared();
        if shared.is_closed() {
            return Err(TransportError::Closed);
        }
        // Asked now, not after a reconnection: a caller polls, and a figure that
        // comes late is worse than none.
        let link = shared
            .live_link()
            .ok_or_else(|| TransportError::Disconnected("not connected to a broker".into()))?;
        let queue = topology::short("namespace", shared.names.dead_letter_queue())?;
        topology::ready_messages(&link.connection, queue).await
    }

    fn publisher(&self) -> Publisher {
        Publisher::User(self.shared().broker_user.clone())
    }

    fn is_ready(&self) -> bool {
        self.shared().is_ready()
    }

    async fn close(&self) {
        self.shared().close();
        self.shared().replies.close().await;
        let supervisor = lock(&self.handle.supervisor).take();
        if let Some(task) = supervisor
            && tokio::time::timeout(CLOSE_GRACE, task).await.is_err()
        {
            warn!("the broker connection did not close within {CLOSE_GRACE:?}");
        }
    }
}
