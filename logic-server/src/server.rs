//! The consume loop of a logic server, and its graceful drain.

use crate::config::LogicServerConfig;
use crate::context::ContextStore;
use crate::dispatch::{Dispatcher, Handled};
use crate::plugin::Registry;
use keelson_protocol::Transport;
use keelson_protocol::transport::{ServiceSpec, TransportError};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The transport refused to declare or consume the service queue.
    #[error("cannot start consuming service `{service}`: {source}")]
    Transport {
        /// The service.
        service: String,
        /// The cause.
        #[source]
        source: TransportError,
    },
    /// The configuration enables no handler.
    #[error("logic_server.handlers is empty: a logic server must host at least one handler")]
    NoHandlers,
}

/// A logic server, ready to start.
#[derive(Debug)]
pub struct LogicServer {
    config: LogicServerConfig,
    transport: Arc<dyn Transport>,
    dispatcher: Arc<Dispatcher>,
}

/// Live figures of a running server.
#[derive(Debug, Default)]
pub struct ServerStats {
    in_flight: AtomicUsize,
    handled: AtomicUsize,
    ready: AtomicBool,
}

impl ServerStats {
    /// Requests being handled now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
    /// Requests handled since start (replied, expired or dead-lettered).
    pub fn handled(&self) -> usize {
        self.handled.load(Ordering::Relaxed)
    }
    /// Whether the server consumes requests.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// A started server; [`RunningServer::shutdown`] drains it. Dropping the handle
/// without calling `shutdown` leaves the server running until its transport closes.
#[derive(Debug)]
pub struct RunningServer {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    stats: Arc<ServerStats>,
}

impl LogicServer {
    /// A server of `config.service` hosting the handlers of `registry`, with user
    /// contexts in `store`.
    pub fn new(
        config: LogicServerConfig,
        node_id: impl Into<String>,
        transport: Arc<dyn Transport>,
        registry: Registry,
        store: Arc<dyn ContextStore>,
    ) -> Self {
        Self {
            config,
            transport,
            dispatcher: Arc::new(Dispatcher {
                node_id: node_id.into(),
                registry,
                store,
            }),
        }
    }

    /// Declare the service queue, bind it to every enabled handler, and start
    /// consuming. Returns once the server takes requests.
    pub async fn start(self) -> Result<RunningServer, ServerError> {
        let routes = self.dispatcher.registry.names();
        if routes.is_empty() {
            return Err(ServerError::NoHandlers);
        }
        let service = self.config.service.clone();
        let spec = ServiceSpec {
            name: service.clone(),
            routes,
        };
        let err = |source| ServerError::Transport {
            service: service.clone(),
            source,
        };
        self.transport.declare_service(&spec).await.map_err(err)?;
        let concurrency = self.config.concurrency.max(1);
        let consumer = self
            .transport
            .consume(&service, concurrency)
            .await
            .map_err(err)?;
        let stats = Arc::new(ServerStats::default());
        stats.ready.store(true, Ordering::Release);
        tracing::info!(
            node = %self.dispatcher.node_id,
            %service,
            handlers = ?spec.routes,
            concurrency,
            "logic server consuming"
        );
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(consume_loop(
            consumer,
            self.dispatcher,
            usize::from(concurrency),
            Duration::from_millis(self.config.drain_timeout_ms),
            stats.clone(),
            stopped,
        ));
        Ok(RunningServer { stop, task, stats })
    }
}

impl RunningServer {
    /// Live figures.
    pub fn stats(&self) -> &Arc<ServerStats> {
        &self.stats
    }

    /// Stop taking requests, let in-flight ones finish within the drain timeout, hand
    /// the rest back to the queue, and return.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "consume loop ended abnormally");
        }
    }

    /// Wait until the consume loop ends by itself (transport closed).
    pub async fn closed(&mut self) {
        let _ = (&mut self.task).await;
    }
}

/// Counts a request as in flight for as long as it lives, including when its task is
/// aborted at the drain timeout.
struct InFlight {
    stats: Arc<ServerStats>,
}

impl InFlight {
    fn enter(stats: Arc<ServerStats>) -> Self {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        Self { stats }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn consume_loop(
    mut consumer: Box<dyn keelson_protocol::transport::Consumer>,
    dispatcher: Arc<Dispatcher>,
    concurrency: usize,
    drain_timeout: Duration,
    stats: Arc<ServerStats>,
    mut stopped: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    // Set when the `RunningServer` handle was dropped without `shutdown`: the server
    // then serves until its transport closes.
    let mut detached = false;
    loop {
        tokio::select! {
            biased;
            changed = stopped.changed(), if !detached => match changed {
                Ok(()) => break,
                Err(_) => detached = true,
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            next = consumer.next() => match next {
                None => {
                    tracing::info!("transport closed; consume loop ends");
                    break;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                }
                Some(Ok(delivery)) => {
                    // The transport's prefetch is the real cap; this guards
                    // against a transport delivering more than it should.
                    let Ok(permit) = limit.clone().acquire_owned().await else { break };
                    let dispatcher = dispatcher.clone();
                    let in_flight = InFlight::enter(stats.clone());
                    tasks.spawn(async move {
                        let outcome = dispatcher.handle(delivery).await;
                        in_flight.stats.handled.fetch_add(1, Ordering::Relaxed);
                        drop(in_flight);
                        drop(permit);
                        if outcome == Handled::DeadLettered {
                            tracing::debug!("delivery dead-lettered");
                        }
                    });
                }
            }
        }
    }
    stats.ready.store(false, Ordering::Release);
    if let Err(e) = consumer.pause().await {
        tracing::warn!(error = %e, "could not stop intake while draining");
    }
    drop(consumer);
    let in_flight = tasks.len();
    if in_flight > 0 {
        tracing::info!(in_flight, ?drain_timeout, "draining in-flight requests");
    }
    let drained = tokio::time::timeout(drain_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        // Aborting drops the unsettled deliveries, which hands them back to the
        // queue for a peer.
        tracing::warn!(
            left = tasks.len(),
            "drain timeout; handing unfinished requests back"
        );
        tasks.shutdown().await;
    }
}
