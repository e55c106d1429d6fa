//! Envelopes of the control channel: what every node says about itself, so that
//! gateways, operators and scripts can see the cluster.
//!
//! Every logic server broadcasts a [`Heartbeat`] on [`CONTROL_CHANNEL`] about once
//! per `interval_ms`; a node not heard from for three intervals is gone. A server
//! that shuts down says so with `leaving: true` before it goes.

use crate::envelope::Envelope;
use crate::job::JobState;
use crate::version::ProtocolVersion;
use serde::{Deserialize, Serialize};

/// The fanout channel of heartbeats and other control messages.
pub const CONTROL_CHANNEL: &str = "control";

/// A node is shown as gone after this many intervals without a heartbeat.
pub const MISSED_INTERVALS_BEFORE_GONE: u32 = 3;

/// The parts of a logic server's load factor, each in `0.0..=1.0`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// The load the governor acts on (see the logic server's governor settings).
    pub factor: f64,
    /// Time inside handlers divided by wall time times concurrency slots.
    pub busy: f64,
    /// CPU used by this process, divided by the cores it may use.
    pub process_cpu: f64,
    /// CPU used by the whole machine.
    pub system_cpu: f64,
}

/// A logic server's account of itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Protocol version of the writer.
    pub v: ProtocolVersion,
    /// Node id.
    pub node: String,
    /// Software version of the node.
    pub version: String,
    /// Services (queues) it consumes.
    pub services: Vec<String>,
    /// Handlers it hosts.
    pub handlers: Vec<String>,
    /// Its load and the parts of it.
    pub load: Load,
    /// Whether it stopped taking new requests because of its load.
    pub paused: bool,
    /// Requests being handled now.
    pub in_flight: u32,
    /// Most requests it handles at once.
    pub concurrency: u32,
    /// How many requests it takes from the queue at once now (its intake window, at
    /// most `concurrency`); 0 from a node that does not say.
    #[serde(default)]
    pub window: u32,
    /// Whether it takes requests (joined and consuming, not draining).
    pub ready: bool,
    /// User contexts it holds.
    pub contexts: u64,
    /// Milliseconds until its next heartbeat.
    pub interval_ms: u64,
    /// Set in the last heartbeat of a server that is shutting down.
    #[serde(default)]
    pub leaving: bool,
    /// How far its context deltas have gone. Since protocol 1.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<crate::context::ContextMark>,
    /// A digest of its context state, when settled. Since protocol 1.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<crate::context::ContextDigest>,
    /// Its background jobs: attempts running here, and the job records it holds by
    /// state. Absent from servers that predate background jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs: Option<JobsBeat>,
    /// The leases this server holds now (singletons, the scheduler), with their
    /// tokens. Absent from servers that predate leases.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leases: Vec<LeaseBeat>,
    /// The schedules this server is configured with, and their last and next slots
    /// as it knows them. Absent from servers that predate schedules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub schedules: Vec<ScheduleBeat>,
}

/// A lease a server holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseBeat {
    /// The lease (`scheduler`, `singleton.{name}`).
    pub name: String,
    /// Its fencing token.
    pub token: u64,
}

/// A schedule, as a server sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleBeat {
    /// The schedule's name.
    pub name: String,
    /// Its cron pattern (with seconds).
    pub cron: String,
    /// Its IANA time zone.
    pub timezone: String,
    /// The handler each firing runs as a job.
    pub handler: String,
    /// The last slot fired (Unix seconds), from the replicated mark.
    #[serde(default)]
    pub last_slot_s: Option<i64>,
    /// The lease token the last slot was fired with.
    #[serde(default)]
    pub last_token: u64,
    /// The next slot due (Unix seconds).
    #[serde(default)]
    pub next_slot_s: Option<i64>,
}

/// What a heartbeat says of background jobs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobsBeat {
    /// Job attempts running on this server now.
    pub running_here: u32,
    /// The job records this server holds, by state. Every server holds every job's
    /// record, so any one server's counts are the cluster's. Counted every few
    /// seconds (it reads every record), not at every heartbeat: `None` until the
    /// first count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records: Option<JobCounts>,
    /// How long before this heartbeat `records` were counted, in milliseconds.
    #[serde(default)]
    pub counted_ms_ago: u64,
}

