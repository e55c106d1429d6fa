//! The `[logic_server]` section of the configuration.

pub use crate::governor::GovernorConfig;
use serde::Deserialize;
use std::collections::BTreeMap;

/// How a logic server runs.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogicServerConfig {
    /// Name of the service this server belongs to. Servers of one service share a
    /// queue and compete for its requests.
    pub service: String,
    /// Handlers this server hosts, by plugin name. Their names become the routes bound
    /// to the service queue.
    pub handlers: Vec<String>,
    /// Most requests handled at once (also the transport prefetch).
    pub concurrency: u16,
    /// On shutdown, how long in-flight requests may run before they are handed back
    /// to the queue for a peer.
    pub drain_timeout_ms: u64,
    /// How often the server announces itself on the control channel.
    pub heartbeat_interval_ms: u64,
    /// Longest time a request's deadline may lie ahead when it arrives; a request
    /// with a deadline farther away (or already past) is refused with an error reply.
    pub max_deadline_ms: u64,
    /// Most deliveries of one request without an outcome (a server died running it,
    /// or lost its connection) before it is dead-lettered and its requester told so.
    /// A delivery given back unstarted (governor pause, narrower window, drain) does
    /// not count.
    pub max_deliveries: u32,
    /// Idempotency records: how redeliveries and client retries are recognised.
    pub idempotency: IdempotencyConfig,
    /// Bounds on the per-user context.
    pub context: ContextConfig,
    /// The load governor (self-throttling).
    pub governor: GovernorConfig,
    /// Broker users whose requests may carry a `user` (the gateways, and the
    /// operator's `keelson dlq replay`, `keelson call` and `keelson context get`,
    /// which only these may send): a request naming a user from any other
    /// publisher is dead-lettered and refused (403). The broker validates a
    /// request's publisher (AMQP `user_id`). Unset: this server's own broker user
    /// only, which is right when every process shares one broker user (the default
    /// guest set-up). Anonymous requests are taken from any publisher. The memory
    /// transport runs in one process and is always trusted.
    pub trusted_publishers: Option<Vec<String>>,
    /// Also take requests naming a user that carry no publisher the broker vouches
    /// for (no AMQP `user_id`). Only while upgrading from a release whose gateways
    /// and servers did not stamp requests: turn it on for the new servers until the
    /// last old process is gone, then off (anyone who can publish a request could
    /// then act as any user).
    pub trust_unstamped_requests: bool,
    /// Per-handler settings, keyed by handler name; each plugin documents its own.
    pub handler_settings: BTreeMap<String, serde_json::Value>,
    /// Settings of the plugins (their shared resources), keyed by plugin name: set
    /// up at start when an enabled handler takes the plugin.
    pub plugins: BTreeMap<String, serde_json::Value>,
    /// Address of the admin HTTP listener (`host:port`, e.g. `127.0.0.1:9464`;
    /// port 0 picks a free one, printed at start), serving `/metrics`, `/healthz`
    /// and `/readyz`. Unset: no listener.
    pub admin_listen: Option<String>,
    /// Background jobs (`[logic_server.jobs]`).
    pub jobs: JobsConfig,
    /// Cluster-wide schedules (`[[logic_server.schedules]]`): each slot of a cron
    /// pattern runs a handler once as a background job, on one server of the
    /// cluster. None by default.
    pub schedules: Vec<ScheduleConfig>,
    /// Singleton tasks to run (their names, as linked plugins register them with
    /// `singleton!`): each runs on one server of the cluster at a time, among the
    /// servers that list it. None by default.
    pub singletons: Vec<String>,
    /// Per-singleton settings, keyed by singleton name (`SingletonCtx::settings`).
    pub singleton_settings: BTreeMap<String, serde_json::Value>,
}

impl Default for LogicServerConfig {
    fn default() -> Self {
        Self {
            service: "default".to_owned(),
            handlers: Vec::new(),
            concurrency: 64,
            drain_timeout_ms: 10_000,
            heartbeat_interval_ms: 1000,
            max_deadline_ms: 300_000,
            max_deliveries: 5,
            idempotency: IdempotencyConfig::default(),
            context: ContextConfig::default(),
            governor: GovernorConfig::default(),
            trusted_publishers: None,
            trust_unstamped_requests: false,
            handler_settings: BTreeMap::new(),
            plugins: BTreeMap::new(),
            admin_listen: None,
            jobs: JobsConfig::default(),
            schedules: Vec::new(),
            singletons: Vec::new(),
            singleton_settings: BTreeMap::new(),
        }
    }
}

