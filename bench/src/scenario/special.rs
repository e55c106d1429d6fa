//! What the special scenarios (`--scenario context|governor|upgrade|jobs`) share: their
//! settings, an in-process open-loop HTTP load that keeps every sample with its
//! intended send time (so a run can be cut into windows afterwards: before and during
//! an upgrade), percentiles, and the machine's disturbance over a window.

use super::Env;
use crate::loadgen::Target as _;
use crate::loadgen::http::HttpEcho;
use crate::procs::{self, HostTicks};
use anyhow::Context as _;
use bytes::Bytes;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// Settings of a special scenario, from the command line.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Shorter windows and smaller figures.
    pub quick: bool,
    /// Where the release binaries are.
    pub bins: PathBuf,
    /// A directory for this run's configuration files and logs.
    pub work_dir: PathBuf,
    /// Unique id of this run.
    pub run_id: String,
    /// Broker URL.
    pub amqp_url: String,
    /// Tokio worker threads of every process.
    pub worker_threads: usize,
    /// `logic_server.concurrency`.
    pub prefetch: u16,
    /// `[log] level` of the Keelson processes.
    pub log_level: String,
    /// Request body size.
    pub payload_bytes: usize,
    /// Open-loop rate (governor, upgrade); the scenario's default when `None`.
    pub rate: Option<f64>,
    /// Handler the governor scenario calls (default `echo`).
    pub handler: Option<String>,
    /// Request body of that handler (then only status 200 is checked); default the
    /// echoed payload.
    pub body: Option<String>,
    /// Jobs the jobs scenario submits (and messages its raw baseline publishes); the
    /// scenario's default when `None`.
    pub jobs: Option<usize>,
}

impl Settings {
    /// An [`Env`] with a directory and namespace of its own, named `tag`.
    pub fn env(&self, tag: &str) -> anyhow::Result<Env> {
        let dir = self.work_dir.join(tag);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Env {
            bins: self.bins.clone(),
            dir,
            amqp_url: self.amqp_url.clone(),
            namespace: format!("kbench-{}-{tag}", self.run_id),
            worker_threads: self.worker_threads,
            prefetch: self.prefetch,
            log_level: self.log_level.clone(),
        })
    }
}

/// The request body: a JSON object of `size` bytes.
pub fn payload(size: usize) -> Bytes {
    let filler = size.saturating_sub(8).max(4);
    Bytes::from(format!("{{\"p\":\"{}\"}}", "x".repeat(filler)))
}

/// Latency percentiles of a set of samples, in microseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    /// Samples (answered or failed).
    pub count: u64,
    /// Failed requests (wrong status, wrong body, timeout).
    pub errors: u64,
    /// The first error.
    pub first_error: Option<String>,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest.
    pub max_us: u64,
}

impl Stats {
    /// Percentiles of `latencies` (successful requests only) plus the error count.
    pub fn of(
        latencies: impl IntoIterator<Item = Duration>,
        errors: u64,
        first_error: Option<String>,
    ) -> anyhow::Result<Self> {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        for l in latencies {
            let us = u64::try_from(l.as_micros()).unwrap_or(60_000_000);
            h.saturating_record(us.clamp(1, 60_000_000));
        }
        Ok(Self {
            count: h.len() + errors,
            errors,
            first_error,
            p50_us: h.value_at_quantile(0.50),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        })
    }
}

/// One request of the open loop.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Its intended send time.
    pub intended: Instant,
    /// From the intended send time to the answer (or the failure).
    pub latency: Duration,
    /// The failure, if any.
    pub error: Option<String>,
}

/// Stats of the samples whose intended send time lies in `[from, to)`.
pub fn window(samples: &[Sample], from: Instant, to: Instant) -> anyhow::Result<Stats> {
    let inside = || {
        samples
            .iter()
            .filter(|s| s.intended >= from && s.intended < to)
    };
    let errors = inside().filter(|s| s.error.is_some()).count() as u64;
    let first = inside().find_map(|s| s.error.clone());
    Stats::of(
        inside().filter(|s| s.error.is_none()).map(|s| s.latency),
        errors,
        first,
    )
}

