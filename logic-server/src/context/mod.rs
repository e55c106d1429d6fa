//! Per-user context: the server-side state of a signed-in user (Keel's per-user
//! Context, the equivalent of a servlet session).
//!
//! Handlers reach it through [`UserContext`], bound to the verified user of their
//! request, never to another. Values are JSON documents under string keys; counters
//! are separate, integer-valued, and changed only by increments.
//!
//! Storage is behind [`ContextStore`]; [`ReplicatedContextStore`] keeps every user's
//! context on every logic server of the mesh (one process alone included).
//!
//! # One request, one delta
//!
//! The writes a handler makes are its request's [`Effects`]: applied to this server's
//! store at once (the handler and this server read them back), and replicated to the
//! peers together, in one delta, with the request's recorded outcome when the request
//! ends ([`ContextStore::commit`]). A peer therefore holds a request's effects and its
//! outcome together or neither, and a redelivery finds either both (and is answered
//! from the record) or neither (and runs again). The writing requests of one user
//! run one at a time on a server (from the first write to the commit), so that a
//! delta never carries another request's uncommitted effects.
//!
//! # Which write wins
//!
//! * `set` and `delete` of one key: the later write wins. In one process "later" is
//!   the order the store saw them.
//! * `increment` of a counter never loses an update: concurrent increments add up.
//!   Use a counter rather than get-then-set for anything that counts.

mod effects;
mod replicated;

pub use effects::{Effects, Pending};
pub use replicated::{ReplicatedContextStore, describe_metrics};

use async_trait::async_trait;
use bytes::Bytes;
use keelson_protocol::context::{ContextDigest, ContextMark};
use keelson_protocol::idempotency::OutcomeRecord;
use keelson_protocol::job::JobRecord;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt;
use std::sync::Arc;
use tokio::time::Instant;

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
    /// Keys starting with a NUL character are Keelson's own (outcome records).
    #[error("context key `{key:?}` is reserved: keys may not start with a NUL character")]
    ReservedKey {
        /// The key.
        key: String,
    },
    /// The request these writes belonged to has ended (a task the handler spawned
    /// outlived it); its effects were already replicated.
    #[error("the request has ended; its context can no longer be written")]
    Ended,
}

/// A recorded outcome to replicate with a request's effects.
#[derive(Debug, Clone)]
pub struct RecordWrite {
    /// The user, or [`keelson_protocol::idempotency::ANONYMOUS_SCOPE`].
    pub scope: String,
    /// [`keelson_protocol::idempotency::record_key`].
    pub key: String,
    /// The record.
    pub record: RecordValue,
}

/// What a [`RecordWrite`] records.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum RecordValue {
    /// A keyed request's outcome (the later write wins).
    Outcome(OutcomeRecord),
    /// A background job's record (the one that got further wins).
    Job(Box<JobRecord>),
    /// A schedule's mark (the newest leader's, then the later slot, wins).
    Schedule(keelson_protocol::schedule::ScheduleMark),
}

impl RecordWrite {
    /// The write of a schedule's mark.
    pub fn schedule(mark: keelson_protocol::schedule::ScheduleMark) -> Self {
        Self {
            scope: keelson_protocol::schedule::SCHEDULES_SCOPE.to_owned(),
            key: keelson_protocol::schedule::mark_key(&mark.name),
            record: RecordValue::Schedule(mark),
        }
    }

    /// The write of a job's record, at its place (see
    /// [`keelson_protocol::job::record_location`]).
    pub fn job(record: JobRecord) -> Self {
        let (scope, key) = keelson_protocol::job::record_location(&record.id);
        Self {
            scope,
            key,
            record: RecordValue::Job(Box::new(record)),
        }
    }
}

