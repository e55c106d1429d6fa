//! `--scenario context` (issue 5): the replicated per-user context store.
//!
//! * **Replication lag**: two `ReplicatedContextStore`s in this process, each on an
//!   AMQP transport (a connection) of its own, node ids `bench-a` and `bench-b`. Store
//!   A writes (`set(user-N, "seq", k)`, users rotating over 1,000) on a fixed 1 ms
//!   schedule, each write in a task of its own so a slow publish does not delay the
//!   next; a dedicated thread polls store B (a `get` every ~20 µs plus the sleep's
//!   timer slack) for write k, then k+1, ... Lag counts from the moment A's `set`
//!   call **started** (also given from when it returned).
//! * **Joining**: store A is filled with 100,000 users of a ~200-byte JSON profile;
//!   then a real `logic-server` process is started on that namespace and timed from
//!   spawn to its `logic server ready` line (it joins before it says so; store A
//!   answers its snapshot requests). Baseline: the same start against a namespace
//!   whose only peer holds 0 users. The joined process's VmRSS is read right after
//!   it is ready, against the payload.

use super::keelson_config::{SERVICE, logic_server, spec_with_config};
use super::special::{Disturbance, Settings, Stats, loadavg, ms, utc_now};
use crate::broker::{self, Objects};
use crate::procs::{self, Proc, Ready};
use anyhow::Context as _;
use bytes::Bytes;
use futures_util::StreamExt as _;
use keelson_logic_server::{ContextConfig, ContextStore as _, ReplicatedContextStore};
use keelson_protocol::context::SNAPSHOT_SERVICE;
use keelson_protocol::transport::{AmqpConfig, AmqpTransport, Transport};
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Users in the join test.
const JOIN_USERS: usize = 100_000;
/// Size of each user's profile value.
const PROFILE_BYTES: usize = 200;

/// The figures of the scenario (the JSON report).
#[derive(Debug, Serialize)]
pub struct ContextReport {
    /// Load average at the start and end, and the date.
    pub machine: serde_json::Value,
    /// Replication lag.
    pub lag: LagReport,
    /// Joining.
    pub join: JoinFigures,
}

/// Replication lag figures.
#[derive(Debug, Serialize)]
pub struct LagReport {
    /// Intended write rate.
    pub rate_per_s: f64,
    /// Writes issued.
    pub writes: usize,
    /// Writes that failed on A.
    pub write_errors: usize,
    /// Writes B never showed (within 5 s after the last write).
    pub not_seen: usize,
    /// Lag from the start of A's `set` call until B shows it.
    pub from_start: Stats,
    /// Lag from the return of A's `set` call (0 when B showed it before).
    pub from_return: Stats,
    /// Duration of A's `set` calls.
    pub set_call: Stats,
    /// Cores busy outside this process and the broker during the window.
    pub other_cores: f64,
}

/// One join measurement.
#[derive(Debug, Serialize)]
pub struct JoinRun {
    /// Users held by the peer.
    pub users: usize,
    /// Spawn to `logic server ready`, in milliseconds.
    pub ready_ms: f64,
    /// VmRSS right after ready, KiB.
    pub rss_kib: u64,
    /// VmHWM right after ready, KiB.
    pub hwm_kib: u64,
    /// The joining server's own "context store ready" log line.
    pub log_line: Option<String>,
    /// Cores busy outside the measured processes during the join.
    pub other_cores: f64,
}

/// Join figures.
#[derive(Debug, Serialize)]
pub struct JoinFigures {
    /// Time to fill store A.
    pub populate_s: f64,
    /// Payload: users × value bytes.
    pub payload_bytes: u64,
    /// Payload including user ids and keys.
    pub payload_with_keys_bytes: u64,
    /// Baseline runs (a peer with 0 users).
    pub baseline: Vec<JoinRun>,
    /// Runs with the full store.
    pub full: Vec<JoinRun>,
    /// Median ready time of `full` minus that of `baseline`, ms.
    pub join_ms: f64,
    /// Median RSS of `full`, KiB.
    pub rss_kib: u64,
    /// Median RSS of `full` minus that of `baseline`, KiB.
    pub rss_net_kib: u64,
}

