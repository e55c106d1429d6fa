//! The test kit: run handlers in a unit test, without a broker.
//!
//! Both tools run the real logic server (dispatch, extractors, context replication,
//! outcome records, plugin set-up and shutdown) over the in-memory transport, which
//! has the semantics of the AMQP one; only HTTP is left out, and
//! [`TestReply::status`] says which HTTP status the gateway would answer.
//!
//! * [`TestRequest`]: one request to one handler, with a user, a body, context
//!   contents, settings and plugin resources given by the test;
//! * [`TestCluster`]: N logic servers and a client in one process, for testing how
//!   a plugin behaves when its state is replicated and servers stop;
//! * [`TestRequest::as_job`] and [`TestRequest::start`]: the handler run as a
//!   background job, with a [`JobCtx`] whose progress reports the test reads back
//!   ([`TestJob`]) and which the test can cancel.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use keelson_logic_server::testkit::TestRequest;
//! # async fn add(cx: keelson_logic_server::Context) -> Result<keelson_logic_server::Json<i64>, keelson_logic_server::Error> {
//! #     Ok(keelson_logic_server::Json(cx.increment("n", 1).await?))
//! # }
//! # keelson_logic_server::handler!("doc.testkit.add", "adds one", add);
//! let reply = TestRequest::new("doc.testkit.add")
//!     .user("ada")
//!     .counter("n", 41)
//!     .send()
//!     .await;
//! assert_eq!(reply.status(), 200);
//! assert_eq!(reply.json::<i64>(), 42);
//! assert_eq!(reply.counter("n").await, 42);
//! # }
//! ```
//!
//! A handler that runs as a job: its progress reports, and how it stops when
//! cancelled.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! use keelson_logic_server::testkit::{JobState, TestRequest};
//! use keelson_logic_server::{Error, JobCtx, Json};
//!
//! async fn count(job: Option<JobCtx>, Json(n): Json<u32>) -> Result<Json<u32>, Error> {
//!     let Some(job) = job else { return Ok(Json(n)) };
//!     for i in 1..=n {
//!         if job.is_cancelled() {
//!             return Ok(Json(i - 1));
//!         }
//!         job.progress(f64::from(i) / f64::from(n), format!("{i} of {n}"));
//!         tokio::time::sleep(std::time::Duration::from_millis(10)).await;
//!     }
//!     Ok(Json(n))
//! }
//! keelson_logic_server::handler!("doc.testkit.count", "counts to n, slowly", count);
//!
//! // To its end: every report the job server would have seen, in order.
//! let reply = TestRequest::new("doc.testkit.count").json(&5).as_job().send().await;
//! assert_eq!(reply.job_state(), Some(JobState::Succeeded));
//! let last = reply.progress_reports().last().unwrap();
//! assert_eq!((last.fraction, last.message.as_deref()), (1.0, Some("5 of 5")));
//!
//! // Cancelled half way: the job ends `cancelled`, whatever the handler answers.
//! let mut job = TestRequest::new("doc.testkit.count").json(&1000).start().await;
//! job.progress_reached(0.01).await;
//! job.cancel();
//! let reply = job.reply().await;
//! assert_eq!(reply.job_state(), Some(JobState::Cancelled));
//! assert!(reply.json::<u32>() < 1000);
//! # }
//! ```
//!
//! The helpers panic with a message saying what went wrong, as test code does.

use crate::config::{ContextConfig, LogicServerConfig};
use crate::context::{ContextStore, Effects, ReplicatedContextStore};
use crate::job_ctx::JobCtx;
use crate::plugin::Registry;
use crate::resource::{Plugin, Resources};
use crate::server::{LogicServer, RunningServer};
use bytes::Bytes;
use keelson_protocol::client::Client;
use keelson_protocol::transport::memory::MemoryTransport;
use keelson_protocol::{Reply, ReplyStatus, Request, Transport};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::time::Instant;

pub use keelson_protocol::job::{JobState, Progress};

/// The service the test kit's servers consume.
const SERVICE: &str = "keelson-testkit";

/// How long a test request may take unless the test says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the handlers of a test run with: which ones, their settings and plugins.
#[derive(Debug, Default)]
struct Setup {
    handlers: Vec<String>,
    handler_settings: BTreeMap<String, serde_json::Value>,
    plugin_settings: BTreeMap<String, serde_json::Value>,
    resources: Option<Resources>,
}

