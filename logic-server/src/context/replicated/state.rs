//! The replicated context as a state-based CRDT: pure data and merge rules, no I/O.
//!
//! * a value is a last-writer-wins register ordered by its [`Stamp`] (hybrid logical
//!   clock, node id as tiebreak); a deletion is a register holding no value (a
//!   tombstone), collected after a bound;
//! * a counter is one running sum per node; of two shares of one node, the higher
//!   `seq` wins; the counter's value is the sum of the shares, so increments made on
//!   different servers at once all count;
//! * a user's `last_active` is the highest time seen (wall, logical; the writer does
//!   not matter there); a user idle past the TTL is dropped.
//!
//! Every merge is commutative, associative and idempotent, so replicas that saw the
//! same operations in any order, any number of times, hold equal states.
//!
//! The state keeps a digest of itself up to date as it changes: the XOR of one hash
//! per live entry (a value, a counter share, an outcome record; see [`entry_hash`]).
//! Replicas holding equal states have equal digests, whatever order they saw the
//! operations in, so heartbeats can carry it to detect replicas that drifted apart.

use keelson_protocol::context::{ContextOp, CounterEntry, Hlc, UserSnapshot, ValueEntry};
use keelson_protocol::idempotency::{RECORD_KEY_PREFIX, is_client_key};
use keelson_protocol::job::{JOB_SCOPE_PREFIX, JobRecord, is_job_key};
use keelson_protocol::schedule::{ScheduleMark, is_mark_key};
use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;
use xxhash_rust::xxh3::Xxh3Default;

/// A node id, interned: every stamp and share of one node shares one allocation, and
/// holds it through a thin pointer (8 bytes in each stamp and share, not 16).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Node(Arc<Box<str>>);

impl From<&str> for Node {
    fn from(s: &str) -> Self {
        Self(Arc::new(s.into()))
    }
}

impl From<String> for Node {
    fn from(s: String) -> Self {
        Self(Arc::new(s.into_boxed_str()))
    }
}

impl Deref for Node {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

// Hashes and compares as its text (derived through `Arc` and `Box`), so a set of
// nodes can be searched with a `&str`.
impl Borrow<str> for Node {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self)
    }
}

/// A context key, interned: a key used by every user ("cart", "visits") is stored
/// once, not once per user.
type Key = Arc<str>;

/// Push without the doubling growth of `Vec::push`: users hold few keys, and across
/// 100k users the spare capacity would cost more than the values.
fn push_exact<T>(v: &mut Vec<T>, item: T) {
    v.reserve_exact(1);
    v.push(item);
}

/// The same for a boxed slice (16 bytes where a `Vec` takes 24).
fn push_boxed<T>(b: &mut Box<[T]>, item: T) {
    let mut v = std::mem::take(b).into_vec();
    push_exact(&mut v, item);
    *b = v.into_boxed_slice();
}

/// Bookkeeping charged per entry against the per-user size limit.
const ENTRY_OVERHEAD: usize = 16;

/// The kinds of entry a digest covers (the first byte hashed).
#[derive(Debug, Clone, Copy)]
enum Entry {
    Value = 1,
    Share = 2,
    Record = 3,
}

/// The hash of one live entry: xxh3-64 of its kind byte followed by its fields, each
/// string or byte field as a little-endian `u32` length and its bytes, each number
/// little-endian. A value or record hashes `user, key, wall_ms (u64), logical (u32),
/// writer node, bytes`; a counter share `user, key, node, seq (u64), sum (i64)`.
/// A tombstone is no live entry (hash 0): replicas that collect it at different
/// times still agree.
fn entry_hash(kind: Entry, user: &str, key: &str, fields: impl FnOnce(&mut Xxh3Default)) -> u64 {
    let mut h = Xxh3Default::new();
    h.update(&[kind as u8]);
    hash_bytes(&mut h, user.as_bytes());
    hash_bytes(&mut h, key.as_bytes());
    fields(&mut h);
    h.digest()
}

fn hash_bytes(h: &mut Xxh3Default, bytes: &[u8]) {
    h.update(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_le_bytes());
    h.update(bytes);
}

fn hash_stamped(h: &mut Xxh3Default, ts: &Stamp, bytes: &[u8]) {
    h.update(&ts.wall_ms.to_le_bytes());
    h.update(&ts.logical.to_le_bytes());
    hash_bytes(h, ts.node.as_bytes());
    hash_bytes(h, bytes);
}

