//! A hybrid logical clock (Kulkarni et al.): timestamps that follow wall time, never
//! go backwards, and order every event after the events it has seen from peers,
//! even when clocks disagree by a little.

use super::state::{Node, Stamp};
use std::time::{SystemTime, UNIX_EPOCH};

/// The clock of one node.
#[derive(Debug)]
pub(crate) struct Clock {
    node: Node,
    wall_ms: u64,
    logical: u32,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Clock {
    pub(crate) fn new(node: Node) -> Self {
        Self {
            node,
            wall_ms: 0,
            logical: 0,
        }
    }

    /// A stamp for a local event, later than every stamp issued or observed before.
    pub(crate) fn tick(&mut self) -> Stamp {
        let now = now_ms();
        if now > self.wall_ms {
            self.wall_ms = now;
            self.logical = 0;
        } else {
            self.bump();
        }
        self.stamp()
    }

    /// Take a peer's stamp into account, so later local events order after it.
    pub(crate) fn observe(&mut self, wall_ms: u64, logical: u32) {
        let now = now_ms();
        if now > self.wall_ms && now > wall_ms {
            self.wall_ms = now;
            self.logical = 0;
        } else if wall_ms > self.wall_ms {
            self.wall_ms = wall_ms;
            self.logical = logical;
            self.bump();
        } else if wall_ms == self.wall_ms {
            self.logical = self.logical.max(logical);
            self.bump();
        }
    }

    fn bump(&mut self) {
        match self.logical.checked_add(1) {
            Some(l) => self.logical = l,
            // Four billion events in one millisecond: move to the next one.
            None => {
                self.wall_ms += 1;
                self.logical = 0;
            }
        }
    }

    fn stamp(&self) -> Stamp {
        Stamp {
            wall_ms: self.wall_ms,
            logical: self.logical,
            node: self.node.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_only_grow_and_follow_observed_peers() {
        let mut c = Clock::new("a".into());
        let a = c.tick();
        let b = c.tick();
        assert!(b > a);
        // A peer an hour ahead: our next stamp orders after its.
        let ahead = a.wall_ms + 3_600_000;
        c.observe(ahead, 7);
        let d = c.tick();
        assert!(d.wall_ms == ahead && d.logical > 7, "{d:?}");
    }
}
