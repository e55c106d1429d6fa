//! Gap detection: what this server applied of each peer's numbered deltas.
//!
//! Deltas are broadcast at most once (a subscriber whose connection is down misses
//! them). Each carries its origin (one incarnation of a server) and a sequence
//! number, and heartbeats carry the origin's last number, so a server sees that it
//! missed one: a number skipped and not filled within [`GRACE`] (deltas of one
//! origin may overtake each other slightly, as they are published by concurrent
//! requests), or a heartbeat announcing more than it applied for as long. Then it
//! pulls the peers' state at once instead of waiting for the periodic resync.
//!
//! An origin first heard of mid-stream is taken as known up to there: what it
//! published before is in the snapshot this server joined with.

use keelson_protocol::context::ContextMark;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use tokio::time::Instant;

/// How long a missing delta may be late before it counts as lost.
pub(crate) const GRACE: Duration = Duration::from_millis(500);
/// Least time between two repairs (each is a full pull of the peers' state).
pub(crate) const MIN_BETWEEN_REPAIRS: Duration = Duration::from_secs(5);
/// An origin not heard from for this long is forgotten (a server long gone).
const FORGET_AFTER: Duration = Duration::from_secs(3600);

#[derive(Debug)]
struct Origin {
    /// Every delta up to this one was applied.
    contiguous: u64,
    /// Applied, beyond a missing one.
    ahead: BTreeSet<u64>,
    /// The highest number its heartbeats announced.
    announced: u64,
    /// Since when something is missing.
    behind_since: Option<Instant>,
    heard: Instant,
}

impl Origin {
    fn new(known_up_to: u64, now: Instant) -> Self {
        Self {
            contiguous: known_up_to,
            ahead: BTreeSet::new(),
            announced: known_up_to,
            behind_since: None,
            heard: now,
        }
    }

    fn behind(&self) -> bool {
        !self.ahead.is_empty() || self.announced > self.contiguous
    }

    /// The highest number known to exist.
    fn known(&self) -> u64 {
        self.announced
            .max(self.ahead.last().copied().unwrap_or(0))
            .max(self.contiguous)
    }

    fn settle(&mut self, now: Instant) {
        while self.ahead.first() == Some(&(self.contiguous + 1)) {
            self.ahead.pop_first();
            self.contiguous += 1;
        }
        let contiguous = self.contiguous;
        self.ahead.retain(|&s| s > contiguous);
        if self.behind() {
            self.behind_since.get_or_insert(now);
        } else {
            self.behind_since = None;
        }
    }
}

/// The origins to repair, and up to which number a repair covers each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Missing(Vec<(String, u64)>);

impl Missing {
    pub(crate) fn origins(&self) -> Vec<&str> {
        self.0.iter().map(|(o, _)| o.as_str()).collect()
    }
}

/// Per-origin bookkeeping of one server.
#[derive(Debug, Default)]
pub(crate) struct Gaps {
    origins: HashMap<String, Origin>,
    last_repair: Option<Instant>,
}

impl Gaps {
    /// Delta `seq` of `origin` was applied.
    pub(crate) fn applied(&mut self, origin: &str, seq: u64, now: Instant) {
        let o = self
            .origins
            .entry(origin.to_owned())
            .or_insert_with(|| Origin::new(seq.saturating_sub(1), now));
        o.heard = now;
        if seq > o.contiguous {
            o.ahead.insert(seq);
        }
        o.settle(now);
    }

    /// A heartbeat of `origin` said its last delta is `seq`.
    pub(crate) fn announced(&mut self, origin: &str, seq: u64, now: Instant) {
        let o = self
            .origins
            .entry(origin.to_owned())
            .or_insert_with(|| Origin::new(seq, now));
        o.heard = now;
        o.announced = o.announced.max(seq);
        o.settle(now);
    }

