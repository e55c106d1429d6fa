//! The load generator: the process (`bench-load`) that sends the requests.
//!
//! It runs a list of [`Phase`]s against one [`Target`] and talks to the harness on
//! standard output, one line per event, so that the harness can read every
//! process's CPU time exactly around each measurement window:
//!
//! ```text
//! start 0                 <- measurement window of phase 0 opens (after its warm-up)
//! end 0                   <- window closes
//! result 0 {json}         <- the PhaseResult
//! ```
//!
//! A worker is a task with a connection of its own (HTTP: its own keep-alive TCP
//! connection; AMQP: a handle on the process's one connection, as a real client
//! would share it). Latencies go to one HDR histogram per worker, merged at the end.

pub mod http;
pub mod keelson;
pub mod lapin_rpc;
mod recorder;
mod run;

pub use run::{Out, Timing, run_phases};

use std::future::Future;

/// Something the load generator can call.
pub trait Target: Send + Sync + 'static {
    /// A worker's connection (or handle on a shared one).
    type Conn: Send + 'static;

    /// Open one worker's connection.
    fn connect(&self) -> impl Future<Output = anyhow::Result<Self::Conn>> + Send;

    /// One request and its answer: `Ok` only when the answer is the expected one
    /// (status 200 / `Ok` and the echoed body). Must give up by itself after the
    /// target's timeout.
    fn call(&self, conn: &mut Self::Conn) -> impl Future<Output = Result<(), String>> + Send;
}
