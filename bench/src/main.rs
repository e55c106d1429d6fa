//! `keelson-bench`: builds the release binaries, runs interleaved rounds of the
//! configurations A to E on this machine and the local broker, prints the table and
//! writes the JSON report.
//!
//! ```sh
//! cargo run --release -p keelson-bench -- [--quick] [--out bench-results.json]
//! ```

use anyhow::Context as _;
use clap::Parser;
use keelson_bench::broker;
use keelson_bench::harness::{Broker, Harness, Options};
use keelson_bench::report::{ConfigInfo, Machine, Report, Settings};
use keelson_bench::scenario::{self, Scenario};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Keelson's benchmark: Keelson against raw axum and raw lapin, as ratios.
#[derive(Debug, Parser)]
#[command(about, long_about = None)]
struct Cli {
    /// Two short rounds (about two minutes) instead of three full ones (about seven).
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON report (default bench-results.json, or
    /// bench-<scenario>.json with --scenario).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run one special scenario instead of the A-E ratio run: `context` (replication
    /// lag, join time and size with 100k users), `governor` (p99 with the governor on
    /// and off, a CPU hog on one server's core), `upgrade` (p99 before and during a
    /// rolling upgrade of three logic servers), `jobs` (submission rate and
    /// submit-to-succeeded latency of empty background jobs against raw lapin
    /// publish-and-consume).
    #[arg(long, value_parser = ["context", "governor", "upgrade", "jobs"])]
    scenario: Option<String>,
    /// Jobs the jobs scenario submits, and messages its raw lapin baseline publishes
    /// (default 5000, or 1000 with --quick).
    #[arg(long)]
    jobs: Option<usize>,
    /// Open-loop rate of the governor and upgrade scenarios, requests per second
    /// (defaults 300 and 200).
    #[arg(long)]
    rate: Option<f64>,
    /// Handler of the governor scenario (default `test.spin`, which burns CPU; the
    /// scenario builds the binaries with the test handlers).
    #[arg(long)]
    handler: Option<String>,
    /// Request body for --handler (then any 200 answer counts; default
    /// '{"us":2000}' for `test.spin`, else the echoed payload).
    #[arg(long)]
    body: Option<String>,
    /// Configurations to run, in this order within each round.
    #[arg(long, value_delimiter = ',', default_value = "A,B,C,D,E")]
    configs: Vec<String>,
    /// Rounds (default 3, or 2 with --quick).
    #[arg(long)]
    rounds: Option<usize>,
    /// Measurement window of each phase, in milliseconds (default 5000, or 1500 with
    /// --quick).
    #[arg(long)]
    measure_ms: Option<u64>,
    /// Closed-loop concurrencies.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// Open-loop rate in requests per second (default: half of B's throughput at 64
    /// in flight, measured before the first round).
    #[arg(long)]
    open_rate: Option<f64>,
    /// Most requests in flight in the open loop.
    #[arg(long, default_value_t = 128)]
    open_workers: usize,
    /// Tokio worker threads of every process (TOKIO_WORKER_THREADS).
    #[arg(long, default_value_t = 2)]
    worker_threads: usize,
    /// Request body size in bytes (a JSON object).
    #[arg(long, default_value_t = 128)]
    payload_bytes: usize,
    /// Deliveries a server works on at once: lapin prefetch (B) and
    /// `logic_server.concurrency` (C, D, E).
    #[arg(long, default_value_t = 64)]
    prefetch: u16,
    /// `[log] level` of the Keelson processes (the shipped default is info).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Broker URL.
    #[arg(
        long,
        env = "KEELSON_BENCH_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    amqp_url: String,
    /// Keep the logs and generated configurations of the configurations that
    /// succeeded (those of failed ones are always kept).
    #[arg(long)]
    keep_logs: bool,
    /// Do not run `cargo build --release` first (the binaries must be up to date).
    #[arg(long)]
    no_build: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The special scenarios run stores and load in this process: two workers.
    let runtime = if cli.scenario.is_some() {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keelson-bench: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = if cli.scenario.is_some() {
        runtime.block_on(run_special(cli))
    } else {
        runtime.block_on(run(cli))
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keelson-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (this crate's parent directory).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Where the release binaries are: beside this executable when it is a release build,
/// else the workspace's `target/release`.
fn bins_dir() -> PathBuf {
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .filter(|dir| dir.file_name().is_some_and(|n| n == "release"))
    {
        return dir;
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
        .join("release")
}

/// Fail with what to run when one of the release binaries `names` is missing.
fn require_bins(bins: &Path, names: &[&str]) -> anyhow::Result<()> {
    for bin in names {
        anyhow::ensure!(
            bins.join(bin).exists(),
            "{} is missing: run `cargo build --release --bins -p keelson -p keelson-bench`",
            bins.join(bin).display()
        );
    }
    Ok(())
}

/// This run's id (start time and process id) and its directory, created beside the
/// binaries: logs and generated configurations.
fn run_dir(bins: &Path) -> anyhow::Result<(String, PathBuf)> {
    let run_id = format!(
        "{}-{}",
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        std::process::id()
    );
    let work_dir = bins
        .parent()
        .map_or_else(|| bins.to_path_buf(), Path::to_path_buf)
        .join("bench")
        .join(&run_id);
    std::fs::create_dir_all(&work_dir)
        .with_context(|| format!("cannot create {}", work_dir.display()))?;
    Ok((run_id, work_dir))
}

/// `cargo build --release` of the binaries, with the test handlers when `test_handlers`.
fn build(test_handlers: bool) -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut args = vec![
        "build",
        "--release",
        "--bins",
        "-p",
        "keelson",
        "-p",
        "keelson-bench",
    ];
    if test_handlers {
        args.extend(["--features", "keelson/test-handlers"]);
    }
    eprintln!("keelson-bench: cargo {}", args.join(" "));
    let status = std::process::Command::new(cargo)
        .args(args)
        .current_dir(workspace_root())
        .status()
        .context("cannot run cargo")?;
    anyhow::ensure!(status.success(), "building the release binaries failed");
    Ok(())
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn loadavg() -> String {
    read_trimmed("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| {
            let secs = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            format!("unix time {secs}")
        })
}

fn cpu_model() -> String {
    read_trimmed("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

/// `--scenario NAME`: one of the special scenarios.
async fn run_special(cli: Cli) -> anyhow::Result<ExitCode> {
    let name = cli.scenario.clone().unwrap_or_default();
    if !cli.no_build {
        build(name == "governor")?;
    }
    let bins = bins_dir();
    require_bins(&bins, &["keelson", "ui-gateway", "logic-server"])?;
    let (run_id, work_dir) = run_dir(&bins)?;
    eprintln!(
        "keelson-bench: logs and generated configurations in {}",
        work_dir.display()
    );
    let settings = scenario::special::Settings {
        quick: cli.quick,
        bins,
        work_dir,
        run_id,
        amqp_url: cli.amqp_url.clone(),
        worker_threads: cli.worker_threads,
        prefetch: cli.prefetch,
        log_level: cli.log_level.clone(),
        payload_bytes: cli.payload_bytes,
        rate: cli.rate,
        handler: cli.handler.clone(),
        body: cli.body.clone(),
        jobs: cli.jobs,
    };
    broker::connect(&cli.amqp_url).await?;
    let began = Instant::now();
    let figures = match name.as_str() {
        "context" => scenario::context::run(&settings).await?,
        "governor" => scenario::governor::run(&settings).await?,
        "upgrade" => scenario::upgrade::run(&settings).await?,
        "jobs" => scenario::jobs::run(&settings).await?,
        other => anyhow::bail!("no scenario {other:?}"),
    };
    let json = serde_json::json!({
        "scenario": name,
        "machine": {
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "cpu_model": cpu_model(),
            "kernel": read_trimmed("/proc/sys/kernel/osrelease"),
            "broker_version": broker::version(),
            "command": std::env::args().collect::<Vec<_>>().join(" "),
        },
        "elapsed_s": began.elapsed().as_secs_f64(),
        "figures": figures,
    });
    let out = cli
        .out
        .unwrap_or_else(|| PathBuf::from(format!("bench-{name}.json")));
    std::fs::write(&out, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!("keelson-bench: JSON report in {}", out.display());
    Ok(ExitCode::SUCCESS)
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let all = scenario::all();
    let mut selected: Vec<&dyn Scenario> = Vec::new();
    for id in &cli.configs {
        let s = all
            .iter()
            .find(|s| s.id().eq_ignore_ascii_case(id.trim()))
            .with_context(|| format!("no configuration {id:?}; there are A, B, C, D and E"))?;
        selected.push(s.as_ref());
    }
    anyhow::ensure!(!selected.is_empty(), "no configuration selected");
    anyhow::ensure!(
        cli.worker_threads > 0,
        "--worker-threads must be at least 1"
    );
    anyhow::ensure!(
        cli.concurrency.iter().all(|&c| c > 0),
        "--concurrency values must be at least 1"
    );

    if !cli.no_build {
        build(false)?;
    }
    let began = Instant::now();
    let bins = bins_dir();
    require_bins(
        &bins,
        &[
            "keelson",
            "ui-gateway",
            "logic-server",
            "bench-load",
            "bench-axum",
            "bench-lapin-server",
        ],
    )?;

    let mut warnings = Vec::new();
    let needs_broker = selected.iter().any(|s| s.needs_broker());
    let port = broker::port(&cli.amqp_url);
    let (broker, broker_version, broker_connections) = if needs_broker {
        let connection = broker::connect(&cli.amqp_url).await?;
        let pid = broker::local_pid(port);
        if pid.is_none() {
            warnings.push(format!(
                "no local beam.smp process listens on port {port}: the broker's CPU time is \
                 not reported"
            ));
        }
        let connections = broker::client_connections(port).saturating_sub(1);
        if connections > 0 {
            warnings.push(format!(
                "{connections} other client connection(s) to the broker when the run began: \
                 other users may share it"
            ));
        }
        (
            Some(Broker { connection, pid }),
            broker::version(),
            Some(connections),
        )
    } else {
        (None, None, None)
    };

    let quick = cli.quick;
    let ms = |full: u64, short: u64| Duration::from_millis(if quick { short } else { full });
    let (run_id, work_dir) = run_dir(&bins)?;
    let opts = Options {
        rounds: cli.rounds.unwrap_or(if quick { 2 } else { 3 }).max(1),
        warmup: ms(1000, 500),
        phase_warmup: ms(500, 200),
        measure: cli
            .measure_ms
            .map_or_else(|| ms(5000, 1500), Duration::from_millis),
        drain: Duration::from_secs(2),
        idle: ms(1000, 500),
        calibrate: ms(3000, 1500),
        worker_threads: cli.worker_threads,
        payload_bytes: cli.payload_bytes,
        prefetch: cli.prefetch,
        concurrencies: cli.concurrency.clone(),
        open_workers: cli.open_workers,
        timeout_ms: 5000,
        amqp_url: cli.amqp_url.clone(),
        log_level: cli.log_level.clone(),
        bins,
        work_dir: work_dir.clone(),
        run_id,
        keep_logs: cli.keep_logs,
    };
    eprintln!(
        "keelson-bench: logs and generated configurations in {}{}",
        work_dir.display(),
        if cli.keep_logs {
            ""
        } else {
            " (removed after each configuration that succeeds; --keep-logs keeps them)"
        }
    );

    let machine_start = Machine {
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model: cpu_model(),
        kernel: read_trimmed("/proc/sys/kernel/osrelease"),
        broker_version,
        broker_connections_at_start: broker_connections,
        loadavg_start: loadavg(),
        loadavg_end: String::new(),
        date: utc_now(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };

    let mut harness = Harness::new(opts, broker);
    let b = selected.iter().find(|s| s.id() == "B");
    let (open_rate, open_rate_source) = match (cli.open_rate, b) {
        (Some(rate), _) => (Some(rate), "--open-rate".to_owned()),
        (None, Some(b)) => {
            eprintln!("keelson-bench: calibrating the open-loop rate on B at 64 in flight");
            let rate = harness.calibrate(*b).await?;
            (
                Some(rate),
                "half of B's throughput at 64 in flight, measured before round 1".to_owned(),
            )
        }
        (None, None) => (None, "B is not run and --open-rate is not given".to_owned()),
    };
    let phases = harness.phases(open_rate);

    let rounds = harness.options().rounds;
    let mut runs = Vec::new();
    let mut failures = 0usize;
    for round in 1..=rounds {
        for s in &selected {
            eprint!("keelson-bench: round {round}/{rounds} {} ...", s.id());
            match harness.run_config(*s, round, &phases).await {
                Ok(run) => {
                    let summary: Vec<String> = run
                        .phases
                        .iter()
                        .map(|p| format!("{} {:.0}/s", p.label, p.result.throughput))
                        .collect();
                    eprintln!(" {}", summary.join(", "));
                    runs.push(run);
                }
                Err(e) => {
                    eprintln!(" FAILED");
                    eprintln!("{e:#}");
                    failures += 1;
                    harness
                        .warnings
                        .push(format!("{} round {round} failed: {e:#}", s.id()));
                }
            }
        }
    }

    let o = harness.options();
    let settings = Settings {
        rounds,
        measure_s: o.measure.as_secs_f64(),
        warmup_s: o.warmup.as_secs_f64(),
        phase_warmup_s: o.phase_warmup.as_secs_f64(),
        worker_threads: o.worker_threads,
        payload_bytes: o.payload_bytes,
        prefetch: o.prefetch,
        concurrencies: o.concurrencies.clone(),
        open_rate,
        open_rate_source,
        open_workers: o.open_workers,
        keelson_log_level: o.log_level.clone(),
        configs: selected
            .iter()
            .map(|s| ConfigInfo {
                id: s.id().to_owned(),
                description: s.describe().to_owned(),
                baseline: s.baseline().map(str::to_owned),
            })
            .collect(),
    };
    warnings.append(&mut harness.warnings);
    let mut report = Report {
        machine: Machine {
            loadavg_end: loadavg(),
            ..machine_start
        },
        settings,
        runs,
        ratios: Vec::new(),
        figures: Vec::new(),
        memory: Vec::new(),
        warnings,
        elapsed_s: began.elapsed().as_secs_f64(),
    };
    report.summarize();
    print!("{}", report.render());
    let json = serde_json::to_string_pretty(&report)?;
    let out = cli
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("bench-results.json"));
    std::fs::write(&out, json).with_context(|| format!("cannot write {}", out.display()))?;
    eprintln!("keelson-bench: JSON report in {}", out.display());
    // Left only when every configuration succeeded and logs were not kept.
    let _ = std::fs::remove_dir(&work_dir);
    Ok(if failures > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
