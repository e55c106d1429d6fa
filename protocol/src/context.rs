//! Envelopes of the context channel: replication of per-user context between logic
//! servers.
//!
//! * [`ContextDelta`]: broadcast on the `context` fanout channel after every write;
//!   every server applies it.
//! * [`SnapshotRequest`] / [`SnapshotChunk`]: a joining server pulls the state of
//!   its peers in chunks, as requests on the route [`SNAPSHOT_ROUTE`], which every
//!   ready server consumes (competing consumers: one of them answers each chunk).
//!
//! Merging is deterministic whatever the order or duplication of messages: values
//! are last-writer-wins registers ordered by [`Hlc`] (hybrid logical clock, node id
//! as tiebreak), counters are per-node running sums where the entry with the
//! highest `seq` wins, and each user's `last_active` is the maximum seen.

use crate::envelope::Envelope;
use crate::version::ProtocolVersion;
use serde::{Deserialize, Serialize};

/// The fanout channel deltas travel on.
pub const CONTEXT_CHANNEL: &str = "context";

/// The route of snapshot requests. It starts with `_` so no gateway can call it.
pub const SNAPSHOT_ROUTE: &str = "_keelson.context.snapshot";

/// The service (queue) that answers snapshot requests.
pub const SNAPSHOT_SERVICE: &str = "_keelson.context";

/// A hybrid logical clock timestamp: wall-clock milliseconds, a logical counter for
/// events within one millisecond (or behind a peer's clock), and the writer's node
/// id to break ties. Ordered by those three fields in that order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hlc {
    /// Milliseconds since the Unix epoch.
    pub wall_ms: u64,
    /// Logical counter.
    pub logical: u32,
    /// Node id of the writer.
    pub node: String,
}

/// One change to one user's context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContextOp {
    /// Set (or, with `value: None`, delete) a value; the highest `ts` wins.
    Set {
        /// The user.
        user: String,
        /// The key.
        key: String,
        /// JSON bytes, or `None` for a deletion (a tombstone).
        #[serde(with = "serde_bytes", default)]
        value: Option<Vec<u8>>,
        /// When, by whom.
        ts: Hlc,
    },
    /// The running sum of one node's increments of a counter; the highest `seq` of a
    /// node wins, the counter is the sum over nodes.
    Count {
        /// The user.
        user: String,
        /// The counter.
        key: String,
        /// The node whose increments these are.
        node: String,
        /// Increments so far by that node (1, 2, ...).
        seq: u64,
        /// Sum of that node's increments.
        sum: i64,
    },
    /// The user was active (read or written) at `ts`; contexts idle past their TTL
    /// are dropped by every server.
    Touch {
        /// The user.
        user: String,
        /// When.
        ts: Hlc,
    },
}

/// Changes made by one server, broadcast on [`CONTEXT_CHANNEL`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextDelta {
    /// Protocol version of the writer.
    pub v: ProtocolVersion,
    /// Node id of the server that made the changes.
    pub origin: String,
    /// The changes.
    pub ops: Vec<ContextOp>,
    /// A barrier marker (with no ops): the origin sends it to itself, and once it is
    /// back, every delta published before it has been received. Since protocol 1.1;
    /// absent from the wire when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub marker: Option<u64>,
    /// This delta's number among its origin's deltas (1, 2, ...; `origin` names one
    /// incarnation of a server): a receiver that misses one sees the gap and repairs
    /// it at once. Since protocol 1.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The W3C `traceparent` of the span that made the changes, when its server
    /// exports traces: a receiver's span applying them is linked to it. Optional
    /// (absent from the wire when `None`); older readers ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<String>,
}

/// How far a server's context deltas have gone: carried in its heartbeats, so that a
/// peer that applied less (it was disconnected) notices and repairs at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextMark {
    /// The `origin` of its deltas.
    pub origin: String,
    /// The `seq` of the last delta it published.
    pub seq: u64,
}

