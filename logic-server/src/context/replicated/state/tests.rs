#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use proptest::prelude::*;
use std::collections::HashMap;

const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];

/// What a replica does locally; turned into the ops it would broadcast.
#[derive(Debug, Clone)]
enum Action {
    Set {
        user: u8,
        key: u8,
        value: Option<u8>,
    },
    Increment {
        user: u8,
        key: u8,
        by: i8,
    },
    Touch {
        user: u8,
    },
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        (0..3u8, 0..3u8, proptest::option::of(any::<u8>()))
            .prop_map(|(user, key, value)| Action::Set { user, key, value }),
        (0..3u8, 0..2u8, -5..5i8).prop_map(|(user, key, by)| Action::Increment { user, key, by }),
        (0..3u8).prop_map(|user| Action::Touch { user }),
    ]
}

/// The ops each replica emits for its actions: stamps from a per-replica clock that
/// sometimes stalls (equal wall times across nodes exercise the tiebreak).
fn emit(node: usize, actions: &[(u8, Action)]) -> Vec<ContextOp> {
    let mut shares: HashMap<(u8, u8), (u64, i64)> = HashMap::new();
    let mut ops = Vec::new();
    for (i, (wall, a)) in actions.iter().enumerate() {
        let logical = u32::try_from(i).unwrap() + 1;
        let ts = Hlc {
            wall_ms: u64::from(*wall),
            logical,
            node: NODES[node].to_owned(),
        };
        match a {
            Action::Set { user, key, value } => ops.push(ContextOp::Set {
                user: format!("u{user}"),
                key: format!("k{key}"),
                value: value.map(|v| vec![v]),
                ts,
            }),
            Action::Increment { user, key, by } => {
                let e = shares.entry((*user, *key)).or_default();
                e.0 += 1;
                e.1 += i64::from(*by);
                ops.push(ContextOp::Count {
                    user: format!("u{user}"),
                    key: format!("c{key}"),
                    node: NODES[node].to_owned(),
                    seq: e.0,
                    sum: e.1,
                });
            }
            Action::Touch { user } => ops.push(ContextOp::Touch {
                user: format!("u{user}"),
                ts,
            }),
        }
    }
    ops
}

fn replica_actions() -> impl Strategy<Value = Vec<(u8, Action)>> {
    proptest::collection::vec((0..20u8, action()), 0..25)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Random writes on three replicas, each op delivered to every replica with
    /// random duplication and in random order: all replicas end equal, and equal to
    /// the state of the ops applied once, in order.
    #[test]
    fn replicas_converge_whatever_the_delivery(
        a in replica_actions(),
        b in replica_actions(),
        c in replica_actions(),
        seeds in proptest::collection::vec(any::<u64>(), 3),
        dups in proptest::collection::vec(0..3usize, 0..200),
    ) {
        let all: Vec<ContextOp> = [emit(0, &a), emit(1, &b), emit(2, &c)].concat();
        let mut reference = State::default();
        for op in &all {
            reference.apply(op);
        }
        for seed in seeds {
            let mut delivery: Vec<&ContextOp> = all.iter().collect();
            // Duplicate some ops (a broker redelivery, a retried broadcast).
            for (i, d) in dups.iter().enumerate() {
                if !all.is_empty() {
                    for _ in 0..*d {
                        delivery.push(&all[i % all.len()]);
                    }
                }
            }
            shuffle(&mut delivery, seed);
            let mut replica = State::default();
            for op in delivery {
                replica.apply(op);
            }
            prop_assert_eq!(replica.canonical(), reference.canonical());
            prop_assert_eq!(replica.digest(), reference.digest());
            prop_assert_eq!(replica.digest(), replica.recomputed_digest());
        }
    }

    /// A joining replica that merges a snapshot taken at any point, plus every op
    /// (before and after the snapshot, duplicates included), equals the others.
    #[test]
    fn snapshot_plus_deltas_converges(
        a in replica_actions(),
        b in replica_actions(),
        cut in 0..50usize,
        chunk in 1..4usize,
        seed in any::<u64>(),
    ) {
        let all: Vec<ContextOp> = [emit(0, &a), emit(1, &b)].concat();
        let cut = cut.min(all.len());
        let mut peer = State::default();
        for op in &all[..cut] {
            peer.apply(op);
        }
        // The joiner pulls the peer's state chunk by chunk...
        let mut joiner = State::default();
        let mut after: Option<String> = None;
        loop {
            let (users, next) = peer.snapshot_after(after.as_deref(), chunk);
            joiner.merge_snapshots(&users);
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        // ... while every delta reaches it, in any order.
        let mut rest: Vec<&ContextOp> = all.iter().collect();
        shuffle(&mut rest, seed);
        for op in rest {
            joiner.apply(op);
        }
        for op in &all[cut..] {
            peer.apply(op);
        }
        prop_assert_eq!(joiner.canonical(), peer.canonical());
        prop_assert_eq!(joiner.digest(), peer.digest());
        prop_assert_eq!(joiner.digest(), joiner.recomputed_digest());
        // Expiry keeps the digest what a fresh computation gives.
        let now = all.len() as u64 * 5;
        joiner.expire(now, now / 2, now / 2);
        prop_assert_eq!(joiner.digest(), joiner.recomputed_digest());
    }
}

fn shuffle<T>(v: &mut [T], mut seed: u64) {
    for i in (1..v.len()).rev() {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let j = (seed >> 33) as usize % (i + 1);
        v.swap(i, j);
    }
}

#[test]
fn later_write_wins_and_node_id_breaks_ties() {
    let mut s = State::default();
    let set = |value: u8, wall, node: &str| ContextOp::Set {
        user: "u".into(),
        key: "k".into(),
        value: Some(vec![value]),
        ts: Hlc {
            wall_ms: wall,
            logical: 0,
            node: node.into(),
        },
    };
    s.apply(&set(2, 10, "b"));
    s.apply(&set(1, 9, "z"));
    assert_eq!(s.get("u", "k"), Some(&[2u8][..]));
    s.apply(&set(3, 10, "c"));
    assert_eq!(
        s.get("u", "k"),
        Some(&[3u8][..]),
        "same time: the higher node id wins"
    );
}

#[test]
fn concurrent_increments_on_two_nodes_add_up() {
    let mut s = State::default();
    for (node, seq) in [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 1)] {
        s.apply(&ContextOp::Count {
            user: "u".into(),
            key: "c".into(),
            node: node.into(),
            seq,
            sum: seq as i64,
        });
    }
    assert_eq!(s.counter("u", "c"), 5);
}

