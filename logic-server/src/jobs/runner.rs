//! Running jobs from the job queue of this server's service: a run message becomes
//! a recorded attempt (watch queued, record `running`, message settled), the
//! handler runs with a [`JobCtx`], and its outcome is committed with its context
//! writes while this server holds its liveness lease; a failure queues the next
//! attempt after a backoff. A watch message checks that a running attempt's server
//! is alive, and queues the next attempt when it is not.
//!
//! Intake: at most `concurrency` runs at once; when all slots are busy the consumer
//! is paused (the rest stays on the queue for peers) and resumed when one frees.

use super::{Jobs, api::cancelled_error, unix_ms_now};
use crate::context::{Effects, RecordWrite};
use crate::job_ctx::JobCtx;
use keelson_protocol::control::MISSED_INTERVALS_BEFORE_GONE;
use keelson_protocol::job::{
    JobKind, JobMessage, JobRecord, JobSpec, JobState, job_route, jobs_service, watch_route,
    watches_service,
};
use keelson_protocol::transport::{Consumer, Delivery, ServiceSpec, TransportError};
use keelson_protocol::{ErrorInfo, ReplyStatus, Request, decode};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often a running job's progress is replicated at most.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// How long a cancelled job's handler may take to return before it is dropped.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// How long a record write may be retried.
const WRITE_WITHIN: Duration = Duration::from_secs(10);

/// The running runner; see [`RunnerHandle::drain`].
#[derive(Debug)]
pub(crate) struct RunnerHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RunnerHandle {
    pub(crate) async fn drain(self, _jobs: &Jobs) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

pub(super) async fn start(jobs: Arc<Jobs>, service: &str) -> Result<RunnerHandle, TransportError> {
    let run_consumer = consume(
        &jobs,
        &jobs_service(service),
        job_route,
        jobs.config.concurrency,
    )
    .await?;
    let watch_consumer = consume(
        &jobs,
        &watches_service(service),
        watch_route,
        WATCH_PREFETCH,
    )
    .await?;
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(run_loop(jobs, run_consumer, watch_consumer, stopped));
    Ok(RunnerHandle { stop, task })
}

/// Declare the queue `name`, bound to `route` of every handler hosted here, and
/// consume it.
async fn consume(
    jobs: &Jobs,
    name: &str,
    route: fn(&str) -> String,
    prefetch: u16,
) -> Result<Box<dyn Consumer>, TransportError> {
    let routes = jobs
        .dispatcher
        .registry
        .names()
        .iter()
        .map(|h| route(h))
        .collect();
    jobs.transport
        .declare_service(&ServiceSpec {
            name: name.to_owned(),
            routes,
        })
        .await?;
    jobs.transport.consume(name, prefetch).await
}

/// Watches a server checks at once (each is quick: a barrier and a look).
const WATCH_PREFETCH: u16 = 64;

async fn run_loop(
    jobs: Arc<Jobs>,
    mut consumer: Box<dyn Consumer>,
    mut watch_consumer: Box<dyn Consumer>,
    mut stopped: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(usize::from(jobs.config.concurrency)));
    let interrupt = CancellationToken::new();
    let mut runs = JoinSet::new();
    let mut watches = JoinSet::new();
    let mut paused = false;
    loop {
        // Full: leave the job queue to peers until a slot frees (watches go on).
        let full = slots.available_permits() == 0;
        if full != paused {
            let changed = if full {
                consumer.pause().await
            } else {
                consumer.resume().await
            };
            if let Err(e) = changed {
                tracing::debug!(error = %e, full, "could not pause or resume job intake");
            }
            paused = full;
        }
        tokio::select! {
            _ = stopped.changed() => break,
            Some(_) = runs.join_next() => {}
            Some(_) = watches.join_next() => {}
            next = watch_consumer.next() => match next {
                None => break,
                Some(Err(e)) => tracing::debug!(error = %e, "job watch intake interrupted"),
                Some(Ok(delivery)) => {
                    if let Some((delivery, message)) = accept(&jobs, delivery).await {
                        watches.spawn(watch_run(jobs.clone(), delivery, message));
                    }
                }
            },
            next = consumer.next(), if !full => match next {
                None => break,
                Some(Err(e)) => tracing::debug!(error = %e, "job intake interrupted"),
                Some(Ok(delivery)) => {
                    let Some((delivery, message)) = accept(&jobs, delivery).await else { continue };
                    // A slot is free (checked above); this task is its only taker.
                    let Ok(permit) = slots.clone().try_acquire_owned() else {
                        let _ = delivery.hand_back().await;
                        continue;
                    };
                    let jobs = jobs.clone();
                    let interrupt = interrupt.clone();
                    runs.spawn(async move {
                        start_run(&jobs, delivery, message, interrupt).await;
                        drop(permit);
                    });
                }
            },
        }
    }
    // Drain: take nothing more; let runs finish within the drain timeout, then put
    // the rest back on the queue as their next attempt.
    let _ = consumer.pause().await;
    let finished = tokio::time::timeout(jobs.drain_timeout, async {
        while runs.join_next().await.is_some() {}
    })
    .await
    .is_ok();
    if !finished {
        interrupt.cancel();
        while runs.join_next().await.is_some() {}
    }
    watches.abort_all();
    drop(consumer);
}

