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

async fn start(transport: &Arc<dyn Transport>, node: &str) -> Arc<ReplicatedContextStore> {
    ReplicatedContextStore::start(transport.clone(), node, config())
        .await
        .unwrap()
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
    // 29 chunks of 7.
    const USERS: usize = 200;
    let transport: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let a = start(&transport, "a").await;
    let b = start(&transport, "b").await;
    for i in 0..USERS {
        a.set(&format!("u{i}"), "k", Bytes::from(format!("\"v{i}\"")))
            .await
            .unwrap();
        b.increment(&format!("u{i}"), "c", 2).await.unwrap();
        a.increment(&format!("u{i}"), "c", 1).await.unwrap();
    }
    eventually("b sees a's writes", || async {
        b.get(&format!("u{}", USERS - 1), "k")
            .await
            .unwrap()
            .is_some()
    })
    .await;
    eventually("a sees b's increments", || async {
        a.counter(&format!("u{}", USERS - 1), "c").await.unwrap() == 3
    })
    .await;
    // A store started now pulls everything, 7 users per chunk, before it returns (a
    // or b answers each; c's own answers are empty and asked again).
    let c = start(&transport, "c").await;
    for i in 0..USERS {
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
    assert_eq!(c.user_count(), USERS);
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
    let a = start(&transport, "a").await;
    let b = start(&transport, "b").await;
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
    let a = start(&transport, "a").await;
    let b = start(&transport, "b").await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_stores_have_equal_digests_and_a_persistent_difference_is_counted_and_repaired() {
    use keelson_protocol::context::{CONTEXT_CHANNEL, ContextDelta, ContextOp, Hlc};
    let transport: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let a = start(&transport, "a").await;
    let b = start(&transport, "b").await;
    for i in 0..20 {
        a.set(&format!("u{i}"), "k", Bytes::from_static(b"1"))
            .await
            .unwrap();
        b.increment(&format!("u{i}"), "c", 1).await.unwrap();
    }
    assert!(a.barrier(Duration::from_secs(5)).await);
    assert!(b.barrier(Duration::from_secs(5)).await);
    let (da, db) = (a.digest().unwrap(), b.digest().unwrap());
    assert_eq!(da.hash, db.hash, "settled on the same deltas");
    assert_ne!(da.hash, 0);

    // A write only b applies, numbered by nobody: an unnumbered delta that names a's
    // origin (a ignores its own origin's deltas). The two now differ while having
    // applied the same numbered deltas, which no gap detection can see.
    let a_origin = a.mark().unwrap().origin;
    let stray = ContextDelta {
        v: keelson_protocol::ProtocolVersion::CURRENT,
        origin: a_origin.clone(),
        ops: vec![ContextOp::Set {
            user: "stray".into(),
            key: "k".into(),
            value: Some(b"2".to_vec()),
            ts: Hlc {
                wall_ms: 1,
                logical: 0,
                node: a_origin.clone(),
            },
        }],
        marker: None,
        seq: None,
        trace: None,
    };
    transport
        .broadcast(
            CONTEXT_CHANNEL,
            keelson_protocol::transport::Message::new(keelson_protocol::encode(&stray).unwrap()),
        )
        .await
        .unwrap();
    eventually("b applied the stray write", || async {
        b.get("stray", "k").await.unwrap().is_some()
    })
    .await;
    // Reading it made b say the old user is active again (a delta sent in the
    // background): wait until each has applied all the other published.
    eventually("a and b applied the same deltas", || async {
        let applied = |s: &ReplicatedContextStore| {
            let mut marks = s.digest().map(|d| d.applied).unwrap_or_default();
            marks.sort_by(|x, y| x.origin.cmp(&y.origin));
            marks
        };
        applied(&a) == applied(&b)
    })
    .await;
    let b_origin = b.mark().unwrap().origin;
    // Heartbeats: each sees the other's digest. Two mismatches are not yet a
    // divergence (a race between two samples looks the same); the third is.
    for round in 1..=3 {
        let (da, db) = (a.digest().unwrap(), b.digest().unwrap());
        assert_ne!(da.hash, db.hash);
        a.clone().observe_digest(&b_origin, &db);
        b.clone().observe_digest(&a_origin, &da);
        let expected = u64::from(round == 3);
        assert_eq!(a.divergences(), expected, "after {round} heartbeats");
        assert_eq!(b.divergences(), expected, "after {round} heartbeats");
    }
    // Both pulled the other's state: a now has the stray write, and they agree.
    eventually("a repaired from b", || async {
        a.get("stray", "k").await.unwrap().is_some()
    })
    .await;
    eventually("the digests agree again", || async {
        matches!((a.digest(), b.digest()), (Some(x), Some(y)) if x.hash == y.hash)
    })
    .await;
}