#[test]
fn tombstones_hide_values_and_are_collected_after_the_bound() {
    let mut s = State::default();
    let ts = |wall| Hlc {
        wall_ms: wall,
        logical: 0,
        node: "a".into(),
    };
    s.apply(&ContextOp::Set {
        user: "u".into(),
        key: "k".into(),
        value: Some(b"1".to_vec()),
        ts: ts(10),
    });
    s.apply(&ContextOp::Set {
        user: "u".into(),
        key: "k".into(),
        value: None,
        ts: ts(20),
    });
    assert_eq!(s.get("u", "k"), None);
    // A delayed older write does not resurrect it while the tombstone lives.
    s.apply(&ContextOp::Set {
        user: "u".into(),
        key: "k".into(),
        value: Some(b"old".to_vec()),
        ts: ts(15),
    });
    assert_eq!(s.get("u", "k"), None);
    assert_eq!(s.expire(0, 0, 21), 0);
    assert!(
        s.user("u").unwrap().values.is_empty(),
        "the tombstone was not collected"
    );
    // Idle users are dropped.
    assert_eq!(s.expire(0, 21, 0), 1);
    assert_eq!(s.user_count(), 0);
}

#[test]
fn the_digest_tells_a_replica_that_missed_a_write() {
    let write = |value: &[u8], wall| ContextOp::Set {
        user: "u".into(),
        key: "k".into(),
        value: Some(value.to_vec()),
        ts: Hlc {
            wall_ms: wall,
            logical: 0,
            node: "a".into(),
        },
    };
    let count = |seq, sum| ContextOp::Count {
        user: "u".into(),
        key: "c".into(),
        node: "a".into(),
        seq,
        sum,
    };
    let (mut a, mut b) = (State::default(), State::default());
    assert_eq!(a.digest(), 0, "an empty state");
    for op in [write(b"1", 10), count(1, 1), write(b"2", 20)] {
        a.apply(&op);
        b.apply(&op);
    }
    assert_eq!(a.digest(), b.digest());
    assert_ne!(a.digest(), 0);
    a.apply(&count(2, 5));
    assert_ne!(a.digest(), b.digest(), "a missed increment");
    b.apply(&count(2, 5));
    assert_eq!(a.digest(), b.digest());
    // A deletion and its tombstone's collection: equal before and after.
    let delete = ContextOp::Set {
        user: "u".into(),
        key: "k".into(),
        value: None,
        ts: Hlc {
            wall_ms: 30,
            logical: 0,
            node: "b".into(),
        },
    };
    a.apply(&delete);
    assert_ne!(a.digest(), b.digest(), "a missed deletion");
    b.apply(&delete);
    a.expire(0, 0, 31);
    assert_eq!(
        a.digest(),
        b.digest(),
        "collecting a tombstone changes nothing"
    );
    assert_eq!(a.digest(), a.recomputed_digest());
}