impl Setup {
    async fn registry(&mut self) -> Registry {
        let registry = Registry::build_with(
            &self.handlers,
            &self.handler_settings,
            &self.plugin_settings,
            self.resources.take().unwrap_or_default(),
        )
        .await;
        registry.unwrap_or_else(|e| panic!("the test's handlers cannot be set up: {e}"))
    }
}

fn to_json<T: Serialize + ?Sized>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or_else(|e| panic!("cannot serialize to JSON: {e}"))
}

async fn start_server(
    transport: &MemoryTransport,
    node: &str,
    registry: Registry,
) -> (RunningServer, Arc<ReplicatedContextStore>) {
    let transport: Arc<dyn Transport> = Arc::new(transport.clone());
    let store = ReplicatedContextStore::start(transport.clone(), node, ContextConfig::default())
        .await
        .unwrap_or_else(|e| panic!("the context store of {node} does not start: {e}"));
    let config = LogicServerConfig {
        service: SERVICE.to_owned(),
        concurrency: 16,
        drain_timeout_ms: 5_000,
        ..LogicServerConfig::default()
    };
    let server = LogicServer::new(config, node, transport, registry, store.clone())
        .start()
        .await
        .unwrap_or_else(|e| panic!("the logic server {node} does not start: {e}"));
    (server, store)
}

fn unix_ms_after(timeout: Duration) -> u64 {
    SystemTime::now()
        .checked_add(timeout)
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(u64::MAX, |d| {
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
        })
}

static REQUEST_IDS: AtomicU64 = AtomicU64::new(1);

/// A request as the gateway would send it.
fn request(handler: &str, user: Option<&str>, body: Vec<u8>, timeout: Duration) -> Request {
    let id = format!("test-{}", REQUEST_IDS.fetch_add(1, Ordering::Relaxed));
    let mut request = Request::new(id, handler, body, unix_ms_after(timeout));
    request.user = user.map(str::to_owned);
    request
}

async fn send(client: &Client, request: &Request, timeout: Duration) -> Reply {
    client
        .send(request, Instant::now() + timeout)
        .await
        .unwrap_or_else(|e| panic!("`{}` was not answered: {e}", request.handler))
}

/// `user`'s value under `key` in `store`, read as `T`.
async fn read_value<T: DeserializeOwned>(
    store: &dyn ContextStore,
    user: &str,
    key: &str,
) -> Option<T> {
    let bytes = store
        .get(user, key)
        .await
        .unwrap_or_else(|e| panic!("cannot read `{key}`: {e}"))?;
    Some(
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("`{key}` is not the expected type: {e}")),
    )
}

/// `user`'s counter `key` in `store`.
async fn read_counter(store: &dyn ContextStore, user: &str, key: &str) -> i64 {
    store
        .counter(user, key)
        .await
        .unwrap_or_else(|e| panic!("cannot read the counter `{key}`: {e}"))
}

/// One request to one handler, run on a logic server of its own.
#[derive(Debug)]
pub struct TestRequest {
    handler: String,
    user: Option<String>,
    body: Vec<u8>,
    idempotency_key: Option<String>,
    headers: BTreeMap<String, String>,
    timeout: Duration,
    values: Vec<(String, Bytes)>,
    counters: Vec<(String, i64)>,
    setup: Setup,
    /// Run as a job: (attempt, max_attempts).
    job: Option<(u32, u32)>,
}

impl TestRequest {
    /// A request to the handler registered as `handler`, anonymous, without a body
    /// (what the gateway sends for an empty HTTP body: `null`).
    pub fn new(handler: &str) -> Self {
        Self {
            handler: handler.to_owned(),
            user: None,
            body: b"null".to_vec(),
            idempotency_key: None,
            headers: BTreeMap::new(),
            timeout: DEFAULT_TIMEOUT,
            values: Vec::new(),
            counters: Vec::new(),
            setup: Setup {
                handlers: vec![handler.to_owned()],
                ..Setup::default()
            },
            job: None,
        }
    }

    /// Sent on behalf of the verified user `user`.
    pub fn user(mut self, user: &str) -> Self {
        self.user = Some(user.to_owned());
        self
    }

