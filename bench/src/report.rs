//! What a run produced: per-round figures, ratios and their spread across rounds,
//! the table on standard output and the JSON file.

use crate::phase::PhaseResult;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The goals of issue 4: (ratio, least acceptable value at 64 in flight).
pub const RATIO_GOALS: [(&str, f64); 3] = [("C/A", 0.6), ("D/B", 0.7), ("E/B", 0.9)];
/// The phase the ratio goals apply to.
pub const GOAL_PHASE: &str = "c=64";
/// Cores busy outside the measured processes above which a phase counts as disturbed.
pub const OTHER_LOAD_LIMIT: f64 = 0.25;
/// Largest acceptable resident size of an idle gateway or logic server, in KiB.
pub const RSS_GOAL_KIB: u64 = 20 * 1024;

/// The machine and broker the figures come from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPUs this process may use.
    pub cores: usize,
    /// From /proc/cpuinfo.
    pub cpu_model: String,
    /// `uname -r`.
    pub kernel: String,
    /// RabbitMQ's version (`rabbitmqctl version`), when the broker was used.
    pub broker_version: Option<String>,
    /// Client connections to the broker's port when the run began (other users).
    pub broker_connections_at_start: Option<usize>,
    /// The load average when the run began and ended.
    pub loadavg_start: String,
    /// The load average when the run ended.
    pub loadavg_end: String,
    /// UTC, when the run began.
    pub date: String,
    /// The command line.
    pub command: String,
}

/// The settings of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// Rounds of A..E.
    pub rounds: usize,
    /// Measurement window per phase, in seconds.
    pub measure_s: f64,
    /// Warm-up before the first phase, in seconds.
    pub warmup_s: f64,
    /// Warm-up before every later phase, in seconds.
    pub phase_warmup_s: f64,
    /// Tokio worker threads of every process.
    pub worker_threads: usize,
    /// Request body size.
    pub payload_bytes: usize,
    /// Prefetch / logic-server concurrency.
    pub prefetch: u16,
    /// Closed-loop concurrencies.
    pub concurrencies: Vec<usize>,
    /// Open-loop rate, requests per second, and how it was chosen.
    pub open_rate: Option<f64>,
    /// Where the open-loop rate comes from.
    pub open_rate_source: String,
    /// Open-loop workers (most requests in flight).
    pub open_workers: usize,
    /// `[log] level` of the Keelson processes.
    pub keelson_log_level: String,
    /// Configurations run, in order.
    pub configs: Vec<ConfigInfo>,
}

/// A configuration as the report names it.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigInfo {
    /// Letter.
    pub id: String,
    /// What it is.
    pub description: String,
    /// What its throughput is divided by.
    pub baseline: Option<String>,
}

/// CPU time of one process over a measurement window.
#[derive(Debug, Clone, Serialize)]
pub struct CpuUse {
    /// `server`, `gateway`, `logic`, `broker`, `loadgen`, or `irq`: host-wide
    /// interrupt and softirq time, charged to no process (mostly the loopback network
    /// stack carrying this configuration's traffic).
    pub role: String,
    /// CPU microseconds per completed request.
    pub us_per_request: f64,
    /// Cores kept busy on average.
    pub cores: f64,
}

/// One measured phase: the load generator's figures and everyone's CPU time.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseRun {
    /// `c=64`, `open`.
    pub label: String,
    /// What the load generator measured.
    pub result: PhaseResult,
    /// Per process.
    pub cpu: Vec<CpuUse>,
    /// Sum of the above.
    pub total_cpu_us_per_request: f64,
    /// Host CPU time of tasks outside the processes above (other users, the kernel's
    /// own threads, this harness), in cores: large values mean the figures are
    /// disturbed.
    pub other_cores: f64,
    /// CPU stolen by the hypervisor, in cores.
    pub steal_cores: f64,
}

/// Resident size of one process.
#[derive(Debug, Clone, Serialize)]
pub struct Memory {
    /// Its role.
    pub role: String,
    /// Right after it said it was ready, before any request.
    pub rss_start_kib: u64,
    /// After the load phases (warm-up included) and one idle second.
    pub rss_idle_after_load_kib: u64,
    /// Peak (VmHWM).
    pub peak_kib: u64,
}

/// One configuration in one round.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigRun {
    /// Letter.
    pub id: String,
    /// Round, from 1.
    pub round: usize,
    /// The phases, in order.
    pub phases: Vec<PhaseRun>,
    /// The processes' resident sizes.
    pub memory: Vec<Memory>,
}

impl ConfigRun {
    fn phase(&self, label: &str) -> Option<&PhaseRun> {
        self.phases.iter().find(|p| p.label == label)
    }
}

/// Median and range of a figure across rounds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    /// Median.
    pub median: f64,
    /// Least.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// How many values.
    pub n: usize,
}

