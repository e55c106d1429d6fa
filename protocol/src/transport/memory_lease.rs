//! Leases on the memory transport: a line of candidates per lease name in the
//! process. The first in line holds the lease; giving it up (release, drop) hands it
//! to the next at once with the next token. Nothing outside the process can take it,
//! so a holder keeps it until it gives it up or the transport closes.

use super::lease::{Fence, Lease, LeaseEvent};
use async_trait::async_trait;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How long a memory lease's fence is valid from its grant: it is never renewed
/// because nothing can take it away (about a century).
const FOREVER: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each critical section below is a few collection operations that cannot panic
    // half-way.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every lease line of one memory transport.
#[derive(Debug, Default)]
pub(super) struct Leases {
    lines: Mutex<HashMap<String, Line>>,
}

#[derive(Debug, Default)]
struct Line {
    /// The last token granted on this line (0: never).
    last_token: u64,
    /// Candidate ids in line; the first holds the lease when `held` is true.
    waiting: VecDeque<u64>,
    held: bool,
    next_id: u64,
    /// Each candidate's grant (`Some(token)` once it holds the lease) and fence (held
    /// from the grant on, before the candidate hears of it, as on AMQP).
    grants: HashMap<u64, (watch::Sender<Option<u64>>, Fence)>,
}

impl Line {
    /// Grant the lease to the first in line if nobody holds it.
    fn grant(&mut self) {
        if self.held {
            return;
        }
        if let Some(first) = self.waiting.front() {
            self.last_token += 1;
            self.held = true;
            if let Some((tx, fence)) = self.grants.get(first) {
                fence.hold(self.last_token, Instant::now() + FOREVER);
                tx.send_replace(Some(self.last_token));
            }
        }
    }
}

impl Leases {
    /// Put a new candidate in line for `name`.
    pub(super) fn join(
        self: &Arc<Self>,
        name: &str,
        fence: &Fence,
    ) -> (u64, watch::Receiver<Option<u64>>) {
        let mut lines = lock(&self.lines);
        let line = lines.entry(name.to_owned()).or_default();
        line.next_id += 1;
        let id = line.next_id;
        let (tx, rx) = watch::channel(None);
        line.grants.insert(id, (tx, fence.clone()));
        line.waiting.push_back(id);
        line.grant();
        (id, rx)
    }

    /// Take candidate `id` out of the line of `name`, handing the lease on if it held it.
    fn leave(&self, name: &str, id: u64) {
        let mut lines = lock(&self.lines);
        let Some(line) = lines.get_mut(name) else {
            return;
        };
        if line.waiting.front() == Some(&id) && line.held {
            line.held = false;
        }
        line.waiting.retain(|c| *c != id);
        line.grants.remove(&id);
        line.grant();
    }
}

/// A candidate for a lease on the memory transport.
pub(super) struct MemoryLease {
    pub(super) leases: Arc<Leases>,
    pub(super) name: String,
    pub(super) id: Option<u64>,
    pub(super) grant: watch::Receiver<Option<u64>>,
    pub(super) fence: Fence,
    /// The token announced by `next` (so each grant is announced once).
    pub(super) announced: Option<u64>,
    /// Resolves when the transport closes.
    pub(super) closed: watch::Receiver<bool>,
}

impl fmt::Debug for MemoryLease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryLease")
            .field("name", &self.name)
            .field("fence", &self.fence)
            .finish()
    }
}

impl MemoryLease {
    fn leave(&mut self) {
        if let Some(id) = self.id.take() {
            self.fence.drop_hold();
            self.leases.leave(&self.name, id);
        }
    }
}

#[async_trait]
impl Lease for MemoryLease {
    async fn next(&mut self) -> Option<LeaseEvent> {
        loop {
            if self.id.is_none() || *self.closed.borrow() {
                self.leave();
                return None;
            }
            let granted = *self.grant.borrow_and_update();
            if let Some(token) = granted
                && self.announced != Some(token)
            {
                self.announced = Some(token);
                return Some(LeaseEvent::Acquired { token });
            }
            tokio::select! {
                changed = self.grant.changed() => {
                    if changed.is_err() {
                        self.leave();
                        return None;
                    }
                }
                _ = self.closed.changed() => {}
            }
        }
    }

    fn fence(&self) -> Fence {
        self.fence.clone()
    }

    async fn release(&mut self) {
        self.leave();
    }
}

impl Drop for MemoryLease {
    fn drop(&mut self) {
        self.leave();
    }
}