    /// `body` as the JSON body.
    pub fn json<T: Serialize + ?Sized>(mut self, body: &T) -> Self {
        self.body = to_json(body).to_string().into_bytes();
        self
    }

    /// These bytes as the body, as they reach the handler (the gateway only lets
    /// JSON through, and sends `null` for an empty HTTP body).
    pub fn raw_body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// The client's `Idempotency-Key`.
    pub fn idempotency_key(mut self, key: &str) -> Self {
        self.idempotency_key = Some(key.to_owned());
        self
    }

    /// A propagated header (e.g. `traceparent`).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.insert(name.to_owned(), value.to_owned());
        self
    }

    /// How long the handler may take (10 s unless set).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The user's context holds `value` under `key` before the request.
    pub fn context_value<T: Serialize + ?Sized>(mut self, key: &str, value: &T) -> Self {
        let bytes = to_json(value).to_string().into_bytes();
        self.values.push((key.to_owned(), bytes.into()));
        self
    }

    /// The user's counter `key` stands at `value` before the request.
    pub fn counter(mut self, key: &str, value: i64) -> Self {
        self.counters.push((key.to_owned(), value));
        self
    }

    /// The handler's settings, as `[logic_server.handler_settings."<handler>"]`.
    pub fn settings<T: Serialize + ?Sized>(mut self, settings: &T) -> Self {
        self.setup
            .handler_settings
            .insert(self.handler.clone(), to_json(settings));
        self
    }

    /// Plugin `plugin`'s settings, as `[logic_server.plugins.<plugin>]`.
    pub fn plugin_settings<T: Serialize + ?Sized>(mut self, plugin: &str, settings: &T) -> Self {
        self.setup
            .plugin_settings
            .insert(plugin.to_owned(), to_json(settings));
        self
    }

    /// Use `plugin` as built by the test instead of setting it up from settings.
    pub fn resource<P: Plugin>(mut self, plugin: P) -> Self {
        self.setup
            .resources
            .get_or_insert_with(Resources::default)
            .insert(plugin);
        self
    }

    /// Also enable the handler `handler` (one this handler calls).
    pub fn with_handler(mut self, handler: &str) -> Self {
        self.setup.handlers.push(handler.to_owned());
        self
    }

    /// Run the handler as a background job (as `POST /api/{handler}` with `Prefer:
    /// respond-async` would): it gets a [`JobCtx`] (first and only attempt unless
    /// [`TestRequest::job_attempt`] says otherwise), its context writes are kept
    /// until it ends and applied only if it succeeds, as on a job server, and the
    /// reply tells its progress reports ([`TestReply::progress_reports`]) and the
    /// state the job ends in ([`TestReply::job_state`]). To watch it while it runs
    /// or cancel it, use [`TestRequest::start`] instead of `send`.
    pub fn as_job(mut self) -> Self {
        self.job.get_or_insert((1, 1));
        self
    }

    /// Run as attempt `attempt` of at most `max_attempts` of a job (a retry, when
    /// `attempt` > 1).
    pub fn job_attempt(mut self, attempt: u32, max_attempts: u32) -> Self {
        self.job = Some((attempt.max(1), max_attempts.max(attempt).max(1)));
        self
    }

    /// Start the request as a background job (see [`TestRequest::as_job`]) and
    /// return while it runs: the [`TestJob`] reads its progress, cancels it, and
    /// waits for its reply.
    pub async fn start(self) -> TestJob {
        let mut this = self.as_job();
        let (attempt, max_attempts) = this.job.unwrap_or((1, 1));
        let (_, server, store) = this.server().await;
        let id = format!("{:032x}", REQUEST_IDS.fetch_add(1, Ordering::Relaxed));
        let mut request = this.request();
        request.id = id.clone();
        request.attempt = attempt;
        let (ctx, progress) = JobCtx::new(&id, attempt, max_attempts);
        let reports = Arc::new(Mutex::new(Vec::new()));
        let run = JobRun {
            server,
            store,
            user: this.user.take(),
            request,
            deadline: Instant::now() + this.timeout,
            ctx: ctx.clone(),
            progress: progress.clone(),
            reports: reports.clone(),
        };
        TestJob {
            id,
            ctx,
            progress,
            timeout: this.timeout,
            task: tokio::spawn(run.run()),
        }
    }

    /// A server of its own, with the context the test gave.
    async fn server(&mut self) -> (MemoryTransport, RunningServer, Arc<ReplicatedContextStore>) {
        let transport = MemoryTransport::new();
        let registry = self.setup.registry().await;
        let (server, store) = start_server(&transport, "test", registry).await;
        if let Some(user) = &self.user {
            for (key, value) in self.values.drain(..) {
                if let Err(e) = store.set(user, &key, value).await {
                    panic!("cannot put `{key}` in the context: {e}");
                }
            }
            for (key, value) in self.counters.drain(..) {
                if let Err(e) = store.increment(user, &key, value).await {
                    panic!("cannot set the counter `{key}`: {e}");
                }
            }
        } else if !self.values.is_empty() || !self.counters.is_empty() {
            panic!("context contents need a user: call .user(...) too");
        }
        (transport, server, store)
    }

    /// The request as the gateway would send it.
    fn request(&mut self) -> Request {
        let mut request = request(
            &self.handler,
            self.user.as_deref(),
            std::mem::take(&mut self.body),
            self.timeout,
        );
        request.idempotency_key = self.idempotency_key.take();
        request.headers = std::mem::take(&mut self.headers);
        request
    }

    /// Run the request and return the reply. The server is drained and its plugins
    /// shut down before this returns.
    pub async fn send(mut self) -> TestReply {
        if self.job.is_some() {
            return self.start().await.reply().await;
        }
        let (transport, server, store) = self.server().await;
        let request = self.request();
        let client = Client::new(Arc::new(transport));
        let reply = send(&client, &request, self.timeout + Duration::from_secs(1)).await;
        server.shutdown().await;
        TestReply {
            reply,
            store: store as Arc<dyn ContextStore>,
            user: self.user,
            job: None,
        }
    }
}

