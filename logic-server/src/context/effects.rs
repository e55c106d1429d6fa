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
}

#[derive(Default)]
struct Inner {
    ops: Vec<ContextOp>,
    turn: Option<OwnedMutexGuard<()>>,
    ended: bool,
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
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Only pushes and takes: a poisoned lock still holds a valid list.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether no write was made.
    pub fn is_empty(&self) -> bool {
        self.lock().ops.is_empty()
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
