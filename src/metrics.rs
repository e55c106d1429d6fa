//! The process's metrics: one Prometheus recorder for everything this process runs.
//!
//! Every part records through the `metrics` facade (the gateway, the logic servers,
//! the context store, the AMQP transport); this module installs the one recorder
//! that keeps the figures and renders them in the Prometheus text format for the
//! gateway's `GET /metrics` and the logic server's admin listener. Because the
//! recorder is process-wide, the embedded mesh shows its gateway's and its logic
//! server's metrics on one page (per-server series carry a `node` label).
//!
//! The recorder must be installed before the parts start: they resolve their metric
//! handles once, when they are built, and a handle resolved with no recorder
//! installed records nothing.

use keelson_ui_gateway::MetricsRender;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Duration;

/// Histogram buckets, in seconds: from 0.5 ms (a request through the embedded mesh)
/// to 30 s (the default request timeout).
const BUCKETS_SECONDS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How often recorded histogram samples are folded into their buckets, so that a
/// process nobody scrapes does not keep them.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Install the process's recorder (once; later calls return the same renderer) and
/// start its upkeep on the current runtime. `None` when another recorder was
/// installed first (an application's own): then Keelson serves no metrics.
pub fn install() -> Option<MetricsRender> {
    let handle = HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(&BUCKETS_SECONDS)
                .and_then(PrometheusBuilder::install_recorder);
            match handle {
                Ok(handle) => {
                    describe();
                    metrics::gauge!("keelson_build_info", "version" => crate::VERSION).set(1.0);
                    let upkeep = handle.clone();
                    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                        runtime.spawn(async move {
                            let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
                            loop {
                                tick.tick().await;
                                upkeep.run_upkeep();
                            }
                        });
                    }
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot install the metrics recorder; /metrics is off");
                    None
                }
            }
        })
        .clone()?;
    Some(MetricsRender::new(move || {
        // Publishes descriptions registered since the last upkeep too.
        handle.run_upkeep();
        handle.render()
    }))
}

/// The HELP lines of every metric Keelson records (README, "Observing Keelson").
fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!(
        "keelson_build_info",
        "Always 1; the version label is this build's"
    );
    describe_gauge!(
        "keelson_broker_connected",
        "1 while the AMQP transport holds a connection to a broker, else 0"
    );
    describe_counter!(
        "keelson_broker_reconnections_total",
        "Connections to a broker made after the first one"
    );
    keelson_ui_gateway::describe_metrics();
    keelson_logic_server::describe_metrics();
}