fn value_hash(user: &str, key: &str, r: &Register) -> u64 {
    r.value.as_ref().map_or(0, |v| {
        entry_hash(Entry::Value, user, key, |h| hash_stamped(h, &r.ts, v))
    })
}

fn share_hash(user: &str, key: &str, s: &Share) -> u64 {
    entry_hash(Entry::Share, user, key, |h| {
        hash_bytes(h, s.node.as_bytes());
        h.update(&s.seq.to_le_bytes());
        h.update(&s.sum.to_le_bytes());
    })
}

fn record_hash(user: &str, key: &str, r: &Record) -> u64 {
    entry_hash(Entry::Record, user, key, |h| {
        hash_stamped(h, &r.ts, &r.value)
    })
}

/// A hybrid-logical-clock time and its writer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Stamp {
    pub(crate) wall_ms: u64,
    pub(crate) logical: u32,
    pub(crate) node: Node,
}

/// When a user was last active: the highest (wall, logical) time seen. Only its order
/// matters (for the idle TTL), so the writer is not kept: 16 bytes a user, not 32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Active {
    wall_ms: u64,
    logical: u32,
}

impl From<&Stamp> for Active {
    fn from(s: &Stamp) -> Self {
        Self {
            wall_ms: s.wall_ms,
            logical: s.logical,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Register {
    ts: Stamp,
    value: Option<Box<[u8]>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Share {
    node: Node,
    seq: u64,
    sum: i64,
}

/// An outcome record (see `keelson_protocol::idempotency`): a register of its own,
/// apart from the user's values, since a user may hold many and they do not count
/// against the context's size.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Record {
    ts: Stamp,
    value: Box<[u8]>,
    /// From the record itself; every server forgets it then.
    expires_ms: u64,
}

type Records = HashMap<Box<str>, Record>;

/// A counter: its key and one share per node that counted.
type Counter = (Key, Vec<Share>);

/// What [`State::view`] shows of one user: live values (JSON bytes) and counters.
#[derive(Debug)]
pub(crate) struct UserView<'a> {
    pub(crate) values: Vec<(&'a str, &'a [u8])>,
    pub(crate) counters: Vec<(&'a str, i64)>,
}

/// Of two records of one job, which got further: by [`JobRecord::rank`], then by
/// stamp. Both decode (they were checked on the way in); an undecodable one ranks
/// lowest.
fn job_order(a: &Record, b: &Record) -> std::cmp::Ordering {
    let rank = |r: &Record| {
        keelson_protocol::decode::<JobRecord>(&r.value)
            .ok()
            .map(|j| j.rank())
    };
    rank(a).cmp(&rank(b)).then_with(|| a.ts.cmp(&b.ts))
}

/// Of two marks of one schedule, which wins: by [`ScheduleMark::rank`], then by
/// stamp (an undecodable one ranks lowest).
fn mark_order(a: &Record, b: &Record) -> std::cmp::Ordering {
    let rank = |r: &Record| {
        keelson_protocol::decode::<ScheduleMark>(&r.value)
            .ok()
            .map(|m| m.rank())
    };
    rank(a).cmp(&rank(b)).then_with(|| a.ts.cmp(&b.ts))
}

/// One user's replicated context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UserState {
    last_active: Active,
    values: Box<[(Key, Register)]>,
    /// Counters are rarer than values: `None` takes 8 bytes where an empty `Vec`
    /// takes 24 (and a boxed slice 16), so the box around the `Vec` is on purpose.
    #[allow(clippy::box_collection)]
    counters: Option<Box<Vec<Counter>>>,
    /// Outcome records, by record key; most users have none.
    #[allow(clippy::box_collection)]
    records: Option<Box<Records>>,
}

impl UserState {
    fn new(seen: &Stamp) -> Self {
        Self {
            last_active: Active::from(seen),
            values: Box::default(),
            counters: None,
            records: None,
        }
    }

    fn record_entries(&self) -> impl Iterator<Item = (&Box<str>, &Record)> {
        self.records.iter().flat_map(|r| r.iter())
    }

    /// Merge a record, unless it had expired by `swept_ms`; returns the change to the
    /// digest.
    fn merge_record(
        &mut self,
        user: &str,
        key: &str,
        ts: Stamp,
        value: Option<&[u8]>,
        swept_ms: u64,
    ) -> u64 {
        // A record is never deleted, only replaced or expired.
        let Some(value) = value else { return 0 };
        let job = is_job_key(key);
        let mark = is_mark_key(key);
        let expires_ms = if job {
            keelson_protocol::decode::<JobRecord>(value)
                .ok()
                .map(|r| r.expires_unix_ms)
        } else if mark {
            keelson_protocol::decode::<ScheduleMark>(value)
                .ok()
                .map(|r| r.expires_unix_ms)
        } else {
            keelson_protocol::idempotency::expiry_of(value)
        };
        let Some(expires_ms) = expires_ms else {
            tracing::debug!("ignoring an undecodable record");
            return 0;
        };
        if expires_ms <= swept_ms {
            return 0;
        }
        let records = self.records.get_or_insert_with(Box::default);
        let new = Record {
            ts,
            value: value.into(),
            expires_ms,
        };
        match records.get_mut(key) {
            // A job's record keeps the one that got further, whatever the order of
            // the writes (see `JobRecord::rank`); the later write only among equals.
            Some(r) if job && job_order(&new, r) != std::cmp::Ordering::Greater => 0,
            // A schedule's mark keeps the newest leader's, then the later slot.
            Some(r) if mark && mark_order(&new, r) != std::cmp::Ordering::Greater => 0,
            Some(r) if !job && !mark && new.ts <= r.ts => 0,
            Some(r) => {
                let change = record_hash(user, key, r) ^ record_hash(user, key, &new);
                *r = new;
                change
            }
            None => {
                let change = record_hash(user, key, &new);
                records.insert(key.into(), new);
                change
            }
        }
    }

    /// The job records of this user (a shard scope of jobs), undecodable ones skipped.
    fn jobs(&self) -> impl Iterator<Item = JobRecord> + '_ {
        self.record_entries()
            .filter(|(k, _)| is_job_key(k))
            .filter_map(|(_, r)| keelson_protocol::decode::<JobRecord>(&r.value).ok())
    }

    /// The XOR of the hashes of every live entry of this user.
    fn digest(&self, user: &str) -> u64 {
        let values = self.values.iter().map(|(k, r)| value_hash(user, k, r));
        let shares = self
            .counter_entries()
            .iter()
            .flat_map(|(k, shares)| shares.iter().map(move |s| share_hash(user, k, s)));
        let records = self.record_entries().map(|(k, r)| record_hash(user, k, r));
        values
            .chain(shares)
            .chain(records)
            .fold(0, |acc, h| acc ^ h)
    }

    fn counter_entries(&self) -> &[Counter] {
        self.counters.as_deref().map_or(&[], Vec::as_slice)
    }

    /// Wall time of the latest activity.
    pub(crate) fn last_active_ms(&self) -> u64 {
        self.last_active.wall_ms
    }

    /// Bytes charged against the per-user limit: live values and counters.
    pub(crate) fn size(&self) -> usize {
        let values: usize = self
            .values
            .iter()
            .filter_map(|(k, r)| r.value.as_ref().map(|v| k.len() + v.len() + ENTRY_OVERHEAD))
            .sum();
        let counters: usize = self
            .counter_entries()
            .iter()
            .map(|(k, shares)| k.len() + 8 + ENTRY_OVERHEAD * shares.len())
            .sum();
        values + counters
    }

    fn register(&self, key: &str) -> Option<&Register> {
        self.values
            .iter()
            .find(|(k, _)| &**k == key)
            .map(|(_, r)| r)
    }

    /// Size after setting `key` to a value of `len` bytes.
    pub(crate) fn size_with(&self, key: &str, len: usize) -> usize {
        let old = self
            .register(key)
            .and_then(|r| r.value.as_ref())
            .map_or(0, |v| key.len() + v.len() + ENTRY_OVERHEAD);
        self.size() - old + key.len() + len + ENTRY_OVERHEAD
    }

    /// Merge a value or tombstone; returns the change to the digest.
    fn merge_value(&mut self, user: &str, key: &Key, ts: Stamp, value: Option<Box<[u8]>>) -> u64 {
        let new = Register { ts, value };
        match self.values.iter_mut().find(|(k, _)| k == key) {
            Some((_, r)) if new.ts > r.ts => {
                let change = value_hash(user, key, r) ^ value_hash(user, key, &new);
                *r = new;
                change
            }
            Some(_) => 0,
            None => {
                let change = value_hash(user, key, &new);
                push_boxed(&mut self.values, (key.clone(), new));
                change
            }
        }
    }

    /// Merge a counter share; returns the change to the digest.
    fn merge_share(&mut self, user: &str, key: &Key, node: Node, seq: u64, sum: i64) -> u64 {
        let counters = self.counters.get_or_insert_with(Box::default);
        let shares = match counters.iter_mut().position(|(k, _)| k == key) {
            Some(i) => &mut counters[i].1,
            None => {
                push_exact(counters, (key.clone(), Vec::new()));
                let last = counters.len() - 1;
                &mut counters[last].1
            }
        };
        let new = Share { node, seq, sum };
        match shares.iter_mut().find(|s| s.node == new.node) {
            Some(s) if new.seq > s.seq => {
                let change = share_hash(user, key, s) ^ share_hash(user, key, &new);
                *s = new;
                change
            }
            Some(_) => 0,
            None => {
                let change = share_hash(user, key, &new);
                push_exact(shares, new);
                change
            }
        }
    }

    fn touch(&mut self, ts: &Stamp) {
        self.last_active = self.last_active.max(Active::from(ts));
    }
}

/// All users' contexts on one server.
#[derive(Debug, Default)]
pub(crate) struct State {
    users: BTreeMap<Box<str>, UserState>,
    nodes: HashSet<Node>,
    keys: HashSet<Key>,
    /// The XOR of every user's digest, kept up to date by every change.
    digest: u64,
    /// The instant (Unix ms) of the last expiry sweep: a record that expired by then
    /// and arrives late is not taken, as the peers that swept it no longer hold it.
    swept_ms: u64,
}

impl State {
    pub(crate) fn intern(&mut self, node: &str) -> Node {
        if let Some(n) = self.nodes.get(node) {
            return n.clone();
        }
        let n: Node = node.into();
        self.nodes.insert(n.clone());
        n
    }

