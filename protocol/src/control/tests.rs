#![allow(clippy::unwrap_used)]

use super::*;
use std::time::Duration;

/// A reader of heartbeats from before background jobs.
#[derive(Debug, Deserialize, Serialize)]
struct HeartbeatBeforeJobs {
    v: ProtocolVersion,
    node: String,
    in_flight: u32,
    contexts: u64,
}

fn heartbeat(node: &str, jobs: Option<JobsBeat>) -> Heartbeat {
    Heartbeat {
        v: ProtocolVersion::CURRENT,
        node: node.to_owned(),
        version: "0.1.0".to_owned(),
        services: vec!["default".to_owned()],
        handlers: vec!["echo".to_owned()],
        load: Load::default(),
        paused: false,
        in_flight: 2,
        concurrency: 16,
        window: 16,
        ready: true,
        contexts: 5,
        interval_ms: 1000,
        leaving: false,
        context: None,
        digest: None,
        jobs,
        leases: Vec::new(),
        schedules: Vec::new(),
    }
}

fn counts(succeeded: u64) -> JobCounts {
    JobCounts {
        queued: 1,
        running: 2,
        succeeded,
        failed: 0,
        cancelled: 0,
    }
}

#[test]
fn job_figures_are_read_by_older_peers_and_absent_ones_read_as_none() {
    let beat = heartbeat(
        "a",
        Some(JobsBeat {
            running_here: 3,
            records: Some(counts(7)),
            counted_ms_ago: 400,
        }),
    );
    let bytes = crate::encode(&beat).unwrap();
    let old: HeartbeatBeforeJobs = rmp_serde::from_slice(&bytes).unwrap();
    assert_eq!(
        (old.node.as_str(), old.in_flight, old.contexts),
        ("a", 2, 5)
    );
    assert_eq!(crate::decode::<Heartbeat>(&bytes).unwrap(), beat);
    // A heartbeat without them: no bytes on the wire, `None` when read.
    let without = heartbeat("a", None);
    let bytes = crate::encode(&without).unwrap();
    assert!(!bytes.windows(4).any(|w| w == b"jobs"));
    assert_eq!(crate::decode::<Heartbeat>(&bytes).unwrap().jobs, None);
}

#[test]
fn the_cluster_job_counts_are_the_freshest_ones_never_a_sum() {
    let mut view = ClusterView::default();
    let start = tokio::time::Instant::now();
    assert_eq!(view.job_counts(start), None);
    view.observe(heartbeat("old-server", None), start);
    assert_eq!(view.job_counts(start), None);
    // Counted 8 s before its heartbeat.
    let stale = JobsBeat {
        running_here: 1,
        records: Some(counts(5)),
        counted_ms_ago: 8000,
    };
    view.observe(heartbeat("a", Some(stale)), start);
    // Counted 1 s before a heartbeat heard 2 s later.
    let fresh = JobsBeat {
        running_here: 0,
        records: Some(counts(9)),
        counted_ms_ago: 1000,
    };
    view.observe(heartbeat("b", Some(fresh)), start);
    let now = start + Duration::from_millis(2000);
    let c = view.job_counts(now).unwrap();
    assert_eq!(
        (c.node.as_str(), c.counts, c.age_ms),
        ("b", counts(9), 3000)
    );
    // A server that has not counted yet says nothing of the records.
    let uncounted = JobsBeat {
        running_here: 4,
        records: None,
        counted_ms_ago: 0,
    };
    view.observe(heartbeat("c", Some(uncounted)), now);
    assert_eq!(view.job_counts(now).unwrap().node, "b");
    let json = serde_json::to_value(view.job_counts(now).unwrap()).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"queued": 1, "running": 2, "succeeded": 9, "failed": 0,
            "cancelled": 0, "node": "b", "age_ms": 3000})
    );
}

fn lease(name: &str, token: u64) -> LeaseBeat {
    LeaseBeat {
        name: name.to_owned(),
        token,
    }
}

