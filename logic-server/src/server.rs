//! Starting and stopping a logic server.

use crate::config::LogicServerConfig;
use crate::consume::{ConsumeLoop, WindowSettings};
use crate::context::ContextStore;
use crate::dispatch::{Dispatcher, Limits};
use crate::governor::WindowControl;
use crate::monitor::Monitor;
use crate::plugin::Registry;
use crate::resource::Resources;
pub use crate::stats::ServerStats;
use keelson_protocol::Transport;
use keelson_protocol::control::ClusterView;
use keelson_protocol::transport::{Publisher, ServiceSpec, TransportError};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

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
    /// Settings that do not fit together.
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// A logic server, ready to start.
#[derive(Debug)]
pub struct LogicServer {
    config: LogicServerConfig,
    transport: Arc<dyn Transport>,
    dispatcher: Arc<Dispatcher>,
    version: String,
}

/// A started server; [`RunningServer::shutdown`] drains it. Dropping the handle
/// without calling `shutdown` leaves the server running until its transport closes.
#[derive(Debug)]
pub struct RunningServer {
    stop: watch::Sender<bool>,
    abort: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    monitor_task: tokio::task::JoinHandle<()>,
    listener_task: tokio::task::JoinHandle<()>,
    monitor: Arc<Monitor>,
    stats: Arc<ServerStats>,
    resources: Arc<Resources>,
    jobs: Option<crate::jobs::JobsHandle>,
    /// Stops the heartbeats, which go on while jobs drain.
    beats_stop: watch::Sender<bool>,
    /// The singletons and the scheduler: candidates for their leases.
    leased: Vec<crate::leased::Leased>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("service", &self.service)
            .finish()
    }
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
        let trusted = config.trusted_publishers.clone().unwrap_or_else(|| {
            // One principal for every process: trust ourselves.
            match transport.publisher() {
                Publisher::User(user) => vec![user],
                _ => Vec::new(),
            }
        });
        let trust_unstamped = config.trust_unstamped_requests;
        let concurrency = config.concurrency.max(1);
        let node_id = node_id.into();
        let shared = Arc::new(crate::handler::Shared {
            resources: registry.resources().clone(),
            client: keelson_protocol::client::Client::new(transport.clone()),
            node: Arc::from(node_id.as_str()),
        });
        let limits = Limits {
            max_deadline_ms: config.max_deadline_ms,
            max_deliveries: config.max_deliveries.max(1),
            idempotency: config.idempotency.clone(),
        };
        let metrics = crate::metrics::ServerMetrics::new(&node_id, &registry.names());
        Self {
            config,
            transport,
            dispatcher: Arc::new(Dispatcher {
                metrics,
                node_id,
                registry,
                store,
                peers: Arc::new(Mutex::new(ClusterView::default())),
                limits,
                trusted_publishers: trusted.into_iter().collect(),
                trust_unstamped,
                stats: Arc::new(ServerStats::new(concurrency)),
                shared,
            }),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }
    }

    /// The software version this server reports in its heartbeats.
    pub fn with_version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Declare the service queue, bind it to every enabled handler, and start
    /// consuming, the governor and the heartbeats. Returns once the server takes
    /// requests.
    pub async fn start(self) -> Result<RunningServer, ServerError> {
        self.config
            .governor
            .validate()
            .map_err(ServerError::Config)?;
        let routes = self.dispatcher.registry.names();
        if routes.is_empty() {
            return Err(ServerError::NoHandlers);
        }
        let schedules = crate::schedules::plan::build_schedules(&self.config.schedules)
            .map_err(ServerError::Config)?;
        let problems =
            crate::singleton::check(&self.config.singletons, &self.config.singleton_settings);
        if !problems.is_empty() {
            return Err(ServerError::Config(problems.join("; ")));
        }
        let singletons: Vec<_> = self
            .config
            .singletons
            .iter()
            .filter_map(|name| crate::singleton::find(name))
            .collect();
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
        let liveness = Arc::new(crate::jobs::Liveness::new(Duration::from_millis(
            self.config.heartbeat_interval_ms.max(1),
        )));
        // A topology declared before jobs existed (by an older `keelson topology
        // declare`, for a least-privilege broker user) leaves the server serving
        // requests without jobs.
        let jobs = match crate::jobs::JobsHandle::start(
            self.dispatcher.clone(),
            self.transport.clone(),
            self.config.jobs.clone(),
            &service,
            liveness.clone(),
            Duration::from_millis(self.config.drain_timeout_ms),
        )
        .await
        {
            Ok(jobs) => Some(jobs),
            Err(e @ TransportError::Refused(_)) => {
                tracing::warn!(error = %e, "background jobs are not served by this server");
                None
            }
            Err(e) => return Err(err(e)),
        };
        let board = Arc::new(crate::leased::LeaseBoard::default());
        let mut leased = Vec::new();
        for plugin in singletons {
            let settings = self
                .config
                .singleton_settings
                .get(plugin.name)
                .cloned()
                .unwrap_or(serde_json::Value::Null);
            let node = self.dispatcher.node_id.clone();
            let run: crate::leased::TaskFn = Arc::new(move |token, fence, cancel| {
                let ctx = crate::singleton::SingletonCtx {
                    name: plugin.name.to_owned(),
                    node: node.clone(),
                    token,
                    fence,
                    cancel,
                    settings: settings.clone(),
                };
                Box::pin(async move {
                    if let Err(e) = (plugin.run)(ctx).await {
                        tracing::warn!(singleton = plugin.name, error = %e, "a singleton task failed");
                    }
                })
            });
            leased.push(crate::leased::Leased::start(
                self.transport.clone(),
                format!("singleton.{}", plugin.name),
                board.clone(),
                run,
            ));
        }
        let scheduler = match (&jobs, schedules.is_empty()) {
            (_, true) => None,
            (None, false) => {
                tracing::warn!(
                    "schedules are configured but this server runs no jobs: it does not schedule"
                );
                None
            }
            (Some(jobs), false) => {
                let scheduler = Arc::new(crate::schedules::scheduler::Scheduler::new(
                    schedules,
                    jobs.jobs().clone(),
                ));
                let s = scheduler.clone();
                let run: crate::leased::TaskFn = Arc::new(move |token, fence, cancel| {
                    Box::pin(s.clone().run(token, fence, cancel))
                });
                leased.push(crate::leased::Leased::start(
                    self.transport.clone(),
                    crate::schedules::scheduler::LEASE.to_owned(),
                    board.clone(),
                    run,
                ));
                Some(scheduler)
            }
        };
        let stats = self.dispatcher.stats.clone();
        let resources = self.dispatcher.registry.resources().clone();
        stats.set_ready(true);
        tracing::info!(
            node = %self.dispatcher.node_id,
            %service,
            handlers = ?spec.routes,
            concurrency,
            governor = self.config.governor.enabled,
            "logic server consuming"
        );
        let (stop, stopped) = watch::channel(false);
        let (intake_tx, intake_rx) = watch::channel(false);
        let (abort, abort_rx) = watch::channel(false);
        let peers = self.dispatcher.peers.clone();
        let monitor = Arc::new(Monitor {
            transport: self.transport.clone(),
            dispatcher: self.dispatcher.clone(),
            stats: stats.clone(),
            governor: self.config.governor.clone(),
            heartbeat_interval: Duration::from_millis(self.config.heartbeat_interval_ms.max(1)),
            service,
            version: self.version,
            concurrency,
            intake_paused: intake_tx,
            peers: peers.clone(),
            liveness,
            job_counts: std::sync::Mutex::new(None),
            leases: board,
            scheduler,
        });
        let listener_task = tokio::spawn(Monitor::listen(
            self.transport.clone(),
            peers,
            self.dispatcher.store.clone(),
        ));
        let (beats_stop, beats_stopped) = watch::channel(false);
        let monitor_task = tokio::spawn(monitor.clone().run(beats_stopped));
        let task = tokio::spawn(
            ConsumeLoop {
                consumer,
                dispatcher: self.dispatcher,
                concurrency: usize::from(concurrency),
                drain_timeout: Duration::from_millis(self.config.drain_timeout_ms),
                stats: stats.clone(),
                stopped,
                intake_paused: intake_rx,
                abort: abort_rx,
                window: (self.config.governor.enabled && self.config.governor.adaptive_window)
                    .then(|| WindowSettings {
                        control: WindowControl::new(
                            concurrency,
                            self.config.governor.min_window,
                            Duration::from_millis(self.config.governor.start_delay_target_ms),
                        ),
                        interval: Duration::from_millis(self.config.governor.window_interval_ms),
                        narrow_alone: self.config.governor.pause_last_consumer,
                    }),
            }
            .run(),
        );
        Ok(RunningServer {
            stop,
            abort,
            task,
            monitor_task,
            listener_task,
            monitor,
            stats,
            resources,
            jobs,
            beats_stop,
            leased,
        })
    }
}

