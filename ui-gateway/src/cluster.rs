//! `GET /cluster`: the live table of logic servers, from the heartbeats they
//! broadcast on the control channel.
//!
//! ```json
//! {"nodes": [{"node": "logic-1", "state": "up", "age_ms": 312, "load": {...}, ...}],
//!  "services": {"default": {"up": 2, "paused": 1, "not_ready": 0, "left": 0, "gone": 0}},
//!  "stalled_services": [],
//!  "dead_letters": {"waiting": 0},
//!  "jobs": {"queued": 0, "running": 2, "succeeded": 40, "failed": 1, "cancelled": 0,
//!           "node": "logic-1", "age_ms": 3200},
//!  "leases": [{"name": "scheduler", "node": "logic-2", "token": 7},
//!             {"name": "singleton.cleanup", "node": "logic-1", "token": 3}],
//!  "schedules": [{"name": "nightly-report", "cron": "0 30 2 * * *",
//!                 "timezone": "Europe/Berlin", "handler": "report.build",
//!                 "last_slot": "2026-03-29T00:30:00Z", "last_token": 7,
//!                 "next_slot": "2026-03-30T00:30:00Z", "leader": "logic-2"}]}
//! ```
//!
//! `jobs` counts the background jobs by state (`null` until a server has counted
//! them): every server holds every job's record and counts them every few seconds,
//! so these are the counts of the server that counted last (`node`, `age_ms` ago),
//! not a sum. Each node's `jobs.running_here` is the attempts it runs now.
//!
//! `leases` are the leases held now (the scheduler's, singletons'), each with the
//! node that holds it and its fencing token, from the nodes up, paused or not ready;
//! when two claim one (an old holder's last heartbeat after a hand-over), the higher
//! token wins. `schedules` are the cluster's schedules as the freshest heartbeat
//! listing each says: slots in RFC 3339 UTC (`null` before the first firing, or when
//! the pattern has no next slot), and `leader`, the node holding the `scheduler`
//! lease (`null` while none does: no schedule fires).
//!
//! `dead_letters.waiting` counts the namespace's dead letters waiting to be read
//! (`null` when the transport cannot tell now; see [`crate::dead_letters`]).
//!
//! A service is *stalled* when it has servers but none of them takes requests (all
//! paused, draining or gone): its requests wait on the queue until a server resumes
//! or their deadline passes.

use crate::dead_letters::DeadLetterCount;
use crate::routes::AppState;
use axum::Json;
use axum::extract::State;
use keelson_protocol::Transport;
use keelson_protocol::control::{
    ClusterJobCounts, ClusterLease, ClusterSchedule, ClusterView, NodeState, NodeStatus,
};
use keelson_protocol::topic::HEARTBEATS;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

/// Nodes silent for this many of their intervals are forgotten.
const FORGET_AFTER_INTERVALS: u32 = 60;

/// The cluster as this gateway hears it.
#[derive(Debug, Default)]
pub(crate) struct Cluster {
    view: Mutex<ClusterView>,
}

impl Cluster {
    fn lock(&self) -> std::sync::MutexGuard<'_, ClusterView> {
        // Bookkeeping only; a poisoned lock still holds a usable table.
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Listen to heartbeats until the transport closes.
    pub(crate) async fn listen(
        self: Arc<Self>,
        transport: Arc<dyn Transport>,
        metrics: Arc<crate::metrics::GatewayMetrics>,
    ) {
        let mut heartbeats = match HEARTBEATS.subscribe(transport.as_ref()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen to the control channel; /cluster stays empty");
                return;
            }
        };
        while let Some(hb) = heartbeats.next().await {
            // The handlers servers host get `handler` series of their own.
            for name in &hb.handlers {
                metrics.learn(name);
            }
            let mut view = self.lock();
            view.observe(hb, Instant::now());
            view.prune(Instant::now(), FORGET_AFTER_INTERVALS);
        }
    }

    pub(crate) fn report(&self) -> ClusterReport {
        let (nodes, jobs, leases, schedules) = {
            let view = self.lock();
            let now = Instant::now();
            (
                view.nodes(now),
                view.job_counts(now),
                view.leases(now),
                view.schedules(now),
            )
        };
        let mut services: BTreeMap<String, ServiceCounts> = BTreeMap::new();
        for n in &nodes {
            for s in &n.heartbeat.services {
                let c = services.entry(s.clone()).or_default();
                match n.state {
                    NodeState::Up => c.up += 1,
                    NodeState::Paused => c.paused += 1,
                    NodeState::NotReady => c.not_ready += 1,
                    NodeState::Left => c.left += 1,
                    NodeState::Gone => c.gone += 1,
                }
            }
        }
        let stalled_services = services
            .iter()
            .filter(|(_, c)| c.up == 0)
            .map(|(s, _)| s.clone())
            .collect();
        ClusterReport {
            nodes,
            services,
            stalled_services,
            dead_letters: DeadLetterCount::default(),
            jobs,
            leases,
            schedules,
        }
    }
}

/// Servers of one service, by state.
#[derive(Debug, Default, Serialize)]
pub(crate) struct ServiceCounts {
    up: usize,
    paused: usize,
    not_ready: usize,
    left: usize,
    gone: usize,
}

/// The body of `GET /cluster`.
#[derive(Debug, Serialize)]
pub(crate) struct ClusterReport {
    nodes: Vec<NodeStatus>,
    services: BTreeMap<String, ServiceCounts>,
    stalled_services: Vec<String>,
    dead_letters: DeadLetterCount,
    jobs: Option<ClusterJobCounts>,
    leases: Vec<ClusterLease>,
    schedules: Vec<ClusterSchedule>,
}

/// `GET /cluster`.
pub(crate) async fn cluster(State(state): State<AppState>) -> Json<ClusterReport> {
    let mut report = state.cluster.report();
    report.dead_letters = state.dead_letters.count(state.transport.as_ref()).await;
    Json(report)
}
