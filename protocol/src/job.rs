//! Background jobs: what a gateway asks a logic server about them, what travels on a
//! job queue, and the replicated record of each job.
//!
//! * A gateway sends the job requests ([`SUBMIT_ROUTE`], [`GET_ROUTE`],
//!   [`CANCEL_ROUTE`], and the operator's [`LIST_ROUTE`]) as ordinary
//!   [`Request`](crate::Request)s to the queue of [`JOBS_SERVICE`], which every
//!   logic server consumes. Their bodies and replies are JSON; a reply's body is what
//!   the gateway answers over HTTP, verbatim.
//! * A logic server that accepts a job writes its [`JobRecord`] (replicated to every
//!   server like a context write, before the gateway answers 202) and puts a
//!   [`JobMessage`] on the job queue of the service that hosts the handler (route
//!   [`job_route`]), a durable queue apart from the service's interactive one.
//! * The record's state only moves forward: of two records of one job, every server
//!   keeps the one of higher [`JobRecord::rank`] (then the later write), so a job seen
//!   `running` is never seen `queued` again, and a finished job stays finished.

use crate::envelope::{Envelope, ErrorInfo};
use crate::idempotency::RECORD_KEY_PREFIX;
use crate::version::ProtocolVersion;
use serde::{Deserialize, Serialize};

/// The service (queue) whose consumers answer job requests.
pub const JOBS_SERVICE: &str = "_keelson.jobs";
/// Submit a job: body [`Submit`] (JSON); reply `202` with the job's status and a
/// `Location` header.
pub const SUBMIT_ROUTE: &str = "_keelson.jobs.submit";
/// A job's status: body [`Query`] (JSON); reply the status (`404` when unknown or
/// another user's).
pub const GET_ROUTE: &str = "_keelson.jobs.get";
/// Cancel a job: body [`Query`]; reply the status after the cancellation.
pub const CANCEL_ROUTE: &str = "_keelson.jobs.cancel";
/// Every job a server holds, for an operator (trusted publishers only): body
/// [`ListQuery`]; reply `{"jobs": [status, ...]}`.
pub const LIST_ROUTE: &str = "_keelson.jobs.list";

/// Every route of [`JOBS_SERVICE`].
pub const ROUTES: [&str; 4] = [SUBMIT_ROUTE, GET_ROUTE, CANCEL_ROUTE, LIST_ROUTE];

/// The route a job of `handler` is queued on: the job queue of the service hosting
/// `handler` is bound to it.
///
/// ```
/// assert_eq!(keelson_protocol::job::job_route("report.build"), "_job.report.build");
/// ```
pub fn job_route(handler: &str) -> String {
    format!("_job.{handler}")
}

/// The route of the watches of `handler`'s jobs (see [`JobKind::Watch`]): a queue
/// of their own, so that they are checked even while every server's job slots are
/// full.
///
/// ```
/// assert_eq!(keelson_protocol::job::watch_route("report.build"), "_jobwatch.report.build");
/// ```
pub fn watch_route(handler: &str) -> String {
    format!("_jobwatch.{handler}")
}

/// The name of the watch service (queue) of `service`.
///
/// ```
/// assert_eq!(keelson_protocol::job::watches_service("reports"), "_jobwatches.reports");
/// ```
pub fn watches_service(service: &str) -> String {
    format!("_jobwatches.{service}")
}

/// The name of the job service (queue) of `service`.
///
/// ```
/// assert_eq!(keelson_protocol::job::jobs_service("reports"), "_jobs.reports");
/// ```
pub fn jobs_service(service: &str) -> String {
    format!("_jobs.{service}")
}

/// Job records live in the replicated context under this many shard scopes, so that
/// no one scope (which travels whole in a snapshot chunk) grows with the number of
/// jobs.
pub const RECORD_SHARDS: usize = 256;

/// Every shard scope of job records starts with this (a user id no token can carry).
pub const JOB_SCOPE_PREFIX: &str = "\u{0}keelson.jobs/";

/// The scope (pseudo user) and the record key of job `id`.
///
/// ```
/// let (scope, key) = keelson_protocol::job::record_location("0a1b");
/// assert!(scope.ends_with("/0a"));
/// assert!(key.ends_with("j/0a1b"));
/// ```
pub fn record_location(id: &str) -> (String, String) {
    let shard = id.get(..2).unwrap_or("00");
    (
        format!("{JOB_SCOPE_PREFIX}{shard}"),
        format!("{RECORD_KEY_PREFIX}j/{id}"),
    )
}

/// Whether a record key holds a job record.
pub fn is_job_key(key: &str) -> bool {
    key.strip_prefix(RECORD_KEY_PREFIX)
        .is_some_and(|k| k.starts_with("j/"))
}

/// Whether `id` has the shape of a job id: 32 lowercase hex digits.
pub fn is_job_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Where a job is. Ordered as the state moves: `Queued < Running <` the three
/// terminal states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting on its queue (first attempt, or a retry waiting out its backoff).
    Queued,
    /// A server runs it.
    Running,
    /// The handler answered; `result` holds its reply body.
    Succeeded,
    /// The last attempt failed; `error` says why.
    Failed,
    /// Cancelled by its submitter or an operator.
    Cancelled,
}

