//! The load governor: a logic server that is too busy stops taking new requests for
//! a while, leaving them on the queue for its peers, and takes them again once its
//! load has fallen (Keel's self-tuning servers).
//!
//! The load factor, sampled every `sample_ms`, is the largest of the enabled parts:
//!
//! * **busy**: time spent inside handlers divided by wall time times concurrency
//!   slots (Keel's definition: the share of its capacity a server spends working);
//! * **process CPU**: this process's CPU time divided by the cores it may use (off by
//!   default: a server doing its work well runs its CPU high, and pausing it hands
//!   the work to peers that may be worse off; a server starved of CPU shows *low*
//!   process CPU while its requests pile up);
//! * **system CPU**: the whole machine's CPU use (off by default: on a shared host it
//!   says more about the neighbours than about this server).
//!
//! By default the factor is the busy ratio alone, with the high watermark at half the
//! slots: a server holding more than half its concurrency in handlers is slower than
//! its arrivals, and its peers should take the next requests. Every part is measured
//! and reported in heartbeats whether or not it counts.
//!
//! smoothed by an exponential moving average (`smoothing` is the weight of the
//! newest sample). Above `high_watermark` intake pauses; it stays paused at least
//! `min_pause_ms`, then resumes once the load is below `low_watermark`. The gap
//! between the marks and the minimum pause keep a server from flapping. The
//! concurrency limit (= prefetch) stays the hard cap whatever the governor says.
//!
//! Under that cap the governor also sets the **intake window** ([`WindowControl`]): a
//! server whose requests wait inside it before their handlers start takes fewer at
//! once, so a server starved of CPU holds a request or two instead of a full
//! prefetch, and the rest waits on the queue for its peers.

mod meter;
mod sampler;
mod window;

pub(crate) use meter::BusyMeter;
pub(crate) use sampler::CpuSampler;
pub use window::WindowControl;

use serde::Deserialize;
use std::time::Duration;
use tokio::time::Instant;

/// The `[logic_server.governor]` section.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GovernorConfig {
    /// Whether the governor may pause intake. The load is measured and reported
    /// either way.
    pub enabled: bool,
    /// How often the load is sampled.
    pub sample_ms: u64,
    /// Pause intake when the load factor rises above this (0..1).
    pub high_watermark: f64,
    /// Resume intake when the load factor falls below this (0..1, below the high
    /// watermark).
    pub low_watermark: f64,
    /// Stay paused at least this long.
    pub min_pause_ms: u64,
    /// Weight of the newest sample in the smoothed load (1.0: no smoothing).
    pub smoothing: f64,
    /// Count the busy ratio in the load factor.
    pub use_busy: bool,
    /// Count this process's CPU in the load factor.
    pub use_process_cpu: bool,
    /// Count the machine's CPU in the load factor.
    pub use_system_cpu: bool,
    /// Whether a server may pause, or narrow its intake window, when no other
    /// server of its service takes requests. Off by default: with no peer to take
    /// the work, either only delays it. Either way the log says so when it would
    /// pause.
    pub pause_last_consumer: bool,
    /// Whether the governor narrows the intake window while requests wait inside
    /// this server before their handlers start (needs `enabled`).
    pub adaptive_window: bool,
    /// The longest a request should wait inside this server for its handler to
    /// start; above it, the window narrows.
    pub start_delay_target_ms: u64,
    /// How often the window is reconsidered.
    pub window_interval_ms: u64,
    /// The narrowest window (at least 1).
    pub min_window: u16,
}

impl Default for GovernorConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            sample_ms: 500,
            high_watermark: 0.5,
            low_watermark: 0.25,
            min_pause_ms: 1000,
            smoothing: 0.5,
            use_busy: true,
            use_process_cpu: false,
            use_system_cpu: false,
            pause_last_consumer: false,
            adaptive_window: true,
            start_delay_target_ms: 5,
            window_interval_ms: 100,
            min_window: 1,
        }
    }
}

impl GovernorConfig {
    /// Check the settings fit together.
    pub fn validate(&self) -> Result<(), String> {
        let unit = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!(
                    "logic_server.governor.{name} must be between 0 and 1, not {v}"
                ))
            }
        };
        unit("high_watermark", self.high_watermark)?;
        unit("low_watermark", self.low_watermark)?;
        if self.smoothing <= 0.0 || self.smoothing > 1.0 {
            return Err(format!(
                "logic_server.governor.smoothing must be in (0, 1], not {}",
                self.smoothing
            ));
        }
        if self.low_watermark >= self.high_watermark {
            return Err(format!(
                "logic_server.governor.low_watermark ({}) must be below high_watermark ({})",
                self.low_watermark, self.high_watermark
            ));
        }
        for (name, value) in [
            ("sample_ms", self.sample_ms),
            ("window_interval_ms", self.window_interval_ms),
            ("min_window", u64::from(self.min_window)),
        ] {
            if value == 0 {
                return Err(format!("logic_server.governor.{name} must be at least 1"));
            }
        }
        Ok(())
    }

    /// The load factor from its parts, as configured.
    pub fn combine(&self, busy: f64, process_cpu: f64, system_cpu: f64) -> f64 {
        let mut load: f64 = 0.0;
        if self.use_busy {
            load = load.max(busy);
        }
        if self.use_process_cpu {
            load = load.max(process_cpu);
        }
        if self.use_system_cpu {
            load = load.max(system_cpu);
        }
        load.clamp(0.0, 1.0)
    }
}

/// What the governor decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Stop taking new requests.
    Pause,
    /// Take requests again.
    Resume,
}

/// The governor's state machine: pure, driven by samples and the clock.
#[derive(Debug)]
pub struct Governor {
    config: GovernorConfig,
    smoothed: Option<f64>,
    paused_since: Option<Instant>,
}

impl Governor {
    /// A governor that starts running (not paused).
    pub fn new(config: GovernorConfig) -> Self {
        Self {
            config,
            smoothed: None,
            paused_since: None,
        }
    }

    /// Whether intake is paused.
    pub fn is_paused(&self) -> bool {
        self.paused_since.is_some()
    }

    /// The smoothed load factor.
    pub fn load(&self) -> f64 {
        self.smoothed.unwrap_or(0.0)
    }

    /// Undo a pause just decided (the caller chose not to act on it); the next
    /// sample above the high watermark proposes it again.
    pub fn cancel_pause(&mut self) {
        self.paused_since = None;
    }

    /// Take a raw load sample at `now`; returns a transition when one is due.
    pub fn observe(&mut self, raw: f64, now: Instant) -> Option<Transition> {
        let a = self.config.smoothing;
        let load = match self.smoothed {
            Some(prev) => a * raw + (1.0 - a) * prev,
            None => raw,
        };
        self.smoothed = Some(load);
        if !self.config.enabled {
            return None;
        }
        match self.paused_since {
            None if load > self.config.high_watermark => {
                self.paused_since = Some(now);
                Some(Transition::Pause)
            }
            Some(since)
                if now.duration_since(since) >= Duration::from_millis(self.config.min_pause_ms)
                    && load < self.config.low_watermark =>
            {
                self.paused_since = None;
                Some(Transition::Resume)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