/// A handler started as a job by [`TestRequest::start`], still running or over.
#[derive(Debug)]
pub struct TestJob {
    id: String,
    ctx: JobCtx,
    progress: watch::Receiver<Option<Progress>>,
    timeout: Duration,
    task: tokio::task::JoinHandle<TestReply>,
}

impl TestJob {
    /// The job's id, as its handler sees it ([`JobCtx::id`]).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The handler's latest progress report, if it made one.
    pub fn progress(&self) -> Option<Progress> {
        self.progress.borrow().clone()
    }

    /// Wait until the handler reports progress of at least `fraction`; that report.
    /// Panics if none comes within the request's timeout (10 s unless set).
    pub async fn progress_reached(&mut self, fraction: f64) -> Progress {
        let wait = self
            .progress
            .wait_for(|p| p.as_ref().is_some_and(|p| p.fraction >= fraction));
        let found = match tokio::time::timeout(self.timeout, wait).await {
            Ok(Ok(report)) => report.clone(),
            _ => None,
        };
        found.unwrap_or_else(|| {
            panic!(
                "the job reported no progress of {fraction} or more within {:?} (last: {:?})",
                self.timeout,
                self.progress()
            )
        })
    }

    /// Cancel the job, as `DELETE /jobs/{id}` does once it reaches the server.
    pub fn cancel(&self) {
        self.ctx.cancel();
    }

    /// Whether the handler returned.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Wait for the handler's reply. The server is drained and its plugins shut
    /// down before this returns.
    pub async fn reply(self) -> TestReply {
        self.task
            .await
            .unwrap_or_else(|e| panic!("the test job's task failed: {e}"))
    }
}

/// A job's run on the test kit's server: as the job server runs one, without the
/// queue and the record.
struct JobRun {
    server: RunningServer,
    store: Arc<ReplicatedContextStore>,
    user: Option<String>,
    request: Request,
    deadline: Instant,
    ctx: JobCtx,
    progress: watch::Receiver<Option<Progress>>,
    reports: Arc<Mutex<Vec<Progress>>>,
}

