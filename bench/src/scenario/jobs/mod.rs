//! `--scenario jobs` (issue 15): what a background job costs against the broker path
//! it rides on, in the same run and on the same broker.
//!
//! * **Keelson**: two `logic-server`s and one `ui-gateway` on AMQP; N empty jobs
//!   (`POST /api/echo` with `{}` and `Prefer: respond-async`) submitted over HTTP,
//!   64 in flight, then 200 one at a time (their latency has no queueing in it).
//!   Submission rate: N over the time from the first submit to the last `202`.
//!   Completion: every job's record is read afterwards (`GET
//!   /jobs/{id}?wait=30`) and its latency is its `finished_at` minus the moment its
//!   submit began (same host clock; `finished_at` has millisecond resolution).
//! * **Raw lapin**: the same numbers of persistent `{}` messages published with
//!   publisher confirms to a durable classic queue on one channel, 64 then 1 in
//!   flight, consumed and acked by two consumers (a connection each, prefetch = the
//!   jobs' concurrency). Publish rate, and latency from the start of the publish to
//!   the delivery in a consumer.
//!
//! Both run in a virtual host of the run's own (deleted afterwards) when the broker is
//! local, else in a namespace of their own on `--amqp-url` (queues expire after ten
//! minutes). Each side first runs 200 of its own to warm up, not counted.

mod keelson;
mod raw;

use super::special::{Settings, Stats, loadavg, ms, utc_now};
use crate::broker::{self, Vhost};
use anyhow::Context as _;
use serde::Serialize;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::task::JoinSet;

/// Submissions (publishes) in flight at once in the throughput run.
const IN_FLIGHT: usize = 64;
/// Jobs (messages) of the run one at a time, whose latency has no queueing in it.
const ONE_BY_ONE: usize = 200;
/// Jobs per side at [`IN_FLIGHT`] by default.
const JOBS: usize = 5_000;
/// The same with `--quick`.
const QUICK_JOBS: usize = 1_000;
/// Jobs (messages) each side runs first, not counted.
const WARMUP: usize = 200;
/// The body of every job and message: an empty job.
const BODY: &[u8] = b"{}";
/// How long a submit or a publish may take before it counts as failed.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the raw consumers may take to receive a batch's last message.
const DONE_TIMEOUT: Duration = Duration::from_secs(60);

/// One side's figures.
#[derive(Debug, Serialize)]
pub struct Side {
    /// Jobs submitted (messages published).
    pub count: usize,
    /// Submissions in flight at once.
    pub in_flight: usize,
    /// Submissions answered `202` (publishes confirmed) per second: the count over
    /// the time from the first submit to the last answer.
    pub sent_per_s: f64,
    /// Round trip of each submit (`202`) or publish (confirm).
    pub send: Stats,
    /// From the start of each submit (publish) to the job's `finished_at` (the
    /// delivery in a consumer); failures: not accepted, not `succeeded`, not consumed.
    pub done: Stats,
    /// Completed per second: the count over the time from the first submit to the
    /// last completion.
    pub done_per_s: f64,
    /// Cores busy outside this process, the broker and the Keelson processes.
    pub other_cores: f64,
}

/// One submission (publish): when it started and how it went.
struct Sent<T> {
    at: Instant,
    unix_us: u64,
    took: Duration,
    out: Result<T, String>,
}

/// What [`send_all`] runs: one side's submissions, or the status reads.
trait Sends: Send + Sync + 'static {
    /// A worker's connection.
    type Conn: Send + 'static;
    /// What a successful send gives.
    type Out: Send + 'static;
    /// Open a worker's connection.
    fn connect(&self) -> impl Future<Output = anyhow::Result<Self::Conn>> + Send;
    /// Send number `i`; must give up by itself.
    fn send(
        &self,
        conn: &mut Self::Conn,
        i: usize,
    ) -> impl Future<Output = Result<Self::Out, String>> + Send;
}

