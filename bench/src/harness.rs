//! Interleaved rounds: for each round, each configuration in turn is deployed, loaded
//! by a fresh `bench-load` process, measured, stopped, and its broker objects are
//! deleted. CPU time of every process is read from `/proc` exactly when the load
//! generator opens and closes each measurement window.

use crate::broker::Objects;
use crate::phase::{Phase, PhaseResult};
use crate::procs::{self, HostTicks, Proc, Ready, Spec};
use crate::report::{ConfigRun, CpuUse, Memory, PhaseRun};
use crate::scenario::{Deployment, Env, Scenario, stop_all};
use anyhow::Context as _;
use lapin::Connection;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How a run is done.
#[derive(Debug, Clone)]
pub struct Options {
    /// Rounds of every configuration.
    pub rounds: usize,
    /// Warm-up before the first phase of each configuration.
    pub warmup: Duration,
    /// Warm-up before every later phase.
    pub phase_warmup: Duration,
    /// Measurement window of each phase.
    pub measure: Duration,
    /// Open loop: drain period after the window.
    pub drain: Duration,
    /// Idle time before the resident size is read after the load.
    pub idle: Duration,
    /// Length of the calibration of the open-loop rate.
    pub calibrate: Duration,
    /// Tokio worker threads of every process.
    pub worker_threads: usize,
    /// Request body size.
    pub payload_bytes: usize,
    /// Prefetch (B) and logic-server concurrency (C, D, E).
    pub prefetch: u16,
    /// Closed-loop concurrencies.
    pub concurrencies: Vec<usize>,
    /// Most requests in flight in the open loop.
    pub open_workers: usize,
    /// Timeout of one call, in milliseconds.
    pub timeout_ms: u64,
    /// Broker URL.
    pub amqp_url: String,
    /// `[log] level` of the Keelson processes.
    pub log_level: String,
    /// Directory of the release binaries.
    pub bins: PathBuf,
    /// Directory for this run's configuration files and logs.
    pub work_dir: PathBuf,
    /// Unique id of this run (part of every broker name).
    pub run_id: String,
    /// Keep the logs and configuration files of configurations that succeeded (the
    /// per-request log lines of the Keelson processes take tens of MB per phase).
    pub keep_logs: bool,
}

/// The broker, when a configuration needs it.
#[derive(Debug)]
pub struct Broker {
    /// A connection of the harness's own, for deleting objects.
    pub connection: Connection,
    /// The local broker process, when found.
    pub pid: Option<u32>,
}

/// The CPU time of the watched processes and of the host at one instant.
#[derive(Debug, Clone)]
struct Snapshot {
    at: Instant,
    ticks: Vec<u64>,
    host: HostTicks,
}