impl JobRun {
    async fn run(mut self) -> TestReply {
        let dispatcher = self.server.dispatcher().clone();
        let handler = dispatcher.registry.get(&self.request.handler).cloned();
        // Deferred: the writes stand only if the job succeeds.
        let effects = Arc::new(Effects::deferred());
        let call = dispatcher.run(
            handler,
            self.request,
            self.deadline,
            effects.clone(),
            Some(self.ctx.clone()),
        );
        tokio::pin!(call);
        let record = |progress: &mut watch::Receiver<Option<Progress>>| {
            if let Some(report) = progress.borrow_and_update().clone() {
                self.reports
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(report);
            }
        };
        let reply = loop {
            tokio::select! {
                reply = &mut call => {
                    if self.progress.has_changed().unwrap_or(false) {
                        record(&mut self.progress);
                    }
                    break reply;
                }
                Ok(()) = self.progress.changed() => record(&mut self.progress),
            }
        };
        let state = job_state(&reply, &self.ctx);
        if state == JobState::Succeeded {
            let commit = self
                .store
                .commit(&effects, None, Instant::now() + DEFAULT_TIMEOUT)
                .await;
            if let Err(e) = commit {
                panic!("the job's context writes were not applied: {e}");
            }
        }
        self.server.shutdown().await;
        let reports = std::mem::take(&mut *self.reports.lock().unwrap_or_else(|p| p.into_inner()));
        TestReply {
            reply,
            store: self.store as Arc<dyn ContextStore>,
            user: self.user,
            job: Some(JobOutcome { state, reports }),
        }
    }
}

/// How a job server would conclude a run that answered `reply`: cancelled whatever
/// it answered once cancelled; a failure is retried while attempts remain.
fn job_state(reply: &Reply, ctx: &JobCtx) -> JobState {
    if ctx.is_cancelled() {
        JobState::Cancelled
    } else if reply.status == ReplyStatus::Ok {
        JobState::Succeeded
    } else if ctx.attempt() < ctx.max_attempts() {
        JobState::Queued
    } else {
        JobState::Failed
    }
}

/// What a run as a job adds to its reply.
#[derive(Debug)]
struct JobOutcome {
    state: JobState,
    reports: Vec<Progress>,
}

/// A handler's reply, as a test sees it.
#[derive(Debug)]
pub struct TestReply {
    reply: Reply,
    store: Arc<dyn ContextStore>,
    user: Option<String>,
    job: Option<JobOutcome>,
}

impl TestReply {
    /// For a request run as a job: the state the job ends in, as the job server
    /// would record it (`Succeeded`, `Failed`, `Cancelled` if it was cancelled,
    /// whatever the handler answered, or `Queued` for a failure that a later
    /// attempt retries). `None` for a plain request.
    pub fn job_state(&self) -> Option<JobState> {
        self.job.as_ref().map(|j| j.state)
    }

    /// For a request run as a job: its progress reports, in order. The latest one
    /// at each moment, as the job server sees them: reports made in a burst,
    /// without the handler yielding in between, arrive as the last of them.
    pub fn progress_reports(&self) -> &[Progress] {
        self.job.as_ref().map_or(&[], |j| &j.reports)
    }

    /// The HTTP status the gateway would answer with.
    pub fn status(&self) -> u16 {
        match self.reply.status {
            ReplyStatus::Ok => self.reply.http_status.unwrap_or(200),
            status => status.http_status(),
        }
    }

    /// The body read as `T`; panics when the request failed or the body is not a `T`.
    #[track_caller]
    pub fn json<T: DeserializeOwned>(&self) -> T {
        if self.reply.status != ReplyStatus::Ok {
            panic!(
                "the request failed with {} ({:?}): {:?}",
                self.status(),
                self.reply.status,
                self.reply.error
            );
        }
        let body: &[u8] = if self.reply.body.is_empty() {
            b"null"
        } else {
            &self.reply.body
        };
        serde_json::from_slice(body).unwrap_or_else(|e| {
            panic!(
                "the body {:?} is not the expected type: {e}",
                String::from_utf8_lossy(body)
            )
        })
    }

    /// The body's bytes (empty for an error or a 204).
    pub fn body(&self) -> &[u8] {
        &self.reply.body
    }

    /// The response header `name` (lower case) the handler set.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.reply
            .headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The error code of a failed request (`bad_request`, `unauthorized`, ...).
    pub fn error_code(&self) -> Option<&str> {
        self.reply.error.as_ref().map(|e| e.code.as_str())
    }

    /// The error message a failed request shows its caller.
    pub fn error_message(&self) -> Option<&str> {
        self.reply.error.as_ref().map(|e| e.message.as_str())
    }

    /// The whole reply envelope.
    pub fn reply(&self) -> &Reply {
        &self.reply
    }