/// The wall clock in microseconds since the Unix epoch, to compare with the times
/// the servers record.
fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Sends `0..n`, `in_flight` at once (each worker takes the next number when its
/// send is answered); the results in order, and the time from the first send to the
/// last answer.
async fn send_all<S: Sends>(
    s: Arc<S>,
    n: usize,
    in_flight: usize,
) -> anyhow::Result<(Vec<Sent<S::Out>>, Duration)> {
    let mut conns = Vec::new();
    for _ in 0..in_flight.clamp(1, n.max(1)) {
        conns.push(s.connect().await?);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let began = Instant::now();
    let mut tasks = JoinSet::new();
    for mut conn in conns {
        let (s, next) = (s.clone(), next.clone());
        tasks.spawn(async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return done;
                }
                let (at, unix_us) = (Instant::now(), unix_us());
                let out = s.send(&mut conn, i).await;
                let took = at.elapsed();
                done.push((
                    i,
                    Sent {
                        at,
                        unix_us,
                        took,
                        out,
                    },
                ));
            }
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(done) = tasks.join_next().await {
        all.extend(done.context("a sending task failed")?);
    }
    let elapsed = began.elapsed();
    all.sort_by_key(|(i, _)| *i);
    Ok((all.into_iter().map(|(_, s)| s).collect(), elapsed))
}

/// Stats of the sends' round trips, failures counted.
fn send_stats<T>(sent: &[Sent<T>]) -> anyhow::Result<Stats> {
    let first = sent.iter().find_map(|s| s.out.as_ref().err().cloned());
    let errors = sent.iter().filter(|s| s.out.is_err()).count() as u64;
    Stats::of(
        sent.iter().filter(|s| s.out.is_ok()).map(|s| s.took),
        errors,
        first,
    )
}

/// `rate` as `count / elapsed`.
fn per_s(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-6)
}

/// Stats of the latencies to completion, failures counted.
fn done_stats(done: &[Result<Duration, String>]) -> anyhow::Result<Stats> {
    let first = done.iter().find_map(|d| d.as_ref().err().cloned());
    let errors = done.iter().filter(|d| d.is_err()).count() as u64;
    Stats::of(
        done.iter().filter_map(|d| d.as_ref().ok().copied()),
        errors,
        first,
    )
}

/// Keelson's figures over raw lapin's.
fn ratios(keelson: &Side, raw: &Side) -> serde_json::Value {
    let ratio = |k: f64, r: f64| k / r.max(1e-9);
    serde_json::json!({
        "in_flight": keelson.in_flight,
        "sent_per_s": ratio(keelson.sent_per_s, raw.sent_per_s),
        "done_per_s": ratio(keelson.done_per_s, raw.done_per_s),
        "done_p50": ratio(keelson.done.p50_us as f64, raw.done.p50_us as f64),
        "done_p99": ratio(keelson.done.p99_us as f64, raw.done.p99_us as f64),
    })
}

/// One line of the table.
fn row(name: &str, s: &Side) -> String {
    format!(
        "{name:<10} {:>6} {:>6} {:>9.0} {:>9} {:>9} {:>9} {:>9} {:>9.0} {:>7} {:>6.2}\n",
        s.in_flight,
        s.count,
        s.sent_per_s,
        ms(s.send.p50_us),
        ms(s.send.p99_us),
        ms(s.done.p50_us),
        ms(s.done.p99_us),
        s.done_per_s,
        s.done.errors,
        s.other_cores
    )
}

/// Run the scenario; print the table; return the JSON.
pub async fn run(settings: &Settings) -> anyhow::Result<serde_json::Value> {
    let n = settings
        .jobs
        .unwrap_or(if settings.quick { QUICK_JOBS } else { JOBS });
    anyhow::ensure!(n > 0, "--jobs must be at least 1");
    let date = utc_now();
    let load_start = loadavg();
    let mut env = settings.env("jobs")?;
    let vhost = match Vhost::create(&settings.amqp_url, &env.namespace).await {
        Ok(vhost) => {
            env.amqp_url = vhost.url.clone();
            Some(vhost)
        }
        Err(e) => {
            eprintln!(
                "keelson-bench: no vhost of its own ({e:#}): namespace {} on --amqp-url",
                env.namespace
            );
            None
        }
    };
    let raw_queue = format!("{}.raw", env.namespace);
    eprintln!("keelson-bench: jobs: raw lapin, {n} messages");
    let raw = raw::side(&env.amqp_url, &raw_queue, settings, n).await;
    eprintln!("keelson-bench: jobs: Keelson, {n} jobs");
    let keelson = match &raw {
        Ok(_) => keelson::side(&env, settings, n).await,
        Err(_) => Err(anyhow::anyhow!("not run")),
    };
    let vhost_name = vhost.as_ref().map(|v| v.name.clone());
    match vhost {
        Some(vhost) => vhost.delete().await,
        None => {
            if let Ok(conn) = broker::connect(&settings.amqp_url).await {
                let raw = broker::Objects {
                    queues: vec![raw_queue],
                    exchanges: Vec::new(),
                };
                let _ = raw.delete(&conn).await;
            }
        }
    }
    let (raw, keelson) = (raw?, keelson?);
    let load_end = loadavg();
    let ratios = [ratios(&keelson[0], &raw[0]), ratios(&keelson[1], &raw[1])];
    let mut s = format!(
        "Jobs scenario ({date}; load average {load_start} at the start, {load_end} at the end)\n\
         empty jobs: keelson POST /api/echo {{}} with Prefer: respond-async, 2 logic servers \
         (jobs concurrency {p}), 1 gateway; raw: lapin publish (persistent, confirmed) to a \
         durable classic queue, 2 consumers (prefetch {p})\n\
         {:<10} {:>6} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7} {:>6}\n",
        "",
        "flight",
        "jobs",
        "sent/s",
        "send p50",
        "send p99",
        "done p50",
        "done p99",
        "done/s",
        "errors",
        "other",
        p = settings.prefetch,
    );
    for i in 0..2 {
        s.push_str(&row("raw lapin", &raw[i]));
        s.push_str(&row("keelson", &keelson[i]));
    }
    for r in &ratios {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        s.push_str(&format!(
            "keelson/raw at {} in flight: submission rate {:.3}, completion rate {:.3}, \
             latency p50 {:.1}x, p99 {:.1}x\n",
            r["in_flight"],
            f("sent_per_s"),
            f("done_per_s"),
            f("done_p50"),
            f("done_p99"),
        ));
    }
    s.push_str(
        "ms; send: round trip of the submit (202) / publish (confirm); done: from the submit's \
         start to the job's finished_at (1 ms resolution) / from the publish's start to the \
         delivery\n",
    );
    for (name, side) in [("raw", &raw), ("keelson", &keelson)] {
        if let Some(e) = side.iter().find_map(|s| s.done.first_error.as_ref()) {
            s.push_str(&format!("{name}: first error: {e}\n"));
        }
    }
    print!("{s}");
    Ok(serde_json::json!({
        "machine": {"date": date, "loadavg_start": load_start, "loadavg_end": load_end},
        "jobs": n,
        "warmup": WARMUP,
        "concurrency": settings.prefetch,
        "vhost": vhost_name,
        "raw": raw,
        "keelson": keelson,
        "ratios": ratios,
    }))
}
