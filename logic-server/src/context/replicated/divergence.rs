//! Divergence detection: comparing this server's context digest with its peers'.
//!
//! Each heartbeat of a settled peer carries a [`ContextDigest`]. When this server has
//! applied exactly the deltas the peer had (every origin both know at the same
//! `seq`, the same expiry sweep), the two states must be equal, and so must the
//! digests. A mismatch at such a moment can still be a race (a delta applied
//! between the two samples), so only [`PERSISTENT_AFTER`] comparable mismatches in a
//! row, with no match between, count as a divergence: logged, counted, and repaired
//! by pulling the peers' state.

use keelson_protocol::context::ContextDigest;
use std::collections::HashMap;

/// Comparable mismatches in a row that make a divergence.
pub(crate) const PERSISTENT_AFTER: u32 = 3;

/// What one comparison found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The two had not applied the same deltas (or swept at different times).
    Incomparable,
    Match,
    /// A mismatch, not (yet) persistent.
    Mismatch,
    /// The mismatch just became persistent: report it (once per episode).
    Diverged,
}

/// Whether two digests were taken over the same applied deltas.
fn comparable(mine: &ContextDigest, theirs: &ContextDigest) -> bool {
    mine.swept_ms == theirs.swept_ms
        && theirs.applied.iter().all(|t| {
            mine.applied
                .iter()
                .find(|m| m.origin == t.origin)
                .is_none_or(|m| m.seq == t.seq)
        })
}

/// Per-peer run of mismatches.
#[derive(Debug, Default)]
pub(crate) struct Divergence {
    in_a_row: HashMap<String, u32>,
    /// Divergences found since start.
    pub(crate) total: u64,
}

impl Divergence {
    /// Compare a peer's digest with this server's, taken now.
    pub(crate) fn observe(
        &mut self,
        peer: &str,
        mine: &ContextDigest,
        theirs: &ContextDigest,
    ) -> Verdict {
        if !comparable(mine, theirs) {
            return Verdict::Incomparable;
        }
        if mine.hash == theirs.hash {
            self.in_a_row.remove(peer);
            return Verdict::Match;
        }
        if self.in_a_row.len() > 1024 {
            // Peers come and go (a new name per restart): forget old runs.
            self.in_a_row.clear();
        }
        let run = self.in_a_row.entry(peer.to_owned()).or_default();
        *run += 1;
        if *run == PERSISTENT_AFTER {
            self.total += 1;
            Verdict::Diverged
        } else {
            Verdict::Mismatch
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keelson_protocol::context::ContextMark;

    fn digest(hash: u64, swept_ms: u64, applied: &[(&str, u64)]) -> ContextDigest {
        ContextDigest {
            hash,
            swept_ms,
            applied: applied
                .iter()
                .map(|(o, s)| ContextMark {
                    origin: (*o).to_owned(),
                    seq: *s,
                })
                .collect(),
        }
    }

    #[test]
    fn only_digests_over_the_same_deltas_and_sweep_are_compared() {
        let mut d = Divergence::default();
        let mine = digest(1, 10, &[("a", 5), ("b", 7)]);
        assert_eq!(
            d.observe("b", &mine, &digest(2, 10, &[("a", 5), ("b", 8)])),
            Verdict::Incomparable
        );
        assert_eq!(
            d.observe("b", &mine, &digest(2, 20, &[("a", 5), ("b", 7)])),
            Verdict::Incomparable
        );
        // An origin only one of them knows (gone before the other joined) is left out.
        assert_eq!(
            d.observe("b", &mine, &digest(1, 10, &[("b", 7), ("old", 3)])),
            Verdict::Match
        );
    }

    #[test]
    fn a_mismatch_is_a_divergence_when_it_persists_and_a_match_ends_the_run() {
        let mut d = Divergence::default();
        let mine = digest(1, 10, &[("a", 5)]);
        let theirs = digest(2, 10, &[("a", 5)]);
        assert_eq!(d.observe("b", &mine, &theirs), Verdict::Mismatch);
        assert_eq!(d.observe("b", &mine, &theirs), Verdict::Mismatch);
        // Incomparable moments neither count nor end the run.
        assert_eq!(
            d.observe("b", &mine, &digest(2, 10, &[("a", 6)])),
            Verdict::Incomparable
        );
        assert_eq!(d.observe("b", &mine, &theirs), Verdict::Diverged);
        assert_eq!(
            d.observe("b", &mine, &theirs),
            Verdict::Mismatch,
            "reported once"
        );
        assert_eq!(d.total, 1);
        assert_eq!(d.observe("b", &mine, &mine), Verdict::Match);
        assert_eq!(d.observe("b", &mine, &theirs), Verdict::Mismatch);
        assert_eq!(d.total, 1);
    }
}