    /// The value under `key` in the user's context after the request.
    pub async fn context<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        read_value(self.store.as_ref(), self.user_or_panic(), key).await
    }

    /// The user's counter `key` after the request.
    pub async fn counter(&self, key: &str) -> i64 {
        read_counter(self.store.as_ref(), self.user_or_panic(), key).await
    }

    fn user_or_panic(&self) -> &str {
        self.user
            .as_deref()
            .unwrap_or_else(|| panic!("the request had no user, so no context"))
    }
}

/// Several logic servers and a client in one process, on one in-memory transport:
/// requests go to whichever server takes them first, contexts replicate between
/// them, and a server can be stopped mid-test.
#[derive(Debug)]
pub struct TestCluster {
    transport: MemoryTransport,
    client: Client,
    servers: Vec<Option<(RunningServer, Arc<ReplicatedContextStore>)>>,
}

/// How a [`TestCluster`] is set up; see [`TestCluster::builder`].
#[derive(Debug)]
pub struct TestClusterBuilder {
    setup: Setup,
}

impl TestClusterBuilder {
    /// The handlers' settings, as `[logic_server.handler_settings."<handler>"]`.
    pub fn handler_settings<T: Serialize + ?Sized>(mut self, handler: &str, settings: &T) -> Self {
        self.setup
            .handler_settings
            .insert(handler.to_owned(), to_json(settings));
        self
    }

    /// Plugin `plugin`'s settings, as `[logic_server.plugins.<plugin>]`.
    pub fn plugin_settings<T: Serialize + ?Sized>(mut self, plugin: &str, settings: &T) -> Self {
        self.setup
            .plugin_settings
            .insert(plugin.to_owned(), to_json(settings));
        self
    }

    /// Start `servers` logic servers (named `server-0`, `server-1`, ...), each
    /// joining the context of those before it.
    pub async fn start(mut self, servers: usize) -> TestCluster {
        let transport = MemoryTransport::new();
        let mut started = Vec::with_capacity(servers);
        for i in 0..servers {
            let registry = self.setup.registry().await;
            started.push(Some(
                start_server(&transport, &format!("server-{i}"), registry).await,
            ));
        }
        TestCluster {
            client: Client::new(Arc::new(transport.clone())),
            transport,
            servers: started,
        }
    }
}

impl TestCluster {
    /// A cluster whose servers enable `handlers`.
    pub fn builder(handlers: &[&str]) -> TestClusterBuilder {
        TestClusterBuilder {
            setup: Setup {
                handlers: handlers.iter().map(|h| (*h).to_owned()).collect(),
                ..Setup::default()
            },
        }
    }

    /// Call `handler` with the JSON `body`, as `user` (or anonymously). The
    /// reply's [`TestReply::context`] reads the server that served it; another
    /// server has the writes after [`TestCluster::settle`].
    pub async fn call<T: Serialize + ?Sized>(
        &self,
        user: Option<&str>,
        handler: &str,
        body: &T,
    ) -> TestReply {
        let body = to_json(body).to_string().into_bytes();
        let request = request(handler, user, body, DEFAULT_TIMEOUT);
        let reply = send(&self.client, &request, DEFAULT_TIMEOUT).await;
        // The reply's context is read where it was written: on the server that
        // served it (or the first one running).
        let store = self
            .live()
            .find(|(i, _)| reply.served_by == format!("server-{i}"))
            .or_else(|| self.live().next())
            .map(|(_, store)| store.clone() as Arc<dyn ContextStore>)
            .unwrap_or_else(|| panic!("every server of the cluster is stopped"));
        TestReply {
            reply,
            store,
            user: user.map(str::to_owned),
            job: None,
        }
    }

    /// The node that served `reply`.
    pub fn served_by(reply: &TestReply) -> &str {
        &reply.reply.served_by
    }

    /// Drain and stop server `i`: it finishes what it runs, its queue share goes to
    /// the others, its plugins shut down.
    pub async fn stop(&mut self, i: usize) {
        let Some((server, store)) = self.servers.get_mut(i).and_then(Option::take) else {
            panic!("server {i} is not running");
        };
        server.shutdown().await;
        store.stop();
    }