    fn key(&mut self, key: &str) -> Key {
        if let Some(k) = self.keys.get(key) {
            return k.clone();
        }
        let k: Key = key.into();
        self.keys.insert(k.clone());
        k
    }

    fn stamp(&mut self, hlc: &Hlc) -> Stamp {
        Stamp {
            wall_ms: hlc.wall_ms,
            logical: hlc.logical,
            node: self.intern(&hlc.node),
        }
    }

    fn user_mut(&mut self, user: &str, seen: &Stamp) -> &mut UserState {
        if !self.users.contains_key(user) {
            self.users.insert(user.into(), UserState::new(seen));
        }
        // Just ensured present; `BTreeMap::entry` would need an owned key every time.
        match self.users.get_mut(user) {
            Some(u) => u,
            None => unreachable!("inserted above"),
        }
    }

    pub(crate) fn user(&self, user: &str) -> Option<&UserState> {
        self.users.get(user)
    }

    pub(crate) fn user_count(&self) -> usize {
        // Job records' shard scopes are no users.
        self.users.len() - self.job_scopes().count()
    }

    /// The shard scopes of job records: at most 256, adjacent in key order.
    fn job_scopes(&self) -> impl Iterator<Item = (&Box<str>, &UserState)> {
        self.users
            .range::<str, _>((
                std::ops::Bound::Included(JOB_SCOPE_PREFIX),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(name, _)| name.starts_with(JOB_SCOPE_PREFIX))
    }

    /// Bytes of every context, as charged against the per-user limit (walks them all).
    pub(crate) fn total_size(&self) -> usize {
        self.users.values().map(UserState::size).sum()
    }

    /// Apply one operation, from this server or a peer.
    pub(crate) fn apply(&mut self, op: &ContextOp) {
        match op {
            ContextOp::Set {
                user,
                key,
                value,
                ts,
            } => {
                let ts = self.stamp(ts);
                if key.starts_with(RECORD_KEY_PREFIX) {
                    // Not interned: record keys are unique.
                    let swept_ms = self.swept_ms;
                    self.digest ^= self.user_mut(user, &ts).merge_record(
                        user,
                        key,
                        ts,
                        value.as_deref(),
                        swept_ms,
                    );
                    return;
                }
                let key = self.key(key);
                let u = self.user_mut(user, &ts);
                u.touch(&ts);
                self.digest ^= u.merge_value(user, &key, ts, value.as_deref().map(Box::from));
            }
            ContextOp::Count {
                user,
                key,
                node,
                seq,
                sum,
            } => {
                let node = self.intern(node);
                let key = self.key(key);
                // A share says nothing about time; a user first seen through one is
                // stamped as never active and gets its time from the next touch.
                let never = Stamp {
                    wall_ms: 0,
                    logical: 0,
                    node: node.clone(),
                };
                let u = self.user_mut(user, &never);
                u.touch(&never);
                self.digest ^= u.merge_share(user, &key, node, *seq, *sum);
            }
            ContextOp::Touch { user, ts } => {
                let ts = self.stamp(ts);
                self.user_mut(user, &ts).touch(&ts);
            }
        }
    }

    /// The live value of `key`.
    pub(crate) fn get(&self, user: &str, key: &str) -> Option<&[u8]> {
        self.users.get(user)?.register(key)?.value.as_deref()
    }

    /// The bytes of the outcome record under `key`, unless expired at `now_ms`.
    pub(crate) fn record(&self, user: &str, key: &str, now_ms: u64) -> Option<&[u8]> {
        let r = self.users.get(user)?.records.as_ref()?.get(key)?;
        (r.expires_ms > now_ms).then_some(&*r.value)
    }

    /// Every live job record at `now_ms`, of every shard scope.
    pub(crate) fn jobs(&self, now_ms: u64) -> Vec<JobRecord> {
        self.job_scopes()
            .flat_map(|(_, u)| u.jobs())
            .filter(|j| j.expires_unix_ms > now_ms)
            .collect()
    }

    /// How many records of client idempotency keys `user` holds.
    pub(crate) fn client_keys(&self, user: &str) -> usize {
        self.users.get(user).map_or(0, |u| {
            u.record_entries().filter(|(k, _)| is_client_key(k)).count()
        })
    }

    /// The value of a counter: the sum of every node's share.
    pub(crate) fn counter(&self, user: &str, key: &str) -> i64 {
        self.users
            .get(user)
            .and_then(|u| u.counter_entries().iter().find(|(k, _)| &**k == key))
            .map_or(0, |(_, shares)| {
                shares.iter().fold(0i64, |acc, s| acc.wrapping_add(s.sum))
            })
    }

    /// A user's live values and counters (their sums), for an operator; `None` when
    /// the user has no context. Outcome records are not included.
    pub(crate) fn view(&self, user: &str) -> Option<UserView<'_>> {
        let u = self.users.get(user)?;
        let values = u
            .values
            .iter()
            .filter_map(|(k, r)| r.value.as_deref().map(|v| (&**k, v)))
            .collect();
        let counters = u
            .counter_entries()
            .iter()
            .map(|(k, shares)| {
                let sum = shares.iter().fold(0i64, |acc, s| acc.wrapping_add(s.sum));
                (&**k, sum)
            })
            .collect();
        Some(UserView { values, counters })
    }