/// Jobs by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCounts {
    /// Waiting on a queue (a first attempt, or a retry waiting out its backoff).
    pub queued: u64,
    /// Being run by a server.
    pub running: u64,
    /// Finished with the handler's answer.
    pub succeeded: u64,
    /// Finished with the last attempt's error.
    pub failed: u64,
    /// Cancelled by their submitter or an operator.
    pub cancelled: u64,
}

impl JobCounts {
    fn slot(&mut self, state: JobState) -> &mut u64 {
        match state {
            JobState::Queued => &mut self.queued,
            JobState::Running => &mut self.running,
            JobState::Succeeded => &mut self.succeeded,
            JobState::Failed => &mut self.failed,
            JobState::Cancelled => &mut self.cancelled,
        }
    }

    /// Count one more job in `state`.
    pub fn add(&mut self, state: JobState) {
        *self.slot(state) += 1;
    }

    /// How many jobs are in `state`.
    pub fn get(mut self, state: JobState) -> u64 {
        *self.slot(state)
    }
}

/// The cluster's job counts: those of the server that counted last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterJobCounts {
    /// Jobs by state.
    #[serde(flatten)]
    pub counts: JobCounts,
    /// The server whose counts these are.
    pub node: String,
    /// How long ago it counted them, in milliseconds.
    pub age_ms: u64,
}

/// A lease of the cluster and the node that holds it, from the heartbeats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterLease {
    /// The lease (`scheduler`, `singleton.{name}`).
    pub name: String,
    /// The node holding it.
    pub node: String,
    /// Its fencing token.
    pub token: u64,
}

/// A schedule of the cluster, from the heartbeats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSchedule {
    /// The schedule's name.
    pub name: String,
    /// Its cron pattern (with seconds).
    pub cron: String,
    /// Its IANA time zone.
    pub timezone: String,
    /// The handler each firing runs as a job.
    pub handler: String,
    /// The last slot fired, RFC 3339 UTC to the second; `None` before the first.
    pub last_slot: Option<String>,
    /// The lease token the last slot was fired with (0 before the first).
    pub last_token: u64,
    /// The next slot due, RFC 3339 UTC to the second; `None` when the pattern has
    /// no later slot.
    pub next_slot: Option<String>,
    /// The node holding the [scheduler lease](crate::schedule::SCHEDULER_LEASE),
    /// which fires every schedule; `None` while no live node holds it.
    pub leader: Option<String>,
}

impl Envelope for Heartbeat {
    const KIND: &'static str = "heartbeat";
    fn version(&self) -> ProtocolVersion {
        self.v
    }
}

/// What a node is doing, as the cluster sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Ready and taking requests.
    Up,
    /// Ready, but its governor paused intake.
    Paused,
    /// Joining or draining: not taking requests.
    NotReady,
    /// Said it is shutting down.
    Left,
    /// Silent for [`MISSED_INTERVALS_BEFORE_GONE`] intervals.
    Gone,
}

/// One row of the cluster table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Derived from the heartbeat and its age.
    pub state: NodeState,
    /// Milliseconds since its last heartbeat.
    pub age_ms: u64,
    /// Its last heartbeat.
    #[serde(flatten)]
    pub heartbeat: Heartbeat,
}

/// The cluster as seen from heartbeats: pure bookkeeping, fed by whoever listens on
/// the control channel (gateways, logic servers, `keelson status`).
#[derive(Debug, Default)]
pub struct ClusterView {
    nodes: std::collections::BTreeMap<String, (Heartbeat, tokio::time::Instant)>,
}

impl ClusterView {
    /// Record a heartbeat received at `now`.
    pub fn observe(&mut self, heartbeat: Heartbeat, now: tokio::time::Instant) {
        self.nodes.insert(heartbeat.node.clone(), (heartbeat, now));
    }

    /// Forget nodes gone or left for more than `after` intervals of theirs.
    pub fn prune(&mut self, now: tokio::time::Instant, after: u32) {
        self.nodes.retain(|_, (hb, at)| {
            let age = now.duration_since(*at).as_millis() as u64;
            age <= hb.interval_ms.saturating_mul(u64::from(after))
        });
    }

