//! Background jobs on a logic server: answering the job requests of gateways
//! ([`api`]) and running jobs from the job queue of its service ([`runner`]).
//!
//! A job's truth is its [`JobRecord`], replicated with the user contexts (as an
//! outcome record is: see `keelson_protocol::job`), whose state only moves forward.
//! Its work is a [`JobMessage`] on a durable queue: a **run** of one attempt, taken
//! by one server, which records the attempt as running, settles the message at
//! once (so no broker `consumer_timeout` ever ends a long job) and leaves a
//! **watch** in its place: a copy that comes back every `lease_check_ms` through a
//! delay queue. Whoever takes the watch looks at the record: still running on a
//! server that beats (heartbeats on the control channel), it is put back for later;
//! running on a server gone silent, the next attempt is queued; over, it is dropped.
//! Both messages carry the whole job, so it runs again even if every server that
//! knew its record is gone.
//!
//! A server only commits a run's outcome while it holds its **liveness lease**: its
//! own heartbeats went out without a gap long enough for peers to think it gone
//! (see [`Liveness`]). A server frozen past that (a long pause, `SIGSTOP`) drops the
//! outcome of the runs it had, since a peer may be running them again.

pub(crate) mod api;
pub(crate) mod runner;

use crate::config::JobsConfig;
use crate::dispatch::Dispatcher;
use keelson_protocol::Transport;
use keelson_protocol::control::MISSED_INTERVALS_BEFORE_GONE;
use keelson_protocol::job::{JobMessage, JobRecord};
use keelson_protocol::transport::{Publisher, TransportError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

pub(crate) use crate::dispatch::unix_ms_now;

/// Whether this server may still act on the runs it holds: its heartbeats went out
/// without a gap long enough for a peer to think it gone. Fed by the monitor after
/// every heartbeat it publishes.
#[derive(Debug)]
pub(crate) struct Liveness {
    interval: Duration,
    /// When the last heartbeat went out, and the lease epoch (it grows after every
    /// gap: runs claimed before a gap are no longer this server's to finish).
    last: Mutex<(Option<Instant>, u64)>,
}

impl Liveness {
    pub(crate) fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: Mutex::new((None, 0)),
        }
    }

    /// A gap longer than this between heartbeats ends the lease: peers call a node
    /// gone after [`MISSED_INTERVALS_BEFORE_GONE`] intervals, and a server must stop
    /// acting before any peer can act in its place.
    fn bound(&self) -> Duration {
        self.interval * (MISSED_INTERVALS_BEFORE_GONE - 1)
    }

    /// A heartbeat went out now.
    pub(crate) fn beat(&self) {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(at) = last.0
            && now.duration_since(at) > self.bound()
        {
            last.1 += 1;
            tracing::warn!(
                gap_ms = now.duration_since(at).as_millis() as u64,
                "heartbeats stopped for longer than peers wait: the jobs running here may run elsewhere now; their outcome here is dropped"
            );
        }
        last.0 = Some(now);
    }

    /// The current lease epoch, if the lease holds now.
    pub(crate) fn lease(&self) -> Option<u64> {
        let last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let at = last.0?;
        (Instant::now().duration_since(at) <= self.bound()).then_some(last.1)
    }

    /// Whether the lease taken at `epoch` still holds.
    pub(crate) fn holds(&self, epoch: u64) -> bool {
        self.lease() == Some(epoch)
    }
}

/// Who waits for which job record to change: status requests holding `?wait=`, and
/// runs watching for their cancellation.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    by_id: Mutex<HashMap<Arc<str>, WaitersOf>>,
}

/// The wake-up of one job's waiters, and how many they are.
type WaitersOf = (Arc<Notify>, usize);

/// A registration in [`Waiters`]; removed on drop.
pub(crate) struct Waiting<'a> {
    waiters: &'a Waiters,
    id: Arc<str>,
    pub(crate) notify: Arc<Notify>,
}

impl Waiters {
    pub(crate) fn register(&self, id: &str) -> Waiting<'_> {
        let id: Arc<str> = Arc::from(id);
        let mut map = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map
            .entry(id.clone())
            .or_insert_with(|| (Arc::new(Notify::new()), 0));
        entry.1 += 1;
        Waiting {
            waiters: self,
            id,
            notify: entry.0.clone(),
        }
    }

    fn changed(&self, id: &str) {
        let map = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((notify, _)) = map.get(id) {
            notify.notify_waiters();
        }
    }

    fn all_changed(&self) {
        let map = self.by_id.lock().unwrap_or_else(|p| p.into_inner());
        for (notify, _) in map.values() {
            notify.notify_waiters();
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut map = self.waiters.by_id.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = map.get_mut(&self.id) {
            entry.1 -= 1;
            if entry.1 == 0 {
                map.remove(&self.id);
            }
        }
    }
}

