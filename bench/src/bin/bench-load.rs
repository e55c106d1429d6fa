//! `bench-load`: the load generator the harness starts for each configuration.
//!
//! Prints `start N`, `end N` and `result N {json}` lines on standard output (see
//! `keelson_bench::loadgen`). Worker threads: `TOKIO_WORKER_THREADS`, like every
//! process of the benchmark.

use anyhow::Context as _;
use bytes::Bytes;
use clap::{Args, Parser, Subcommand};
use keelson_bench::loadgen::{Out, Target, Timing, http, keelson, lapin_rpc, run_phases};
use keelson_bench::phase::Phase;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Keelson benchmark load generator.
#[derive(Debug, Parser)]
#[command(about)]
struct Cli {
    #[command(subcommand)]
    target: TargetArgs,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Subcommand)]
enum TargetArgs {
    /// POST the payload to an HTTP URL and expect it back.
    Http {
        /// e.g. http://127.0.0.1:8080/api/echo
        #[arg(long)]
        url: String,
    },
    /// Raw lapin RPC with direct reply-to.
    Lapin {
        /// Broker URL.
        #[arg(long)]
        amqp_url: String,
        /// Exchange to publish to.
        #[arg(long)]
        exchange: String,
        /// Routing key.
        #[arg(long)]
        routing_key: String,
        /// Diagnostics: await a publisher confirm for every request.
        #[arg(long)]
        confirm: bool,
        /// Diagnostics: publish `mandatory`.
        #[arg(long)]
        mandatory: bool,
        /// Diagnostics: per-message TTL in milliseconds.
        #[arg(long)]
        expiration_ms: Option<u64>,
        /// Diagnostics: set a 36-byte message id.
        #[arg(long)]
        message_id: bool,
    },
    /// Keelson's Rust client API over the AMQP transport.
    Keelson {
        /// Broker URL.
        #[arg(long)]
        amqp_url: String,
        /// The mesh's namespace.
        #[arg(long)]
        namespace: String,
        /// The handler to call.
        #[arg(long, default_value = "echo")]
        handler: String,
    },
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Load")]
struct Common {
    /// Phases to run in order: closed:N or open:RATE:WORKERS, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    phases: Vec<Phase>,
    /// JSON body size in bytes.
    #[arg(long, default_value_t = 128)]
    payload_bytes: usize,
    /// Warm-up before the first phase, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    warmup_ms: u64,
    /// Warm-up before each later phase, in milliseconds.
    #[arg(long, default_value_t = 300)]
    phase_warmup_ms: u64,
    /// Measurement window of each phase, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    measure_ms: u64,
    /// Open loop: how long after the window queued requests may still be sent.
    #[arg(long, default_value_t = 2000)]
    drain_ms: u64,
    /// Timeout of one call, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-load: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // The builder's default worker count honours TOKIO_WORKER_THREADS.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async move {
        let c = &cli.common;
        let body = payload(c.payload_bytes);
        let timeout = Duration::from_millis(c.timeout_ms);
        let timing = Timing {
            warmup: Duration::from_millis(c.warmup_ms),
            phase_warmup: Duration::from_millis(c.phase_warmup_ms),
            measure: Duration::from_millis(c.measure_ms),
            drain: Duration::from_millis(c.drain_ms),
            call_timeout: timeout,
        };
        match &cli.target {
            TargetArgs::Http { url } => {
                let target = http::HttpEcho::new(url, body, timeout).await?;
                go(target, &c.phases, timing).await
            }
            TargetArgs::Lapin {
                amqp_url,
                exchange,
                routing_key,
                confirm,
                mandatory,
                expiration_ms,
                message_id,
            } => {
                let extras = lapin_rpc::Extras {
                    confirm: *confirm,
                    mandatory: *mandatory,
                    expiration_ms: *expiration_ms,
                    message_id: *message_id,
                };
                let target = lapin_rpc::LapinRpc::new(
                    amqp_url,
                    exchange,
                    routing_key,
                    body,
                    timeout,
                    extras,
                )
                .await?;
                go(target, &c.phases, timing).await
            }
            TargetArgs::Keelson {
                amqp_url,
                namespace,
                handler,
            } => {
                let target =
                    keelson::KeelsonCall::new(amqp_url, namespace, handler, body, timeout).await?;
                go(target, &c.phases, timing).await
            }
        }
    })
}

async fn go<T: Target>(target: T, phases: &[Phase], timing: Timing) -> anyhow::Result<()> {
    run_phases(Arc::new(target), phases, timing, &Out).await
}

/// A JSON object of exactly `size` bytes (at least 12): `{"p":"xxxx"}`.
fn payload(size: usize) -> Bytes {
    let filler = size.saturating_sub(8).max(4);
    Bytes::from(format!("{{\"p\":\"{}\"}}", "x".repeat(filler)))
}
