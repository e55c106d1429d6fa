//! Schedules: the replicated *mark* of each schedule, the last slot a scheduler fired
//! and the lease token it fired it with.
//!
//! The scheduler (a singleton on one logic server) fires each slot of a schedule as
//! a background job whose id is derived from the schedule's name and the slot, and
//! then writes the schedule's [`ScheduleMark`] into the replicated context, like a
//! job record. A scheduler that gains the lease reads the mark to know which slots
//! it missed. Of two marks of one schedule every server keeps the one of higher
//! [`ScheduleMark::rank`] (token, then slot), so a former leader that wakes up late
//! can never move a newer leader's mark back, and a scheduler that sees a mark with
//! a higher token than its own knows it no longer leads.

use crate::envelope::Envelope;
use crate::idempotency::RECORD_KEY_PREFIX;
use crate::version::ProtocolVersion;
use serde::{Deserialize, Serialize};

/// The scope (pseudo user) of the schedule marks: under the job scopes' prefix, so
/// that it is not counted as a user.
pub const SCHEDULES_SCOPE: &str = "\u{0}keelson.jobs/schedules";

/// Headers a scheduled job carries (its handler reads them from its request):
/// the schedule's name.
pub const SCHEDULE_HEADER: &str = "x-keelson-schedule";
/// The slot, RFC 3339 UTC (`2026-03-29T00:30:00Z`).
pub const SLOT_HEADER: &str = "x-keelson-slot";
/// The scheduler's lease token when it fired the slot.
pub const TOKEN_HEADER: &str = "x-keelson-token";

/// The lease of the cluster's scheduler: its holder fires every schedule.
pub const SCHEDULER_LEASE: &str = "scheduler";

/// A slot (Unix seconds) as RFC 3339 UTC to the second, as [`SLOT_HEADER`] and
/// `GET /cluster` write it.
///
/// ```
/// use keelson_protocol::schedule::slot_rfc3339;
/// assert_eq!(slot_rfc3339(1_774_744_200), "2026-03-29T00:30:00Z");
/// assert_eq!(slot_rfc3339(-1), "1969-12-31T23:59:59Z");
/// ```
pub fn slot_rfc3339(slot_s: i64) -> String {
    format!("{}Z", crate::job::date_time(slot_s))
}

/// The record key of the mark of schedule `name`.
///
/// ```
/// assert!(keelson_protocol::schedule::mark_key("nightly").ends_with("s/nightly"));
/// ```
pub fn mark_key(name: &str) -> String {
    format!("{RECORD_KEY_PREFIX}s/{name}")
}

/// Whether a record key holds a schedule mark.
pub fn is_mark_key(key: &str) -> bool {
    key.strip_prefix(RECORD_KEY_PREFIX)
        .is_some_and(|k| k.starts_with("s/"))
}

/// The last slot fired of one schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleMark {
    /// Protocol version of the writer.
    pub v: ProtocolVersion,
    /// The schedule.
    pub name: String,
    /// The slot (Unix seconds, UTC).
    pub slot_s: i64,
    /// The lease token of the scheduler that fired it.
    pub token: u64,
    /// The last slot that ran as a job (Unix seconds): `slot_s`, unless that slot
    /// was skipped because the previous run was unfinished (`overlap = "skip"`).
    #[serde(default)]
    pub run_slot_s: Option<i64>,
    /// The node that fired it.
    pub node: String,
    /// When it was fired (Unix ms).
    pub fired_ms: u64,
    /// Every server forgets the mark after this (Unix ms).
    pub expires_unix_ms: u64,
}

impl Envelope for ScheduleMark {
    const KIND: &'static str = "schedule mark";
    fn version(&self) -> ProtocolVersion {
        self.v
    }
}

impl ScheduleMark {
    /// Of two marks of one schedule, the higher rank wins: a newer leader's, then a
    /// later slot.
    pub fn rank(&self) -> (u64, i64) {
        (self.token, self.slot_s)
    }
}
