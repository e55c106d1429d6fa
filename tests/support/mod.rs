//! Helpers shared by the cross-process tests: configuration files, real binaries
//! started as child processes, and an HTTP client.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod broker;
pub mod browser;
pub mod cluster;
pub mod mesh;
pub mod otlp;
pub mod short_timeout;
pub mod tls;

#[cfg(not(feature = "test-handlers"))]
compile_error!(
    "the cross-process tests need the test-only handlers: run them with \
     `cargo test --workspace --features keelson/test-handlers` (see README.md)"
);

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A scratch directory holding a test's configuration files and logs.
pub struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().expect("cannot create a temporary directory"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Write `contents` to `name` in the scratch directory.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).expect("cannot write a config file");
        path
    }
}

/// Now, in milliseconds since the Unix epoch (the unit of envelope deadlines).
pub fn unix_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// Milliseconds since the Unix epoch of an RFC 3339 UTC time as the servers write
/// it (`2026-11-29T22:30:05Z`, or with milliseconds `...05.123Z`).
pub fn rfc3339_ms(rfc3339: &str) -> i64 {
    let (date, time) = rfc3339.trim_end_matches('Z').split_once('T').unwrap();
    let d: Vec<i64> = date.split('-').map(|p| p.parse().unwrap()).collect();
    let (hms, ms) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms.split(':').map(|p| p.parse().unwrap()).collect();
    // Days from civil (Howard Hinnant).
    let (y, m) = if d[1] <= 2 {
        (d[0] - 1, d[1] + 9)
    } else {
        (d[0], d[1] - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d[2] - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    (days * 86_400 + t[0] * 3600 + t[1] * 60 + t[2]) * 1000 + ms.parse::<i64>().unwrap()
}

/// Run `bash script args` with `env` added; fails the test with its output when it
/// fails, else returns its output (standard output, then standard error).
pub fn run_script(script: &str, args: &[&str], env: &[(&str, String)]) -> String {
    let mut cmd = std::process::Command::new("bash");
    cmd.arg(script)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)));
    output_ok(&mut cmd, &format!("{script} {args:?}"))
}

