//! The processes of a benchmark: starting them with the fixed worker-thread count,
//! waiting until they say they are ready, stopping them, and reading their CPU time
//! and resident size from `/proc`.

use anyhow::Context as _;
use procfs::CurrentSI as _;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

/// How long a process may take to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a process may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Resolves on SIGTERM or SIGINT (for the benchmark's own server binaries).
pub async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// What a process prints on standard output once it can be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// A line containing `listening on http://ADDR`: the process serves HTTP there.
    Listening,
    /// A line containing this text.
    Line(&'static str),
}

/// How to start one process.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Its role in the configuration (`server`, `gateway`, `logic`, `loadgen`).
    pub role: &'static str,
    /// The executable.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// What it says when ready.
    pub ready: Ready,
}

impl Spec {
    /// A spec for `program` with `args`.
    pub fn new<I, S>(role: &'static str, program: PathBuf, args: I, ready: Ready) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        Self {
            role,
            program,
            args: args.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            ready,
        }
    }
}

/// A running child process.
#[derive(Debug)]
pub struct Proc {
    /// Its role.
    pub role: &'static str,
    /// Its process id.
    pub pid: u32,
    /// The HTTP base URL, for [`Ready::Listening`].
    pub url: Option<String>,
    /// Its standard error.
    pub log: PathBuf,
    child: Child,
}

/// Read `lines` until the readiness line; the URL for [`Ready::Listening`].
async fn wait_ready(
    lines: &mut Lines<BufReader<ChildStdout>>,
    ready: Ready,
) -> anyhow::Result<Option<String>> {
    while let Some(line) = lines.next_line().await? {
        match ready {
            Ready::Listening => {
                if let Some((_, rest)) = line.split_once("listening on ") {
                    return Ok(Some(rest.trim().to_owned()));
                }
            }
            Ready::Line(text) => {
                if line.contains(text) {
                    return Ok(None);
                }
            }
        }
    }
    anyhow::bail!("it exited before saying it was ready")
}

impl Proc {
    /// Start `spec` with `worker_threads` tokio workers, its standard error going to
    /// `log_dir/<role>.log`, and hand back its standard output unread.
    pub fn spawn(
        spec: &Spec,
        worker_threads: usize,
        log_dir: &Path,
    ) -> anyhow::Result<(Self, Lines<BufReader<ChildStdout>>)> {
        let log = log_dir.join(format!("{}.log", spec.role));
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args)
            .env("TOKIO_WORKER_THREADS", worker_threads.to_string())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true);
        // The generated configuration alone must decide; a KEELSON__ variable in the
        // caller's shell would silently change what is measured.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("KEELSON__") {
                cmd.env_remove(key);
            }
        }
        for (k, v) in &spec.env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", spec.program.display()))?;
        let pid = child.id().context("the child exited at once")?;
        let stdout = child.stdout.take().context("stdout is piped")?;
        Ok((
            Self {
                role: spec.role,
                pid,
                url: None,
                log,
                child,
            },
            BufReader::new(stdout).lines(),
        ))
    }

    /// [`Proc::spawn`], then wait until it says it is ready; its standard output is
    /// drained from then on.
    pub async fn start(spec: Spec, worker_threads: usize, log_dir: &Path) -> anyhow::Result<Self> {
        let (mut proc, mut lines) = Self::spawn(&spec, worker_threads, log_dir)?;
        let waited = tokio::time::timeout(READY_TIMEOUT, wait_ready(&mut lines, spec.ready)).await;
        let failure = match waited {
            Ok(Ok(url)) => {
                proc.url = url;
                // Keep draining standard output so the child never blocks on a full
                // pipe.
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                return Ok(proc);
            }
            Ok(Err(e)) => format!("did not start: {e:#}"),
            Err(_) => format!("was not ready within {READY_TIMEOUT:?}"),
        };
        let tail = proc.log_tail();
        proc.stop().await;
        anyhow::bail!(
            "{} ({}) {failure}; its log:\n{tail}",
            spec.role,
            spec.program.display(),
        )
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Wait for it to exit by itself (bounded), and say whether it succeeded.
    pub async fn wait(mut self, within: Duration) -> anyhow::Result<()> {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                anyhow::ensure!(
                    status.success(),
                    "{} exited with {status}; its log:\n{}",
                    self.role,
                    self.log_tail()
                );
                Ok(())
            }
            Err(_) => {
                let _ = self.child.kill().await;
                anyhow::bail!("{} did not exit within {within:?}", self.role)
            }
        }
    }

    /// SIGTERM, wait (bounded), then SIGKILL if it is still there.
    pub async fn stop(mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.pid.to_string())
                .status()
                .await;
            if tokio::time::timeout(STOP_TIMEOUT, self.child.wait())
                .await
                .is_err()
            {
                let _ = self.child.kill().await;
            }
        }
    }
}

/// User plus system CPU time of process `pid` so far, in clock ticks (threads that
/// already exited included).
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let pid = i32::try_from(pid)?;
    let stat = procfs::process::Process::new(pid)?.stat()?;
    Ok(stat.utime + stat.stime)
}

/// Clock ticks per second of the values above.
pub fn ticks_per_second() -> u64 {
    procfs::ticks_per_second()
}

/// Resident set size and its peak, in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let pid = i32::try_from(pid)?;
    let status = procfs::process::Process::new(pid)?.status()?;
    Ok((
        status.vmrss.context("no VmRSS")?,
        status.vmhwm.context("no VmHWM")?,
    ))
}

/// Host-wide CPU time, in clock ticks.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostTicks {
    /// Ticks spent running tasks (user, nice, system): what processes are charged.
    pub tasks: u64,
    /// Ticks spent in interrupts and softirqs, charged to no process: on loopback
    /// traffic, mostly the network stack's receive path.
    pub irq: u64,
    /// Ticks stolen by the hypervisor (other tenants of the host).
    pub steal: u64,
}

/// The host's CPU time so far.
pub fn host_ticks() -> anyhow::Result<HostTicks> {
    let t = procfs::KernelStats::current()?.total;
    Ok(HostTicks {
        tasks: t.user + t.nice + t.system,
        irq: t.irq.unwrap_or(0) + t.softirq.unwrap_or(0),
        steal: t.steal.unwrap_or(0),
    })
}