impl Snapshot {
    fn take(pids: &[(String, u32)]) -> anyhow::Result<Self> {
        let at = Instant::now();
        let ticks = pids
            .iter()
            .map(|(role, pid)| {
                procs::cpu_ticks(*pid)
                    .with_context(|| format!("cannot read the CPU time of {role} (pid {pid})"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            at,
            ticks,
            host: procs::host_ticks()?,
        })
    }
}

/// Runs configurations and collects their figures.
#[derive(Debug)]
pub struct Harness {
    opts: Options,
    broker: Option<Broker>,
    /// Everything that makes a figure doubtful, for the report.
    pub warnings: Vec<String>,
}

impl Harness {
    /// A harness; `broker` is required by the configurations that need one.
    pub fn new(opts: Options, broker: Option<Broker>) -> Self {
        Self {
            opts,
            broker,
            warnings: Vec::new(),
        }
    }

    /// The options.
    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// The phases of every configuration: the closed loops, then the open loop at
    /// `open_rate` when there is one.
    pub fn phases(&self, open_rate: Option<f64>) -> Vec<Phase> {
        let mut phases: Vec<Phase> = self
            .opts
            .concurrencies
            .iter()
            .map(|&concurrency| Phase::Closed { concurrency })
            .collect();
        if let Some(rate) = open_rate {
            phases.push(Phase::Open {
                rate,
                workers: self.opts.open_workers,
            });
        }
        phases
    }

    /// Half of the throughput `scenario` (B) reaches at 64 in flight: the open-loop
    /// rate of the run.
    pub async fn calibrate(&mut self, scenario: &dyn Scenario) -> anyhow::Result<f64> {
        let mut opts = self.opts.clone();
        opts.measure = self.opts.calibrate;
        let saved = std::mem::replace(&mut self.opts, opts);
        let run = self
            .run_config(scenario, 0, &[Phase::Closed { concurrency: 64 }])
            .await;
        self.opts = saved;
        let run = run.context("calibrating the open-loop rate on B")?;
        let phase = run
            .phases
            .first()
            .context("the calibration measured nothing")?;
        anyhow::ensure!(
            phase.result.throughput > 0.0 && phase.result.errors == 0,
            "the calibration on B failed: {} answers, {} errors ({})",
            phase.result.completed,
            phase.result.errors,
            phase.result.error_sample.as_deref().unwrap_or("-")
        );
        Ok((phase.result.throughput / 2.0).round().max(1.0))
    }

    /// Deploy `scenario`, run `phases` against it, stop it, and return its figures.
    pub async fn run_config(
        &mut self,
        scenario: &dyn Scenario,
        round: usize,
        phases: &[Phase],
    ) -> anyhow::Result<ConfigRun> {
        let id = scenario.id();
        let tag = if round == 0 {
            format!("calibrate-{id}")
        } else {
            format!("r{round}-{id}")
        };
        let dir = self.opts.work_dir.join(&tag);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let broker_pid = self.broker.as_ref().and_then(|b| b.pid);
        if scenario.needs_broker() && self.broker.is_none() {
            anyhow::bail!("configuration {id} needs the broker");
        }
        let env = Env {
            bins: self.opts.bins.clone(),
            dir: dir.clone(),
            amqp_url: self.opts.amqp_url.clone(),
            namespace: format!("kbench-{}-{}", self.opts.run_id, tag.to_lowercase()),
            worker_threads: self.opts.worker_threads,
            prefetch: self.opts.prefetch,
            log_level: self.opts.log_level.clone(),
        };
        let deployment = scenario
            .deploy(&env)
            .await
            .with_context(|| format!("cannot start configuration {id}"))?;
        let Deployment {
            procs,
            load,
            broker_objects,
        } = deployment;
        let outcome = self
            .measure(
                &procs,
                &load.args(&self.opts.amqp_url),
                phases,
                broker_pid,
                &dir,
            )
            .await;
        let mut memory = Vec::new();
        if let Ok((_, start_rss)) = &outcome {
            tokio::time::sleep(self.opts.idle).await;
            for (proc, &start) in procs.iter().zip(start_rss) {
                let (rss, peak) = procs::rss_kib(proc.pid)
                    .with_context(|| format!("{} of {id} is gone after the load", proc.role))?;
                memory.push(Memory {
                    role: proc.role.to_owned(),
                    rss_start_kib: start,
                    rss_idle_after_load_kib: rss,
                    peak_kib: peak,
                });
            }
        }
        stop_all(procs).await;
        self.delete(broker_objects.as_ref(), id).await;
        let (phase_runs, _) = outcome
            .with_context(|| format!("configuration {id} failed (logs in {})", dir.display()))?;
        if !self.opts.keep_logs {
            let _ = std::fs::remove_dir_all(&dir);
        }
        let run = ConfigRun {
            id: id.to_owned(),
            round,
            phases: phase_runs,
            memory,
        };
        if round > 0 {
            self.note_warnings(&run);
        }
        Ok(run)
    }

    async fn delete(&mut self, objects: Option<&Objects>, id: &str) {
        let (Some(objects), Some(broker)) = (objects, self.broker.as_ref()) else {
            return;
        };
        if let Err(e) = objects.delete(&broker.connection).await {
            self.warnings.push(format!(
                "could not delete the broker objects of {id}: {e:#} (they expire after ten \
                 minutes unused)"
            ));
        }
    }

    /// Run the load generator; read CPU times around each window.
    async fn measure(
        &self,
        procs: &[Proc],
        load_args: &[String],
        phases: &[Phase],
        broker_pid: Option<u32>,
        dir: &std::path::Path,
    ) -> anyhow::Result<(Vec<PhaseRun>, Vec<u64>)> {
        let start_rss = procs
            .iter()
            .map(|p| procs::rss_kib(p.pid).map(|(rss, _)| rss))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let o = &self.opts;
        // The common options first: they belong to bench-load itself, the target's
        // subcommand follows.
        let mut args: Vec<String> = Vec::new();
        args.extend([
            "--phases".to_owned(),
            phases
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            "--payload-bytes".to_owned(),
            o.payload_bytes.to_string(),
            "--warmup-ms".to_owned(),
            o.warmup.as_millis().to_string(),
            "--phase-warmup-ms".to_owned(),
            o.phase_warmup.as_millis().to_string(),
            "--measure-ms".to_owned(),
            o.measure.as_millis().to_string(),
            "--drain-ms".to_owned(),
            o.drain.as_millis().to_string(),
            "--timeout-ms".to_owned(),
            o.timeout_ms.to_string(),
        ]);
        args.extend_from_slice(load_args);
        let spec = Spec::new(
            "loadgen",
            o.bins.join("bench-load"),
            args,
            Ready::Line("start"),
        );
        let (loadgen, mut lines) = Proc::spawn(&spec, o.worker_threads, dir)?;
        let mut watched: Vec<(String, u32)> =
            procs.iter().map(|p| (p.role.to_owned(), p.pid)).collect();
        if let Some(pid) = broker_pid {
            watched.push(("broker".to_owned(), pid));
        }
        watched.push(("loadgen".to_owned(), loadgen.pid));

        let mut starts: BTreeMap<usize, Snapshot> = BTreeMap::new();
        let mut ends: BTreeMap<usize, Snapshot> = BTreeMap::new();
        let mut results: BTreeMap<usize, PhaseResult> = BTreeMap::new();
        let per_phase = o.phase_warmup + o.measure + o.drain + Duration::from_millis(o.timeout_ms);
        let budget = o.warmup
            + per_phase * u32::try_from(phases.len()).unwrap_or(u32::MAX)
            + Duration::from_secs(60);
        let read = async {
            while let Some(line) = lines.next_line().await? {
                let mut parts = line.splitn(3, ' ');
                let (Some(event), Some(index)) = (parts.next(), parts.next()) else {
                    continue;
                };
                let Ok(index) = index.parse::<usize>() else {
                    continue;
                };
                match event {
                    "start" => {
                        starts.insert(index, Snapshot::take(&watched)?);
                    }
                    "end" => {
                        ends.insert(index, Snapshot::take(&watched)?);
                    }
                    "result" => {
                        let json = parts.next().unwrap_or_default();
                        let result: PhaseResult = serde_json::from_str(json)
                            .with_context(|| format!("bad result line from bench-load: {line}"))?;
                        results.insert(index, result);
                    }
                    _ => {}
                }
            }
            anyhow::Ok(())
        };
        let read = tokio::time::timeout(budget, read).await;
        let log_tail = loadgen.log_tail();
        let exited = loadgen.wait(Duration::from_secs(10)).await;
        match read {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.context(format!("bench-load's log:\n{log_tail}"))),
            Err(_) => anyhow::bail!("bench-load ran past {budget:?}; its log:\n{log_tail}"),
        }
        exited.context("bench-load failed")?;

        let tps = procs::ticks_per_second() as f64;
        let mut runs = Vec::new();
        for (i, phase) in phases.iter().enumerate() {
            let (Some(start), Some(end), Some(result)) =
                (starts.get(&i), ends.get(&i), results.remove(&i))
            else {
                anyhow::bail!(
                    "bench-load did not report phase {i} ({phase}); its log:\n{log_tail}"
                );
            };
            let window = end.at.duration_since(start.at).as_secs_f64().max(1e-9);
            let mut cpu = Vec::new();
            let mut ours = 0u64;
            for (j, (role, _)) in watched.iter().enumerate() {
                let ticks = end.ticks[j].saturating_sub(start.ticks[j]);
                ours += ticks;
                let seconds = ticks as f64 / tps;
                cpu.push(CpuUse {
                    role: role.clone(),
                    us_per_request: if result.completed > 0 {
                        seconds * 1e6 / result.completed as f64
                    } else {
                        f64::NAN
                    },
                    cores: seconds / window,
                });
            }
            // Interrupt time is charged to no process; on loopback it is mostly the
            // receive path of this configuration's own traffic, so it counts in the
            // total (host-wide, so other users' traffic is in it too).
            let irq = end.host.irq.saturating_sub(start.host.irq);
            let irq_seconds = irq as f64 / tps;
            cpu.push(CpuUse {
                role: "irq".to_owned(),
                us_per_request: if result.completed > 0 {
                    irq_seconds * 1e6 / result.completed as f64
                } else {
                    f64::NAN
                },
                cores: irq_seconds / window,
            });
            let total: f64 = cpu.iter().map(|c| c.us_per_request).sum();
            let host_tasks = end.host.tasks.saturating_sub(start.host.tasks);
            let steal = end.host.steal.saturating_sub(start.host.steal);
            runs.push(PhaseRun {
                label: phase.label(),
                result,
                cpu,
                total_cpu_us_per_request: total,
                other_cores: host_tasks.saturating_sub(ours) as f64 / tps / window,
                steal_cores: steal as f64 / tps / window,
            });
        }
        Ok((runs, start_rss))
    }

    fn note_warnings(&mut self, run: &ConfigRun) {
        for p in &run.phases {
            let at = format!("{} round {} {}", run.id, run.round, p.label);
            let r = &p.result;
            if r.errors > 0 {
                self.warnings.push(format!(
                    "{at}: {} failed calls (first: {})",
                    r.errors,
                    r.error_sample.as_deref().unwrap_or("-")
                ));
            }
            if r.unsent > 0 {
                self.warnings.push(format!(
                    "{at}: fell behind the open-loop schedule; {} requests never sent",
                    r.unsent
                ));
            }
        }
    }
}