/// A job record (see `keelson_protocol::job`) in state `state`, attempt `attempt`.
fn job_op(
    state: keelson_protocol::job::JobState,
    attempt: u32,
    wall_ms: u64,
    node: &str,
) -> ContextOp {
    use keelson_protocol::job::{JobOptions, JobRecord, JobSpec, record_location};
    let spec = JobSpec {
        id: "ab".repeat(16),
        handler: "h".to_owned(),
        user: None,
        body: Vec::new(),
        options: JobOptions {
            max_attempts: 3,
            timeout_ms: 1000,
            result_ttl_s: 60,
            max_result_bytes: 1024,
        },
        created_ms: 1,
        fingerprint: None,
        headers: Default::default(),
        traceparent: None,
    };
    let (scope, key) = record_location(&spec.id);
    let record = JobRecord {
        state,
        attempt,
        node: Some(node.to_owned()),
        ..JobRecord::queued(&spec, u64::MAX)
    };
    ContextOp::Set {
        user: scope,
        key,
        value: Some(keelson_protocol::encode(&record).unwrap().to_vec()),
        ts: Hlc {
            wall_ms,
            logical: 0,
            node: node.to_owned(),
        },
    }
}

#[test]
fn a_job_record_keeps_the_state_that_got_furthest_whatever_the_order() {
    use keelson_protocol::job::JobState::{Queued, Running, Succeeded};
    // Written in this order by clocks that disagree: the later writes carry older
    // stamps, and a peer's rerun (attempt 2) is written after the success.
    let ops = [
        job_op(Queued, 1, 50, "node-a"),
        job_op(Running, 1, 40, "node-b"),
        job_op(Succeeded, 1, 30, "node-b"),
        job_op(Running, 2, 60, "node-c"),
    ];
    let mut states = Vec::new();
    for order in [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]] {
        let mut state = State::default();
        for i in order {
            state.apply(&ops[i]);
        }
        let jobs = state.jobs(0);
        assert_eq!(jobs.len(), 1);
        assert_eq!(state.user_count(), 0, "a job record's scope is no user");
        assert_eq!(
            (jobs[0].state, jobs[0].attempt),
            (Succeeded, 1),
            "order {order:?}"
        );
        states.push(state.digest());
    }
    assert!(states.windows(2).all(|w| w[0] == w[1]), "replicas disagree");
}

/// A schedule mark of slot `slot_s` fired with lease token `token`.
fn mark_op(token: u64, slot_s: i64, wall_ms: u64, node: &str) -> ContextOp {
    use keelson_protocol::schedule::{SCHEDULES_SCOPE, ScheduleMark, mark_key};
    let mark = ScheduleMark {
        v: keelson_protocol::ProtocolVersion::CURRENT,
        name: "tick".to_owned(),
        slot_s,
        token,
        run_slot_s: Some(slot_s),
        node: node.to_owned(),
        fired_ms: wall_ms,
        expires_unix_ms: u64::MAX,
    };
    ContextOp::Set {
        user: SCHEDULES_SCOPE.to_owned(),
        key: mark_key("tick"),
        value: Some(keelson_protocol::encode(&mark).unwrap().to_vec()),
        ts: Hlc {
            wall_ms,
            logical: 0,
            node: node.to_owned(),
        },
    }
}

#[test]
fn a_schedule_mark_keeps_the_newest_leaders_whatever_the_order() {
    use keelson_protocol::schedule::{SCHEDULES_SCOPE, ScheduleMark, mark_key};
    // Leader 5 fired slot 100 then 101; leader 6 took over and fired 102; the old
    // leader, frozen, wakes up and writes slot 103 late with token 5 (the latest
    // stamp of all): it must not win.
    let ops = [
        mark_op(5, 100, 10, "node-a"),
        mark_op(5, 101, 20, "node-a"),
        mark_op(6, 102, 30, "node-b"),
        mark_op(5, 103, 90, "node-a"),
    ];
    let mut digests = Vec::new();
    for order in [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]] {
        let mut state = State::default();
        for i in order {
            state.apply(&ops[i]);
        }
        let bytes = state.record(SCHEDULES_SCOPE, &mark_key("tick"), 0).unwrap();
        let mark: ScheduleMark = keelson_protocol::decode(bytes).unwrap();
        assert_eq!((mark.token, mark.slot_s), (6, 102), "order {order:?}");
        assert_eq!(state.user_count(), 0, "the marks' scope is no user");
        digests.push(state.digest());
    }
    assert!(
        digests.windows(2).all(|w| w[0] == w[1]),
        "replicas disagree"
    );
}