    /// This node's share of a counter: `(seq, sum)`.
    pub(crate) fn share(&self, user: &str, key: &str, node: &str) -> (u64, i64) {
        self.users
            .get(user)
            .and_then(|u| u.counter_entries().iter().find(|(k, _)| &**k == key))
            .and_then(|(_, shares)| shares.iter().find(|s| &*s.node == node))
            .map_or((0, 0), |s| (s.seq, s.sum))
    }

    /// Drop outcome records expired at `now_ms`, users idle since before
    /// `idle_before_ms` that hold no record, and tombstones written before
    /// `tombstones_before_ms`. Returns the number of users dropped.
    pub(crate) fn expire(
        &mut self,
        now_ms: u64,
        idle_before_ms: u64,
        tombstones_before_ms: u64,
    ) -> usize {
        let before = self.users.len();
        self.swept_ms = self.swept_ms.max(now_ms);
        let mut change = 0;
        for (name, u) in &mut self.users {
            if let Some(records) = u.records.as_mut() {
                records.retain(|k, r| {
                    let keep = r.expires_ms > now_ms;
                    if !keep {
                        change ^= record_hash(name, k, r);
                    }
                    keep
                });
                if records.is_empty() {
                    u.records = None;
                }
            }
        }
        self.users.retain(|name, u| {
            let keep = u.last_active.wall_ms >= idle_before_ms || u.records.is_some();
            if !keep {
                change ^= u.digest(name);
            }
            keep
        });
        // Tombstones are no live entries: collecting them leaves the digest as it is.
        self.digest ^= change;
        let expired = |r: &Register| r.value.is_none() && r.ts.wall_ms < tombstones_before_ms;
        for u in self.users.values_mut() {
            if u.values.iter().any(|(_, r)| expired(r)) {
                let mut values = std::mem::take(&mut u.values).into_vec();
                values.retain(|(_, r)| !expired(r));
                u.values = values.into_boxed_slice();
            }
        }
        before - self.users.len()
    }

