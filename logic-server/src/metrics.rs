//! A logic server's metrics, recorded through the `metrics` facade to whatever
//! recorder the process installed (the `keelson` binary installs a Prometheus one;
//! without a recorder every handle is a no-op).
//!
//! Every series carries `node` (the server's node id), so that several servers in
//! one process stay apart. Handles are resolved once, when the server is built (one
//! per handler for the durations), so recording is an atomic add, with no label
//! formatting or registry lookup per request. Gauges are set by the monitor at each
//! load sample (`governor.sample_ms`).

use crate::dispatch::Handled;
use crate::stats::ServerStats;
use keelson_protocol::ReplyStatus;
use keelson_protocol::control::{JobCounts, Load};
use keelson_protocol::job::JobState;
use metrics::{Counter, Gauge, Histogram};
use std::collections::HashMap;

/// The handles of one server's series.
#[derive(Debug)]
pub(crate) struct ServerMetrics {
    answered: Counter,
    failed: Counter,
    redelivered: Counter,
    pub(crate) handed_back: Counter,
    deduplicated: Counter,
    dead_lettered: Counter,
    durations: HashMap<String, Histogram>,
    in_flight: Gauge,
    window: Gauge,
    paused: Gauge,
    load_factor: Gauge,
    load_busy: Gauge,
    load_process_cpu: Gauge,
    load_system_cpu: Gauge,
    contexts: Gauge,
    context_bytes: Gauge,
    peers: Gauge,
    jobs: JobMetrics,
}

/// The job series of one server.
#[derive(Debug)]
struct JobMetrics {
    submitted: Counter,
    /// Attempts ended, by outcome.
    ended: HashMap<&'static str, Counter>,
    running: Gauge,
    durations: HashMap<String, Histogram>,
    /// Job records held, by state (every server holds them all).
    by_state: Vec<(JobState, Gauge)>,
}

/// How a job attempt can end, as `keelson_job_attempts_total{outcome}` counts it.
const JOB_OUTCOMES: [&str; 6] = [
    "succeeded",
    "failed",
    "retried",
    "cancelled",
    "lost",
    "fenced",
];

impl ServerMetrics {
    pub(crate) fn new(node: &str, handlers: &[String]) -> Self {
        let node = node.to_owned();
        let outcome = |outcome: &'static str| metrics::counter!("keelson_deliveries_total", "node" => node.clone(), "outcome" => outcome);
        let part = |part: &'static str| metrics::gauge!("keelson_load_part", "node" => node.clone(), "part" => part);
        let gauge = |name: &'static str| metrics::gauge!(name, "node" => node.clone());
        Self {
            answered: outcome("answered"),
            failed: outcome("failed"),
            redelivered: outcome("redelivered"),
            handed_back: outcome("handed_back"),
            deduplicated: outcome("deduplicated"),
            dead_lettered: outcome("dead_lettered"),
            durations: handlers
                .iter()
                .map(|h| {
                    let histogram = metrics::histogram!(
                        "keelson_handler_duration_seconds",
                        "node" => node.clone(),
                        "handler" => h.clone()
                    );
                    (h.clone(), histogram)
                })
                .collect(),
            in_flight: gauge("keelson_in_flight"),
            window: gauge("keelson_intake_window"),
            paused: gauge("keelson_paused"),
            load_factor: gauge("keelson_load_factor"),
            load_busy: part("busy"),
            load_process_cpu: part("process_cpu"),
            load_system_cpu: part("system_cpu"),
            contexts: gauge("keelson_contexts"),
            context_bytes: gauge("keelson_context_bytes"),
            peers: gauge("keelson_peers"),
            jobs: JobMetrics {
                submitted: metrics::counter!("keelson_jobs_submitted_total", "node" => node.clone()),
                ended: JOB_OUTCOMES
                    .iter()
                    .map(|o| (*o, metrics::counter!("keelson_job_attempts_total", "node" => node.clone(), "outcome" => *o)))
                    .collect(),
                running: gauge("keelson_jobs_running"),
                durations: handlers
                    .iter()
                    .map(|h| {
                        let histogram = metrics::histogram!(
                            "keelson_job_duration_seconds",
                            "node" => node.clone(),
                            "handler" => h.clone()
                        );
                        (h.clone(), histogram)
                    })
                    .collect(),
                by_state: JobState::ALL
                    .iter()
                    .map(|s| (*s, metrics::gauge!("keelson_jobs", "node" => node.clone(), "state" => s.as_str())))
                    .collect(),
            },
        }
    }

    /// A job was accepted here.
    pub(crate) fn job_submitted(&self) {
        self.jobs.submitted.increment(1);
    }

    /// A job attempt started here.
    pub(crate) fn job_started(&self) {
        self.jobs.running.increment(1.0);
    }

    /// A job attempt of `handler` ran this long here.
    pub(crate) fn job_ran(&self, handler: &str, seconds: f64) {
        self.jobs.running.decrement(1.0);
        if let Some(histogram) = self.jobs.durations.get(handler) {
            histogram.record(seconds);
        }
    }

