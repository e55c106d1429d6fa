//! Handlers that exist only for Keelson's own tests: they misbehave on purpose.
//!
//! * `test.slow`: waits `{"ms": n}` milliseconds (default 1000), then answers
//!   `{"slept_ms": n}`;
//! * `test.spin`: burns CPU for `{"us": n}` microseconds (default 1000);
//! * `test.panic`: panics;
//! * `test.fail`: returns an internal error;
//! * `test.whoami`: answers `{"user": ...}` with the verified user or `null`;
//! * `test.increment_slowly`: adds 1 to the user's `counter` (the one
//!   `counter.get` reads), then waits `{"ms": n}` milliseconds (default 50) before
//!   answering `{"value": n}`: a write followed by more work, the window in which a
//!   crash must not make the write count twice;
//! * `test.abort`: aborts the whole process (a poison message: a handler that kills
//!   its server, as an out-of-memory kill or a crash in native code would);
//! * `test.quota`: answers its settings' `{"limit": n}` (a `Handler` with settings
//!   and a dotted name, for the environment overrides of handler settings);
//! * `test.relay`: calls `{"handler": NAME, "body": BODY}` and answers its answer;
//! * `test.cycle`: calls itself (a cycle, ended by the deadline);
//! * `test.meta`: answers `{"user", "id", "left_ms"}` of the request;
//! * `test.fragile`: takes the plugin `fragile`, whose set-up fails with
//!   `[logic_server.plugins.fragile] fail = true`;
//! * `test.job`: a job's test work (counts `job:{id}` for the user, waits `{"ms"}`,
//!   fails its first `{"fail_first"}` attempts, answers `{"attempt", "count", "pad"}`);
//! * `test.record`: appends one JSON line per call, `{"node", "handler", "job",
//!   "attempt", "token", "slot", "body", "at_ms"}` (null where it does not apply;
//!   `at_ms`: when it ran, Unix ms), to the file named by its setting `path`, then
//!   answers `{}`: what the schedule tests count (a scheduled job's `token` and
//!   `slot` come from its headers);
//! * singleton `test.singleton`: while it runs, appends `{"event": "start" | "tick"
//!   | "stop", "node", "token", "at_ms"}` lines to the file named by its setting
//!   `path`: a tick every 20 ms, written only while the lease holds, with the time
//!   of that check (so the intervals of two holders can be compared);
//! * `test.next` (feature `next`): exists only in the "next version" build of the
//!   rolling-upgrade test.
//!
//! A default build does not link this crate; the `test-handlers` feature of the
//! `keelson` package does.

use keelson_logic_server::{Handler, HandlerError, RequestCtx, Response, async_trait};
use serde::Deserialize;
use serde_json::json;
use std::time::Duration;

#[derive(Debug, Default, Deserialize)]
struct SlowBody {
    ms: Option<u64>,
}

struct Slow;

#[async_trait]
impl Handler for Slow {
    async fn call(&self, req: RequestCtx) -> Result<Response, HandlerError> {
        let ms = req
            .json::<Option<SlowBody>>()?
            .unwrap_or_default()
            .ms
            .unwrap_or(1000)
            .min(600_000);
        // Tests wait for this line to know the request is in a handler.
        tracing::info!(ms, id = req.id(), "test.slow started");
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Response::json(&json!({ "slept_ms": ms }))
    }
}

#[derive(Debug, Default, Deserialize)]
struct SpinBody {
    us: Option<u64>,
}

/// Burns CPU on the calling worker thread for `{"us": n}` microseconds (default
/// 1000): work that a starved core slows down, unlike a sleep.
struct Spin;

#[async_trait]
impl Handler for Spin {
    async fn call(&self, req: RequestCtx) -> Result<Response, HandlerError> {
        let us = req
            .json::<Option<SpinBody>>()?
            .unwrap_or_default()
            .us
            .unwrap_or(1000)
            .min(1_000_000);
        let cpu_started = std::time::Instant::now();
        let mut x = 0u64;
        while cpu_started.elapsed() < Duration::from_micros(us) {
            for i in 0..1000u64 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
            }
        }
        Response::json(&json!({ "spun_us": us, "x": x & 1 }))
    }
}

struct Panic;

#[async_trait]
impl Handler for Panic {
    async fn call(&self, _req: RequestCtx) -> Result<Response, HandlerError> {
        panic!("test.panic was called")
    }
}

struct Fail;

#[async_trait]
impl Handler for Fail {
    async fn call(&self, _req: RequestCtx) -> Result<Response, HandlerError> {
        Err(HandlerError::internal("test.fail always fails"))
    }
}

struct IncrementSlowly;

#[async_trait]
impl Handler for IncrementSlowly {
    async fn call(&self, req: RequestCtx) -> Result<Response, HandlerError> {
        let ms = req
            .json::<Option<SlowBody>>()?
            .unwrap_or_default()
            .ms
            .unwrap_or(50)
            .min(10_000);
        let value = req.context()?.increment("counter", 1).await?;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Response::json(&json!({ "value": value }))
    }
}

