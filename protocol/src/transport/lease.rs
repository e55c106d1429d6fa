//! Leases: at most one holder at a time in the whole mesh, with a fencing token.
//!
//! A process asks for a lease by name ([`super::Transport::lease`]) and gets a
//! [`Lease`]: a candidate that waits in line. When it becomes the holder,
//! [`Lease::next`] returns [`LeaseEvent::Acquired`] with its **token**, a number that
//! is strictly greater than the token of every earlier holder of that lease. While it
//! holds the lease the candidate keeps it alive by itself; when it can no longer be
//! sure that it holds it (its connection is gone, or a renewal was not confirmed in
//! time), it **fences itself**: [`Fence::check`] turns `None` at once, *before* the
//! lease can be given to another candidate, and [`Lease::next`] returns
//! [`LeaseEvent::Lost`]. The candidate then waits in line again by itself.
//!
//! Whoever acts on the strength of a lease checks the [`Fence`] right before acting,
//! and passes the token on with what it does, so that a receiver can refuse work
//! from an older holder (a process that was frozen between its check and its act).
//!
//! On AMQP a lease is a quorum queue with a single active consumer holding one
//! *baton* message (see `TOPOLOGY.md`, "Leases"); on the memory transport it is a
//! queue of candidates in the process, with the same semantics.

use async_trait::async_trait;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// What happened to a [`Lease`] candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    /// This candidate now holds the lease, with this token (greater than every
    /// earlier holder's).
    Acquired {
        /// The fencing token.
        token: u64,
    },
    /// This candidate no longer holds the lease it held with `token`: it fenced
    /// itself (its [`Fence`] already says so) and waits in line again.
    Lost {
        /// The token it held.
        token: u64,
        /// Why, for the log.
        reason: String,
    },
}

/// A candidate for a lease (see the module documentation).
///
/// Dropping it, or [`Lease::release`], gives the lease up at once: the next
/// candidate acquires it without waiting for any timeout.
#[async_trait]
pub trait Lease: Send + fmt::Debug {
    /// The next change: acquired or lost. `None` once the transport is closed (the
    /// lease is then not held). Cancel-safe.
    async fn next(&mut self) -> Option<LeaseEvent>;

    /// The fence of this candidate: cheap to clone, shared with the tasks acting on
    /// the lease.
    fn fence(&self) -> Fence;

    /// Give the lease up (if held) and leave the line; the next candidate acquires it
    /// at once. After this, [`Lease::next`] returns `None`.
    async fn release(&mut self);
}

/// Whether a lease is held *now*, and with which token: checked right before acting.
#[derive(Clone, Default)]
pub struct Fence {
    state: Arc<FenceState>,
}

#[derive(Default)]
struct FenceState {
    /// The token held, 0 while not held.
    token: AtomicU64,
    /// Until when (nanoseconds after [`epoch`]) the holder is sure to hold it.
    valid_until: AtomicU64,
}

/// The process-wide origin of the monotonic instants a fence stores.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn nanos_since_epoch(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

impl Fence {
    /// A fence not held.
    pub fn new() -> Self {
        Self::default()
    }

    /// The token, if the lease is held at this instant (the monotonic clock has not
    /// passed the end of the last confirmed renewal's validity).
    pub fn check(&self) -> Option<u64> {
        let token = self.state.token.load(Ordering::Acquire);
        if token == 0 {
            return None;
        }
        let until = self.state.valid_until.load(Ordering::Acquire);
        // A hold in progress (see `hold`) changes the token around the validity:
        // read it again, so that an old token is never paired with a new validity.
        if self.state.token.load(Ordering::Acquire) != token {
            return None;
        }
        (nanos_since_epoch(Instant::now()) < until).then_some(token)
    }

    /// The token last held or held now (0 if never): for logs and status.
    pub fn token(&self) -> u64 {
        self.state.token.load(Ordering::Acquire)
    }

    /// How long the lease stays valid from now without another renewal; zero when
    /// not held.
    pub fn remaining(&self) -> Duration {
        if self.state.token.load(Ordering::Acquire) == 0 {
            return Duration::ZERO;
        }
        let until = self.state.valid_until.load(Ordering::Acquire);
        Duration::from_nanos(until.saturating_sub(nanos_since_epoch(Instant::now())))
    }

    /// Resolves once the fence no longer holds (checked at its validity's end and
    /// every `poll` until then, since a renewal may extend it). Cancel-safe.
    pub async fn expired(&self, poll: Duration) {
        while self.check().is_some() {
            let left = self.remaining();
            tokio::time::sleep(left.min(poll).max(Duration::from_millis(1))).await;
        }
    }

    /// Transport side: hold with `token`, valid until `until`.
    pub fn hold(&self, token: u64, until: Instant) {
        // Not held while the validity changes (`check` reads the token on both sides).
        self.state.token.store(0, Ordering::Release);
        self.state
            .valid_until
            .store(nanos_since_epoch(until), Ordering::Release);
        self.state.token.store(token, Ordering::Release);
    }

    /// Transport side: a renewal confirmed; valid until `until` (never shortened).
    pub fn extend(&self, until: Instant) {
        self.state
            .valid_until
            .fetch_max(nanos_since_epoch(until), Ordering::AcqRel);
    }

    /// Transport side: not held any more (the token stays readable by [`Fence::token`]).
    pub fn drop_hold(&self) {
        self.state.valid_until.store(0, Ordering::Release);
    }
}

impl fmt::Debug for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fence")
            .field("token", &self.token())
            .field("held", &self.check().is_some())
            .finish()
    }
}

/// Checks a lease name: 1–100 characters of `[a-z0-9._-]`, as it becomes part of a
/// queue name.
pub fn check_lease_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "lease name `{name}`: expected 1 to 100 characters of a-z, 0-9, `.`, `_`, `-`"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_fence_holds_until_its_validity_ends() {
        let fence = Fence::new();
        assert_eq!(fence.check(), None);
        fence.hold(7, Instant::now() + Duration::from_millis(50));
        assert_eq!(fence.check(), Some(7));
        fence.extend(Instant::now()); // never shortened
        assert_eq!(fence.check(), Some(7));
        fence.expired(Duration::from_millis(5)).await;
        assert_eq!(fence.check(), None);
        assert_eq!(fence.token(), 7);
        fence.hold(8, Instant::now() + Duration::from_secs(60));
        fence.drop_hold();
        assert_eq!(fence.check(), None);
    }

    #[test]
    fn lease_names_are_checked() {
        assert!(check_lease_name("singleton.report-sweeper_1").is_ok());
        assert!(check_lease_name("").is_err());
        assert!(check_lease_name("Upper").is_err());
        assert!(check_lease_name("a/b").is_err());
    }
}