/// Run `cmd` to its end; fails the test with its output (naming it `what`) when it
/// fails, else returns its output (standard output, then standard error).
pub fn output_ok(cmd: &mut std::process::Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

/// The secret used by test configurations.
pub const SECRET: &str = "test-secret-0123456789abcdef0123456789abcdef";

/// An embedded-mesh configuration on an ephemeral port, with the example and test
/// handlers, and `extra` appended (TOML).
pub fn embedded_config(extra: &str) -> String {
    format!(
        r#"
[transport]
kind = "memory"

[gateway]
listen = "127.0.0.1:0"
request_timeout_ms = 5000

[auth]
secret = "{SECRET}"

[logic_server]
handlers = ["echo", "counter.increment", "counter.get", "cart.add", "cart.list", "cart.clear",
            "hello", "test.slow", "test.panic", "test.fail", "test.whoami"]
concurrency = 32
drain_timeout_ms = 5000
{extra}
"#
    )
}

/// Which binary of the package to run.
#[derive(Clone, Copy, Debug)]
pub enum Bin {
    Keelson,
    Gateway,
    LogicServer,
    /// The logic server of the "next version" build (feature `next-preview`),
    /// which tests/run.sh builds into `$KEELSON_NEXT_BIN_DIR`.
    NextLogicServer,
    /// The logic server and gateway of the previous release, which tests/run.sh
    /// builds from its commit into `$KEELSON_PREVIOUS_BIN_DIR`.
    PreviousLogicServer,
    PreviousGateway,
}

/// `name` in the directory named by the environment variable `var`, which
/// tests/run.sh fills; a clear failure when it is missing.
fn built(var: &str, name: &str) -> String {
    let dir = std::env::var(var).unwrap_or_else(|_| {
        panic!(
            "{var} is not set: the rolling-upgrade tests need builds of other versions; \
             run the suite with bash tests/run.sh"
        )
    });
    let path = std::path::Path::new(&dir).join(name);
    assert!(
        path.exists(),
        "{} does not exist; run bash tests/run.sh",
        path.display()
    );
    path.display().to_string()
}

impl Bin {
    pub fn path(self) -> String {
        match self {
            Bin::Keelson => env!("CARGO_BIN_EXE_keelson").to_owned(),
            Bin::Gateway => env!("CARGO_BIN_EXE_ui-gateway").to_owned(),
            Bin::LogicServer => env!("CARGO_BIN_EXE_logic-server").to_owned(),
            Bin::NextLogicServer => built("KEELSON_NEXT_BIN_DIR", "logic-server"),
            Bin::PreviousLogicServer => built("KEELSON_PREVIOUS_BIN_DIR", "logic-server"),
            Bin::PreviousGateway => built("KEELSON_PREVIOUS_BIN_DIR", "ui-gateway"),
        }
    }
}

/// A running Keelson process.
pub struct Process {
    child: Child,
    /// The gateway's base URL, when the process runs one.
    pub base_url: Option<String>,
    /// The admin listener's base URL (`admin=` on the ready line), when it has one.
    pub admin_url: Option<String>,
    /// Where its standard error (the log) goes.
    pub log: PathBuf,
}

/// How long a process may take to start before the test fails.
const START_TIMEOUT: Duration = Duration::from_secs(30);

impl Process {
    /// Start `bin --config config` (plus `args`), and wait until it says on standard
    /// output that it listens (gateway, embedded) or is ready (logic server).
    pub async fn start(bin: Bin, config: &Path, log: &Path, envs: &[(&str, &str)]) -> Self {
        Self::start_command(bin, Command::new(bin.path()), config, log, envs).await
    }

    /// [`Process::start`] with the open-file limit (soft and hard) set to `nofile`,
    /// through prlimit(1), as systemd's default `LimitNOFILE` would.
    pub async fn start_with_fd_limit(
        bin: Bin,
        config: &Path,
        log: &Path,
        envs: &[(&str, &str)],
        nofile: u64,
    ) -> Self {
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--")
            .arg(bin.path());
        Self::start_command(bin, cmd, config, log, envs).await
    }

    async fn start_command(
        bin: Bin,
        mut cmd: Command,
        config: &Path,
        log: &Path,
        envs: &[(&str, &str)],
    ) -> Self {
        cmd.arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .env_remove("KEELSON__TRANSPORT__KIND");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Self::start_program(&format!("{bin:?}"), cmd, log).await
    }

    /// Start `cmd`, a program that prints Keelson's ready lines (an application's
    /// binary, `cargo run`), with its standard error in `log`, and wait until it
    /// says on standard output that it listens or is ready. `what` names it in
    /// failures.
    pub async fn start_program(what: &str, mut cmd: Command, log: &Path) -> Self {
        let log_file = std::fs::File::create(log).expect("cannot create the log file");
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        let mut admin_url = None;
        let wait = async {
            while let Some(line) = lines.next_line().await.expect("cannot read stdout") {
                if let Some((_, rest)) = line.split_once("admin=") {
                    admin_url = rest.split_whitespace().next().map(str::to_owned);
                }
                if let Some((_, rest)) = line.split_once("listening on ") {
                    return Some(rest.trim().to_owned());
                }
                if line.contains("logic server ready") {
                    return None;
                }
            }
            panic!(
                "{what} exited before it was ready; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        };
        let base_url = tokio::time::timeout(START_TIMEOUT, wait)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{what} did not become ready within {START_TIMEOUT:?}; its log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                )
            });
        // Keep draining standard output so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            child,
            base_url,
            admin_url,
            log: log.to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the process is still running")
    }

    /// `POST {base}/api/{handler}`.
    pub fn url(&self, handler: &str) -> String {
        format!(
            "{}/api/{handler}",
            self.base_url
                .as_deref()
                .expect("this process runs no gateway")
        )
    }

    /// Send a signal with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("cannot run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// SIGTERM, then wait for the exit (bounded).
    pub async fn terminate(mut self, within: Duration) -> ExitStatus {
        self.signal("TERM");
        tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the process did not exit within {within:?} of SIGTERM"))
            .expect("cannot wait for the process")
    }

    /// Whether the process has exited (reaping it if so).
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// Whether the process exits within `within` (reaping it).
    pub async fn exits_within(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, self.child.wait())
            .await
            .is_ok()
    }

    /// SIGKILL, and reap it.
    pub async fn kill9(mut self) {
        self.child.kill().await.expect("cannot kill the process");
    }

    /// Wait (bounded) until the process's log contains `needle`: the event a test
    /// needs, such as a handler having started.
    pub async fn wait_for_log(&self, needle: &str) {
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        while !self.log_text().contains(needle) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the log never said {needle:?}:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Run `keelson args` to its end, in `dir` when given, and return what it printed.
pub fn keelson(args: &[&str], dir: Option<&Path>) -> std::process::Output {
    let mut cmd = std::process::Command::new(Bin::Keelson.path());
    cmd.args(args).env_remove("KEELSON__TRANSPORT__KIND");
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run keelson {args:?}: {e}"))
}

/// Print a token for `user` with the `keelson token` command.
pub fn token(config: &Path, user: &str) -> String {
    let out = std::process::Command::new(Bin::Keelson.path())
        .args(["token", "--user", user, "--config"])
        .arg(config)
        .output()
        .expect("cannot run keelson token");
    assert!(
        out.status.success(),
        "keelson token failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("token is UTF-8")
        .trim()
        .to_owned()
}

/// An HTTP client with a bounded timeout, so no test can hang.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("cannot build an HTTP client")
}