impl RunningServer {
    /// Live figures.
    pub fn stats(&self) -> &Arc<ServerStats> {
        &self.stats
    }

    /// What runs its handlers (the test kit runs a handler as a job through it).
    pub(crate) fn dispatcher(&self) -> &Arc<Dispatcher> {
        &self.monitor.dispatcher
    }

    /// Drain: say on the control channel that this server leaves, stop taking
    /// requests (deliveries the transport holds but the server has not started go
    /// back to the queue), let in-flight ones finish and reply within the drain
    /// timeout, hand the rest back to the queue, run the plugins' shutdown hooks,
    /// and return. Replies are published before this returns, so the transport may
    /// be closed afterwards.
    pub async fn shutdown(self) {
        self.shutdown_or_abort(std::future::pending()).await;
    }

    /// Like [`RunningServer::shutdown`], but when `abort` resolves during the drain
    /// (an operator's second signal), unfinished requests go back to the queue at
    /// once.
    pub async fn shutdown_or_abort(self, abort: impl std::future::Future<Output = ()>) {
        self.stats
            .leaving
            .store(true, std::sync::atomic::Ordering::Release);
        self.monitor.publish(&self.monitor.heartbeat(true)).await;
        // Singletons and the scheduler first: each task ends, then its lease is
        // given up, so a peer takes over at once.
        futures_util::future::join_all(self.leased.into_iter().map(|l| l.stop())).await;
        let _ = self.stop.send(true);
        let mut task = self.task;
        // Jobs drain beside the requests; heartbeats go on until both are done, so
        // peers do not take this server's running jobs for lost meanwhile.
        let jobs = async {
            if let Some(jobs) = self.jobs {
                jobs.drain().await;
            }
        };
        tokio::pin!(jobs);
        let (mut jobs_done, mut task_done) = (false, false);
        tokio::pin!(abort);
        while !(jobs_done && task_done) {
            tokio::select! {
                _ = &mut task, if !task_done => task_done = true,
                () = &mut jobs, if !jobs_done => jobs_done = true,
                () = &mut abort => {
                    let _ = self.abort.send(true);
                    if !task_done {
                        let _ = (&mut task).await;
                    }
                    if !jobs_done {
                        (&mut jobs).await;
                    }
                    break;
                }
            }
        }
        let _ = self.beats_stop.send(true);
        let _ = self.monitor_task.await;
        self.listener_task.abort();
        self.monitor.publish(&self.monitor.heartbeat(true)).await;
        // No handler of this server runs any more: the plugins may let go.
        self.resources.shutdown().await;
    }

    /// Wait until the consume loop ends by itself (transport closed).
    pub async fn closed(&mut self) {
        let _ = (&mut self.task).await;
    }
}