/// Decode and check a job message; dead-letter what cannot be run.
async fn accept(jobs: &Jobs, delivery: Delivery) -> Option<(Delivery, JobMessage)> {
    let reason = match decode::<JobMessage>(&delivery.payload) {
        Ok(_) if !jobs.trusts_job_publisher(delivery.publisher()) => format!(
            "untrusted publisher: a job message from {}, not a logic server",
            delivery.publisher()
        ),
        Ok(m) if delivery.route().is_some_and(|r| r != m.route()) => {
            "route mismatch: a job message on the route of another handler or kind".to_owned()
        }
        Ok(m) if !keelson_protocol::job::is_job_id(&m.job.id) => {
            "undecodable job message: a malformed job id".to_owned()
        }
        Ok(m) => return Some((delivery, m)),
        Err(e) => format!("undecodable job message: {e}"),
    };
    tracing::warn!(%reason, "dead-lettering a job message");
    let _ = delivery.reject(reason).await;
    None
}

/// The record a runner writes when it takes attempt `attempt` of `spec`.
fn record_of(spec: &JobSpec, before: Option<&JobRecord>) -> JobRecord {
    JobRecord {
        cancel_requested: before.is_some_and(|b| b.cancel_requested),
        error: before.and_then(|b| b.error.clone()),
        ..JobRecord::queued(spec, before.map_or(u64::MAX, |b| b.expires_unix_ms))
    }
}

async fn write(
    jobs: &Jobs,
    effects: &Effects,
    record: JobRecord,
) -> Result<(), crate::context::ContextError> {
    jobs.dispatcher
        .store
        .commit(
            effects,
            Some(RecordWrite::job(record)),
            Instant::now() + WRITE_WITHIN,
        )
        .await
}

/// A finished record: kept `result_ttl_s` from now.
fn finish(mut record: JobRecord, state: JobState) -> JobRecord {
    let now = unix_ms_now();
    record.state = state;
    record.finished_ms = Some(now);
    record.expires_unix_ms = now.saturating_add(record.options.result_ttl_s.saturating_mul(1000));
    record
}

async fn start_run(
    jobs: &Jobs,
    delivery: Delivery,
    message: JobMessage,
    interrupt: CancellationToken,
) {
    let spec = &message.job;
    let n = message.attempt;
    let before = jobs.fresh_record(&spec.id).await;
    if let Some(r) = &before {
        let taken = r.attempt > n || (r.attempt == n && r.state != JobState::Queued);
        if r.state.is_terminal() || taken {
            // Over, or this attempt is another server's: a duplicate.
            let _ = delivery.ack().await;
            return;
        }
        if r.cancel_requested {
            let mut rec = r.clone();
            rec.error = Some(cancelled_error());
            let _ = write(jobs, &Effects::default(), finish(rec, JobState::Cancelled)).await;
            let _ = delivery.ack().await;
            return;
        }
    }
    let Some(epoch) = jobs.liveness.lease() else {
        // This server's heartbeats are not going out: peers may think it gone.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = delivery.hand_back().await;
        return;
    };
    // The watch first: once the record says running here, someone must be checking.
    let watch = JobMessage {
        kind: JobKind::Watch {
            node: jobs.incarnation().to_owned(),
        },
        ..message.clone()
    };
    let lease_check = Duration::from_millis(jobs.config.lease_check_ms.max(100));
    if let Err(e) = jobs.enqueue(&watch, lease_check).await {
        tracing::warn!(id = %spec.id, error = %e, "could not queue a job's watch; handing the job back");
        let _ = delivery.hand_back().await;
        return;
    }
    let mut record = record_of(spec, before.as_ref());
    record.state = JobState::Running;
    record.attempt = n;
    record.lost = message.lost;
    record.started_ms = Some(unix_ms_now());
    record.node = Some(jobs.incarnation().to_owned());
    if let Err(e) = write(jobs, &Effects::default(), record.clone()).await {
        tracing::debug!(id = %spec.id, error = %e, "a job's running record is not replicated yet");
    }
    // Settled at start: the run holds no delivery, so no consumer timeout ends it.
    if let Err(e) = delivery.ack().await {
        tracing::debug!(error = %e, "a job message's ack failed; a duplicate may come (it is dropped)");
    }
    jobs.dispatcher.metrics.job_started();
    let running = crate::stats::JobRunning::enter(jobs.dispatcher.stats.clone());
    let started = Instant::now();
    let outcome = run(jobs, spec, n, &record, interrupt).await;
    drop(running);
    jobs.dispatcher
        .metrics
        .job_ran(&spec.handler, started.elapsed().as_secs_f64());
    conclude(jobs, &message, record, epoch, outcome).await;
}

