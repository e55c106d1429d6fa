//! The replicated context store over the in-memory transport: several stores on
//! one transport behave as servers of one mesh.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use keelson_logic_server::{ContextConfig, ContextError, ContextStore, ReplicatedContextStore};
use keelson_protocol::Transport;
use keelson_protocol::transport::memory::MemoryTransport;
use std::sync::Arc;
use std::time::Duration;

fn config() -> ContextConfig {
    ContextConfig {
        max_bytes_per_user: 256,
        max_users: 1000,
        join_timeout_ms: 500,
        snapshot_chunk_users: 7,
        ..ContextConfig::default()
    }
}

/// Wait (bounded) until `f` holds: replication is asynchronous.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_reach_every_store_and_a_late_joiner_gets_them_all_in_chunks() {
    let transport: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let a = ReplicatedContextStore::start(transport.clone(), "a", config())
        .await
        .unwrap();
    let b = ReplicatedContextStore::start(transport.clone(), "b", config())
        .await
        .unwrap();
    for i in 0..50 {
        a.set(&format!("u{i}"), "k", Bytes::from(format!("\"v{i}\"")))
            .await
            .unwrap();
        b.increment(&format!("u{i}"), "c", 2).await.unwrap();
        a.increment(&format!("u{i}"), "c", 1).await.unwrap();
    }
    eventually("b sees a's writes", || async {
        b.get("u49", "k").await.unwrap().is_some()
    })
    .await;
    eventually("a sees b's increments", || async {
        a.counter("u49", "c").await.unwrap() == 3
    })
    .await;
    // A store started now pulls everything, 7 users per chunk, before it returns.
    let c = ReplicatedContextStore::start(transport.clone(), "c", config())
        .await
        .unwrap();
    for i in 0..50 {
        assert_eq!(
            c.get(&format!("u{i}"), "k").await.unwrap(),
            Some(Bytes::from(format!("\"v{i}\""))),
            "user {i}"
        );
        assert_eq!(
            c.counter(&format!("u{i}"), "c").await.unwrap(),
            3,
            "user {i}"
        );
    }
    assert_eq!(c.user_count(), 50);
    // Deletes replicate too.
    assert!(c.delete("u0", "k").await.unwrap());
    eventually("the delete reaches a", || async {
        a.get("u0", "k").await.unwrap().is_none()
    })
    .await;
}

#[tokio::test]
async fn a_store_alone_starts_empty_at_once() {
    let transport: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let started = tokio::time::Instant::now();
    let a = ReplicatedContextStore::start(transport, "a", config())
        .await
        .unwrap();
    assert!(a.is_ready());
    assert_eq!(a.user_count(), 0);
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "waited for a peer that cannot exist"
    );
}

#[tokio::test]
async fn bounds_give_clear_errors_and_change_nothing() {
    let transport: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let a = ReplicatedContextStore::start(
        transport,
        "a",
        ContextConfig {
            max_users: 2,
            ..config()
        },
    )
    .await
    .unwrap();
    let err = a
        .set("u", "big", Bytes::from(vec![b'1'; 300]))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ContextError::TooLarge { limit: 256, .. }),
        "{err:?}"
    );
    assert_eq!(a.get("u", "big").await.unwrap(), None);
    a.increment("u1", "c", 1).await.unwrap();
    a.increment("u2", "c", 1).await.unwrap();
    let err = a.increment("u3", "c", 1).await.unwrap_err();
    assert_eq!(err, ContextError::StoreFull { limit: 2 });
}

#[tokio::test]
async fn an_undecodable_delta_is_ignored_and_the_store_goes_on() {
    let transport: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let a = ReplicatedContextStore::start(transport.clone(), "a", config())
        .await
        .unwrap();
    let b = ReplicatedContextStore::start(transport.clone(), "b", config())
        .await
        .unwrap();
    transport
        .broadcast(
            keelson_protocol::context::CONTEXT_CHANNEL,
            keelson_protocol::transport::Message::new(&b"\x91\x91\x91garbage"[..]),
        )
        .await
        .unwrap();
    a.set("u", "k", Bytes::from_static(b"1")).await.unwrap();
    eventually("b still applies deltas", || async {
        b.get("u", "k").await.unwrap().is_some()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_barrier_returns_once_the_deltas_published_before_it_are_applied() {
    let transport: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let a = ReplicatedContextStore::start(transport.clone(), "a", config())
        .await
        .unwrap();
    let b = ReplicatedContextStore::start(transport.clone(), "b", config())
        .await
        .unwrap();
    for i in 0..100 {
        a.increment("u", "c", 1).await.unwrap();
        assert!(
            b.barrier(Duration::from_secs(5)).await,
            "the marker came back"
        );
        assert_eq!(
            b.counter("u", "c").await.unwrap(),
            i + 1,
            "every earlier delta applied"
        );
    }
}