    /// Wait until every running server has applied every context write made so
    /// far.
    pub async fn settle(&self) {
        for (i, store) in self.live() {
            if !store.barrier(Duration::from_secs(5)).await {
                panic!("server-{i} did not apply the context writes within 5 s");
            }
        }
    }

    /// `user`'s value under `key` as server `i` holds it.
    pub async fn context_on<T: DeserializeOwned>(
        &self,
        i: usize,
        user: &str,
        key: &str,
    ) -> Option<T> {
        read_value(self.store_of(i), user, key).await
    }

    /// `user`'s counter `key` as server `i` holds it.
    pub async fn counter_on(&self, i: usize, user: &str, key: &str) -> i64 {
        read_counter(self.store_of(i), user, key).await
    }

    /// Stop every server and close the transport.
    pub async fn shutdown(mut self) {
        for i in 0..self.servers.len() {
            if self.servers[i].is_some() {
                self.stop(i).await;
            }
        }
        self.transport.close().await;
    }

    fn store_of(&self, i: usize) -> &ReplicatedContextStore {
        match self.servers.get(i) {
            Some(Some((_, store))) => store,
            _ => panic!("server {i} is not running"),
        }
    }

    fn live(&self) -> impl Iterator<Item = (usize, &Arc<ReplicatedContextStore>)> {
        self.servers
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|(_, store)| (i, store)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::extract::{Context, Json};
    use crate::handler::HandlerError;
    use serde_json::{Value, json};

    /// Counts its runs in the user's context, reports progress, then fails, waits
    /// for its cancellation or answers, as `{"fail"}` and `{"wait_cancel"}` say.
    async fn runs(
        cx: Context,
        job: Option<JobCtx>,
        Json(body): Json<Value>,
    ) -> Result<Json<i64>, HandlerError> {
        let n = cx.increment("runs", 1).await?;
        if let Some(job) = &job {
            job.progress(0.5, "counted");
            if body["wait_cancel"] == true {
                job.cancelled().await;
            }
        }
        if body["fail"] == true {
            return Err(HandlerError::Internal("fails on purpose".to_owned()));
        }
        Ok(Json(n))
    }
    crate::handler!("t.testkit.runs", "counts its runs", runs);

    fn runs_request(body: Value) -> TestRequest {
        TestRequest::new("t.testkit.runs")
            .user("ada")
            .counter("runs", 10)
            .json(&body)
    }

    #[tokio::test]
    async fn a_job_s_writes_stand_only_when_it_succeeds() {
        let ok = runs_request(json!({})).as_job().send().await;
        assert_eq!(ok.job_state(), Some(JobState::Succeeded));
        // The handler read its own (deferred) write back.
        assert_eq!(ok.json::<i64>(), 11);
        assert_eq!(ok.counter("runs").await, 11);
        assert_eq!(ok.progress_reports().len(), 1);
        assert_eq!(ok.progress_reports()[0].message.as_deref(), Some("counted"));

        // A failed attempt with attempts left is queued again; the last one fails.
        let retried = runs_request(json!({"fail": true}))
            .job_attempt(1, 3)
            .send()
            .await;
        assert_eq!(retried.job_state(), Some(JobState::Queued));
        assert_eq!(retried.status(), 500);
        assert_eq!(retried.counter("runs").await, 10);
        let failed = runs_request(json!({"fail": true}))
            .job_attempt(3, 3)
            .send()
            .await;
        assert_eq!(failed.job_state(), Some(JobState::Failed));
        assert_eq!(failed.counter("runs").await, 10);

        // Not a job: written at once, no job state.
        let plain = runs_request(json!({})).send().await;
        assert_eq!(plain.job_state(), None);
        assert_eq!(plain.counter("runs").await, 11);
    }

    #[tokio::test]
    async fn a_cancelled_job_ends_cancelled_and_its_writes_are_dropped() {
        let mut job = runs_request(json!({"wait_cancel": true})).start().await;
        assert!(keelson_protocol::job::is_job_id(job.id()));
        let report = job.progress_reached(0.5).await;
        assert_eq!(job.progress(), Some(report));
        assert!(!job.is_finished());
        job.cancel();
        let reply = job.reply().await;
        // The handler answered: cancelled all the same.
        assert_eq!(reply.json::<i64>(), 11);
        assert_eq!(reply.job_state(), Some(JobState::Cancelled));
        assert_eq!(reply.counter("runs").await, 10);
    }
}