/// A running open-loop load: a pacer thread hands intended send times to the first
/// idle worker (latency counts from the intended time: no coordinated omission);
/// workers take the targets in turn (worker `i` uses target `i % n`).
#[derive(Debug)]
pub struct OpenLoad {
    stop: Arc<AtomicBool>,
    tasks: JoinSet<Vec<Sample>>,
    pacer: std::thread::JoinHandle<()>,
}

impl OpenLoad {
    /// Start `rate` requests per second over `workers` connections to `targets`.
    pub async fn start(targets: Vec<Arc<Http>>, rate: f64, workers: usize) -> anyhow::Result<Self> {
        anyhow::ensure!(!targets.is_empty(), "no target");
        let mut conns = Vec::with_capacity(workers);
        for i in 0..workers {
            let target = targets[i % targets.len()].clone();
            let conn = target.connect().await.context("cannot connect a worker")?;
            conns.push((target, conn));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = async_channel::unbounded::<Instant>();
        let t0 = Instant::now() + Duration::from_millis(10);
        let stop_pacer = stop.clone();
        let pacer = std::thread::Builder::new()
            .name("pacer".into())
            .spawn(move || {
                let mut i: u64 = 0;
                while !stop_pacer.load(Ordering::Relaxed) {
                    let at = t0 + Duration::from_secs_f64(i as f64 / rate);
                    let now = Instant::now();
                    if at > now {
                        std::thread::sleep(at - now);
                    }
                    if tx.send_blocking(at).is_err() {
                        return;
                    }
                    i += 1;
                }
            })
            .context("cannot start the pacer thread")?;
        let mut tasks = JoinSet::new();
        for (target, mut conn) in conns {
            let rx = rx.clone();
            tasks.spawn(async move {
                let mut samples = Vec::new();
                while let Ok(intended) = rx.recv().await {
                    let outcome = target.call(&mut conn).await;
                    samples.push(Sample {
                        intended,
                        latency: intended.elapsed(),
                        error: outcome.err(),
                    });
                }
                samples
            });
        }
        Ok(Self { stop, tasks, pacer })
    }

    /// Stop sending, wait for the requests in flight, and return every sample in
    /// intended-time order.
    pub async fn finish(mut self) -> anyhow::Result<Vec<Sample>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        while let Some(done) = self.tasks.join_next().await {
            all.extend(done.context("a load worker failed")?);
        }
        if self.pacer.join().is_err() {
            anyhow::bail!("the pacer thread panicked");
        }
        all.sort_by_key(|s| s.intended);
        Ok(all)
    }
}

/// An HTTP target for `POST {base}/api/{handler}` with `body`, expecting the body
/// back (the `echo` handler).
pub async fn http_target(base: &str, handler: &str, body: Bytes) -> anyhow::Result<Arc<Http>> {
    Ok(Arc::new(Http::Echo(
        HttpEcho::new(
            &format!("{base}/api/{handler}"),
            body,
            Duration::from_secs(10),
        )
        .await?,
    )))
}