    /// Up to `max` users after `after`, in order, and the cursor for the next chunk.
    pub(crate) fn snapshot_after(
        &self,
        after: Option<&str>,
        max: usize,
    ) -> (Vec<UserSnapshot>, Option<String>) {
        use std::ops::Bound;
        let start = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        let mut range = self
            .users
            .range::<str, _>((start, Bound::Unbounded))
            .peekable();
        while out.len() < max.max(1) {
            let Some((name, u)) = range.next() else { break };
            out.push(to_snapshot(name, u));
        }
        let next = match range.peek() {
            Some(_) => out.last().map(|u| u.user.clone()),
            None => None,
        };
        (out, next)
    }

    /// Merge a chunk of a peer's state. Users already known are merged in place; new
    /// ones are added in one bulk build, which packs the tree's nodes full (a chunk
    /// arrives in key order, and inserting sorted keys one by one leaves every node
    /// half empty).
    pub(crate) fn merge_snapshots(&mut self, snaps: &[UserSnapshot]) {
        let mut fresh = Vec::new();
        for snap in snaps {
            let active = self.stamp(&snap.last_active);
            let mut state = match self.users.get_mut(snap.user.as_str()) {
                Some(existing) => std::mem::replace(existing, UserState::new(&active)),
                None => UserState::new(&active),
            };
            state.touch(&active);
            for v in &snap.values {
                let ts = self.stamp(&v.ts);
                if v.key.starts_with(RECORD_KEY_PREFIX) {
                    self.digest ^= state.merge_record(
                        &snap.user,
                        &v.key,
                        ts,
                        v.value.as_deref(),
                        self.swept_ms,
                    );
                    continue;
                }
                let key = self.key(&v.key);
                self.digest ^=
                    state.merge_value(&snap.user, &key, ts, v.value.as_deref().map(Box::from));
            }
            for c in &snap.counters {
                let node = self.intern(&c.node);
                let key = self.key(&c.key);
                self.digest ^= state.merge_share(&snap.user, &key, node, c.seq, c.sum);
            }
            match self.users.get_mut(snap.user.as_str()) {
                Some(slot) => *slot = state,
                None => fresh.push((Box::<str>::from(snap.user.as_str()), state)),
            }
        }
        if !fresh.is_empty() {
            let mut fresh: BTreeMap<Box<str>, UserState> = fresh.into_iter().collect();
            self.users.append(&mut fresh);
        }
    }