async fn transport(
    env: &super::Env,
    node: &str,
) -> anyhow::Result<(Arc<AmqpTransport>, Arc<dyn Transport>)> {
    let config: AmqpConfig = serde_json::from_value(serde_json::json!({
        "urls": [env.amqp_url],
        "namespace": env.namespace,
        "queue_expires_ms": 600_000,
    }))
    .context("cannot configure the AMQP transport")?;
    let t = Arc::new(
        AmqpTransport::connect(config, node)
            .await
            .context("cannot connect the AMQP transport")?,
    );
    let dyn_t: Arc<dyn Transport> = t.clone();
    Ok((t, dyn_t))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

/// A ~200-byte JSON profile for user `i`.
fn profile(i: usize) -> Bytes {
    let head = format!(
        "{{\"name\":\"User {i}\",\"email\":\"user-{i:06}@example.com\",\"plan\":\"pro\",\"locale\":\"en-GB\",\"pad\":\""
    );
    let pad = PROFILE_BYTES.saturating_sub(head.len() + 2);
    Bytes::from(format!("{head}{}\"}}", "x".repeat(pad)))
}

async fn measure_lag(
    settings: &Settings,
    a: Arc<ReplicatedContextStore>,
    b: Arc<ReplicatedContextStore>,
    watched: &[u32],
) -> anyhow::Result<LagReport> {
    let secs = if settings.quick { 3 } else { 10 };
    let writes = secs * 1000;
    let handle = tokio::runtime::Handle::current();
    let (tx, rx) = std::sync::mpsc::channel::<(usize, String)>();
    // The poller: one thread, so it costs little and never waits behind the runtime.
    let poller = std::thread::Builder::new()
        .name("lag-poller".into())
        .spawn(move || {
            let mut seen: Vec<Option<Instant>> = vec![None; writes];
            let mut deadline: Option<Instant> = None;
            while let Ok((k, user)) = rx.recv() {
                loop {
                    let got = handle.block_on(b.get(&user, "seq")).ok().flatten();
                    let value = got
                        .and_then(|v| std::str::from_utf8(&v).ok().and_then(|s| s.parse().ok()))
                        .unwrap_or(-1_i64);
                    if value >= k as i64 {
                        seen[k] = Some(Instant::now());
                        break;
                    }
                    // Give up on a write 5 s after the last one was sent.
                    if let Some(d) = deadline
                        && Instant::now() > d
                    {
                        break;
                    }
                    if k + 1 == writes && deadline.is_none() {
                        deadline = Some(Instant::now() + Duration::from_secs(5));
                    }
                    std::thread::sleep(Duration::from_micros(20));
                }
                if k + 1 == writes {
                    break;
                }
            }
            seen
        })
        .context("cannot start the poller thread")?;

    let disturbance = Disturbance::begin(watched)?;
    let t0 = tokio::time::Instant::now() + Duration::from_millis(5);
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..writes {
        tokio::time::sleep_until(t0 + Duration::from_millis(k as u64)).await;
        let user = format!("user-{}", k % 1000);
        let a = a.clone();
        let tx = tx.clone();
        tasks.spawn(async move {
            let start = Instant::now();
            let _ = tx.send((k, user.clone()));
            let outcome = a.set(&user, "seq", Bytes::from(k.to_string())).await;
            (k, start, Instant::now(), outcome.is_ok())
        });
    }
    drop(tx);
    let mut starts = vec![None; writes];
    let mut write_errors = 0;
    while let Some(done) = tasks.join_next().await {
        let (k, start, returned, ok) = done?;
        starts[k] = Some((start, returned));
        if !ok {
            write_errors += 1;
        }
    }
    let other_cores = disturbance.other_cores(watched)?;
    let seen = tokio::task::spawn_blocking(move || poller.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the poller thread panicked"))?;
    let mut from_start = Vec::new();
    let mut from_return = Vec::new();
    let mut calls = Vec::new();
    let mut not_seen = 0;
    for (k, s) in starts.iter().enumerate() {
        let Some((start, returned)) = *s else {
            continue;
        };
        calls.push(returned - start);
        match seen[k] {
            Some(at) => {
                from_start.push(at.saturating_duration_since(start));
                from_return.push(at.saturating_duration_since(returned));
            }
            None => not_seen += 1,
        }
    }
    Ok(LagReport {
        rate_per_s: 1000.0,
        writes,
        write_errors,
        not_seen,
        from_start: Stats::of(from_start, 0, None)?,
        from_return: Stats::of(from_return, 0, None)?,
        set_call: Stats::of(calls, 0, None)?,
        other_cores,
    })
}

async fn populate(a: &Arc<ReplicatedContextStore>, users: usize) -> anyhow::Result<f64> {
    let began = Instant::now();
    let results: Vec<_> = futures_util::stream::iter(0..users)
        .map(|i| {
            let a = a.clone();
            async move { a.set(&format!("user-{i:06}"), "profile", profile(i)).await }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    anyhow::ensure!(
        failed == 0,
        "{failed} of {users} writes failed while populating"
    );
    Ok(began.elapsed().as_secs_f64())
}

/// Start a logic server on `env`'s namespace; time it until ready, read its RSS.
async fn join_once(
    settings: &Settings,
    env: &super::Env,
    tag: &str,
    users: usize,
    watched: &[u32],
) -> anyhow::Result<JoinRun> {
    let mut toml = logic_server(env);
    toml.push_str("\n[logic_server.context]\njoin_timeout_ms = 5000\n");
    let spec = spec_with_config(
        env,
        "logic",
        "logic-server",
        &format!("logic-server-{tag}.toml"),
        &toml,
        Ready::Line("logic server ready"),
    )?;
    let disturbance = Disturbance::begin(watched)?;
    let began = Instant::now();
    let proc = Proc::start(spec, settings.worker_threads, &env.dir).await?;
    let ready_ms = began.elapsed().as_secs_f64() * 1000.0;
    let mut pids = watched.to_vec();
    pids.push(proc.pid);
    let other_cores = disturbance.other_cores(&pids).unwrap_or(0.0);
    let (rss_kib, hwm_kib) = procs::rss_kib(proc.pid)?;
    let log = std::fs::read_to_string(&proc.log).unwrap_or_default();
    let log_line = log
        .lines()
        .find(|l| l.contains("context store ready"))
        .map(str::to_owned);
    proc.stop().await;
    let _ = std::fs::rename(proc_log(env), env.dir.join(format!("logic-{tag}.log")));
    Ok(JoinRun {
        users,
        ready_ms,
        rss_kib,
        hwm_kib,
        log_line,
        other_cores,
    })
}

fn proc_log(env: &super::Env) -> std::path::PathBuf {
    env.dir.join("logic.log")
}

/// Run the scenario; print the table; return the JSON.
pub async fn run(settings: &Settings) -> anyhow::Result<serde_json::Value> {
    let broker_conn = broker::connect(&settings.amqp_url).await?;
    let broker_pid = broker::local_pid(broker::port(&settings.amqp_url));
    let mut watched = vec![std::process::id()];
    watched.extend(broker_pid);
    let load_start = loadavg();
    let date = utc_now();

    // (a) Replication lag.
    let env = settings.env("ctx-lag")?;
    let (ta, dyn_a) = transport(&env, "bench-a").await?;
    let (tb, dyn_b) = transport(&env, "bench-b").await?;
    let config = ContextConfig {
        join_timeout_ms: 1000,
        ..ContextConfig::default()
    };
    let a = ReplicatedContextStore::start(dyn_a, "bench-a", config.clone()).await?;
    let b = ReplicatedContextStore::start(dyn_b, "bench-b", config.clone()).await?;
    eprintln!("keelson-bench: context: replication lag at 1,000 writes/s");
    let lag = measure_lag(settings, a.clone(), b.clone(), &watched).await;
    a.stop();
    b.stop();
    drop((a, b));
    let _ = ta.delete_topology().await;
    let _ = tb.delete_topology().await;
    let lag = lag?;

    // (b) Join: baseline namespace with an empty peer, full namespace with 100k.
    let env_empty = settings.env("ctx-join-empty")?;
    let env_full = settings.env("ctx-join-full")?;
    let (te, dyn_e) = transport(&env_empty, "bench-empty").await?;
    let (tf, dyn_f) = transport(&env_full, "bench-a").await?;
    let empty = ReplicatedContextStore::start(dyn_e, "bench-empty", config.clone()).await?;
    let full = ReplicatedContextStore::start(dyn_f, "bench-a", config.clone()).await?;
    eprintln!("keelson-bench: context: writing {JOIN_USERS} users of {PROFILE_BYTES} bytes");
    let populate_s = populate(&full, JOIN_USERS).await?;
    eprintln!(
        "keelson-bench: context: populated in {populate_s:.1} s ({} users)",
        full.user_count()
    );
    let reps = if settings.quick { 1 } else { 3 };
    let mut baseline = Vec::new();
    let mut full_runs = Vec::new();
    for rep in 0..reps {
        eprintln!("keelson-bench: context: join {}/{reps}", rep + 1);
        baseline.push(join_once(settings, &env_empty, &format!("empty-{rep}"), 0, &watched).await?);
        full_runs.push(
            join_once(
                settings,
                &env_full,
                &format!("full-{rep}"),
                JOIN_USERS,
                &watched,
            )
            .await?,
        );
    }
    empty.stop();
    full.stop();
    drop((empty, full));
    let _ = te.delete_topology().await;
    let _ = tf.delete_topology().await;
    for ns in [&env_empty.namespace, &env_full.namespace] {
        let _ = Objects::keelson(ns, &[SERVICE, SNAPSHOT_SERVICE])
            .delete(&broker_conn)
            .await;
    }

    let med = |runs: &[JoinRun], f: fn(&JoinRun) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        median(&mut v)
    };
    let base_ms = med(&baseline, |r| r.ready_ms);
    let full_ms = med(&full_runs, |r| r.ready_ms);
    let base_rss = med(&baseline, |r| r.rss_kib as f64) as u64;
    let full_rss = med(&full_runs, |r| r.rss_kib as f64) as u64;
    let payload_bytes = (JOIN_USERS * PROFILE_BYTES) as u64;
    let payload_with_keys_bytes = (0..JOIN_USERS)
        .map(|i| (format!("user-{i:06}").len() + "profile".len() + profile(i).len()) as u64)
        .sum();
    let join = JoinFigures {
        populate_s,
        payload_bytes,
        payload_with_keys_bytes,
        baseline,
        full: full_runs,
        join_ms: full_ms - base_ms,
        rss_kib: full_rss,
        rss_net_kib: full_rss.saturating_sub(base_rss),
    };

    let report = ContextReport {
        machine: serde_json::json!({
            "date": date,
            "loadavg_start": load_start,
            "loadavg_end": loadavg(),
        }),
        lag,
        join,
    };
    print!("{}", render(&report, base_ms, full_ms));
    Ok(serde_json::to_value(&report)?)
}

fn render(r: &ContextReport, base_ms: f64, full_ms: f64) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let l = &r.lag;
    let _ = writeln!(
        s,
        "Context scenario ({}; load average {} at the start, {} at the end)",
        r.machine["date"].as_str().unwrap_or_default(),
        r.machine["loadavg_start"].as_str().unwrap_or_default(),
        r.machine["loadavg_end"].as_str().unwrap_or_default()
    );
    let _ = writeln!(
        s,
        "\nReplication lag, A -> B over RabbitMQ, {} writes at {:.0}/s ({} failed, {} never seen); other cores busy {:.2}",
        l.writes, l.rate_per_s, l.write_errors, l.not_seen, l.other_cores
    );
    let _ = writeln!(
        s,
        "{:<28} {:>8} {:>8} {:>8} {:>8}",
        "ms", "p50", "p99", "p99.9", "max"
    );
    for (name, st) in [
        ("lag from set() start", &l.from_start),
        ("lag from set() return", &l.from_return),
        ("set() call on A", &l.set_call),
    ] {
        let _ = writeln!(
            s,
            "{name:<28} {:>8} {:>8} {:>8} {:>8}",
            ms(st.p50_us),
            ms(st.p99_us),
            ms(st.p999_us),
            ms(st.max_us)
        );
    }
    let verdict = |ok: bool| if ok { "met" } else { "SHORT" };
    let _ = writeln!(
        s,
        "goal: lag p99 <= 5 ms: {} ({} ms)",
        verdict(l.from_start.p99_us <= 5000),
        ms(l.from_start.p99_us)
    );
    let j = &r.join;
    let _ = writeln!(
        s,
        "\nJoin: logic-server process, spawn to \"logic server ready\"; peer populated with {} users in {:.1} s",
        JOIN_USERS, j.populate_s
    );
    let _ = writeln!(
        s,
        "{:<10} {:>7} {:>10} {:>10} {:>10} {:>6}",
        "peer", "users", "ready ms", "RSS MiB", "HWM MiB", "other"
    );
    for run in j.baseline.iter().chain(&j.full) {
        let _ = writeln!(
            s,
            "{:<10} {:>7} {:>10.0} {:>10.1} {:>10.1} {:>6.2}",
            if run.users == 0 { "empty" } else { "full" },
            run.users,
            run.ready_ms,
            run.rss_kib as f64 / 1024.0,
            run.hwm_kib as f64 / 1024.0,
            run.other_cores
        );
    }
    let payload_mib = j.payload_bytes as f64 / 1048576.0;
    let _ = writeln!(
        s,
        "join time (median full {full_ms:.0} ms - median empty {base_ms:.0} ms) = {:.0} ms; goal <= 3000 ms: {}",
        j.join_ms,
        verdict(j.join_ms <= 3000.0)
    );
    let _ = writeln!(
        s,
        "RSS {:.1} MiB ({:.1} MiB above the empty server) for a payload of {payload_mib:.1} MiB ({:.1} MiB with user ids and keys); goal RSS <= 2x payload = {:.1} MiB: {}",
        j.rss_kib as f64 / 1024.0,
        j.rss_net_kib as f64 / 1024.0,
        j.payload_with_keys_bytes as f64 / 1048576.0,
        2.0 * payload_mib,
        verdict(j.rss_kib as f64 / 1024.0 <= 2.0 * payload_mib)
    );
    s
}