impl JobState {
    /// Whether the job is over.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    /// The name in the JSON status and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// Every state, in the order a job moves through them.
    pub const ALL: [Self; 5] = [
        Self::Queued,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
    ];

    /// Parse [`JobState::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// How far a running job says it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Done share, 0.0 to 1.0.
    pub fraction: f64,
    /// What it is doing, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The per-job bounds, fixed at submission (server defaults, lowered or raised by
/// the submitter within the server's maximums).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobOptions {
    /// Runs at most this many times (first run and retries).
    pub max_attempts: u32,
    /// One run is cancelled after this long and counts as a failed attempt.
    pub timeout_ms: u64,
    /// The record is kept this long after the job ended, then gone (404).
    pub result_ttl_s: u64,
    /// A reply body larger than this fails the job (`result_too_large`).
    pub max_result_bytes: u64,
}

/// The replicated record of one job: its status as every gateway shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Protocol version of the writer.
    pub v: ProtocolVersion,
    /// The job id.
    pub id: String,
    /// The handler it runs.
    pub handler: String,
    /// The submitting user; `None` for an anonymous job.
    #[serde(default)]
    pub user: Option<String>,
    /// Where it is.
    pub state: JobState,
    /// The attempt this record is about (1 for the first run).
    pub attempt: u32,
    /// How many attempts ended with their server lost (killed, frozen, drained), not
    /// with a failure: they do not count against `max_attempts`.
    #[serde(default)]
    pub lost: u32,
    /// The bounds it runs under.
    pub options: JobOptions,
    /// When it was accepted (Unix ms).
    pub created_ms: u64,
    /// When its current (or last) attempt started.
    #[serde(default)]
    pub started_ms: Option<u64>,
    /// When it ended.
    #[serde(default)]
    pub finished_ms: Option<u64>,
    /// A queued retry does not start before this (Unix ms).
    #[serde(default)]
    pub not_before_ms: Option<u64>,
    /// The node running it (while running), or that ran it last.
    #[serde(default)]
    pub node: Option<String>,
    /// The last progress the handler reported in this attempt.
    #[serde(default)]
    pub progress: Option<Progress>,
    /// The submitter or an operator asked to cancel it while it ran.
    #[serde(default)]
    pub cancel_requested: bool,
    /// The handler's reply body (JSON), once succeeded.
    #[serde(with = "serde_bytes", default)]
    pub result: Vec<u8>,
    /// Why the last attempt failed (kept while a retry waits), or why it was cancelled.
    #[serde(default)]
    pub error: Option<ErrorInfo>,
    /// A hash of the handler and body, when submitted with an `Idempotency-Key`: the
    /// same key with another request is refused.
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Every server forgets the record after this (Unix ms).
    pub expires_unix_ms: u64,
}

impl Envelope for JobRecord {
    const KIND: &'static str = "job record";
    fn version(&self) -> ProtocolVersion {
        self.v
    }
}

impl JobRecord {
    /// The record of `spec` as accepted: `queued`, first attempt, kept until
    /// `expires_unix_ms` unless it gets further.
    pub fn queued(spec: &JobSpec, expires_unix_ms: u64) -> Self {
        Self {
            v: ProtocolVersion::CURRENT,
            id: spec.id.clone(),
            handler: spec.handler.clone(),
            user: spec.user.clone(),
            state: JobState::Queued,
            attempt: 1,
            lost: 0,
            options: spec.options.clone(),
            created_ms: spec.created_ms,
            started_ms: None,
            finished_ms: None,
            not_before_ms: None,
            node: None,
            progress: None,
            cancel_requested: false,
            result: Vec::new(),
            error: None,
            fingerprint: spec.fingerprint.clone(),
            expires_unix_ms,
        }
    }

    /// How far the job has got: of two records of one job, the higher rank wins (the
    /// later write between equal ranks). A finished job outranks everything, then a
    /// later attempt, then the state within an attempt, then a requested
    /// cancellation.
    pub fn rank(&self) -> (bool, u32, u8, bool) {
        let state = match self.state {
            JobState::Queued => 0,
            JobState::Running => 1,
            _ => 2,
        };
        (
            self.state.is_terminal(),
            self.attempt,
            state,
            self.cancel_requested,
        )
    }

    /// The status as a gateway answers it: `{"id", "handler", "state", "attempts",
    /// "progress", "result" | "error", "created_at", "started_at", "finished_at"}`,
    /// times as RFC 3339 UTC.
    pub fn status_json(&self) -> serde_json::Value {
        let mut status = serde_json::json!({
            "id": self.id,
            "handler": self.handler,
            "state": self.state.as_str(),
            "attempts": self.attempt,
            "progress": self.progress,
            "created_at": rfc3339(self.created_ms),
            "started_at": self.started_ms.map(rfc3339),
            "finished_at": self.finished_ms.map(rfc3339),
        });
        if self.cancel_requested && !self.state.is_terminal() {
            status["cancel_requested"] = true.into();
        }
        if self.state == JobState::Succeeded {
            let result = serde_json::from_slice::<serde_json::Value>(&self.result)
                .unwrap_or(serde_json::Value::Null);
            status["result"] = result;
        } else if let Some(error) = &self.error {
            status["error"] = serde_json::json!({"code": error.code, "message": error.message});
        }
        status
    }
}