    /// Every node known, with its state at `now`.
    pub fn nodes(&self, now: tokio::time::Instant) -> Vec<NodeStatus> {
        self.nodes
            .values()
            .map(|(hb, at)| {
                let age_ms = u64::try_from(now.duration_since(*at).as_millis()).unwrap_or(u64::MAX);
                let gone_after = hb
                    .interval_ms
                    .saturating_mul(u64::from(MISSED_INTERVALS_BEFORE_GONE));
                let state = if hb.leaving {
                    NodeState::Left
                } else if age_ms > gone_after {
                    NodeState::Gone
                } else if !hb.ready {
                    NodeState::NotReady
                } else if hb.paused {
                    NodeState::Paused
                } else {
                    NodeState::Up
                };
                NodeStatus {
                    state,
                    age_ms,
                    heartbeat: hb.clone(),
                }
            })
            .collect()
    }

    /// The freshest job counts any node reported (every server holds every job's
    /// record, so the counts are the cluster's, not one server's share: they are
    /// never summed); `None` when no node reported any.
    pub fn job_counts(&self, now: tokio::time::Instant) -> Option<ClusterJobCounts> {
        self.nodes
            .values()
            .filter_map(|(hb, at)| {
                let jobs = hb.jobs?;
                let counts = jobs.records?;
                let heard = u64::try_from(now.duration_since(*at).as_millis()).unwrap_or(u64::MAX);
                Some(ClusterJobCounts {
                    counts,
                    node: hb.node.clone(),
                    age_ms: heard.saturating_add(jobs.counted_ms_ago),
                })
            })
            .min_by_key(|c| c.age_ms)
    }

    /// The leases held in the cluster, by name, each with its holder: from the
    /// nodes that are up, paused or not ready (a node gone or left holds nothing).
    /// When two nodes claim one lease (the old holder's last heartbeat still here
    /// after a hand-over), the higher token is the holder.
    pub fn leases(&self, now: tokio::time::Instant) -> Vec<ClusterLease> {
        let mut leases: std::collections::BTreeMap<&str, ClusterLease> = Default::default();
        let nodes = self.nodes(now);
        for n in &nodes {
            if !matches!(
                n.state,
                NodeState::Up | NodeState::Paused | NodeState::NotReady
            ) {
                continue;
            }
            for lease in &n.heartbeat.leases {
                let claim = ClusterLease {
                    name: lease.name.clone(),
                    node: n.heartbeat.node.clone(),
                    token: lease.token,
                };
                match leases.get(lease.name.as_str()) {
                    Some(held) if held.token >= claim.token => {}
                    _ => {
                        leases.insert(lease.name.as_str(), claim);
                    }
                }
            }
        }
        leases.into_values().collect()
    }

    /// The schedules of the cluster, by name: each as the freshest heartbeat that
    /// lists it says (every server reads the same replicated marks), with the
    /// holder of the scheduler lease as its leader.
    pub fn schedules(&self, now: tokio::time::Instant) -> Vec<ClusterSchedule> {
        let leader = self
            .leases(now)
            .into_iter()
            .find(|l| l.name == crate::schedule::SCHEDULER_LEASE)
            .map(|l| l.node);
        let mut freshest: std::collections::BTreeMap<&str, (&ScheduleBeat, tokio::time::Instant)> =
            Default::default();
        for (hb, at) in self.nodes.values() {
            for s in &hb.schedules {
                match freshest.get(s.name.as_str()) {
                    Some((_, seen)) if seen >= at => {}
                    _ => {
                        freshest.insert(s.name.as_str(), (s, *at));
                    }
                }
            }
        }
        freshest
            .into_values()
            .map(|(s, _)| ClusterSchedule {
                name: s.name.clone(),
                cron: s.cron.clone(),
                timezone: s.timezone.clone(),
                handler: s.handler.clone(),
                last_slot: s.last_slot_s.map(crate::schedule::slot_rfc3339),
                last_token: s.last_token,
                next_slot: s.next_slot_s.map(crate::schedule::slot_rfc3339),
                leader: leader.clone(),
            })
            .collect()
    }

    /// Nodes other than `except` that consume `service` and take requests now.
    pub fn active_in_service(
        &self,
        service: &str,
        except: &str,
        now: tokio::time::Instant,
    ) -> usize {
        self.nodes(now)
            .iter()
            .filter(|n| {
                n.state == NodeState::Up
                    && n.heartbeat.node != except
                    && n.heartbeat.services.iter().any(|s| s == service)
            })
            .count()
    }
}

#[cfg(test)]
mod tests;
