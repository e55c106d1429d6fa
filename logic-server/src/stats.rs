//! Live figures of a running server, shared by the consume loop, the governor and
//! the heartbeat.

use crate::governor::BusyMeter;
use keelson_protocol::control::Load;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Live figures of a running server.
#[derive(Debug)]
pub struct ServerStats {
    in_flight: AtomicUsize,
    handled: AtomicUsize,
    ready: AtomicBool,
    paused: AtomicBool,
    pauses: AtomicU64,
    resumes: AtomicU64,
    window: AtomicU16,
    /// Other servers of the service taking requests, as of the last sample.
    others_active: AtomicUsize,
    load: Mutex<Load>,
    pub(crate) meter: BusyMeter,
    /// Set while overloaded as the last active server of its service (logged once).
    pub(crate) overloaded_alone: AtomicBool,
    /// Set once the server started shutting down.
    pub(crate) leaving: AtomicBool,
    untrusted_publishers: AtomicU64,
    route_mismatches: AtomicU64,
    jobs_running: AtomicUsize,
}

impl ServerStats {
    pub(crate) fn new(concurrency: u16) -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            handled: AtomicUsize::new(0),
            ready: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            pauses: AtomicU64::new(0),
            resumes: AtomicU64::new(0),
            window: AtomicU16::new(concurrency),
            others_active: AtomicUsize::new(0),
            load: Mutex::new(Load::default()),
            meter: BusyMeter::new(concurrency),
            overloaded_alone: AtomicBool::new(false),
            leaving: AtomicBool::new(false),
            untrusted_publishers: AtomicU64::new(0),
            route_mismatches: AtomicU64::new(0),
            jobs_running: AtomicUsize::new(0),
        }
    }

    /// Requests being handled now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
    /// Requests handled since start (replied, expired or dead-lettered).
    pub fn handled(&self) -> usize {
        self.handled.load(Ordering::Relaxed)
    }
    /// Whether the server consumes requests (started and not draining).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
    /// Whether the governor paused intake.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }
    /// How often the governor paused and resumed intake since start.
    pub fn transitions(&self) -> (u64, u64) {
        (
            self.pauses.load(Ordering::Relaxed),
            self.resumes.load(Ordering::Relaxed),
        )
    }
    /// How many requests the server takes from the queue at once now (the intake
    /// window, at most the concurrency).
    pub fn window(&self) -> u16 {
        self.window.load(Ordering::Relaxed)
    }
    /// Requests dead-lettered since start because they named a user but came from
    /// a publisher not in `trusted_publishers`.
    pub fn untrusted_publishers(&self) -> u64 {
        self.untrusted_publishers.load(Ordering::Relaxed)
    }
    /// Requests dead-lettered since start because their route (routing key) and
    /// the handler their envelope names disagree.
    pub fn route_mismatches(&self) -> u64 {
        self.route_mismatches.load(Ordering::Relaxed)
    }
    /// Job attempts running on this server now.
    pub fn jobs_running(&self) -> usize {
        self.jobs_running.load(Ordering::Relaxed)
    }
    /// The latest load sample.
    pub fn load(&self) -> Load {
        *self.load.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }
    pub(crate) fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Release);
        let counter = if paused { &self.pauses } else { &self.resumes };
        counter.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn others_active(&self) -> usize {
        self.others_active.load(Ordering::Relaxed)
    }
    pub(crate) fn set_others_active(&self, others: usize) {
        self.others_active.store(others, Ordering::Relaxed);
    }
    pub(crate) fn set_window(&self, window: u16) {
        self.window.store(window, Ordering::Relaxed);
    }
    pub(crate) fn set_load(&self, load: Load) {
        *self.load.lock().unwrap_or_else(|p| p.into_inner()) = load;
    }
    pub(crate) fn count_untrusted_publisher(&self) {
        self.untrusted_publishers.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_route_mismatch(&self) {
        self.route_mismatches.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_handled(&self) {
        self.handled.fetch_add(1, Ordering::Relaxed);
    }
}

/// Counts a request as in flight (and busy) for as long as it lives, including when
/// its task is aborted at the drain timeout.
pub(crate) struct InFlight {
    stats: Arc<ServerStats>,
}

impl InFlight {
    pub(crate) fn enter(stats: Arc<ServerStats>) -> Self {
        stats.in_flight.fetch_add(1, Ordering::Relaxed);
        stats.meter.enter();
        Self { stats }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stats.meter.exit();
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a job attempt as running here for as long as it lives, including when its
/// task is aborted.
pub(crate) struct JobRunning {
    stats: Arc<ServerStats>,
}

impl JobRunning {
    pub(crate) fn enter(stats: Arc<ServerStats>) -> Self {
        stats.jobs_running.fetch_add(1, Ordering::Relaxed);
        Self { stats }
    }
}

impl Drop for JobRunning {
    fn drop(&mut self) {
        self.stats.jobs_running.fetch_sub(1, Ordering::Relaxed);
    }
}