    /// The instant (Unix ms) as of which the last expiry sweep expired.
    pub(crate) fn swept_ms(&self) -> u64 {
        self.swept_ms
    }

    /// The digest of the whole state: equal on replicas holding equal states.
    pub(crate) fn digest(&self) -> u64 {
        self.digest
    }

    /// The digest computed from scratch (what [`State::digest`] keeps up to date).
    #[cfg(test)]
    pub(crate) fn recomputed_digest(&self) -> u64 {
        self.users
            .iter()
            .fold(0, |acc, (name, u)| acc ^ u.digest(name))
    }

    /// A canonical form of the whole state, equal on replicas that converged.
    #[cfg(test)]
    pub(crate) fn canonical(&self) -> Vec<UserSnapshot> {
        self.users
            .iter()
            .map(|(name, u)| {
                let mut s = to_snapshot(name, u);
                s.values.sort_by(|a, b| a.key.cmp(&b.key));
                s.counters
                    .sort_by(|a, b| (&a.key, &a.node).cmp(&(&b.key, &b.node)));
                s
            })
            .collect()
    }
}

fn to_hlc(s: &Stamp) -> Hlc {
    Hlc {
        wall_ms: s.wall_ms,
        logical: s.logical,
        node: s.node.to_string(),
    }
}

fn to_snapshot(name: &str, u: &UserState) -> UserSnapshot {
    UserSnapshot {
        user: name.to_owned(),
        last_active: Hlc {
            wall_ms: u.last_active.wall_ms,
            logical: u.last_active.logical,
            node: String::new(),
        },
        values: u
            .values
            .iter()
            .map(|(k, r)| ValueEntry {
                key: k.to_string(),
                value: r.value.as_ref().map(|v| v.to_vec()),
                ts: to_hlc(&r.ts),
            })
            .chain(u.record_entries().map(|(k, r)| ValueEntry {
                key: k.to_string(),
                value: Some(r.value.to_vec()),
                ts: to_hlc(&r.ts),
            }))
            .collect(),
        counters: u
            .counter_entries()
            .iter()
            .flat_map(|(k, shares)| {
                shares.iter().map(move |s| CounterEntry {
                    key: k.to_string(),
                    node: s.node.to_string(),
                    seq: s.seq,
                    sum: s.sum,
                })
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests;