/// What the job tasks of a server share.
#[derive(Debug)]
pub(crate) struct Jobs {
    pub(crate) dispatcher: Arc<Dispatcher>,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) config: JobsConfig,
    pub(crate) liveness: Arc<Liveness>,
    pub(crate) waiters: Waiters,
    /// How long a draining server lets its running jobs finish.
    pub(crate) drain_timeout: Duration,
    /// This incarnation of the server (its node id is often the same after a
    /// restart): what a job's record names as the server running it, and what its
    /// heartbeats carry (the context store's origin).
    pub(crate) incarnation: String,
}

impl Jobs {
    pub(crate) fn node(&self) -> &str {
        &self.dispatcher.node_id
    }

    /// See [`Jobs::incarnation`].
    pub(crate) fn incarnation(&self) -> &str {
        &self.incarnation
    }

    /// The record of `id` after every write published before now has arrived here
    /// (within a bound: a late one only makes the answer older, never wrong-way).
    pub(crate) async fn fresh_record(&self, id: &str) -> Option<JobRecord> {
        if !self.dispatcher.store.barrier(BARRIER_WITHIN).await {
            tracing::debug!(%id, "job barrier timed out; answering from what is here");
        }
        self.dispatcher.store.job(id)
    }

    /// Whether job messages from `publisher` may be trusted: they come from logic
    /// servers, which share this server's broker user.
    pub(crate) fn trusts_job_publisher(&self, publisher: &Publisher) -> bool {
        match publisher {
            Publisher::Local => true,
            Publisher::User(_) => publisher == &self.transport.publisher(),
            Publisher::Unknown => self.dispatcher.trust_unstamped,
            _ => false,
        }
    }

    /// Put `message` on the job queue of its handler, after `delay`; tried again (the
    /// broker may be away) until it is queued or `give_up` passes.
    pub(crate) async fn enqueue(
        &self,
        message: &JobMessage,
        delay: Duration,
    ) -> Result<(), keelson_protocol::transport::RequestError> {
        let payload = keelson_protocol::encode(message)
            .map_err(|e| keelson_protocol::transport::RequestError::Unavailable(e.to_string()))?;
        let route = message.route();
        let mut pause = Duration::from_millis(100);
        let give_up = Instant::now() + ENQUEUE_RETRY_FOR;
        loop {
            let msg = keelson_protocol::transport::Message::new(payload.clone());
            match self.transport.enqueue(&route, msg, delay).await {
                Ok(()) => return Ok(()),
                Err(e @ keelson_protocol::transport::RequestError::Unroutable(_)) => return Err(e),
                Err(e) if Instant::now() + pause > give_up => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, "could not queue a job message; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// How long a job request waits for the context channel's barrier.
const BARRIER_WITHIN: Duration = Duration::from_secs(2);

/// How long a job message that the broker does not take is tried again.
const ENQUEUE_RETRY_FOR: Duration = Duration::from_secs(60);

/// The running job tasks of a server.
#[derive(Debug)]
pub struct JobsHandle {
    jobs: Arc<Jobs>,
    api: JoinHandle<()>,
    watcher: JoinHandle<()>,
    runner: Option<runner::RunnerHandle>,
}

impl JobsHandle {
    /// Declare the job service and this service's job queue, and start answering
    /// and running jobs.
    pub(crate) async fn start(
        dispatcher: Arc<Dispatcher>,
        transport: Arc<dyn Transport>,
        config: JobsConfig,
        service: &str,
        liveness: Arc<Liveness>,
        drain_timeout: Duration,
    ) -> Result<Self, TransportError> {
        let incarnation = dispatcher
            .store
            .mark()
            .map_or_else(|| dispatcher.node_id.clone(), |m| m.origin);
        let jobs = Arc::new(Jobs {
            incarnation,
            dispatcher,
            transport,
            config,
            liveness,
            waiters: Waiters::default(),
            drain_timeout,
        });
        let runner = if jobs.config.concurrency > 0 {
            Some(runner::start(jobs.clone(), service).await?)
        } else {
            None
        };
        let api = match api::start(jobs.clone()).await {
            Ok(api) => api,
            Err(e) => {
                if let Some(runner) = runner {
                    runner.drain(&jobs).await;
                }
                return Err(e);
            }
        };
        let watcher = tokio::spawn(watch_changes(jobs.clone()));
        Ok(Self {
            jobs,
            api,
            watcher,
            runner,
        })
    }

    /// What the job tasks share (the scheduler submits through it).
    pub(crate) fn jobs(&self) -> &Arc<Jobs> {
        &self.jobs
    }

    /// Stop taking jobs, let the running ones finish within the drain timeout, and
    /// put those still running back on the queue as their next attempt.
    pub(crate) async fn drain(mut self) {
        if let Some(runner) = self.runner.take() {
            runner.drain(&self.jobs).await;
        }
        self.api.abort();
        self.watcher.abort();
    }
}

impl Drop for JobsHandle {
    fn drop(&mut self) {
        self.api.abort();
        self.watcher.abort();
    }
}

/// Wake whoever waits on a job record that changed.
async fn watch_changes(jobs: Arc<Jobs>) {
    let Some(mut changes) = jobs.dispatcher.store.job_changes() else {
        return;
    };
    loop {
        match changes.recv().await {
            Ok(id) => jobs.waiters.changed(&id),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => jobs.waiters.all_changed(),
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}