/// Idempotency records (the `[logic_server.idempotency]` section).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct IdempotencyConfig {
    /// How long the outcome of a request sent with an `Idempotency-Key` is kept: a
    /// retry with the same key within this time is answered from it.
    pub ttl_s: u64,
    /// Most client idempotency keys one user holds records of at once; a request
    /// with a new key past it is refused (HTTP 429) until older ones expire.
    pub max_keys_per_user: usize,
    /// The same bound for anonymous requests, which share one scope.
    pub max_anonymous_keys: usize,
    /// How long a redelivered request waits for the effects its earlier delivery may
    /// have replicated before it runs again.
    pub redelivery_barrier_ms: u64,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            ttl_s: 86_400,
            max_keys_per_user: 1000,
            max_anonymous_keys: 100_000,
            redelivery_barrier_ms: 1000,
        }
    }
}

/// Bounds on the per-user context store.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ContextConfig {
    /// Largest context of one user, in bytes (keys and values); a write past it fails
    /// with a clear error (HTTP 413).
    pub max_bytes_per_user: usize,
    /// Most users with a context at once.
    pub max_users: usize,
    /// A context untouched for this long is dropped (by every server).
    pub idle_ttl_s: u64,
    /// How long a deletion is remembered. A write delayed longer than this could
    /// bring a deleted value back; it must exceed any plausible delivery delay.
    pub tombstone_ttl_s: u64,
    /// How long a starting server waits for a peer to answer its snapshot request
    /// before it concludes it is alone and starts empty.
    pub join_timeout_ms: u64,
    /// Users per snapshot chunk sent to a joining server.
    pub snapshot_chunk_users: u32,
    /// Every this many seconds (give or take a fifth), a running server pulls a peer's
    /// state as a joining one does and merges it, so a write it missed (its
    /// connection was down when the write was broadcast) is not missed for good.
    /// Costs a full snapshot transfer each time; 0 turns it off.
    pub resync_interval_s: u64,
}

impl Default for ContextConfig {
    fn default() -> Self {
        Self {
            max_bytes_per_user: 64 * 1024,
            max_users: 1_000_000,
            idle_ttl_s: 24 * 3600,
            tombstone_ttl_s: 3600,
            join_timeout_ms: 2000,
            snapshot_chunk_users: 2000,
            resync_interval_s: 60,
        }
    }
}

/// Background jobs (the `[logic_server.jobs]` section): how many this server runs at
/// once, and the defaults and bounds of each job. A submitter may choose
/// `max_attempts`, `timeout_ms` and `result_ttl_s` per job, up to the `max_` bounds.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Jobs this server runs at once, apart from its `concurrency` for requests (so
    /// neither starves the other). 0: this server runs no jobs (it still accepts
    /// them and answers their status).
    pub concurrency: u16,
    /// Runs of a failing job, the first included.
    pub max_attempts: u32,
    /// The most a submitter may ask for.
    pub max_attempts_limit: u32,
    /// One run is cancelled after this long and counts as a failed attempt.
    pub timeout_ms: u64,
    /// The most a submitter may ask for.
    pub timeout_ms_limit: u64,
    /// A finished job's record (and result) is kept this long, then gone (404).
    pub result_ttl_s: u64,
    /// The most a submitter may ask for.
    pub result_ttl_s_limit: u64,
    /// A result (the handler's reply body) larger than this fails the job.
    pub max_result_bytes: u64,
    /// The first retry waits this long; each next one twice as long (with jitter of
    /// up to a quarter either way), up to `backoff_max_ms`.
    pub backoff_base_ms: u64,
    /// The longest wait before a retry.
    pub backoff_max_ms: u64,
    /// How often the cluster checks that the server running a job is alive; a job
    /// whose server is gone (no heartbeat for three intervals) runs again elsewhere
    /// within about this long.
    pub lease_check_ms: u64,
    /// Attempts lost with their server (killed, frozen) on top of `max_attempts`
    /// before the job fails (a job that kills every server it runs on).
    pub max_lost_attempts: u32,
    /// The longest `?wait=` a status request may hold (its delivery is acknowledged
    /// when it is taken, so no broker `consumer_timeout` applies).
    pub max_wait_s: u64,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            concurrency: 8,
            max_attempts: 3,
            max_attempts_limit: 25,
            timeout_ms: 30 * 60 * 1000,
            timeout_ms_limit: 7 * 24 * 3600 * 1000,
            result_ttl_s: 24 * 3600,
            result_ttl_s_limit: 30 * 24 * 3600,
            max_result_bytes: 1024 * 1024,
            backoff_base_ms: 1000,
            backoff_max_ms: 10 * 60 * 1000,
            lease_check_ms: 5000,
            max_lost_attempts: 5,
            max_wait_s: 60,
        }
    }
}

