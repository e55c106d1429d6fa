//! The configurations under test, one module each.
//!
//! A [`Scenario`] starts its system under test as separate processes and says how the
//! load generator reaches it; the harness does the rest (load phases, CPU and memory
//! sampling, stopping, deleting broker objects), the same way for every scenario. A
//! new scenario (context, governor, rolling upgrade...) is one module here and one
//! line in [`all`]; naming a [`Scenario::baseline`] adds its ratio to the report.

mod amqp_client;
mod amqp_http;
pub mod context;
mod embedded_http;
pub mod governor;
pub mod jobs;
mod keelson_config;
mod raw_axum;
mod raw_lapin;
pub mod special;
pub mod upgrade;

use crate::broker::Objects;
use crate::procs::Proc;
use async_trait::async_trait;
use std::fmt;
use std::path::PathBuf;

/// Everything a scenario needs to start its processes.
#[derive(Debug, Clone)]
pub struct Env {
    /// Where the release binaries are (`target/release`).
    pub bins: PathBuf,
    /// A directory of its own for configuration files and logs.
    pub dir: PathBuf,
    /// The broker URL.
    pub amqp_url: String,
    /// A namespace of its own on the broker (prefix of every queue and exchange).
    pub namespace: String,
    /// Tokio worker threads of every process.
    pub worker_threads: usize,
    /// Deliveries a server works on at once: lapin prefetch (B), Keelson's
    /// `logic_server.concurrency` (C, D, E).
    pub prefetch: u16,
    /// `[log] level` of the Keelson processes.
    pub log_level: String,
}

impl Env {
    /// The path of one of the release binaries.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bins.join(name)
    }
}

/// How the load generator reaches a deployed scenario (the arguments of
/// `bench-load`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Load {
    /// `POST` to this URL.
    Http {
        /// The full URL, e.g. `http://127.0.0.1:41234/api/echo`.
        url: String,
    },
    /// Raw lapin RPC to this exchange and routing key.
    Lapin {
        /// Exchange.
        exchange: String,
        /// Routing key.
        routing_key: String,
    },
    /// Keelson's client API in this namespace.
    Keelson {
        /// Namespace.
        namespace: String,
        /// Handler.
        handler: String,
    },
}

impl Load {
    /// The `bench-load` subcommand and its arguments.
    pub fn args(&self, amqp_url: &str) -> Vec<String> {
        let owned = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        match self {
            Load::Http { url } => owned(&["http", "--url", url]),
            Load::Lapin {
                exchange,
                routing_key,
            } => owned(&[
                "lapin",
                "--amqp-url",
                amqp_url,
                "--exchange",
                exchange,
                "--routing-key",
                routing_key,
            ]),
            Load::Keelson { namespace, handler } => owned(&[
                "keelson",
                "--amqp-url",
                amqp_url,
                "--namespace",
                namespace,
                "--handler",
                handler,
            ]),
        }
    }
}

/// A scenario's running system.
#[derive(Debug)]
pub struct Deployment {
    /// Its processes, in start order (stopped in reverse).
    pub procs: Vec<Proc>,
    /// How to load it.
    pub load: Load,
    /// What it declared on the broker, deleted after the run.
    pub broker_objects: Option<Objects>,
}

/// One configuration of the benchmark.
#[async_trait]
pub trait Scenario: Send + Sync + fmt::Debug {
    /// Its letter in the report (`A`...).
    fn id(&self) -> &'static str;

    /// One line saying what it is.
    fn describe(&self) -> &'static str;

    /// The scenario whose throughput this one is divided by, in the same round.
    fn baseline(&self) -> Option<&'static str> {
        None
    }

    /// Whether it needs the broker.
    fn needs_broker(&self) -> bool;

    /// Start its processes; return when they are ready for load. On error, whatever
    /// it started must be stopped already.
    async fn deploy(&self, env: &Env) -> anyhow::Result<Deployment>;
}

/// Every scenario, in the order a round runs them.
pub fn all() -> Vec<Box<dyn Scenario>> {
    vec![
        Box::new(raw_axum::RawAxum),
        Box::new(raw_lapin::RawLapin),
        Box::new(embedded_http::EmbeddedHttp),
        Box::new(amqp_http::AmqpHttp),
        Box::new(amqp_client::AmqpClient),
    ]
}

/// Stop `procs` in reverse start order.
pub async fn stop_all(procs: Vec<Proc>) {
    for proc in procs.into_iter().rev() {
        proc.stop().await;
    }
}
