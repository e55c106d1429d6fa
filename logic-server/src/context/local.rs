//! The context store of a single process.

use super::{ContextError, ContextStore};
use crate::config::ContextConfig;
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// Fixed bookkeeping cost charged per stored entry, so that many tiny keys still
/// count against the per-user limit.
const ENTRY_OVERHEAD: usize = 16;

/// Per-user contexts held in this process's memory, bounded in size per user, in
/// number of users, and expired after an idle time.
#[derive(Debug)]
pub struct LocalContextStore {
    users: Mutex<HashMap<String, UserEntry>>,
    max_bytes_per_user: usize,
    max_users: usize,
    idle_ttl: Duration,
}

#[derive(Debug)]
struct UserEntry {
    values: HashMap<String, Bytes>,
    counters: HashMap<String, i64>,
    bytes: usize,
    last_used: Instant,
}

impl UserEntry {
    fn new(now: Instant) -> Self {
        Self {
            values: HashMap::new(),
            counters: HashMap::new(),
            bytes: 0,
            last_used: now,
        }
    }
}

impl LocalContextStore {
    /// An empty store with the given bounds.
    pub fn new(config: &ContextConfig) -> Self {
        Self {
            users: Mutex::new(HashMap::new()),
            max_bytes_per_user: config.max_bytes_per_user,
            max_users: config.max_users,
            idle_ttl: Duration::from_secs(config.idle_ttl_s),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, UserEntry>> {
        // Every critical section below leaves the map consistent before any call
        // that could panic, so a poisoned lock still guards valid data.
        self.users.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drop contexts idle for longer than the TTL; returns how many were dropped.
    pub fn expire_idle(&self) -> usize {
        let now = Instant::now();
        let mut users = self.lock();
        let before = users.len();
        users.retain(|_, e| now.duration_since(e.last_used) < self.idle_ttl);
        before - users.len()
    }

    /// Run `f` on the user's live entry, creating it when `create` is set.
    fn with_entry<R>(
        &self,
        user: &str,
        create: bool,
        f: impl FnOnce(&mut UserEntry) -> Result<R, ContextError>,
        absent: impl FnOnce() -> R,
    ) -> Result<R, ContextError> {
        let now = Instant::now();
        let mut users = self.lock();
        let expired = users
            .get(user)
            .is_some_and(|e| now.duration_since(e.last_used) >= self.idle_ttl);
        if expired {
            users.remove(user);
        }
        if !users.contains_key(user) {
            if !create {
                return Ok(absent());
            }
            if users.len() >= self.max_users {
                drop(users);
                // Make room from idle users before refusing.
                self.expire_idle();
                users = self.lock();
                if users.len() >= self.max_users {
                    return Err(ContextError::StoreFull {
                        limit: self.max_users,
                    });
                }
            }
            users.insert(user.to_owned(), UserEntry::new(now));
        }
        match users.get_mut(user) {
            Some(entry) => {
                entry.last_used = now;
                f(entry)
            }
            None => Ok(absent()),
        }
    }
}

fn value_cost(key: &str, value: &[u8]) -> usize {
    key.len() + value.len() + ENTRY_OVERHEAD
}

#[async_trait]
impl ContextStore for LocalContextStore {
    async fn get(&self, user: &str, key: &str) -> Result<Option<Bytes>, ContextError> {
        self.with_entry(user, false, |e| Ok(e.values.get(key).cloned()), || None)
    }

    async fn set(&self, user: &str, key: &str, value: Bytes) -> Result<(), ContextError> {
        let limit = self.max_bytes_per_user;
        self.with_entry(
            user,
            true,
            |e| {
                let old = e.values.get(key).map_or(0, |v| value_cost(key, v));
                let size = e.bytes - old + value_cost(key, &value);
                if size > limit {
                    return Err(ContextError::TooLarge { size, limit });
                }
                e.bytes = size;
                e.values.insert(key.to_owned(), value);
                Ok(())
            },
            || (),
        )
    }

    async fn delete(&self, user: &str, key: &str) -> Result<bool, ContextError> {
        self.with_entry(
            user,
            false,
            |e| match e.values.remove(key) {
                Some(v) => {
                    e.bytes -= value_cost(key, &v);
                    Ok(true)
                }
                None => Ok(false),
            },
            || false,
        )
    }

    async fn increment(&self, user: &str, key: &str, by: i64) -> Result<i64, ContextError> {
        let limit = self.max_bytes_per_user;
        self.with_entry(
            user,
            true,
            |e| {
                let current = e.counters.get(key).copied();
                let next = current.unwrap_or(0).checked_add(by).ok_or_else(|| {
                    ContextError::NotANumber {
                        key: key.to_owned(),
                    }
                })?;
                if current.is_none() {
                    let size = e.bytes + value_cost(key, &[0; 8]);
                    if size > limit {
                        return Err(ContextError::TooLarge { size, limit });
                    }
                    e.bytes = size;
                }
                e.counters.insert(key.to_owned(), next);
                Ok(next)
            },
            || 0,
        )
    }

    async fn counter(&self, user: &str, key: &str) -> Result<i64, ContextError> {
        self.with_entry(
            user,
            false,
            |e| Ok(e.counters.get(key).copied().unwrap_or(0)),
            || 0,
        )
    }

    fn user_count(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn store(max_bytes: usize, max_users: usize) -> LocalContextStore {
        LocalContextStore::new(&ContextConfig {
            max_bytes_per_user: max_bytes,
            max_users,
            idle_ttl_s: 60,
            ..ContextConfig::default()
        })
    }

    #[tokio::test]
    async fn users_are_isolated() {
        let s = store(1024, 10);
        s.set("alice", "k", Bytes::from_static(b"1")).await.unwrap();
        assert_eq!(
            s.get("alice", "k").await.unwrap(),
            Some(Bytes::from_static(b"1"))
        );
        assert_eq!(s.get("bob", "k").await.unwrap(), None);
        assert_eq!(s.increment("alice", "c", 2).await.unwrap(), 2);
        assert_eq!(s.counter("bob", "c").await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_write_past_the_user_limit_is_refused_and_changes_nothing() {
        let s = store(64, 10);
        s.set("u", "a", Bytes::from(vec![b'1'; 20])).await.unwrap();
        let err = s
            .set("u", "b", Bytes::from(vec![b'1'; 40]))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ContextError::TooLarge { limit: 64, .. }),
            "{err:?}"
        );
        assert_eq!(s.get("u", "b").await.unwrap(), None);
        // Replacing a value is charged by the difference.
        s.set("u", "a", Bytes::from(vec![b'2'; 30])).await.unwrap();
        assert!(s.delete("u", "a").await.unwrap());
        s.set("u", "b", Bytes::from(vec![b'1'; 40])).await.unwrap();
    }

    #[tokio::test]
    async fn the_user_limit_is_enforced_and_reads_do_not_create_users() {
        let s = store(1024, 2);
        assert_eq!(s.get("ghost", "k").await.unwrap(), None);
        assert_eq!(s.user_count(), 0);
        s.increment("a", "c", 1).await.unwrap();
        s.increment("b", "c", 1).await.unwrap();
        let err = s.increment("c", "c", 1).await.unwrap_err();
        assert_eq!(err, ContextError::StoreFull { limit: 2 });
    }

    #[tokio::test(start_paused = true)]
    async fn idle_contexts_expire() {
        let s = store(1024, 10);
        s.increment("a", "c", 5).await.unwrap();
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(s.counter("a", "c").await.unwrap(), 5);
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(s.counter("a", "c").await.unwrap(), 0);
        assert_eq!(s.user_count(), 0);
    }
}
