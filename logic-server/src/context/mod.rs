//! Per-user context: the server-side state of a signed-in user (Keel's per-user
//! Context, the equivalent of a servlet session).
//!
//! Handlers reach it through [`UserContext`], bound to the verified user of their
//! request, never to another. Values are JSON documents under string keys; counters
//! are separate, integer-valued, and changed only by increments.
//!
//! Storage is behind [`ContextStore`], so the local store of a single process
//! ([`LocalContextStore`]) and a replicated store shared by many logic servers are
//! interchangeable.
//!
//! # Which write wins
//!
//! * `set` and `delete` of one key: the later write wins. In one process "later" is
//!   the order the store saw them.
//! * `increment` of a counter never loses an update: concurrent increments add up.
//!   Use a counter rather than get-then-set for anything that counts.

mod local;
mod replicated;

pub use local::LocalContextStore;
pub use replicated::ReplicatedContextStore;

use async_trait::async_trait;
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt;
use std::sync::Arc;

/// Why a context operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ContextError {
    /// The write would make the user's context larger than its limit.
    #[error("the user's context would take {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// Size the context would have after the write.
        size: usize,
        /// The per-user limit.
        limit: usize,
    },
    /// The store holds as many users as it may.
    #[error("the context store is full ({limit} users)")]
    StoreFull {
        /// The limit on users.
        limit: usize,
    },
    /// A stored value could not be read as the requested type.
    #[error("context key `{key}` holds a value of another shape: {reason}")]
    WrongShape {
        /// The key.
        key: String,
        /// What serde said.
        reason: String,
    },
    /// A counter would overflow.
    #[error("counter `{key}` would overflow")]
    NotANumber {
        /// The key.
        key: String,
    },
    /// The store cannot be reached.
    #[error("context store unavailable: {0}")]
    Unavailable(String),
}

/// Storage of per-user contexts, shared by all requests of a server.
///
/// Implementations are safe to call concurrently. `user` is always a verified user
/// id; the store never decides who may read what (that is [`UserContext`]'s job).
#[async_trait]
pub trait ContextStore: Send + Sync + fmt::Debug + 'static {
    /// The JSON value under `key`, if any.
    async fn get(&self, user: &str, key: &str) -> Result<Option<Bytes>, ContextError>;
    /// Store a JSON value under `key`, replacing any previous value.
    async fn set(&self, user: &str, key: &str, value: Bytes) -> Result<(), ContextError>;
    /// Remove `key`; whether it existed.
    async fn delete(&self, user: &str, key: &str) -> Result<bool, ContextError>;
    /// Add `by` to the counter `key` (absent counters are 0); the new value.
    async fn increment(&self, user: &str, key: &str, by: i64) -> Result<i64, ContextError>;
    /// The value of the counter `key` (0 when absent).
    async fn counter(&self, user: &str, key: &str) -> Result<i64, ContextError>;
    /// How many users have a context.
    fn user_count(&self) -> usize;
}

/// The context of one verified user, as a handler sees it.
#[derive(Clone)]
pub struct UserContext {
    store: Arc<dyn ContextStore>,
    user: String,
}

impl fmt::Debug for UserContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserContext")
            .field("user", &self.user)
            .finish()
    }
}

impl UserContext {
    /// Bind `store` to `user`. Only the server does this, with the verified user.
    pub(crate) fn new(store: Arc<dyn ContextStore>, user: String) -> Self {
        Self { store, user }
    }

    /// The user this context belongs to.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The value under `key`, deserialized as `T`.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, ContextError> {
        match self.store.get(&self.user, key).await? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| ContextError::WrongShape {
                        key: key.to_owned(),
                        reason: e.to_string(),
                    })
            }
        }
    }

    /// Store `value` under `key`. The later of two writes to one key wins.
    pub async fn set<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<(), ContextError> {
        let bytes = serde_json::to_vec(value).map_err(|e| ContextError::WrongShape {
            key: key.to_owned(),
            reason: e.to_string(),
        })?;
        self.store.set(&self.user, key, bytes.into()).await
    }

    /// Remove `key`; whether it existed.
    pub async fn delete(&self, key: &str) -> Result<bool, ContextError> {
        self.store.delete(&self.user, key).await
    }

    /// Add `by` to the counter `key`; concurrent increments all count.
    pub async fn increment(&self, key: &str, by: i64) -> Result<i64, ContextError> {
        self.store.increment(&self.user, key, by).await
    }

    /// The current value of the counter `key` (0 when never incremented).
    pub async fn counter(&self, key: &str) -> Result<i64, ContextError> {
        self.store.counter(&self.user, key).await
    }
}