    /// A job attempt ended with `outcome` (one of [`JOB_OUTCOMES`]).
    pub(crate) fn job_ended(&self, outcome: &str) {
        if let Some(counter) = self.jobs.ended.get(outcome) {
            counter.increment(1);
        }
    }

    /// Set the job-record gauges: how many jobs each state holds.
    pub(crate) fn job_states(&self, counts: &JobCounts) {
        for (state, gauge) in &self.jobs.by_state {
            gauge.set(counts.get(*state) as f64);
        }
    }

    /// Count how a delivery ended.
    pub(crate) fn delivery(&self, handled: Handled) {
        let counter = match handled {
            Handled::Replied(ReplyStatus::Ok) => &self.answered,
            Handled::Replied(_) | Handled::Refused(_) => &self.failed,
            Handled::Replayed(_) => &self.deduplicated,
            Handled::DeadLettered => &self.dead_lettered,
            Handled::HandedOver => &self.handed_back,
            Handled::Recounted => &self.redelivered,
        };
        counter.increment(1);
    }

    /// How long `handler` ran (to its answer, error, panic or deadline).
    pub(crate) fn handler_ran(&self, handler: &str, seconds: f64) {
        if let Some(histogram) = self.durations.get(handler) {
            histogram.record(seconds);
        }
    }

    /// Set the gauges from a load sample.
    pub(crate) fn sample(&self, stats: &ServerStats, load: &Load, peers: usize) {
        self.in_flight.set(stats.in_flight() as f64);
        self.window.set(f64::from(stats.window()));
        self.paused.set(if stats.is_paused() { 1.0 } else { 0.0 });
        self.load_factor.set(load.factor);
        self.load_busy.set(load.busy);
        self.load_process_cpu.set(load.process_cpu);
        self.load_system_cpu.set(load.system_cpu);
        self.peers.set(peers as f64);
    }

    /// Set the context gauges.
    pub(crate) fn contexts(&self, users: usize, bytes: Option<u64>) {
        self.contexts.set(users as f64);
        if let Some(bytes) = bytes {
            self.context_bytes.set(bytes as f64);
        }
    }
}

/// Registers the HELP text of the logic server's metrics with the process's
/// recorder (and of the context store's).
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "keelson_deliveries_total",
        "Deliveries taken from the queue, by how they ended: answered, failed (an error reply), redelivered, handed_back, deduplicated (answered from the outcome record), dead_lettered"
    );
    describe_histogram!(
        "keelson_handler_duration_seconds",
        Unit::Seconds,
        "Time a handler ran, by handler"
    );
    describe_gauge!("keelson_in_flight", "Requests being handled now");
    describe_gauge!(
        "keelson_intake_window",
        "Requests the server takes from the queue at once now"
    );
    describe_gauge!(
        "keelson_paused",
        "1 while the governor paused intake, else 0"
    );
    describe_gauge!(
        "keelson_load_factor",
        "The load the governor acts on (0 to 1)"
    );
    describe_gauge!(
        "keelson_load_part",
        "Parts of the load: busy (handler time share), process_cpu, system_cpu (0 to 1)"
    );
    describe_gauge!("keelson_contexts", "User contexts held");
    describe_gauge!(
        "keelson_context_bytes",
        "Bytes of the user contexts held, as charged against max_bytes_per_user"
    );
    describe_gauge!(
        "keelson_peers",
        "Other logic servers heard on the control channel and not gone"
    );
    describe_counter!(
        "keelson_jobs_submitted_total",
        "Background jobs accepted by this server (answered 202)"
    );
    describe_counter!(
        "keelson_job_attempts_total",
        "Job attempts run here, by how they ended: succeeded, failed (for good), retried (failed, another attempt queued), cancelled, lost (interrupted by a drain; run again), fenced (outcome dropped: this server lost its lease while it ran)"
    );
    describe_gauge!("keelson_jobs_running", "Job attempts running here now");
    describe_histogram!(
        "keelson_job_duration_seconds",
        Unit::Seconds,
        "Time a job attempt ran, by handler"
    );
    describe_gauge!(
        "keelson_jobs",
        "Job records held (the same on every server), by state: queued, running, succeeded, failed, cancelled"
    );
    describe_counter!(
        "keelson_lease_acquisitions_total",
        "Leases this server gained, by lease: scheduler, singleton.NAME"
    );
    describe_counter!(
        "keelson_lease_losses_total",
        "Leases this server lost while holding them (it fenced itself: broker connection gone or a renewal not confirmed in time; a drain's hand-over is not counted), by lease"
    );
    describe_counter!(
        "keelson_schedule_firings_total",
        "Schedule slots this server's scheduler fired as jobs, by schedule and kind: on_time, catch_up (a slot missed while no scheduler ran, fired late)"
    );
    describe_counter!(
        "keelson_schedule_skipped_total",
        "Schedule slots not fired, by schedule and reason: misfire (missed, and not caught up by the misfire policy or older than catch_up_window_s), overlap (an earlier slot's job still running, overlap = skip), no_handler (no server runs jobs of its handler)"
    );
    describe_counter!(
        "keelson_schedule_stale_dropped_total",
        "Firings dropped because their lease token was stale (a newer scheduler's mark was seen: this server no longer leads), by schedule"
    );
    crate::context::describe_metrics();
}