impl Spread {
    /// `None` for no values.
    pub fn of(values: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

/// A ratio of throughputs at one phase, across rounds.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// `C/A`.
    pub name: String,
    /// `c=64`.
    pub phase: String,
    /// One value per round that had both figures.
    pub per_round: Vec<f64>,
    /// Their spread.
    pub spread: Option<Spread>,
    /// Per round, the baseline's total CPU per request over this configuration's:
    /// the throughput ratio to expect when every process competes for the same
    /// saturated cores. Much less disturbed by other users' load than throughput.
    pub cpu_per_round: Vec<f64>,
    /// Their spread.
    pub cpu_spread: Option<Spread>,
    /// The goal, where the issue sets one for this phase.
    pub goal: Option<f64>,
}

/// A configuration's figures at one phase, across rounds.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    /// Letter.
    pub id: String,
    /// Phase label.
    pub phase: String,
    /// Requests per second.
    pub throughput: Option<Spread>,
    /// Latency percentiles, in microseconds.
    pub p50_us: Option<Spread>,
    /// 99th.
    pub p99_us: Option<Spread>,
    /// 99.9th.
    pub p999_us: Option<Spread>,
    /// CPU microseconds per request, per process role.
    pub cpu_us_per_request: BTreeMap<String, Spread>,
    /// Their sum.
    pub total_cpu_us_per_request: Option<Spread>,
    /// Failed calls, all rounds together.
    pub errors: u64,
    /// Open loop: requests never sent, all rounds together.
    pub unsent: u64,
    /// Most CPU busy outside the measured processes in any round, in cores.
    pub max_other_cores: f64,
}

/// A process role's resident size across rounds.
#[derive(Debug, Clone, Serialize)]
pub struct MemoryFigures {
    /// Letter.
    pub id: String,
    /// Role.
    pub role: String,
    /// Right after start, KiB.
    pub rss_start_kib: Option<Spread>,
    /// Idle after the load, KiB.
    pub rss_idle_after_load_kib: Option<Spread>,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// How.
    pub settings: Settings,
    /// Every configuration of every round.
    pub runs: Vec<ConfigRun>,
    /// The ratios.
    pub ratios: Vec<Ratio>,
    /// Figures per configuration and phase.
    pub figures: Vec<Figures>,
    /// Resident sizes.
    pub memory: Vec<MemoryFigures>,
    /// Everything that makes a figure doubtful.
    pub warnings: Vec<String>,
    /// Wall-clock length of the run after the build, in seconds.
    pub elapsed_s: f64,
}