/// How a run ended.
enum Outcome {
    /// The handler returned (successfully or not); its writes, deferred.
    Returned(keelson_protocol::Reply, Arc<Effects>, bool),
    /// The server drained before the run finished.
    Interrupted,
}

async fn run(
    jobs: &Jobs,
    spec: &JobSpec,
    n: u32,
    record: &JobRecord,
    interrupt: CancellationToken,
) -> Outcome {
    let (ctx, mut progress) = JobCtx::new(&spec.id, n, spec.options.max_attempts);
    let now = unix_ms_now();
    let mut request = Request::new(
        spec.id.clone(),
        spec.handler.clone(),
        spec.body.clone(),
        now.saturating_add(spec.options.timeout_ms),
    );
    request.user = spec.user.clone();
    request.attempt = n;
    request.headers = spec.headers.clone();
    let deadline = Instant::now() + Duration::from_millis(spec.options.timeout_ms);
    let handler = jobs.dispatcher.registry.get(&spec.handler).cloned();
    let effects = Arc::new(Effects::deferred());
    let call = jobs.dispatcher.run(
        handler,
        request,
        deadline,
        effects.clone(),
        Some(ctx.clone()),
    );
    tokio::pin!(call);
    let waiting = jobs.waiters.register(&spec.id);
    let mut last_progress = Instant::now() - PROGRESS_EVERY;
    let mut pending_progress = false;
    let mut cancel_deadline: Option<Instant> = None;
    let mut shown = record.clone();
    loop {
        let notified = waiting.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !ctx.is_cancelled()
            && let Some(now) = jobs.dispatcher.store.job(&spec.id)
            && (now.cancel_requested || now.state.is_terminal() || now.attempt > n)
        {
            // Cancelled, or decided elsewhere: the handler should stop.
            ctx.cancel();
            cancel_deadline = Some(Instant::now() + CANCEL_GRACE);
        }
        let progress_due = last_progress + PROGRESS_EVERY;
        tokio::select! {
            reply = &mut call => return Outcome::Returned(reply, effects, ctx.is_cancelled()),
            () = interrupt.cancelled() => return Outcome::Interrupted,
            () = &mut notified => {}
            changed = progress.changed(), if !pending_progress => {
                if changed.is_ok() { pending_progress = true; }
            }
            () = tokio::time::sleep_until(progress_due), if pending_progress => {
                pending_progress = false;
                last_progress = Instant::now();
                if let Some(now) = jobs.dispatcher.store.job(&spec.id) {
                    shown = now;
                }
                if shown.attempt == n && shown.state == JobState::Running {
                    shown.progress = progress.borrow_and_update().clone();
                    if let Err(e) = write(jobs, &Effects::default(), shown.clone()).await {
                        tracing::debug!(error = %e, "a job's progress is not replicated yet");
                    }
                }
            }
            () = tokio::time::sleep_until(cancel_deadline.unwrap_or_else(far_future)), if cancel_deadline.is_some() => {
                let reply = keelson_protocol::Reply::error(
                    spec.id.clone(),
                    ReplyStatus::HandlerError,
                    "cancelled",
                    "the job was cancelled",
                    jobs.node(),
                );
                return Outcome::Returned(reply, effects, true);
            }
        }
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}

/// The wait before attempt `failures + 1`: `backoff_base_ms` doubled per failure so
/// far, up to `backoff_max_ms`, with up to a quarter of jitter either way.
fn backoff(jobs: &Jobs, failures: u32) -> Duration {
    let base = jobs.config.backoff_base_ms;
    let ms = base
        .saturating_mul(1u64 << failures.saturating_sub(1).min(30))
        .min(jobs.config.backoff_max_ms);
    let quarter = ms / 4;
    let jitter = if quarter == 0 {
        0
    } else {
        rand::random_range(0..=2 * quarter)
    };
    Duration::from_millis(ms - quarter + jitter)
}

async fn conclude(
    jobs: &Jobs,
    message: &JobMessage,
    record: JobRecord,
    epoch: u64,
    outcome: Outcome,
) {
    let spec = &message.job;
    let n = message.attempt;
    let (reply, effects, cancelled) = match outcome {
        Outcome::Interrupted => {
            requeue_lost(
                jobs,
                message,
                "interrupted",
                "the server running it shut down",
            )
            .await;
            return;
        }
        Outcome::Returned(reply, effects, cancelled) => (reply, effects, cancelled),
    };
    // Every record written before now, here: a peer that took this attempt for
    // lost, or a cancellation, is seen before anything is committed. Two windows
    // stay open without a consensus store: a freeze between the lease check below
    // and the commit's publish, and a peer's takeover published after this barrier
    // by a peer that heard no heartbeat of this live server for three intervals;
    // then both attempts may commit (the second finds the first's terminal record
    // and drops its own outcome only if it concludes later).
    let current = jobs.fresh_record(&spec.id).await;
    if !jobs.liveness.holds(epoch) {
        // Peers may have taken this attempt for lost and run it again: its outcome
        // and writes are dropped here (the writes were never applied).
        tracing::warn!(id = %spec.id, attempt = n, "dropping a job run's outcome: this server lost its lease while it ran");
        jobs.dispatcher.metrics.job_ended("fenced");
        if current.is_none_or(|c| c.attempt == n && !c.state.is_terminal()) {
            requeue_lost(
                jobs,
                message,
                "server_lost",
                "the server running it stopped answering",
            )
            .await;
        }
        return;
    }
    let current = current.unwrap_or(record);
    if current.state.is_terminal() || current.attempt > n {
        // Decided elsewhere (cancelled while queued, say): nothing of this run stands.
        return;
    }
    if current.state == JobState::Running && current.node.as_deref() != Some(jobs.incarnation()) {
        // Two servers took this attempt at once (its run message was queued twice,
        // by a takeover and by the server that lost it): every replica keeps one
        // claim, the same one; the other's outcome and writes are dropped.
        tracing::info!(id = %spec.id, attempt = n, "another server runs this attempt; dropping this run's outcome");
        return;
    }
    let mut next = current;
    next.progress = None;
    if cancelled || next.cancel_requested {
        next.error = Some(cancelled_error());
        let _ = write(jobs, &Effects::default(), finish(next, JobState::Cancelled)).await;
        jobs.dispatcher.metrics.job_ended("cancelled");
        return;
    }
    if reply.status == ReplyStatus::Ok {
        if reply.body.len() as u64 > spec.options.max_result_bytes {
            next.error = Some(ErrorInfo {
                code: "result_too_large".to_owned(),
                message: format!(
                    "the job's result is {} bytes; at most {} are kept",
                    reply.body.len(),
                    spec.options.max_result_bytes
                ),
            });
            let _ = write(jobs, &Effects::default(), finish(next, JobState::Failed)).await;
            jobs.dispatcher.metrics.job_ended("failed");
            return;
        }
        next.result = reply.body;
        next.error = None;
        // The handler's writes and the outcome, in one delta.
        if let Err(e) = write(jobs, &effects, finish(next, JobState::Succeeded)).await {
            tracing::warn!(id = %spec.id, error = %e, "a job's outcome is not replicated yet");
        }
        jobs.dispatcher.metrics.job_ended("succeeded");
        return;
    }
    let error = reply.error.unwrap_or_else(|| ErrorInfo {
        code: "handler_error".to_owned(),
        message: "the handler failed".to_owned(),
    });
    next.error = Some(error);
    let failures = n.saturating_sub(message.lost);
    if failures < spec.options.max_attempts {
        let delay = backoff(jobs, failures);
        let retry = JobMessage {
            kind: JobKind::Run,
            attempt: n + 1,
            ..message.clone()
        };
        if let Err(e) = jobs.enqueue(&retry, delay).await {
            tracing::error!(id = %spec.id, error = %e, "could not queue a job's retry; it fails");
        } else {
            next.state = JobState::Queued;
            next.attempt = n + 1;
            next.started_ms = None;
            next.node = None;
            next.not_before_ms = Some(unix_ms_now().saturating_add(delay.as_millis() as u64));
            let _ = write(jobs, &Effects::default(), next).await;
            jobs.dispatcher.metrics.job_ended("retried");
            return;
        }
    }
    let _ = write(jobs, &Effects::default(), finish(next, JobState::Failed)).await;
    jobs.dispatcher.metrics.job_ended("failed");
}

/// Attempt `message.attempt` ended without an outcome (its server drained, froze or
/// died): queue the next one at once, unless too many were lost.
async fn requeue_lost(jobs: &Jobs, message: &JobMessage, code: &str, why: &str) {
    let spec = &message.job;
    let n = message.attempt;
    let mut next = jobs
        .dispatcher
        .store
        .job(&spec.id)
        .unwrap_or_else(|| record_of(spec, None));
    if next.state.is_terminal() || next.attempt > n {
        return;
    }
    next.attempt = n;
    next.error = Some(ErrorInfo {
        code: code.to_owned(),
        message: why.to_owned(),
    });
    next.progress = None;
    if message.lost + 1 > jobs.config.max_lost_attempts {
        let _ = write(jobs, &Effects::default(), finish(next, JobState::Failed)).await;
        jobs.dispatcher.metrics.job_ended("failed");
        return;
    }
    let rerun = JobMessage {
        kind: JobKind::Run,
        attempt: n + 1,
        lost: message.lost + 1,
        ..message.clone()
    };
    if let Err(e) = jobs.enqueue(&rerun, Duration::ZERO).await {
        tracing::error!(id = %spec.id, error = %e, "could not queue a lost job again; its watch will");
        return;
    }
    next.state = JobState::Queued;
    next.attempt = n + 1;
    next.lost = message.lost + 1;
    next.started_ms = None;
    next.node = None;
    let _ = write(jobs, &Effects::default(), next).await;
    jobs.dispatcher.metrics.job_ended("lost");
}

/// A watch came back: is attempt `message.attempt` still running on a live server?
async fn watch_run(jobs: Arc<Jobs>, delivery: Delivery, message: JobMessage) {
    let n = message.attempt;
    let record = jobs.fresh_record(&message.job.id).await;
    let rerun = match &record {
        // Every server that knew the record is gone: this message is all there is.
        None => true,
        Some(r) if r.state.is_terminal() || r.attempt > n => {
            let _ = delivery.ack().await;
            return;
        }
        Some(r) if r.state == JobState::Queued => {
            // Not taken yet (its run message waits, or its runner is about to write):
            // look again later.
            false
        }
        Some(r) => !alive(&jobs, r.node.as_deref().unwrap_or_default()),
    };
    if rerun {
        tracing::info!(id = %message.job.id, attempt = n, "a job's server is gone; running it again");
        requeue_lost(
            &jobs,
            &message,
            "server_lost",
            "the server running it stopped answering",
        )
        .await;
        let _ = delivery.ack().await;
        return;
    }
    let lease_check = Duration::from_millis(jobs.config.lease_check_ms.max(100));
    match jobs.enqueue(&message, lease_check).await {
        Ok(()) => {
            let _ = delivery.ack().await;
        }
        Err(e) => {
            tracing::debug!(error = %e, "could not put a job's watch back; it comes again");
            let _ = delivery.hand_back().await;
        }
    }
}

/// Whether the server incarnation `node` beats: heard from within the intervals
/// after which it is gone (a draining server still beats while it finishes its
/// jobs).
fn alive(jobs: &Jobs, node: &str) -> bool {
    if node == jobs.incarnation() {
        return jobs.liveness.lease().is_some();
    }
    let view = jobs
        .dispatcher
        .peers
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    view.nodes(Instant::now()).iter().any(|n| {
        // The incarnation its heartbeats carry (a restarted server with the same
        // node id is another one: the runs of the one before are lost).
        let incarnation = n
            .heartbeat
            .context
            .as_ref()
            .map_or(n.heartbeat.node.as_str(), |m| m.origin.as_str());
        incarnation == node
            && n.age_ms
                <= n.heartbeat
                    .interval_ms
                    .saturating_mul(u64::from(MISSED_INTERVALS_BEFORE_GONE))
    })
}
