//! The replicated store's metrics: how late peers' writes arrive, and how often it
//! had to repair (a gap in a peer's numbered deltas) or resync (a full pull).
//!
//! Handles are resolved once, when the store starts, with the server's `node` label.

use metrics::{Counter, Histogram};

/// The handles of one store's series.
#[derive(Debug)]
pub(super) struct ReplicationMetrics {
    /// Seconds from a peer's write (its hybrid-clock time) to its application here.
    pub(super) lag: Histogram,
    /// Peers' deltas found missing past the grace period (each starts a repair).
    pub(super) gaps: Counter,
    /// Pulls of the peers' state while running (periodic, repair or divergence).
    pub(super) resyncs: Counter,
}

impl ReplicationMetrics {
    pub(super) fn new(node: &str) -> Self {
        Self {
            lag: metrics::histogram!("keelson_replication_lag_seconds", "node" => node.to_owned()),
            gaps: metrics::counter!("keelson_replication_gaps_total", "node" => node.to_owned()),
            resyncs: metrics::counter!("keelson_replication_resyncs_total", "node" => node.to_owned()),
        }
    }

    /// A peer's delta written at `written_ms` (its clock) applied at `now_ms` (ours).
    /// Clocks of different hosts disagree a little; a write "from the future" is 0.
    pub(super) fn applied(&self, written_ms: u64, now_ms: u64) {
        self.lag
            .record(now_ms.saturating_sub(written_ms) as f64 / 1000.0);
    }
}

/// Registers the HELP text of the store's metrics with the process's recorder.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_histogram!(
        "keelson_replication_lag_seconds",
        Unit::Seconds,
        "Time from a peer's context write (by its clock) to its application on this server"
    );
    describe_counter!(
        "keelson_replication_gaps_total",
        "Peers' context deltas found missing (each starts a pull of the peers' state)"
    );
    describe_counter!(
        "keelson_replication_resyncs_total",
        "Pulls of the peers' context state while running (periodic, gap repair or divergence)"
    );
}
