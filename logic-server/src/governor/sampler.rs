//! CPU figures from `sysinfo`: this process's share of the cores it may use, and
//! the whole machine's.

use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate, System};

/// Samples CPU use; call [`CpuSampler::sample`] at most every 200 ms or so (the
/// machine-wide figure cannot refresh faster).
#[derive(Debug)]
pub(crate) struct CpuSampler {
    /// `None` where the platform gives no CPU figures: the parts then read 0 and
    /// the load factor rests on the busy ratio.
    system: Option<System>,
    pid: Pid,
    cores: f64,
}

impl CpuSampler {
    pub(crate) fn new() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let mut sampler = Self {
            system: match System::new() {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %e, "no CPU figures on this platform; the load factor uses the busy ratio only");
                    None
                }
            },
            pid: Pid::from_u32(std::process::id()),
            cores,
        };
        // The first reading only sets the baseline.
        sampler.sample();
        sampler
    }

    /// `(process, system)` CPU use since the previous sample, each in 0..=1.
    pub(crate) fn sample(&mut self) -> (f64, f64) {
        let Some(system) = self.system.as_mut() else {
            return (0.0, 0.0);
        };
        system.refresh_cpu_usage();
        system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[self.pid]),
            false,
            ProcessRefreshKind::nothing().with_cpu(),
        );
        let process = system
            .process(self.pid)
            .map_or(0.0, |p| f64::from(p.cpu_usage()) / 100.0 / self.cores);
        let machine = f64::from(system.global_cpu_usage()) / 100.0;
        (process.clamp(0.0, 1.0), machine.clamp(0.0, 1.0))
    }
}