/// An HTTP target for `POST {base}/api/{handler}` with `body`, expecting status 200
/// with any body (a handler that does not echo, such as a CPU-burning test handler).
pub async fn http_status_target(
    base: &str,
    handler: &str,
    body: Bytes,
) -> anyhow::Result<Arc<Http>> {
    let url = format!("{base}/api/{handler}");
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("not an http:// URL: {url}"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr = tokio::net::lookup_host(authority)
        .await?
        .next()
        .with_context(|| format!("{authority} resolves to no address"))?;
    Ok(Arc::new(Http::Status {
        addr,
        authority: authority.to_owned(),
        path: path.to_owned(),
        body,
    }))
}

/// What the open loop calls.
#[derive(Debug)]
pub enum Http {
    /// Expect the body back.
    Echo(HttpEcho),
    /// Expect status 200.
    Status {
        /// Server address.
        addr: std::net::SocketAddr,
        /// Host header.
        authority: String,
        /// Path.
        path: String,
        /// Request body.
        body: Bytes,
    },
}

/// A keep-alive HTTP/1.1 connection of hyper's low-level client.
pub(super) type Sender = hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>;

/// Open a connection to `addr`.
pub(super) async fn connect_http(addr: std::net::SocketAddr) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// One request on `conn` (reopened first if the server closed it): its status and
/// body. No timeout of its own.
pub(super) async fn http_exchange(
    conn: &mut Sender,
    addr: std::net::SocketAddr,
    request: hyper::http::request::Builder,
    body: Bytes,
) -> Result<(hyper::StatusCode, Bytes), String> {
    use http_body_util::BodyExt as _;
    if conn.is_closed() {
        *conn = connect_http(addr).await.map_err(|e| format!("{e:#}"))?;
    }
    conn.ready().await.map_err(|e| format!("not ready: {e}"))?;
    let request = request
        .body(http_body_util::Full::new(body))
        .map_err(|e| e.to_string())?;
    let response = conn
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let status = response.status();
    let answer = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the body: {e}"))?
        .to_bytes();
    Ok((status, answer))
}

async fn status_call(
    conn: &mut Sender,
    addr: std::net::SocketAddr,
    authority: &str,
    path: &str,
    body: &Bytes,
) -> Result<(), String> {
    let request = hyper::Request::post(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::CONTENT_TYPE, "application/json");
    let (status, answer) = http_exchange(conn, addr, request, body.clone()).await?;
    if status != hyper::StatusCode::OK {
        return Err(format!(
            "status {status}: {}",
            String::from_utf8_lossy(&answer[..answer.len().min(200)])
        ));
    }
    Ok(())
}

/// A connection of either kind.
#[derive(Debug)]
pub struct HttpConn(Sender);

impl crate::loadgen::Target for Http {
    type Conn = HttpConn;

    async fn connect(&self) -> anyhow::Result<HttpConn> {
        match self {
            Http::Echo(e) => Ok(HttpConn(e.connect().await?)),
            Http::Status { addr, .. } => Ok(HttpConn(connect_http(*addr).await?)),
        }
    }

    async fn call(&self, conn: &mut HttpConn) -> Result<(), String> {
        match self {
            Http::Echo(e) => e.call(&mut conn.0).await,
            Http::Status {
                addr,
                authority,
                path,
                body,
            } => {
                let call = status_call(&mut conn.0, *addr, authority, path, body);
                match tokio::time::timeout(Duration::from_secs(10), call).await {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        conn.0 = connect_http(*addr).await.map_err(|e| format!("{e:#}"))?;
                        Err("no answer within 10 s".to_owned())
                    }
                }
            }
        }
    }
}

/// CPU time spent on the machine outside `pids` over a window, in cores: the
/// disturbance by other users, as the main harness reports it.
#[derive(Debug, Clone)]
pub struct Disturbance {
    at: Instant,
    host: HostTicks,
    ticks: u64,
}

impl Disturbance {
    /// Start a window, watching `pids`.
    pub fn begin(pids: &[u32]) -> anyhow::Result<Self> {
        Ok(Self {
            at: Instant::now(),
            host: procs::host_ticks()?,
            ticks: pids.iter().filter_map(|&p| procs::cpu_ticks(p).ok()).sum(),
        })
    }

    /// Cores busy outside `pids` (the same list as at the start) since [`begin`].
    ///
    /// [`begin`]: Disturbance::begin
    pub fn other_cores(&self, pids: &[u32]) -> anyhow::Result<f64> {
        let host = procs::host_ticks()?;
        let ticks: u64 = pids.iter().filter_map(|&p| procs::cpu_ticks(p).ok()).sum();
        let tps = procs::ticks_per_second() as f64;
        let secs = self.at.elapsed().as_secs_f64().max(1e-3);
        let other = host
            .tasks
            .saturating_sub(self.host.tasks)
            .saturating_sub(ticks.saturating_sub(self.ticks));
        Ok(other as f64 / tps / secs)
    }
}

/// The machine's load average (1, 5, 15 minutes).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Format microseconds as milliseconds with two decimals.
pub fn ms(us: u64) -> String {
    format!("{:.2}", us as f64 / 1000.0)
}

/// The current UTC time, as `date -u` gives it.
pub fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