/// A digest of a server's settled context state, carried in its heartbeats so that two
/// servers that applied the same deltas can tell whether they hold the same state.
///
/// `hash` is the XOR of one xxh3-64 hash per live entry (a value, a counter share,
/// an outcome record; the exact bytes hashed are in TOPOLOGY.md). A server sends it
/// only when settled: no write of its own applied but not yet published, no delta
/// applied out of order. Two digests are comparable when their `swept_ms` are equal
/// and every origin listed in both has the same `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContextDigest {
    /// XOR of the entries' hashes.
    pub hash: u64,
    /// The wall-clock boundary (Unix ms) of the last expiry sweep: every server sweeps
    /// at the same multiples of its sweep period, so equal sweeps expired the same.
    pub swept_ms: u64,
    /// Up to which `seq` each origin's deltas are applied (its own: published).
    pub applied: Vec<ContextMark>,
}

impl Envelope for ContextDelta {
    const KIND: &'static str = "context delta";
    fn version(&self) -> ProtocolVersion {
        self.v
    }
}

/// Ask a peer for the users after `after` (in byte order of user ids).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRequest {
    /// Protocol version of the writer.
    pub v: ProtocolVersion,
    /// Node id of the joining server.
    pub requester: String,
    /// Start after this user id; `None` for the first chunk.
    #[serde(default)]
    pub after: Option<String>,
    /// Most users in the answer.
    pub max_users: u32,
}

impl Envelope for SnapshotRequest {
    const KIND: &'static str = "snapshot request";
    fn version(&self) -> ProtocolVersion {
        self.v
    }
}

/// A value register in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueEntry {
    /// The key.
    pub key: String,
    /// JSON bytes, or `None` for a tombstone.
    #[serde(with = "serde_bytes", default)]
    pub value: Option<Vec<u8>>,
    /// When, by whom.
    pub ts: Hlc,
}

/// One node's share of a counter in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterEntry {
    /// The counter.
    pub key: String,
    /// The node.
    pub node: String,
    /// That node's increments so far.
    pub seq: u64,
    /// Their sum.
    pub sum: i64,
}

/// The whole replicated state of one user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSnapshot {
    /// The user.
    pub user: String,
    /// Latest activity.
    pub last_active: Hlc,
    /// Value registers, tombstones included.
    pub values: Vec<ValueEntry>,
    /// Counter shares.
    pub counters: Vec<CounterEntry>,
}

/// A chunk of a peer's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotChunk {
    /// Protocol version of the writer.
    pub v: ProtocolVersion,
    /// Node id of the server that answered.
    pub responder: String,
    /// Users, in byte order of their ids.
    pub users: Vec<UserSnapshot>,
    /// Ask again with `after` = this for the next chunk; `None` when done.
    #[serde(default)]
    pub next: Option<String>,
}

impl Envelope for SnapshotChunk {
    const KIND: &'static str = "snapshot chunk";
    fn version(&self) -> ProtocolVersion {
        self.v
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A 1.2 reader's delta, before `trace`.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct DeltaWithoutTrace {
        v: ProtocolVersion,
        origin: String,
        ops: Vec<ContextOp>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        marker: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    }

    fn delta(trace: Option<&str>) -> ContextDelta {
        ContextDelta {
            v: ProtocolVersion::CURRENT,
            origin: "a/1".into(),
            ops: vec![ContextOp::Count {
                user: "u".into(),
                key: "k".into(),
                node: "a".into(),
                seq: 3,
                sum: 5,
            }],
            marker: None,
            seq: Some(9),
            trace: trace.map(str::to_owned),
        }
    }

    #[test]
    fn the_trace_of_a_delta_is_invisible_to_older_readers_and_absent_when_off() {
        let traced = delta(Some(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ));
        let bytes = crate::encode(&traced).unwrap();
        let old: DeltaWithoutTrace = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!((old.origin.as_str(), old.seq), ("a/1", Some(9)));
        assert_eq!(old.ops, traced.ops);
        // Without a trace, the bytes are what a 1.2 writer sends.
        let untraced = crate::encode(&delta(None)).unwrap();
        let old_bytes = rmp_serde::to_vec_named(&old).unwrap();
        assert_eq!(untraced, old_bytes);
        let back: ContextDelta = crate::decode(&old_bytes).unwrap();
        assert_eq!(back, delta(None));
    }
}