/// Storage of per-user contexts, shared by all requests of a server.
///
/// Implementations are safe to call concurrently. `user` is always a verified user
/// id; the store never decides who may read what (that is [`UserContext`]'s job).
///
/// Writes go into an [`Effects`]: applied here at once, replicated by
/// [`ContextStore::commit`]. `set`, `delete` and `increment` without effects are one
/// write committed at once.
#[async_trait]
pub trait ContextStore: Send + Sync + fmt::Debug + 'static {
    /// The JSON value under `key`, if any.
    async fn get(&self, user: &str, key: &str) -> Result<Option<Bytes>, ContextError>;
    /// The value of the counter `key` (0 when absent).
    async fn counter(&self, user: &str, key: &str) -> Result<i64, ContextError>;
    /// Store a JSON value under `key`, replacing any previous value, as part of
    /// `effects`.
    async fn set_in(
        &self,
        effects: &Effects,
        user: &str,
        key: &str,
        value: Bytes,
    ) -> Result<(), ContextError>;
    /// Remove `key` as part of `effects`; whether it existed.
    async fn delete_in(
        &self,
        effects: &Effects,
        user: &str,
        key: &str,
    ) -> Result<bool, ContextError>;
    /// Add `by` to the counter `key` (absent counters are 0) as part of `effects`;
    /// the new value.
    async fn increment_in(
        &self,
        effects: &Effects,
        user: &str,
        key: &str,
        by: i64,
    ) -> Result<i64, ContextError>;
    /// Replicate `effects`, and `record` with them, in one delta; retried until
    /// `deadline`. On an error the effects and the record stand on this server and
    /// are replicated later, when the transport carries traffic again. Afterwards
    /// `effects` takes no more writes ([`ContextError::Ended`]).
    async fn commit(
        &self,
        effects: &Effects,
        record: Option<RecordWrite>,
        deadline: Instant,
    ) -> Result<(), ContextError>;
    /// The outcome recorded under `key` in `scope`, unless expired.
    fn record(&self, scope: &str, key: &str) -> Option<OutcomeRecord>;
    /// The record of job `id`, unless expired or unknown here.
    fn job(&self, _id: &str) -> Option<JobRecord> {
        None
    }
    /// The mark of schedule `name`, unless unknown here.
    fn schedule_mark(&self, _name: &str) -> Option<keelson_protocol::schedule::ScheduleMark> {
        None
    }
    /// Every live job record held here.
    fn jobs(&self) -> Vec<JobRecord> {
        Vec::new()
    }
    /// The ids of job records as they are written here or arrive from peers; `None`
    /// when the store cannot tell (then watchers poll).
    fn job_changes(&self) -> Option<tokio::sync::broadcast::Receiver<Arc<str>>> {
        None
    }
    /// How many client idempotency keys `scope` holds records of.
    fn client_keys(&self, scope: &str) -> usize;
    /// Wait until every delta that any server published before this call has been
    /// applied here (a marker sent to itself through the context channel came back),
    /// or `within` passed; whether the marker came back.
    async fn barrier(&self, within: std::time::Duration) -> bool;
    /// How many users have a context.
    fn user_count(&self) -> usize;

    /// Bytes of the contexts held, as charged against the per-user size limit;
    /// `None` when the store does not know. Walks every context: call it seldom.
    fn context_bytes(&self) -> Option<u64> {
        None
    }

    /// How far this store's replicated writes have got, for the server's heartbeats;
    /// `None` for a store that does not replicate.
    fn mark(&self) -> Option<ContextMark> {
        None
    }

    /// A peer's heartbeat said how far its writes have got: a store that applied less
    /// repairs.
    fn observe_mark(&self, _mark: &ContextMark) {}

    /// A digest of this store's settled state, for the server's heartbeats; `None`
    /// while unsettled or for a store that does not replicate.
    fn digest(&self) -> Option<ContextDigest> {
        None
    }

    /// The heartbeat of the store whose deltas have origin `peer` carried its digest:
    /// a store that persistently differs from it at the same applied deltas logs it,
    /// counts it and repairs.
    fn observe_digest(self: Arc<Self>, _peer: &str, _digest: &ContextDigest) {}

    /// Divergences from peers found since start (see [`ContextStore::observe_digest`]).
    fn divergences(&self) -> u64 {
        0
    }

    /// The context of `user` as JSON, `{"user", "values": {key: JSON}, "counters":
    /// {key: integer}}`, for an operator (`keelson context get`); `None` when this
    /// store holds none for that user or cannot list it.
    fn user_view(&self, _user: &str) -> Option<serde_json::Value> {
        None
    }

    /// [`ContextStore::set_in`], committed at once.
    async fn set(&self, user: &str, key: &str, value: Bytes) -> Result<(), ContextError> {
        let effects = Effects::default();
        self.set_in(&effects, user, key, value).await?;
        self.commit(&effects, None, Instant::now()).await
    }
    /// [`ContextStore::delete_in`], committed at once.
    async fn delete(&self, user: &str, key: &str) -> Result<bool, ContextError> {
        let effects = Effects::default();
        let existed = self.delete_in(&effects, user, key).await?;
        self.commit(&effects, None, Instant::now()).await?;
        Ok(existed)
    }
    /// [`ContextStore::increment_in`], committed at once.
    async fn increment(&self, user: &str, key: &str, by: i64) -> Result<i64, ContextError> {
        let effects = Effects::default();
        let value = self.increment_in(&effects, user, key, by).await?;
        self.commit(&effects, None, Instant::now()).await?;
        Ok(value)
    }
}

