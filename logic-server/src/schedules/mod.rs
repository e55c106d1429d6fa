//! Cluster-wide schedules (`[[logic_server.schedules]]`): one server of the cluster
//! fires each *slot* of a cron pattern as a background job whose id is derived from
//! the slot, so that no slot runs twice whichever server fires it, or how often.
//!
//! [`plan`] is the pure part: the checked configuration ([`plan::Schedule`]), which
//! slots are due given the last one fired, and the slots' keys and job ids.

pub mod plan;
pub(crate) mod scheduler;
