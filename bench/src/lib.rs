//! Keelson's benchmark harness: Keelson measured against the physical limits of its
//! own stack (raw axum for HTTP, raw lapin RPC for the broker path) in the same run,
//! and reported as ratios, because absolute figures on a shared two-core machine drift
//! two- or threefold between runs.
//!
//! The pieces:
//! * [`scenario`]: one module per configuration (A to E); a scenario starts its system
//!   under test as separate processes and says how the load generator reaches it;
//! * [`loadgen`]: the load generator (`bench-load`, a process of its own so that its
//!   CPU time is measured apart): closed and open loops, HDR histograms;
//! * [`procs`]: child processes (start, wait for readiness, stop) and their CPU time
//!   and resident size from `/proc`;
//! * [`broker`]: reaching RabbitMQ, finding its process, deleting what a run declared;
//! * [`harness`]: interleaved rounds, CPU sampling around each measured phase;
//! * [`report`]: ratios, medians, the table on standard output and the JSON file.

pub mod broker;
pub mod harness;
pub mod loadgen;
pub mod phase;
pub mod procs;
pub mod report;
pub mod scenario;