    /// The origins missing a delta for longer than [`GRACE`], unless a repair ran
    /// less than [`MIN_BETWEEN_REPAIRS`] ago. Taking them starts a repair.
    pub(crate) fn due(&mut self, now: Instant) -> Option<Missing> {
        self.origins
            .retain(|_, o| now.duration_since(o.heard) < FORGET_AFTER);
        if self
            .last_repair
            .is_some_and(|at| now.duration_since(at) < MIN_BETWEEN_REPAIRS)
        {
            return None;
        }
        let missing: Vec<(String, u64)> = self
            .origins
            .iter()
            .filter(|(_, o)| {
                o.behind_since
                    .is_some_and(|at| now.duration_since(at) >= GRACE)
            })
            .map(|(name, o)| (name.clone(), o.known()))
            .collect();
        if missing.is_empty() {
            return None;
        }
        self.last_repair = Some(now);
        Some(Missing(missing))
    }

    /// Up to which number each origin's deltas are applied without a hole; `None`
    /// while any delta is applied beyond a missing one (the state is then not what
    /// any list of numbers describes).
    pub(crate) fn applied_marks(&self) -> Option<Vec<ContextMark>> {
        self.origins
            .iter()
            .map(|(name, o)| {
                o.ahead.is_empty().then(|| ContextMark {
                    origin: name.clone(),
                    seq: o.contiguous,
                })
            })
            .collect()
    }

    /// A repair pulled the peers' state: what it covers counts as applied.
    pub(crate) fn repaired(&mut self, missing: &Missing, now: Instant) {
        for (name, upto) in &missing.0 {
            if let Some(o) = self.origins.get_mut(name) {
                o.contiguous = o.contiguous.max(*upto);
                o.behind_since = None;
                o.settle(now);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn in_order_and_slightly_reordered_deltas_leave_no_gap() {
        let t = Instant::now();
        let mut g = Gaps::default();
        for seq in [5, 6, 8, 7, 9] {
            g.applied("a", seq, t);
        }
        g.announced("a", 9, t);
        assert_eq!(g.due(t + GRACE * 2), None);
    }

    #[test]
    fn a_missing_delta_is_due_after_the_grace_and_a_repair_covers_it() {
        let t = Instant::now();
        let mut g = Gaps::default();
        g.applied("a", 1, t);
        g.applied("a", 3, t);
        assert_eq!(g.due(t + GRACE / 2), None, "it may still come");
        let missing = g.due(t + GRACE).expect("due");
        assert_eq!(missing.origins(), ["a"]);
        g.repaired(&missing, t + GRACE);
        g.applied("a", 4, t + GRACE);
        assert_eq!(g.due(t + MIN_BETWEEN_REPAIRS * 2), None);
    }

    #[test]
    fn a_heartbeat_ahead_of_what_was_applied_is_a_gap() {
        let t = Instant::now();
        let mut g = Gaps::default();
        g.applied("a", 10, t);
        g.announced("a", 30, t);
        let missing = g.due(t + GRACE).expect("due");
        g.repaired(&missing, t + GRACE);
        g.announced("a", 30, t + GRACE);
        assert_eq!(g.due(t + MIN_BETWEEN_REPAIRS * 2), None);
        // A late delta filled by then: nothing missing either.
        g.applied("a", 12, t);
        g.announced("a", 31, t + GRACE);
        g.applied("a", 31, t + GRACE);
        assert_eq!(g.due(t + MIN_BETWEEN_REPAIRS * 3), None);
    }

    #[test]
    fn repairs_are_spaced() {
        let t = Instant::now();
        let mut g = Gaps::default();
        g.announced("a", 1, t);
        g.announced("a", 5, t);
        assert!(g.due(t + GRACE).is_some());
        g.announced("b", 1, t);
        g.announced("b", 9, t + GRACE);
        assert_eq!(g.due(t + GRACE * 3), None, "too soon after the last repair");
        assert!(g.due(t + GRACE + MIN_BETWEEN_REPAIRS).is_some());
    }

    #[test]
    fn an_origin_first_heard_of_mid_stream_is_known_up_to_there() {
        let t = Instant::now();
        let mut g = Gaps::default();
        g.applied("late", 100, t);
        g.announced("other", 50, t);
        assert_eq!(g.due(t + GRACE * 2), None);
    }
}
