//! Envelopes of the control channel: what every node says about itself, so that
//! gateways, operators and scripts can see the cluster.
//!
//! Every logic server broadcasts a [`Heartbeat`] on [`CONTROL_CHANNEL`] about once
//! per `interval_ms`; a node not heard from for three intervals is gone. A server
//! that shuts down says so with `leaving: true` before it goes.

use crate::envelope::Envelope;
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