/// One cluster-wide schedule (a `[[logic_server.schedules]]` table): each *slot* of
/// `cron` (an instant the pattern matches, local time in `timezone`) runs `handler`
/// with `body` as a background job, once for the cluster. Checked by
/// [`ScheduleConfig::build`] into a [`Schedule`](crate::schedules::plan::Schedule).
///
/// ```toml
/// [[logic_server.schedules]]
/// name = "nightly-report"
/// cron = "0 30 2 * * *"          # sec min hour day-of-month month day-of-week
/// timezone = "Europe/Berlin"
/// handler = "report.build"
/// body = { scope = "all" }
/// ```
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    /// Unique name, 1 to 64 of `a-z 0-9 _ -`: part of each slot's job id and of the
    /// metrics' labels, so renaming a schedule makes its slots new ones.
    pub name: String,
    /// Cron pattern with a seconds field, six fields `sec min hour dom month dow`:
    /// `"* * * * * *"` every second, `"0 */5 * * * *"` every five minutes,
    /// `"0 30 2 * * *"` daily at 02:30 in `timezone`. Also `L`, `W`, `#`, names
    /// (`MON`, `JAN`) and `@daily`-style nicknames; no year field.
    pub cron: String,
    /// IANA time zone the pattern's fields are read in (`Europe/Berlin`), default
    /// `UTC`. Across a daylight-saving change, a pattern with one fixed second,
    /// minute and hour runs once a day (at the end of a skipped hour; at the first
    /// pass of a repeated one); others run at each wall-clock time that happens.
    #[serde(default = "ScheduleConfig::default_timezone")]
    pub timezone: String,
    /// The handler each slot runs (enabled on the servers that run jobs).
    pub handler: String,
    /// The request body the handler gets, a table (`{ scope = "all" }`) or any
    /// other TOML value; default `{}`.
    #[serde(default = "ScheduleConfig::default_body")]
    pub body: serde_json::Value,
    /// What to do with slots missed while no scheduler ran (all servers down, a
    /// failover): `fire_all` (the default) runs each one no older than
    /// `catch_up_window_s`, `fire_once` only the newest of them, `skip` none. The
    /// slot due now always runs.
    #[serde(default)]
    pub misfire: Misfire,
    /// Missed slots older than this many seconds are not caught up (they count as
    /// skipped), whatever `misfire` says.
    #[serde(default = "ScheduleConfig::default_catch_up_window_s")]
    pub catch_up_window_s: u64,
    /// Whether a slot runs while the job of an earlier slot of this schedule is
    /// still running: `skip` (the default) skips it, `allow` runs both.
    #[serde(default)]
    pub overlap: Overlap,
}

impl ScheduleConfig {
    /// The default of `timezone`.
    pub const DEFAULT_TIMEZONE: &str = "UTC";
    /// The default of `catch_up_window_s`.
    pub const DEFAULT_CATCH_UP_WINDOW_S: u64 = 300;

    fn default_timezone() -> String {
        Self::DEFAULT_TIMEZONE.to_owned()
    }

    fn default_body() -> serde_json::Value {
        serde_json::Value::Object(serde_json::Map::new())
    }

    fn default_catch_up_window_s() -> u64 {
        Self::DEFAULT_CATCH_UP_WINDOW_S
    }
}

/// What a schedule does with the slots it missed (`misfire`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
// Read from a string so that a bad one is refused saying what was expected (the
// `config` crate's own enum errors do not).
#[serde(try_from = "String")]
pub enum Misfire {
    /// Run none of them.
    Skip,
    /// Run the newest of them (within the catch-up window).
    FireOnce,
    /// Run each of them within the catch-up window, oldest first.
    #[default]
    FireAll,
}

/// Whether a slot runs while an earlier slot's job of the same schedule runs
/// (`overlap`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(try_from = "String")]
pub enum Overlap {
    /// Skip the slot.
    #[default]
    Skip,
    /// Run it anyway.
    Allow,
}

impl TryFrom<String> for Misfire {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        match value.as_str() {
            "skip" => Ok(Self::Skip),
            "fire_once" => Ok(Self::FireOnce),
            "fire_all" => Ok(Self::FireAll),
            _ => Err(format!(
                "`{value}` is not a misfire policy: expected one of `skip`, `fire_once`, `fire_all`"
            )),
        }
    }
}

impl TryFrom<String> for Overlap {
    type Error = String;

    fn try_from(value: String) -> Result<Self, String> {
        match value.as_str() {
            "skip" => Ok(Self::Skip),
            "allow" => Ok(Self::Allow),
            _ => Err(format!(
                "`{value}` is not an overlap policy: expected `skip` or `allow`"
            )),
        }
    }
}
