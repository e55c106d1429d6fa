//! Singletons and schedules over RabbitMQ with real processes: the scheduler's
//! leader killed (`kill -9`) and frozen (`SIGSTOP`) while a schedule fires every
//! second, a singleton's holder stopped, killed and frozen in turn, and a rolling
//! upgrade of every server, all read back from the lines `test.record` and
//! `test.singleton` append to files.
//!
//! The long run: `KEELSON_SCHEDULE_TEST_S=600 cargo test --features
//! keelson/test-handlers --test schedules slot -- --nocapture` (600 slots; the
//! README's test command runs 150).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};
use support::broker::{Vhost, amqp_transport};
use support::mesh::{Mesh, ServerSpec, schedule_spec};

/// The AMQP heartbeat of the test transports (`support::broker::amqp_transport`).
const HEARTBEAT: Duration = Duration::from_secs(2);

/// Seconds since the Unix epoch of `2026-11-29T22:30:05Z`.
fn unix_s(rfc3339: &str) -> i64 {
    support::rfc3339_ms(rfc3339) / 1000
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a bad line {l:?}: {e}")))
        .collect()
}

/// The node holding lease `lease` with a token above `above`, from a gateway's
/// `/cluster`; waits for it (a hand-over is seen in the next heartbeats).
async fn holder(mesh: &Mesh, client: &reqwest::Client, lease: &str, above: u64) -> (String, u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let cluster = mesh.cluster(client).await;
        for node in cluster["nodes"].as_array().into_iter().flatten() {
            if node["state"] != "up" {
                continue;
            }
            for l in node["leases"].as_array().into_iter().flatten() {
                let token = l["token"].as_u64().unwrap_or(0);
                if l["name"] == lease && token > above {
                    return (node["node"].as_str().unwrap().to_owned(), token);
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no server holds lease {lease} with a token above {above}: {cluster}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What happened to the leader, for the report and the bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill,
    Freeze,
}

/// Every slot of a schedule firing every second runs exactly once as a first
/// attempt (a second line for a slot only as a rerun, attempt > 1), none missing,
/// while its leader is killed and frozen; the slots a hand-over left behind are
/// caught up within 1 s of the new leader taking over; a frozen leader that wakes
/// up has its stale-token firing dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_slot_runs_once_while_the_leader_is_killed_and_frozen() {
    let duration = std::env::var("KEELSON_SCHEDULE_TEST_S")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(150);
    let vhost = Vhost::create("schedules-slots");
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    let record = mesh.scratch.path().join("record.jsonl");
    let spec =
        |node: &str| schedule_spec(node, &record).env("KEELSON_TEST_STALE_FIRE_ON_LOSS", "1");
    let mut index: HashMap<String, usize> = HashMap::new();
    for node in ["logic-a", "logic-b", "logic-c"] {
        index.insert(node.to_owned(), mesh.add_server(spec(node)).await);
    }
    mesh.add_gateway().await;
    let client = reqwest::Client::new();
    let started = Instant::now();
    let events = ((duration.saturating_sub(30)) / 60).max(5);
    let spacing = Duration::from_secs(duration.saturating_sub(30)) / events as u32;
    let mut faults = Vec::new();
    let mut token = 0;
    for e in 0..events {
        let at = started + Duration::from_secs(10) + spacing * (e as u32 + 1);
        tokio::time::sleep_until(at.into()).await;
        let (leader, t) = holder(&mesh, &client, "scheduler", token).await;
        token = t;
        let i = index[&leader];
        let fault = if e == 1 || e == 3 {
            Fault::Freeze
        } else {
            Fault::Kill
        };
        let at_ms = support::unix_ms();
        match fault {
            Fault::Kill => {
                mesh.kill_server(i).await;
                index.insert(leader.clone(), mesh.add_server(spec(&leader)).await);
            }
            Fault::Freeze => {
                let p = mesh.servers[i].as_ref().unwrap();
                p.signal("STOP");
                tokio::time::sleep(Duration::from_secs(8)).await;
                mesh.servers[i].as_ref().unwrap().signal("CONT");
            }
        }
        eprintln!(
            "{:?}: {fault:?} of the leader {leader} (token {token})",
            started.elapsed()
        );
        faults.push((fault, at_ms, token));
    }
    let end = started + Duration::from_secs(duration);
    tokio::time::sleep_until(end.into()).await;
    // The last slots' jobs are run.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let lines = lines(&record);
    let mut by_slot: BTreeMap<i64, Vec<&Value>> = BTreeMap::new();
    for l in &lines {
        by_slot
            .entry(unix_s(l["slot"].as_str().expect("a slot")))
            .or_default()
            .push(l);
    }
    let first = *by_slot.keys().next().expect("no slot fired at all");
    let last_expected = first + i64::try_from(duration).unwrap() - 15;
    let mut missing = Vec::new();
    let mut doubled = Vec::new();
    let mut reruns = 0;
    for slot in first..=last_expected {
        let Some(ls) = by_slot.get(&slot) else {
            missing.push(slot);
            continue;
        };
        let firsts = ls.iter().filter(|l| l["attempt"] == 1).count();
        if firsts != 1 {
            doubled.push((slot, ls.clone()));
        }
        reruns += ls.len() - firsts;
    }
    // How late each slot ran (its first line after the slot), around each fault.
    let lateness = |slot: i64| -> i64 {
        by_slot.get(&slot).map_or(i64::MAX, |ls| {
            ls.iter()
                .map(|l| l["at_ms"].as_i64().unwrap() - slot * 1000)
                .min()
                .unwrap()
        })
    };
    let mut worst: Vec<(Fault, i64)> = Vec::new();
    for (fault, at_ms, _) in &faults {
        let from = (*at_ms / 1000) as i64 - 1;
        let to = from + 15;
        let w = (from..to).map(lateness).max().unwrap();
        worst.push((*fault, w));
    }
    let stale_all: usize = std::fs::read_dir(mesh.scratch.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .map(|log| {
            log.matches("a firing with a stale lease token was dropped")
                .count()
        })
        .sum();
    eprintln!(
        "{} slots ({first}..={last_expected}), {} lines, {reruns} reruns, missing {missing:?}, \
         doubled {}, worst lateness around each fault (ms): {worst:?}, stale firings dropped: {stale_all}",
        last_expected - first + 1,
        lines.len(),
        doubled.len(),
    );
    assert!(missing.is_empty(), "slots never fired: {missing:?}");
    assert!(
        doubled.is_empty(),
        "slots with other than one first run: {doubled:?}"
    );
    let kill_bound = (2 * HEARTBEAT + Duration::from_secs(2)).as_millis() as i64;
    let freeze_bound = (3 * HEARTBEAT + Duration::from_secs(2)).as_millis() as i64;
    for (fault, w) in &worst {
        let bound = if *fault == Fault::Kill {
            kill_bound
        } else {
            freeze_bound
        };
        assert!(
            *w <= bound,
            "a slot ran {w} ms late around a {fault:?} (bound {bound} ms)"
        );
    }
    if stale_all == 0 {
        for e in std::fs::read_dir(mesh.scratch.path()).unwrap().flatten() {
            if e.file_name().to_string_lossy().ends_with(".log") {
                let log = std::fs::read_to_string(e.path()).unwrap_or_default();
                for l in log.lines().filter(|l| {
                    l.contains("lease") || l.contains("scheduler") || l.contains("failpoint")
                }) {
                    eprintln!("{}: {l}", e.file_name().to_string_lossy());
                }
            }
        }
    }
    assert!(stale_all >= 1, "no stale-token firing was dropped");
}

/// The intervals (start, last act) of each token of the singleton's lines.
fn holdings(lines: &[Value]) -> BTreeMap<u64, (String, u64, u64)> {
    let mut by_token: BTreeMap<u64, (String, u64, u64)> = BTreeMap::new();
    for l in lines {
        let token = l["token"].as_u64().unwrap();
        let at = l["at_ms"].as_u64().unwrap();
        let node = l["node"].as_str().unwrap().to_owned();
        let e = by_token.entry(token).or_insert((node, at, at));
        e.1 = e.1.min(at);
        e.2 = e.2.max(at);
    }
    by_token
}

/// Waits until the singleton runs with a token above `above`; its node and token,
/// and when it started (its start line).
async fn singleton_started(file: &Path, above: u64, within: Duration) -> (String, u64, u64) {
    let deadline = Instant::now() + within;
    loop {
        for l in lines(file) {
            let token = l["token"].as_u64().unwrap();
            if l["event"] == "start" && token > above {
                return (
                    l["node"].as_str().unwrap().to_owned(),
                    token,
                    l["at_ms"].as_u64().unwrap(),
                );
            }
        }
        assert!(
            Instant::now() < deadline,
            "the singleton did not start again within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A singleton on 3 servers, its holder stopped (SIGTERM), killed and frozen in
/// turn: at no instant two holders acting, each new holder with a greater token,
/// the hand-over immediate on SIGTERM and within two heartbeats on `kill -9`, and
/// the frozen holder's late lines carrying its old token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_singleton_runs_on_one_server_at_a_time() {
    let vhost = Vhost::create("schedules-singleton");
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    let file = mesh.scratch.path().join("singleton.jsonl");
    let spec = |node: &str| {
        ServerSpec::new(node)
            .service("default", &["echo"])
            .logic("singletons = [\"test.singleton\"]\n")
            .extra(&format!(
                "\n[logic_server.singleton_settings.\"test.singleton\"]\npath = \"{}\"\n",
                file.display()
            ))
    };
    let mut index: HashMap<String, usize> = HashMap::new();
    for node in ["logic-a", "logic-b", "logic-c"] {
        index.insert(node.to_owned(), mesh.add_server(spec(node)).await);
    }
    let (mut node, mut token, _) = singleton_started(&file, 0, Duration::from_secs(10)).await;
    let mut report = Vec::new();
    for fault in ["TERM", "KILL", "STOP"] {
        let i = index[&node];
        let at = support::unix_ms();
        match fault {
            "TERM" => {
                mesh.stop_server(i).await;
            }
            "KILL" => mesh.kill_server(i).await,
            _ => mesh.servers[i].as_ref().unwrap().signal("STOP"),
        }
        let (next, next_token, started) =
            singleton_started(&file, token, Duration::from_secs(20)).await;
        report.push((
            fault,
            node.clone(),
            token,
            next.clone(),
            next_token,
            started - at,
        ));
        assert!(next_token > token);
        assert_ne!(next, node);
        match fault {
            "TERM" => assert!(
                started - at <= 1_000,
                "a SIGTERM hand-over took {} ms",
                started - at
            ),
            "KILL" => assert!(
                started - at <= (2 * HEARTBEAT).as_millis() as u64,
                "a kill -9 hand-over took {} ms",
                started - at
            ),
            _ => {
                tokio::time::sleep(
                    Duration::from_secs(8)
                        .saturating_sub(Duration::from_millis(support::unix_ms() - at)),
                )
                .await;
                mesh.servers[i].as_ref().unwrap().signal("CONT");
                // The woken holder writes its stop line, late, with its old token.
                let deadline = Instant::now() + Duration::from_secs(10);
                while !lines(&file)
                    .iter()
                    .any(|l| l["event"] == "stop" && l["token"].as_u64() == Some(token))
                {
                    assert!(Instant::now() < deadline, "the frozen holder never stopped");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        if fault != "STOP" {
            index.insert(node.clone(), mesh.add_server(spec(&node)).await);
        }
        node = next;
        token = next_token;
    }
    let all = lines(&file);
    let held = holdings(&all);
    eprintln!("hand-overs (fault, from, token, to, token, ms): {report:?}");
    eprintln!("holdings (token: node, from, to): {held:?}");
    let spans: Vec<_> = held.iter().collect();
    for pair in spans.windows(2) {
        let ((t1, (n1, _, end1)), (t2, (n2, start2, _))) = (pair[0], pair[1]);
        assert!(
            end1 < start2,
            "token {t1} on {n1} acted until {end1}, after token {t2} on {n2} started at {start2}"
        );
    }
    // The late lines of the frozen holder (written after a newer token started) carry
    // its older token.
    let mut newest = 0;
    let mut late_old = 0;
    for l in &all {
        let t = l["token"].as_u64().unwrap();
        if t < newest {
            late_old += 1;
        }
        newest = newest.max(t);
    }
    assert!(
        late_old >= 1,
        "the frozen holder wrote nothing after waking up"
    );
}

/// The servers of a schedule replaced one by one (SIGTERM, then the next
/// version's build started): no slot missed, none run twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_upgrade_misses_and_doubles_no_slot() {
    let vhost = Vhost::create("schedules-rolling");
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    let record = mesh.scratch.path().join("record.jsonl");
    let mut servers = Vec::new();
    for node in ["logic-a", "logic-b", "logic-c"] {
        servers.push(mesh.add_server(schedule_spec(node, &record)).await);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = support::unix_ms() / 1000;
    for (n, i) in servers.into_iter().enumerate() {
        mesh.stop_server(i).await;
        mesh.add_server(schedule_spec(&format!("logic-next-{n}"), &record).next_version())
            .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let ended = support::unix_ms() / 1000;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let lines = lines(&record);
    let mut firsts: BTreeMap<i64, usize> = BTreeMap::new();
    for l in &lines {
        if l["attempt"] == 1 {
            *firsts
                .entry(unix_s(l["slot"].as_str().unwrap()))
                .or_default() += 1;
        }
    }
    let wrong: Vec<_> = (started as i64..=ended as i64)
        .filter(|s| firsts.get(s) != Some(&1))
        .map(|s| (s, firsts.get(&s).copied().unwrap_or(0)))
        .collect();
    eprintln!(
        "{} slots through the upgrade; wrong: {wrong:?}",
        ended - started + 1
    );
    assert!(
        wrong.is_empty(),
        "slots missed or doubled (slot, first runs): {wrong:?}"
    );
}

/// The embedded mesh (memory transport) runs schedules and singletons too: each
/// slot once, a slot skipped while the previous run of an `overlap = "skip"`
/// schedule is unfinished or when no server runs its handler, and a drained
/// process stops its singleton.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_mesh_runs_schedules_and_singletons() {
    let scratch = support::Scratch::new();
    let record = scratch.path().join("record.jsonl");
    let singleton = scratch.path().join("singleton.jsonl");
    let config = scratch.write(
        "keelson.toml",
        &format!(
            r#"
[transport]
kind = "memory"

[gateway]
listen = "127.0.0.1:0"

[auth]
secret = "{secret}"

[logic_server]
handlers = ["test.record", "test.slow"]
singletons = ["test.singleton"]
drain_timeout_ms = 5000

[logic_server.jobs]
concurrency = 4

[logic_server.handler_settings."test.record"]
path = "{record}"

[logic_server.singleton_settings."test.singleton"]
path = "{singleton}"

[[logic_server.schedules]]
name = "every-second"
cron = "* * * * * *"
handler = "test.record"
body = {{ n = 1 }}
# A run that starts late (the first, while the job runner warms up) must not make
# the next slot look like an overlap.
overlap = "allow"

[[logic_server.schedules]]
name = "slow"
cron = "* * * * * *"
handler = "test.slow"
body = {{ ms = 2500 }}
overlap = "skip"

[[logic_server.schedules]]
name = "orphan"
cron = "* * * * * *"
handler = "nobody.runs.this"
"#,
            secret = support::SECRET,
            record = record.display(),
            singleton = singleton.display(),
        ),
    );
    let log = scratch.path().join("keelson.log");
    let process = support::Process::start(support::Bin::Keelson, &config, &log, &[]).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let metrics = reqwest::get(process.url("x").replace("/api/x", "/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let status = process.terminate(Duration::from_secs(20)).await;
    assert!(status.success());

    let mut firsts: BTreeMap<i64, usize> = BTreeMap::new();
    for l in lines(&record) {
        assert_eq!(l["token"], 1, "{l}");
        assert_eq!(l["body"]["n"], 1, "{l}");
        *firsts
            .entry(unix_s(l["slot"].as_str().unwrap()))
            .or_default() += 1;
    }
    let (first, last) = (
        *firsts.keys().next().unwrap(),
        *firsts.keys().last().unwrap(),
    );
    assert!(last - first >= 3, "too few slots: {firsts:?}");
    assert!(
        (first..=last).all(|s| firsts.get(&s) == Some(&1)),
        "each slot once: {firsts:?}"
    );
    let series_of = |schedule: &str, name: &str, label: &str| -> f64 {
        let schedule = format!("schedule=\"{schedule}\"");
        metrics
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(&schedule) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    // Runs of 2.5 s, a slot a second, for about 6 s: a run every third slot at most.
    let series = |name: &str, label: &str| series_of("slow", name, label);
    let skipped = series("keelson_schedule_skipped_total", "reason=\"overlap\"");
    let fired = series("keelson_schedule_firings_total", "kind=");
    // A slot whose handler nobody runs is skipped, not retried for ever.
    let orphaned = series_of(
        "orphan",
        "keelson_schedule_skipped_total",
        "reason=\"no_handler\"",
    );
    assert!(
        orphaned >= 3.0,
        "orphan slots skipped: {orphaned}\n{metrics}"
    );
    assert!(
        skipped >= 2.0 && (1.0..=3.0).contains(&fired),
        "the slow schedule: {fired} fired, {skipped} skipped for overlap\n{metrics}"
    );
    let events: Vec<String> = lines(&singleton)
        .iter()
        .map(|l| l["event"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        events.first().map(String::as_str),
        Some("start"),
        "{events:?}"
    );
    assert_eq!(
        events.last().map(String::as_str),
        Some("stop"),
        "drained: {events:?}"
    );
}

/// The lease queue deleted by an operator (or lost with a broker rebuilt) restarts
/// the lease's tokens at 1, below the tokens the schedule's marks carry: the
/// schedule keeps firing every slot, with tokens above its marks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_lease_queue_does_not_stop_the_schedule() {
    let vhost = Vhost::create("schedules-reset");
    let mut mesh = Mesh::new(amqp_transport(&[vhost.url()]));
    let record = mesh.scratch.path().join("record.jsonl");
    let mut index: HashMap<String, usize> = HashMap::new();
    for node in ["logic-a", "logic-b"] {
        index.insert(
            node.to_owned(),
            mesh.add_server(support::mesh::schedule_spec(node, &record))
                .await,
        );
    }
    mesh.add_gateway().await;
    let client = reqwest::Client::new();
    // A hand-over first, so that the marks carry token 2.
    let (leader, first) = holder(&mesh, &client, "scheduler", 0).await;
    mesh.stop_server(index[&leader]).await;
    let (_, second) = holder(&mesh, &client, "scheduler", first).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deleted_ms = support::unix_ms() as i64;
    vhost.delete_queue("keelson.lease.scheduler");
    tokio::time::sleep(Duration::from_secs(8)).await;
    let lines = lines(&record);
    let mut firsts: BTreeMap<i64, Vec<u64>> = BTreeMap::new();
    for l in &lines {
        if l["attempt"] == 1 {
            firsts
                .entry(unix_s(l["slot"].as_str().unwrap()))
                .or_default()
                .push(l["token"].as_u64().unwrap());
        }
    }
    let from = deleted_ms / 1000 - 2;
    let to = deleted_ms / 1000 + 5;
    let wrong: Vec<_> = (from..=to)
        .filter(|s| firsts.get(s).map(Vec::len) != Some(1))
        .collect();
    let after: Vec<u64> = firsts
        .range(deleted_ms / 1000 + 2..)
        .flat_map(|(_, t)| t.clone())
        .collect();
    eprintln!(
        "tokens before the deletion up to {second}; after: {after:?}; wrong slots: {wrong:?}"
    );
    assert!(
        wrong.is_empty(),
        "slots missed or doubled around the deletion: {wrong:?}"
    );
    assert!(
        !after.is_empty() && after.iter().all(|t| *t > second),
        "after the deletion the schedule fires with tokens above its marks: {after:?}"
    );
}
