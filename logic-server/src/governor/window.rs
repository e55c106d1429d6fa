//! The intake window: how many requests a server takes from the queue at once,
//! between `min_window` and its concurrency.
//!
//! A request that waits *inside* a server before its handler starts (its task is
//! queued behind others on a CPU the server does not get, or behind CPU-bound
//! handlers) would have been better left on the queue, where a peer could take it.
//! Every `window_interval_ms` the governor measures that wait: the age of the oldest
//! delivery whose handler has not started, and how late the governor's own tick ran
//! (a task woken now waits that long for a thread, the consume loop included: it
//! also covers deliveries that arrived while the loop itself waited to run). Then:
//!
//! * above `start_delay_target_ms` two intervals in a row (one late tick may be a
//!   hiccup of the machine; a queue stays), the window halves, and deliveries taken
//!   but not begun go back to the queue (they are the work that waits);
//! * at or below it, while the window was full, it grows by a quarter (at least one);
//! * otherwise it stays.
//!
//! A healthy server starts its handlers at once and keeps the whole window; a server
//! starved of CPU narrows to a request or two and leaves the rest to its peers.
//! A server that no other server of its service helps (as its heartbeats tell) keeps
//! the whole window unless `pause_last_consumer` is set: with no peer, a narrower
//! window only moves the wait from the server to the queue, at a round trip a
//! request.

use std::time::Duration;

/// Decides the window from the start delays, one interval at a time (pure).
#[derive(Debug, Clone)]
pub struct WindowControl {
    cap: u16,
    min: u16,
    size: u16,
    target: Duration,
    /// Intervals in a row with the wait above the target.
    late: u8,
}

impl WindowControl {
    /// A window starting at `cap` (the concurrency), never below `min`, aiming at
    /// start delays of at most `target`.
    pub fn new(cap: u16, min: u16, target: Duration) -> Self {
        let cap = cap.max(1);
        Self {
            cap,
            min: min.clamp(1, cap),
            size: cap,
            target,
            late: 0,
        }
    }

    /// The window now.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Back to the whole window (the server has no peer to leave work to); returns
    /// the new window when it changes.
    pub fn reset(&mut self) -> Option<u16> {
        self.late = 0;
        (self.size != self.cap).then(|| {
            self.size = self.cap;
            self.cap
        })
    }

    /// One interval's figures: how long work waited inside the server, and whether
    /// as many requests as the window were in flight at some point. Returns the new
    /// window when it changes.
    pub fn observe(&mut self, wait: Duration, filled: bool) -> Option<u16> {
        self.late = if wait > self.target {
            self.late.saturating_add(1)
        } else {
            0
        };
        let next = if self.late >= 2 {
            self.late = 0;
            (self.size / 2).max(self.min)
        } else if self.late > 0 {
            self.size
        } else if filled {
            self.size
                .saturating_add((self.size / 4).max(1))
                .min(self.cap)
        } else {
            self.size
        };
        (next != self.size).then(|| {
            self.size = next;
            next
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGET: Duration = Duration::from_millis(5);
    const LATE: Duration = Duration::from_millis(40);
    const PROMPT: Duration = Duration::from_micros(300);

    #[test]
    fn a_standing_queue_halves_the_window_down_to_the_minimum() {
        let mut w = WindowControl::new(64, 2, TARGET);
        let sizes: Vec<_> = (0..14).map(|_| w.observe(LATE, true)).collect();
        assert_eq!(
            sizes,
            [
                None,
                Some(32),
                None,
                Some(16),
                None,
                Some(8),
                None,
                Some(4),
                None,
                Some(2),
                None,
                None,
                None,
                None
            ]
        );
        assert_eq!(w.size(), 2);
    }

    #[test]
    fn prompt_starts_in_a_full_window_widen_it_back_to_the_cap() {
        let mut w = WindowControl::new(64, 1, TARGET);
        for _ in 0..12 {
            w.observe(LATE, true);
        }
        assert_eq!(w.size(), 1);
        let mut sizes = Vec::new();
        while let Some(s) = w.observe(PROMPT, true) {
            sizes.push(s);
        }
        assert_eq!(sizes.first(), Some(&2));
        assert_eq!(sizes.last(), Some(&64));
        assert!(sizes.windows(2).all(|p| p[1] > p[0]));
        assert!(
            sizes.len() < 25,
            "back to the cap in {} intervals",
            sizes.len()
        );
    }

    #[test]
    fn a_reset_restores_the_whole_window() {
        let mut w = WindowControl::new(64, 1, TARGET);
        assert_eq!(w.reset(), None);
        w.observe(LATE, true);
        w.observe(LATE, true);
        assert_eq!(w.reset(), Some(64));
        assert_eq!(w.observe(LATE, true), None, "the late streak starts again");
    }

    #[test]
    fn one_late_interval_is_a_hiccup() {
        let mut w = WindowControl::new(64, 1, TARGET);
        for _ in 0..5 {
            assert_eq!(w.observe(LATE, true), None);
            assert_eq!(w.observe(PROMPT, false), None);
        }
        assert_eq!(w.size(), 64);
    }

    #[test]
    fn a_window_that_is_not_full_stays() {
        let mut w = WindowControl::new(64, 1, TARGET);
        w.observe(LATE, true);
        w.observe(LATE, true);
        assert_eq!(
            w.observe(PROMPT, false),
            None,
            "not full: no evidence it is short"
        );
        assert_eq!(w.observe(TARGET, false), None);
        assert_eq!(w.size(), 32);
        assert_eq!(
            w.observe(TARGET, true),
            Some(40),
            "the target itself is not late"
        );
    }
}