impl Report {
    /// Compute ratios and spreads from `runs`.
    pub fn summarize(&mut self) {
        let ids: Vec<ConfigInfo> = self.settings.configs.clone();
        let labels: Vec<String> = self
            .runs
            .iter()
            .flat_map(|r| r.phases.iter().map(|p| p.label.clone()))
            .fold(Vec::new(), |mut acc, l| {
                if !acc.contains(&l) {
                    acc.push(l);
                }
                acc
            });
        let rounds: Vec<usize> = (1..=self.settings.rounds).collect();
        let find =
            |id: &str, round: usize| self.runs.iter().find(|r| r.id == id && r.round == round);

        self.ratios.clear();
        for config in &ids {
            let Some(base) = &config.baseline else {
                continue;
            };
            if !ids.iter().any(|c| &c.id == base) {
                continue;
            }
            let name = format!("{}/{}", config.id, base);
            for label in labels.iter().filter(|l| l.starts_with("c=")) {
                let per_round: Vec<f64> = rounds
                    .iter()
                    .filter_map(|&round| {
                        let a = find(&config.id, round)?.phase(label)?;
                        let b = find(base, round)?.phase(label)?;
                        (b.result.throughput > 0.0)
                            .then(|| a.result.throughput / b.result.throughput)
                    })
                    .collect();
                let cpu_per_round: Vec<f64> = rounds
                    .iter()
                    .filter_map(|&round| {
                        let a = find(&config.id, round)?.phase(label)?;
                        let b = find(base, round)?.phase(label)?;
                        (a.total_cpu_us_per_request > 0.0)
                            .then(|| b.total_cpu_us_per_request / a.total_cpu_us_per_request)
                    })
                    .collect();
                let goal = RATIO_GOALS
                    .iter()
                    .find(|(n, _)| *n == name && label == GOAL_PHASE)
                    .map(|(_, g)| *g);
                self.ratios.push(Ratio {
                    name: name.clone(),
                    phase: label.clone(),
                    spread: Spread::of(&per_round),
                    per_round,
                    cpu_spread: Spread::of(&cpu_per_round),
                    cpu_per_round,
                    goal,
                });
            }
        }

        self.figures.clear();
        for config in &ids {
            for label in &labels {
                let phases: Vec<&PhaseRun> = self
                    .runs
                    .iter()
                    .filter(|r| r.id == config.id)
                    .filter_map(|r| r.phase(label))
                    .collect();
                if phases.is_empty() {
                    continue;
                }
                let of = |f: &dyn Fn(&PhaseRun) -> f64| {
                    Spread::of(&phases.iter().map(|p| f(p)).collect::<Vec<_>>())
                };
                let mut cpu: BTreeMap<String, Vec<f64>> = BTreeMap::new();
                for p in &phases {
                    for c in &p.cpu {
                        cpu.entry(c.role.clone())
                            .or_default()
                            .push(c.us_per_request);
                    }
                }
                self.figures.push(Figures {
                    id: config.id.clone(),
                    phase: label.clone(),
                    throughput: of(&|p| p.result.throughput),
                    p50_us: of(&|p| p.result.latency.p50_us as f64),
                    p99_us: of(&|p| p.result.latency.p99_us as f64),
                    p999_us: of(&|p| p.result.latency.p999_us as f64),
                    cpu_us_per_request: cpu
                        .into_iter()
                        .filter_map(|(role, v)| Some((role, Spread::of(&v)?)))
                        .collect(),
                    total_cpu_us_per_request: of(&|p| p.total_cpu_us_per_request),
                    errors: phases.iter().map(|p| p.result.errors).sum(),
                    unsent: phases.iter().map(|p| p.result.unsent).sum(),
                    max_other_cores: phases.iter().map(|p| p.other_cores).fold(0.0, f64::max),
                });
            }
        }

        let other: Vec<f64> = self
            .runs
            .iter()
            .flat_map(|r| r.phases.iter().map(|p| p.other_cores))
            .collect();
        let busy = other.iter().filter(|&&c| c > OTHER_LOAD_LIMIT).count();
        if let (Some(sp), true) = (Spread::of(&other), busy > 0) {
            self.warnings.push(format!(
                "in {busy} of {} measured phases more than {OTHER_LOAD_LIMIT} cores were busy \
                 outside the measured processes (median {:.2}, max {:.2} cores): other users' \
                 builds or tests shared the machine, so these figures are less reliable than \
                 on a quiet one",
                sp.n, sp.median, sp.max
            ));
        }
        let steal: Vec<f64> = self
            .runs
            .iter()
            .flat_map(|r| r.phases.iter().map(|p| p.steal_cores))
            .collect();
        if let Some(sp) = Spread::of(&steal).filter(|sp| sp.max > 0.1) {
            self.warnings.push(format!(
                "the hypervisor stole up to {:.2} cores (median {:.2}) during measurements",
                sp.max, sp.median
            ));
        }

        self.memory.clear();
        for config in &ids {
            let mut roles: Vec<String> = Vec::new();
            for r in self.runs.iter().filter(|r| r.id == config.id) {
                for m in &r.memory {
                    if !roles.contains(&m.role) {
                        roles.push(m.role.clone());
                    }
                }
            }
            for role in roles {
                let ms: Vec<&Memory> = self
                    .runs
                    .iter()
                    .filter(|r| r.id == config.id)
                    .flat_map(|r| r.memory.iter().filter(|m| m.role == role))
                    .collect();
                self.memory.push(MemoryFigures {
                    id: config.id.clone(),
                    role,
                    rss_start_kib: Spread::of(
                        &ms.iter()
                            .map(|m| m.rss_start_kib as f64)
                            .collect::<Vec<_>>(),
                    ),
                    rss_idle_after_load_kib: Spread::of(
                        &ms.iter()
                            .map(|m| m.rss_idle_after_load_kib as f64)
                            .collect::<Vec<_>>(),
                    ),
                });
            }
        }
    }

