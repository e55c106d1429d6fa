//! The state every part of the AMQP transport shares: the current connection (a
//! [`Link`], replaced on every reconnection), the closed flag, what was declared (to
//! declare it again after a reconnection) and the requests awaiting a reply.

use super::config::{AmqpConfig, BrokerUrl};
use super::connection::Link;
use super::reply::Replies;
use super::topology::Names;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{oneshot, watch};

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is a single collection operation that cannot
    // panic half-way, so a poisoned lock holds consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What this transport declared, declared again on every new connection.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    /// Service name → routes bound to its queue.
    pub(crate) services: BTreeMap<String, BTreeSet<String>>,
    /// Fanout exchange names.
    pub(crate) fanouts: BTreeSet<String>,
    /// Lease queue names (only deleted with the topology, never declared again by
    /// the supervisor: each lease's driver declares its own).
    pub(crate) leases: BTreeSet<String>,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: AmqpConfig,
    pub(crate) names: Names,
    pub(crate) node_id: String,
    pub(crate) brokers: Vec<BrokerUrl>,
    /// The broker user every URL connects as: the `user_id` of what this transport
    /// publishes (see `origin.rs`).
    pub(crate) broker_user: String,
    /// The current connection, `None` while disconnected. Only the supervisor writes it.
    link: watch::Sender<Option<Arc<Link>>>,
    closed: watch::Sender<bool>,
    pub(crate) registry: Mutex<Registry>,
    /// Correlation id → the request awaiting that reply.
    pub(crate) pending: Mutex<HashMap<String, oneshot::Sender<Bytes>>>,
    next_correlation: AtomicU64,
    /// The connections replies go out on.
    pub(crate) replies: Replies,
}

impl Shared {
    pub(crate) fn new(config: AmqpConfig, node_id: &str, brokers: Vec<BrokerUrl>) -> Self {
        let replies = Replies::new(
            brokers.clone(),
            format!("keelson {node_id} replies ({})", config.namespace),
            config.connect_timeout(),
        );
        let broker_user = brokers
            .first()
            .map(|b| b.uri.authority.userinfo.username.clone())
            .unwrap_or_default();
        Self {
            broker_user,
            replies,
            names: Names::new(&config.namespace),
            config,
            node_id: node_id.to_owned(),
            brokers,
            link: watch::Sender::new(None),
            closed: watch::Sender::new(false),
            registry: Mutex::default(),
            pending: Mutex::default(),
            next_correlation: AtomicU64::new(1),
        }
    }

    pub(crate) fn next_correlation_id(&self) -> String {
        self.next_correlation
            .fetch_add(1, Ordering::Relaxed)
            .to_string()
    }

    pub(crate) fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    pub(crate) fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Resolves once the transport is closed. Cancel-safe.
    pub(crate) async fn closed(&self) {
        let mut rx = self.closed.subscribe();
        // The sender lives in `self`, so waiting cannot fail.
        let _ = rx.wait_for(|closed| *closed).await;
    }

    pub(crate) fn set_link(&self, link: Option<Arc<Link>>) {
        self.link.send_replace(link);
    }

    /// The current connection, if it is up.
    pub(crate) fn live_link(&self) -> Option<Arc<Link>> {
        self.link
            .borrow()
            .as_ref()
            .filter(|l| !l.is_lost())
            .cloned()
    }

    /// Wait for a live connection; `None` once the transport is closed.
    pub(crate) async fn wait_link(&self) -> Option<Arc<Link>> {
        let mut rx = self.link.subscribe();
        loop {
            if self.is_closed() {
                return None;
            }
            if let Some(link) = self.live_link() {
                return Some(link);
            }
            tokio::select! {
                changed = rx.changed() => changed.ok()?,
                () = self.closed() => return None,
            }
        }
    }

    /// [`Shared::wait_link`], giving up after `within`.
    pub(crate) async fn wait_link_within(&self, within: Duration) -> Option<Arc<Link>> {
        tokio::time::timeout(within, self.wait_link())
            .await
            .ok()
            .flatten()
    }

    pub(crate) fn is_ready(&self) -> bool {
        !self.is_closed() && self.live_link().is_some()
    }
}