/// `ms` since the Unix epoch as RFC 3339 UTC with milliseconds.
pub fn rfc3339(ms: u64) -> String {
    let secs = i64::try_from(ms / 1000).unwrap_or(i64::MAX);
    format!("{}.{:03}Z", date_time(secs), ms % 1000)
}

/// `secs` since the Unix epoch (before it when negative) as the date and time of
/// day in UTC, `2026-03-29T00:30:00`, without a fraction or an offset.
pub(crate) fn date_time(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days.saturating_add(719_468);
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{d:02}T{h:02}:{m:02}:{s:02}")
}

/// What a job queue carries: one attempt to run ([`JobKind::Run`]), or the check
/// that a running attempt's server is still alive ([`JobKind::Watch`]). Both carry
/// the whole job, so that whichever server takes it can run it again even if every
/// server that knew the record is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobMessage {
    /// Protocol version of the writer.
    pub v: ProtocolVersion,
    /// What to do.
    pub kind: JobKind,
    /// The attempt it is about.
    pub attempt: u32,
    /// Attempts before it that ended with their server lost (see [`JobRecord::lost`]).
    #[serde(default)]
    pub lost: u32,
    /// The job.
    pub job: JobSpec,
}

impl JobMessage {
    /// The route it travels on: [`job_route`] for a run, [`watch_route`] for a watch.
    pub fn route(&self) -> String {
        match self.kind {
            JobKind::Run => job_route(&self.job.handler),
            JobKind::Watch { .. } => watch_route(&self.job.handler),
        }
    }
}

impl Envelope for JobMessage {
    const KIND: &'static str = "job message";
    fn version(&self) -> ProtocolVersion {
        self.v
    }
}

/// See [`JobMessage`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Run attempt `attempt`.
    Run,
    /// Attempt `attempt` runs on `node`: if that node is gone, queue the next attempt;
    /// if not, check again later.
    Watch {
        /// The node that runs it.
        node: String,
    },
}

/// A job as submitted: everything needed to run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSpec {
    /// The job id.
    pub id: String,
    /// The handler.
    pub handler: String,
    /// The submitting user; `None` for anonymous.
    #[serde(default)]
    pub user: Option<String>,
    /// The request body (JSON).
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// The bounds.
    pub options: JobOptions,
    /// When it was accepted (Unix ms).
    pub created_ms: u64,
    /// The `Idempotency-Key` fingerprint, if submitted with one.
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Request headers forwarded to the handler (as for a request).
    #[serde(default)]
    pub headers: std::collections::BTreeMap<String, String>,
    /// The W3C `traceparent` of the submission, when traced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// The body of a [`SUBMIT_ROUTE`] request (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Submit {
    /// The handler to run.
    pub handler: String,
    /// Its request body.
    pub body: serde_json::Value,
    /// Lower or raise the server's default, within its maximum.
    #[serde(default)]
    pub max_attempts: Option<u32>,
    /// Lower or raise the server's default, within its maximum.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Lower or raise the server's default, within its maximum.
    #[serde(default)]
    pub result_ttl_s: Option<u64>,
}

/// The body of a [`GET_ROUTE`] or [`CANCEL_ROUTE`] request (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Query {
    /// The job id.
    pub id: String,
    /// Hold the answer until the job is over or this many seconds passed.
    #[serde(default)]
    pub wait_s: Option<u64>,
}

/// The body of a [`LIST_ROUTE`] request (JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only jobs in this state.
    #[serde(default)]
    pub state: Option<JobState>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_709_164_800_123), "2024-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_798_761_599_999), "2026-12-31T23:59:59.999Z");
    }

    #[test]
    fn a_finished_job_outranks_a_later_attempt_running() {
        let mut done = record(JobState::Succeeded, 1);
        let running = record(JobState::Running, 2);
        assert!(done.rank() > running.rank());
        done.state = JobState::Queued;
        assert!(done.rank() < running.rank());
        let mut cancel = record(JobState::Running, 2);
        cancel.cancel_requested = true;
        assert!(cancel.rank() > running.rank());
    }

    fn record(state: JobState, attempt: u32) -> JobRecord {
        let spec = JobSpec {
            id: "00".repeat(16),
            handler: "h".into(),
            user: None,
            body: Vec::new(),
            options: JobOptions {
                max_attempts: 3,
                timeout_ms: 1000,
                result_ttl_s: 60,
                max_result_bytes: 1024,
            },
            created_ms: 0,
            fingerprint: None,
            headers: Default::default(),
            traceparent: None,
        };
        JobRecord {
            state,
            attempt,
            ..JobRecord::queued(&spec, 1)
        }
    }

    #[test]
    fn states_parse_back() {
        for s in ["queued", "running", "succeeded", "failed", "cancelled"] {
            assert_eq!(JobState::parse(s).unwrap().as_str(), s);
        }
        assert!(JobState::parse("done").is_none());
    }
}