struct Abort;

#[async_trait]
impl Handler for Abort {
    async fn call(&self, req: RequestCtx) -> Result<Response, HandlerError> {
        tracing::error!(id = req.id(), "test.abort: aborting the process");
        std::process::abort()
    }
}

struct WhoAmI;

#[async_trait]
impl Handler for WhoAmI {
    async fn call(&self, req: RequestCtx) -> Result<Response, HandlerError> {
        Response::json(&json!({ "user": req.user() }))
    }
}

keelson_logic_server::register_handler!("test.slow", "sleeps {\"ms\": n} then answers", |_| Ok(
    Slow
));
keelson_logic_server::register_handler!("test.panic", "panics", |_| Ok(Panic));
keelson_logic_server::register_handler!(
    "test.spin",
    "burns CPU for {\"us\": n} microseconds",
    |_| Ok(Spin)
);
keelson_logic_server::register_handler!("test.fail", "fails with an internal error", |_| Ok(Fail));
keelson_logic_server::register_handler!("test.whoami", "answers the verified user", |_| Ok(WhoAmI));
keelson_logic_server::register_handler!("test.abort", "aborts the process", |_| Ok(Abort));
keelson_logic_server::register_handler!(
    "test.increment_slowly",
    "adds 1 to the user's counter, then waits {\"ms\": n}",
    |_| Ok(IncrementSlowly)
);

#[cfg(feature = "next")]
struct Next;

#[cfg(feature = "next")]
#[async_trait]
impl Handler for Next {
    async fn call(&self, _req: RequestCtx) -> Result<Response, HandlerError> {
        Response::json(&json!({ "hosted_by": "next" }))
    }
}

#[cfg(feature = "next")]
keelson_logic_server::register_handler!(
    "test.next",
    "exists only in the next-version build",
    |_| Ok(Next)
);

// Handlers written as functions: handler-to-handler calls and plugin set-up.

/// `{"handler": NAME, "body": BODY}`: what `test.relay` calls.
#[derive(Debug, Deserialize)]
struct Relay {
    handler: String,
    #[serde(default)]
    body: serde_json::Value,
}

/// Calls the handler its body names and answers what it answered.
async fn relay(
    calls: keelson_logic_server::Caller,
    keelson_logic_server::Json(relay): keelson_logic_server::Json<Relay>,
) -> Result<keelson_logic_server::Json<serde_json::Value>, HandlerError> {
    let answer = calls.call(&relay.handler, &relay.body).await?;
    Ok(keelson_logic_server::Json(answer))
}

/// Calls itself: a cycle, which must end at the deadline.
async fn cycle(
    calls: keelson_logic_server::Caller,
) -> Result<keelson_logic_server::Json<serde_json::Value>, HandlerError> {
    calls
        .call("test.cycle", &())
        .await
        .map(keelson_logic_server::Json)
}

/// Answers what the request says about itself: `{"user", "id", "left_ms"}`.
async fn meta(
    user: Option<keelson_logic_server::User>,
    meta: keelson_logic_server::Meta,
) -> keelson_logic_server::Json<serde_json::Value> {
    let left = meta
        .deadline
        .saturating_duration_since(tokio::time::Instant::now());
    keelson_logic_server::Json(json!({
        "user": user.map(|u| u.0),
        "id": meta.id,
        "left_ms": u64::try_from(left.as_millis()).unwrap_or(u64::MAX),
    }))
}

/// A plugin whose set-up fails when its settings say `fail = true`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Fragile {
    fail: bool,
}

impl keelson_logic_server::Plugin for Fragile {
    const NAME: &'static str = "fragile";
    type Settings = Self;
    async fn setup(settings: Self) -> Result<Self, keelson_logic_server::Error> {
        if settings.fail {
            return Err(keelson_logic_server::Error::internal(
                "cannot open the ledger at /nonexistent/ledger.db",
            ));
        }
        Ok(settings)
    }
}

async fn fragile(_plugin: keelson_logic_server::Res<Fragile>) -> keelson_logic_server::Json<bool> {
    keelson_logic_server::Json(true)
}

keelson_logic_server::handler!("test.relay", "calls {\"handler\", \"body\"}", relay);
keelson_logic_server::handler!("test.cycle", "calls itself", cycle);
keelson_logic_server::handler!("test.meta", "answers {user, id, left_ms}", meta);
keelson_logic_server::handler!("test.fragile", "takes the fragile plugin", fragile);

/// Settings of `test.quota`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaSettings {
    limit: u64,
}

struct Quota {
    limit: u64,
}

#[async_trait]
impl Handler for Quota {
    async fn call(&self, _req: RequestCtx) -> Result<Response, HandlerError> {
        Response::json(&json!({ "limit": self.limit }))
    }
}