/// The context of one verified user, as a handler sees it.
#[derive(Clone)]
pub struct UserContext {
    store: Arc<dyn ContextStore>,
    user: String,
    effects: Arc<Effects>,
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
    pub(crate) fn new(store: Arc<dyn ContextStore>, user: String, effects: Arc<Effects>) -> Self {
        Self {
            store,
            user,
            effects,
        }
    }

    /// The user this context belongs to.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The value under `key`, deserialized as `T`.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, ContextError> {
        let key = own(key)?;
        let value = match self.effects.pending_value(&self.user, key) {
            Some(pending) => pending,
            None => self.store.get(&self.user, key).await?,
        };
        match value {
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
        let key = own(key)?;
        if self.effects.is_deferred() {
            return self.effects.defer(Pending::Set {
                user: self.user.clone(),
                key: key.to_owned(),
                value: Some(bytes.into()),
            });
        }
        self.store
            .set_in(&self.effects, &self.user, key, bytes.into())
            .await
    }

    /// Remove `key`; whether it existed.
    pub async fn delete(&self, key: &str) -> Result<bool, ContextError> {
        let key = own(key)?;
        if self.effects.is_deferred() {
            let existed = match self.effects.pending_value(&self.user, key) {
                Some(pending) => pending.is_some(),
                None => self.store.get(&self.user, key).await?.is_some(),
            };
            self.effects.defer(Pending::Set {
                user: self.user.clone(),
                key: key.to_owned(),
                value: None,
            })?;
            return Ok(existed);
        }
        self.store.delete_in(&self.effects, &self.user, key).await
    }

    /// Add `by` to the counter `key`; concurrent increments all count.
    pub async fn increment(&self, key: &str, by: i64) -> Result<i64, ContextError> {
        let key = own(key)?;
        if self.effects.is_deferred() {
            self.effects.defer(Pending::Add {
                user: self.user.clone(),
                key: key.to_owned(),
                by,
            })?;
            return self.counter(key).await;
        }
        self.store
            .increment_in(&self.effects, &self.user, key, by)
            .await
    }

    /// The current value of the counter `key` (0 when never incremented).
    pub async fn counter(&self, key: &str) -> Result<i64, ContextError> {
        let key = own(key)?;
        let stored = self.store.counter(&self.user, key).await?;
        Ok(stored.saturating_add(self.effects.pending_sum(&self.user, key)))
    }
}

/// `key`, unless it is one of Keelson's own.
fn own(key: &str) -> Result<&str, ContextError> {
    if key.starts_with('\0') {
        return Err(ContextError::ReservedKey {
            key: key.to_owned(),
        });
    }
    Ok(key)
}