fn tick(last_slot_s: Option<i64>, last_token: u64) -> ScheduleBeat {
    ScheduleBeat {
        name: "tick".to_owned(),
        cron: "*/5 * * * * *".to_owned(),
        timezone: "Europe/Berlin".to_owned(),
        handler: "report".to_owned(),
        last_slot_s,
        last_token,
        next_slot_s: last_slot_s.map(|s| s + 5),
    }
}

#[test]
fn a_lease_is_held_by_the_live_claim_of_highest_token_and_leads_the_schedules() {
    let mut view = ClusterView::default();
    let start = tokio::time::Instant::now();
    // A holder frozen 10 s ago (gone), with the highest token of all.
    let mut frozen = heartbeat("frozen", None);
    frozen.leases = vec![lease("scheduler", 9)];
    frozen.schedules = vec![tick(Some(1_774_744_200), 9)];
    view.observe(frozen, start);
    let now = start + Duration::from_secs(10);
    // The old holder's last heartbeat, still here after the hand-over to b ...
    let mut a = heartbeat("a", None);
    a.leases = vec![lease("scheduler", 3), lease("singleton.report", 1)];
    a.schedules = vec![tick(Some(1_774_744_195), 3)];
    view.observe(a, now - Duration::from_millis(800));
    // ... b's, fresher and with the higher token; c, paused, holds a singleton.
    let mut b = heartbeat("b", None);
    b.leases = vec![lease("scheduler", 4)];
    b.schedules = vec![tick(Some(1_774_744_205), 4)];
    view.observe(b, now - Duration::from_millis(100));
    let mut c = heartbeat("c", None);
    c.paused = true;
    c.leases = vec![lease("singleton.cleanup", 2)];
    view.observe(c, now - Duration::from_millis(300));
    // A server that left keeps nothing.
    let mut left = heartbeat("left", None);
    left.leaving = true;
    left.leases = vec![lease("singleton.cleanup", 7)];
    view.observe(left, now);

    let held: Vec<(String, String, u64)> = view
        .leases(now)
        .into_iter()
        .map(|l| (l.name, l.node, l.token))
        .collect();
    let own = |n: &str, node: &str, t: u64| (n.to_owned(), node.to_owned(), t);
    assert_eq!(
        held,
        [
            own("scheduler", "b", 4),
            own("singleton.cleanup", "c", 2),
            own("singleton.report", "a", 1),
        ]
    );

    // The schedule as b's heartbeat (the freshest) says, led by b.
    let schedules = view.schedules(now);
    assert_eq!(schedules.len(), 1);
    assert_eq!(
        serde_json::to_value(&schedules[0]).unwrap(),
        serde_json::json!({"name": "tick", "cron": "*/5 * * * * *",
            "timezone": "Europe/Berlin", "handler": "report",
            "last_slot": "2026-03-29T00:30:05Z", "last_token": 4,
            "next_slot": "2026-03-29T00:30:10Z", "leader": "b"})
    );

    // Every node silent since (b's last word listed nothing): no live holder,
    // so no leader; the schedule as a's heartbeat, now the freshest, says.
    let later = now + Duration::from_secs(4);
    view.observe(heartbeat("b", None), now - Duration::from_secs(10));
    assert_eq!(view.leases(later), []);
    let schedules = view.schedules(later);
    assert_eq!(schedules[0].leader, None);
    assert_eq!(
        (schedules[0].last_slot.as_deref(), schedules[0].last_token),
        (Some("2026-03-29T00:29:55Z"), 3)
    );
    // Never fired: no slots.
    let mut fresh = heartbeat("d", None);
    fresh.schedules = vec![tick(None, 0)];
    view.observe(fresh, later);
    let json = serde_json::to_value(&view.schedules(later)[0]).unwrap();
    assert_eq!(
        (&json["last_slot"], &json["next_slot"]),
        (&serde_json::Value::Null, &serde_json::Value::Null)
    );
}
