//! What the load generator measures and reports: phases and their results.
//!
//! Shared by `bench-load`, which prints a [`PhaseResult`] as one JSON line per phase,
//! and the harness, which reads it back.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// One measured phase of load.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Phase {
    /// `concurrency` workers, each sending its next request as soon as the previous
    /// answer arrived: measures the most the system does with that many in flight.
    Closed {
        /// Requests in flight.
        concurrency: usize,
    },
    /// Requests sent on a constant-rate schedule whatever the answers do; latency
    /// counts from the intended send time, so a stall shows in full (no coordinated
    /// omission).
    Open {
        /// Requests per second.
        rate: f64,
        /// Most requests in flight (the workers that send on the schedule).
        workers: usize,
    },
}

impl Phase {
    /// A short label for tables: `c=64`, `open`.
    pub fn label(&self) -> String {
        match self {
            Phase::Closed { concurrency } => format!("c={concurrency}"),
            Phase::Open { .. } => "open".to_owned(),
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Closed { concurrency } => write!(f, "closed:{concurrency}"),
            Phase::Open { rate, workers } => write!(f, "open:{rate}:{workers}"),
        }
    }
}

impl FromStr for Phase {
    type Err = String;

    /// `closed:N` or `open:RATE:WORKERS`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad = || format!("bad phase {s:?}: expected closed:N or open:RATE:WORKERS");
        match parts.as_slice() {
            ["closed", n] => {
                let concurrency: usize = n.parse().map_err(|_| bad())?;
                if concurrency == 0 {
                    return Err(bad());
                }
                Ok(Phase::Closed { concurrency })
            }
            ["open", rate, workers] => {
                let rate: f64 = rate.parse().map_err(|_| bad())?;
                let workers: usize = workers.parse().map_err(|_| bad())?;
                if !(rate.is_finite() && rate > 0.0) || workers == 0 {
                    return Err(bad());
                }
                Ok(Phase::Open { rate, workers })
            }
            _ => Err(bad()),
        }
    }
}

/// Latency percentiles of one phase, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// Requests in the histogram.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest.
    pub max_us: u64,
    /// Mean.
    pub mean_us: f64,
}

/// What the load generator measured in one phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseResult {
    /// The phase.
    pub phase: Phase,
    /// Length of the measurement window, in seconds.
    pub duration_s: f64,
    /// Correct answers that arrived within the window.
    pub completed: u64,
    /// Failed calls (transport error, timeout, wrong status or body) in the window.
    pub errors: u64,
    /// The first error's message, to tell what failed.
    pub error_sample: Option<String>,
    /// `completed / duration_s`.
    pub throughput: f64,
    /// Closed loop: from send to answer. Open loop: from the intended send time to
    /// the answer, for every request scheduled in the window.
    pub latency: Latency,
    /// Open loop only: requests scheduled in the window but never sent, because every
    /// worker was still busy when the drain period after the window ended (the system
    /// fell behind the schedule). Their latency is counted up to that cut-off.
    pub unsent: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_round_trip_through_their_text_form() {
        for text in ["closed:1", "closed:64", "open:1000:128", "open:2500.5:16"] {
            let phase: Phase = text.parse().unwrap_or(Phase::Closed { concurrency: 999 });
            assert_eq!(phase.to_string(), text);
        }
        for bad in [
            "closed:0",
            "closed:x",
            "open:0:4",
            "open:10",
            "open:nan:4",
            "half:1",
        ] {
            assert!(bad.parse::<Phase>().is_err(), "{bad} was accepted");
        }
    }
}
