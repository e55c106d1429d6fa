//! [`Effects`]: the context writes of one request, replicated together when it ends.

use super::ContextError;
use keelson_protocol::context::ContextOp;
use std::fmt;
use std::sync::{Mutex, MutexGuard};
use tokio::sync::OwnedMutexGuard;

/// The context writes of one request: applied to the store as they are made,
/// replicated in one delta by [`super::ContextStore::commit`].
///
/// It also holds the write turn of the request's user on this server from the first
/// write until the commit, so that no other request's uncommitted writes travel in
/// this request's delta.
#[derive(Default)]
pub struct Effects {
    inner: Mutex<Inner>,
    /// Writes are kept here, not applied, until the commit (a job's run: see
    /// [`Effects::deferred`]).
    deferred: bool,
}

#[derive(Default)]
struct Inner {
    ops: Vec<ContextOp>,
    turn: Option<OwnedMutexGuard<()>>,
    ended: bool,
    pending: Vec<Pending>,
}

/// A deferred write (see [`Effects::deferred`]).
#[derive(Debug, Clone)]
pub enum Pending {
    /// Set (`Some`) or delete (`None`) a value.
    Set {
        /// The user.
        user: String,
        /// The key.
        key: String,
        /// JSON bytes.
        value: Option<bytes::Bytes>,
    },
    /// Add to a counter.
    Add {
        /// The user.
        user: String,
        /// The counter.
        key: String,
        /// How much.
        by: i64,
    },
}

impl fmt::Debug for Effects {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("Effects")
            .field("ops", &inner.ops.len())
            .field("ended", &inner.ended)
            .finish()
    }
}

impl Effects {
    /// Effects whose writes are neither applied nor replicated until the commit, and
    /// vanish if it never comes: a background job's run, which holds no write turn of
    /// its user for its whole length, and whose writes must not stand if its server
    /// loses its lease to a peer that runs it again. The run reads its own writes
    /// back through [`Effects::pending_value`] and [`Effects::pending_sum`].
    pub fn deferred() -> Self {
        Self {
            deferred: true,
            ..Self::default()
        }
    }

    /// Whether writes wait for the commit.
    pub fn is_deferred(&self) -> bool {
        self.deferred
    }

    /// Keep a deferred write; [`ContextError::Ended`] after [`Effects::end`].
    pub fn defer(&self, write: Pending) -> Result<(), ContextError> {
        let mut inner = self.lock();
        if inner.ended {
            return Err(ContextError::Ended);
        }
        inner.pending.push(write);
        Ok(())
    }

    /// The last deferred write of `key`: `Some(Some(value))`, `Some(None)` for a
    /// deletion, `None` when not written.
    pub fn pending_value(&self, user: &str, key: &str) -> Option<Option<bytes::Bytes>> {
        self.lock().pending.iter().rev().find_map(|p| match p {
            Pending::Set {
                user: u,
                key: k,
                value,
            } if u == user && k == key => Some(value.clone()),
            _ => None,
        })
    }

    /// The sum of the deferred additions to counter `key`.
    pub fn pending_sum(&self, user: &str, key: &str) -> i64 {
        self.lock()
            .pending
            .iter()
            .map(|p| match p {
                Pending::Add {
                    user: u,
                    key: k,
                    by,
                } if u == user && k == key => *by,
                _ => 0,
            })
            .fold(0i64, i64::saturating_add)
    }

    /// Take the deferred writes (to apply them at the commit).
    pub fn take_pending(&self) -> Vec<Pending> {
        std::mem::take(&mut self.lock().pending)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Only pushes and takes: a poisoned lock still holds a valid list.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether no write was made.
    pub fn is_empty(&self) -> bool {
        let inner = self.lock();
        inner.ops.is_empty() && inner.pending.is_empty()
    }

    /// Whether the request holds its user's write turn.
    pub fn has_turn(&self) -> bool {
        self.lock().turn.is_some()
    }

    /// Keep the user's write turn until [`Effects::end`].
    pub fn hold_turn(&self, turn: OwnedMutexGuard<()>) {
        self.lock().turn = Some(turn);
    }

    /// Add a write; [`ContextError::Ended`] after [`Effects::end`].
    pub fn push(&self, ops: impl IntoIterator<Item = ContextOp>) -> Result<(), ContextError> {
        let mut inner = self.lock();
        if inner.ended {
            return Err(ContextError::Ended);
        }
        inner.ops.extend(ops);
        Ok(())
    }

    /// Whether more writes are refused.
    pub fn ended(&self) -> bool {
        self.lock().ended
    }

    /// Take the writes for replication and refuse further ones. The user's write turn
    /// is returned, to be released once the writes are replicated.
    pub fn end(&self) -> (Vec<ContextOp>, Option<OwnedMutexGuard<()>>) {
        let mut inner = self.lock();
        inner.ended = true;
        (std::mem::take(&mut inner.ops), inner.turn.take())
    }
}
