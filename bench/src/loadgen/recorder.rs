//! One worker's tally: an HDR histogram of latencies, counts, the first error.

use crate::phase::Latency;
use hdrhistogram::Histogram;
use std::time::Duration;

/// Largest latency the histogram holds, in microseconds (a minute); larger values are
/// clamped to it.
const MAX_US: u64 = 60_000_000;

#[derive(Debug)]
pub(crate) struct Recorder {
    hist: Histogram<u64>,
    pub(crate) completed: u64,
    pub(crate) errors: u64,
    pub(crate) unsent: u64,
    pub(crate) first_error: Option<String>,
}

impl Recorder {
    pub(crate) fn new() -> anyhow::Result<Self> {
        Ok(Self {
            // Three significant digits from 1 µs to a minute.
            hist: Histogram::new_with_bounds(1, MAX_US, 3)?,
            completed: 0,
            errors: 0,
            unsent: 0,
            first_error: None,
        })
    }

    pub(crate) fn latency(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(MAX_US);
        self.hist.saturating_record(us.clamp(1, MAX_US));
    }

    pub(crate) fn error(&mut self, e: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }

    pub(crate) fn merge(&mut self, other: Recorder) -> anyhow::Result<()> {
        self.hist.add(&other.hist)?;
        self.completed += other.completed;
        self.errors += other.errors;
        self.unsent += other.unsent;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        Ok(())
    }

    pub(crate) fn summary(&self) -> Latency {
        let h = &self.hist;
        Latency {
            count: h.len(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_percentiles_cover_every_worker() -> anyhow::Result<()> {
        let mut a = Recorder::new()?;
        let mut b = Recorder::new()?;
        for _ in 0..900 {
            a.latency(Duration::from_micros(100));
        }
        for _ in 0..100 {
            b.latency(Duration::from_millis(10));
        }
        b.error("boom".into());
        a.merge(b)?;
        let s = a.summary();
        assert_eq!(s.count, 1000);
        assert!((99..=101).contains(&s.p50_us), "{s:?}");
        assert!((9_990..=10_010).contains(&s.p99_us), "{s:?}");
        assert_eq!(a.errors, 1);
        assert_eq!(a.first_error.as_deref(), Some("boom"));
        Ok(())
    }
}