    /// The table printed on standard output.
    pub fn render(&self) -> String {
        let mut s = String::new();
        let st = &self.settings;
        let m = &self.machine;
        let _ = writeln!(
            s,
            "Keelson benchmark, {}: {} round(s) of {}; {:.1} s per phase after {:.1} s warm-up; \
             payload {} B; {} tokio worker thread(s) per process; prefetch {}",
            m.date,
            st.rounds,
            st.configs
                .iter()
                .map(|c| c.id.as_str())
                .collect::<Vec<_>>()
                .join(" "),
            st.measure_s,
            st.warmup_s,
            st.payload_bytes,
            st.worker_threads,
            st.prefetch,
        );
        let _ = writeln!(
            s,
            "machine: {} core(s), {}; kernel {}; RabbitMQ {}; load average at start {}",
            m.cores,
            m.cpu_model,
            m.kernel,
            m.broker_version.as_deref().unwrap_or("not used/unknown"),
            m.loadavg_start,
        );
        match st.open_rate {
            Some(rate) => {
                let _ = writeln!(
                    s,
                    "open loop: {rate:.0} req/s ({}), up to {} in flight",
                    st.open_rate_source, st.open_workers
                );
            }
            None => {
                let _ = writeln!(s, "open loop: not run ({})", st.open_rate_source);
            }
        }
        for c in &st.configs {
            let _ = writeln!(s, "  {}  {}", c.id, c.description);
        }

        let _ = writeln!(
            s,
            "\nRatios (closed loop, same round), median and min-max over rounds. throughput: \
             requests/s over the baseline's; CPU cost: the baseline's total CPU per request \
             over this one's (all processes, broker and load generator included)"
        );
        let _ = writeln!(
            s,
            "{:<6} {:>6} {:>10} {:>17} {:>10} {:>17}   goal (throughput)",
            "ratio", "phase", "throughput", "min-max", "CPU cost", "min-max"
        );
        let cells = |sp: Option<Spread>| match sp {
            Some(sp) => (
                format!("{:.2}", sp.median),
                format!("{:.2}-{:.2} (n={})", sp.min, sp.max, sp.n),
            ),
            None => ("-".into(), "-".into()),
        };
        for r in &self.ratios {
            let (median, range) = cells(r.spread);
            let (cpu_median, cpu_range) = cells(r.cpu_spread);
            let goal = match (r.goal, r.spread) {
                (Some(g), Some(sp)) if sp.median >= g => format!(">= {g:.1}: met"),
                (Some(g), Some(_)) => format!(">= {g:.1}: SHORT"),
                (Some(g), None) => format!(">= {g:.1}: not measured"),
                _ => String::new(),
            };
            let _ = writeln!(
                s,
                "{:<6} {:>6} {:>10} {:>17} {:>10} {:>17}   {}",
                r.name, r.phase, median, range, cpu_median, cpu_range, goal
            );
        }

        let _ = writeln!(
            s,
            "\nFigures, median over rounds (latency: closed loop from send, open loop from the \
             intended send time; other: most cores busy outside the measured processes in any \
             round; u: open-loop requests never sent)"
        );
        let _ = writeln!(
            s,
            "{:<3} {:>6} {:>9} {:>8} {:>8} {:>9} {:>6} {:>6}  CPU us/request by process (total)",
            "cfg", "phase", "req/s", "p50 us", "p99 us", "p99.9 us", "errors", "other"
        );
        let med = |sp: Option<Spread>| sp.map_or("-".to_owned(), |s| format!("{:.0}", s.median));
        for f in &self.figures {
            let cpu: Vec<String> = f
                .cpu_us_per_request
                .iter()
                .map(|(role, sp)| format!("{role} {:.1}", sp.median))
                .collect();
            let total = f
                .total_cpu_us_per_request
                .map_or("-".to_owned(), |t| format!("{:.1}", t.median));
            let mut errors = f.errors.to_string();
            if f.unsent > 0 {
                let _ = write!(errors, "+{}u", f.unsent);
            }
            let _ = writeln!(
                s,
                "{:<3} {:>6} {:>9} {:>8} {:>8} {:>9} {:>6} {:>6.2}  {} ({total})",
                f.id,
                f.phase,
                med(f.throughput),
                med(f.p50_us),
                med(f.p99_us),
                med(f.p999_us),
                errors,
                f.max_other_cores,
                cpu.join(", "),
            );
        }

        let _ = writeln!(
            s,
            "\nResident size (VmRSS), median over rounds; goal for an idle gateway or logic \
             server: <= {} MiB",
            RSS_GOAL_KIB / 1024
        );
        let _ = writeln!(
            s,
            "{:<3} {:<8} {:>14} {:>22}",
            "cfg", "process", "after start", "idle after the load"
        );
        let mib = |sp: Option<Spread>| {
            sp.map_or("-".to_owned(), |s| format!("{:.1} MiB", s.median / 1024.0))
        };
        for mem in &self.memory {
            let _ = writeln!(
                s,
                "{:<3} {:<8} {:>14} {:>22}",
                mem.id,
                mem.role,
                mib(mem.rss_start_kib),
                mib(mem.rss_idle_after_load_kib)
            );
        }
        if !self.warnings.is_empty() {
            let _ = writeln!(s, "\nWarnings:");
            for w in &self.warnings {
                let _ = writeln!(s, "  - {w}");
            }
        }
        let _ = writeln!(
            s,
            "\nrun took {:.0} s after the build; load average at the end {}",
            self.elapsed_s, m.loadavg_end
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_middle() {
        let s = Spread::of(&[3.0, 1.0, 2.0]);
        assert_eq!(s.map(|s| (s.median, s.min, s.max)), Some((2.0, 1.0, 3.0)));
        let s = Spread::of(&[4.0, 1.0, 2.0, 3.0]);
        assert_eq!(s.map(|s| s.median), Some(2.5));
        assert!(Spread::of(&[]).is_none());
    }
}