keelson_logic_server::register_handler!("test.quota", "answers its settings' limit", |settings| {
    let s: QuotaSettings = settings.parse()?;
    Ok(Quota { limit: s.limit })
});

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct JobBody {
    /// Work this long (observing cancellation).
    ms: u64,
    /// Fail the first this many attempts.
    fail_first: u32,
    /// Answer this many bytes of result (a JSON string).
    result_bytes: usize,
    /// Not a job: answer `{"count"}`, the counter of job `read` (its effect).
    read: Option<String>,
}

/// A job's test work (a signed-in user's): adds 1 to the user's counter `job:{id}` (the job's effect,
/// which must count once), reports progress, waits `{"ms"}` (stopping early when
/// cancelled), fails its first `{"fail_first"}` attempts, and answers `{"attempt",
/// "count", "pad"}` (`pad`: `{"result_bytes"}` characters).
async fn job(
    job: Option<keelson_logic_server::JobCtx>,
    cx: keelson_logic_server::Context,
    keelson_logic_server::Json(body): keelson_logic_server::Json<JobBody>,
) -> Result<keelson_logic_server::Json<serde_json::Value>, HandlerError> {
    let Some(job) = job else {
        let Some(id) = body.read else {
            return Err(HandlerError::bad_request(
                "test.job runs as a job, or reads a job's count with {\"read\": id}",
            ));
        };
        let count = cx.counter(&format!("job:{id}")).await?;
        return Ok(keelson_logic_server::Json(json!({ "count": count })));
    };
    let count = cx.increment(&format!("job:{}", job.id()), 1).await?;
    job.progress(0.5, "half way");
    tokio::select! {
        () = tokio::time::sleep(Duration::from_millis(body.ms)) => {}
        () = job.cancelled() => return Err(HandlerError::Conflict("cancelled".to_owned())),
    }
    if job.attempt() <= body.fail_first {
        return Err(HandlerError::Internal(format!(
            "attempt {} fails on purpose",
            job.attempt()
        )));
    }
    Ok(keelson_logic_server::Json(json!({
        "attempt": job.attempt(),
        "count": count,
        "pad": "x".repeat(body.result_bytes),
    })))
}

keelson_logic_server::handler!(
    "test.job",
    "a job's test work: counts job:{id}, waits {\"ms\"}, fails {\"fail_first\"} attempts",
    job
);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordSettings {
    /// The file the lines are appended to.
    path: std::path::PathBuf,
}

/// Appends one line per call (see the crate documentation).
struct Record {
    path: std::path::PathBuf,
}

/// Append `line` and a newline to `path` in one write (`O_APPEND`: lines of
/// concurrent writers, even of several processes, do not interleave).
fn append_line(path: &std::path::Path, line: &serde_json::Value) -> std::io::Result<()> {
    use std::io::Write;
    let mut bytes = serde_json::to_vec(line).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(&bytes)
}

#[async_trait]
impl Handler for Record {
    async fn call(&self, req: RequestCtx) -> Result<Response, HandlerError> {
        let header = |name: &str| req.headers().get(name).cloned();
        let body: serde_json::Value =
            serde_json::from_slice(req.body()).unwrap_or(serde_json::Value::Null);
        let line = json!({
            "node": req.node(),
            "handler": req.handler(),
            "job": req.job().map(|j| j.id().to_owned()),
            "attempt": req.job().map(|j| j.attempt()),
            "token": header(keelson_protocol::schedule::TOKEN_HEADER)
                .and_then(|t| t.parse::<u64>().ok()),
            "slot": header(keelson_protocol::schedule::SLOT_HEADER),
            "body": body,
            "at_ms": unix_ms(),
        });
        append_line(&self.path, &line)
            .map_err(|e| HandlerError::internal(format!("test.record: {e}")))?;
        Response::json(&json!({}))
    }
}

keelson_logic_server::register_handler!(
    "test.record",
    "appends a JSON line per call to the file of its setting path",
    |settings| {
        let s: RecordSettings = settings.parse()?;
        Ok(Record { path: s.path })
    }
);

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The test singleton (see the crate documentation).
async fn singleton(ctx: keelson_logic_server::SingletonCtx) -> Result<(), HandlerError> {
    let s: RecordSettings = ctx.settings()?;
    let line = |event: &str, at_ms: u64| json!({"event": event, "node": ctx.node(), "token": ctx.token(), "at_ms": at_ms});
    let write = |v: serde_json::Value| {
        append_line(&s.path, &v).map_err(|e| HandlerError::internal(format!("test.singleton: {e}")))
    };
    let mut last_valid = unix_ms();
    if !ctx.is_leader() {
        return Ok(());
    }
    write(line("start", last_valid))?;
    loop {
        // The time of the check is what the line says: the holder acted then.
        let at = unix_ms();
        if !ctx.is_leader() {
            break;
        }
        last_valid = at;
        write(line("tick", at))?;
        tokio::select! {
            () = ctx.cancelled() => break,
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    write(line("stop", last_valid))?;
    Ok(())
}

keelson_logic_server::singleton!(
    "test.singleton",
    "appends start, tick and stop lines with its token to the file of its setting path",
    singleton
);
