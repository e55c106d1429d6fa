//! Answering the job requests of gateways and operators (the queue of
//! [`JOBS_SERVICE`], consumed by every logic server): submit, status (with `?wait=`),
//! cancel, list.
//!
//! Every status answer comes after the context channel's barrier, so it reflects
//! every record written anywhere before the request: an id a gateway was just given
//! is known here, and a state once seen is never followed by an older one.

use super::{Jobs, unix_ms_now};
use crate::context::{Effects, RecordWrite};
use keelson_protocol::job::{
    CANCEL_ROUTE, GET_ROUTE, JOBS_SERVICE, JobKind, JobMessage, JobOptions, JobRecord, JobSpec,
    JobState, LIST_ROUTE, ListQuery, Query, ROUTES, SUBMIT_ROUTE, Submit,
};
use keelson_protocol::transport::{Delivery, RequestError, ServiceSpec, TransportError};
use keelson_protocol::{ErrorInfo, ProtocolVersion, Reply, ReplyStatus, Request, decode};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Job requests a server holds at once (most are quick; a `?wait=` holds one).
const PREFETCH: u16 = 1024;

/// How long before its deadline a waiting status request answers anyway.
const WAIT_MARGIN: Duration = Duration::from_millis(500);

/// A non-finished record is kept at most this long without news (a job queued for a
/// handler no server runs, say).
const UNFINISHED_TTL_MS: u64 = 30 * 24 * 3600 * 1000;

pub(super) async fn start(jobs: Arc<Jobs>) -> Result<JoinHandle<()>, TransportError> {
    let transport = jobs.transport.clone();
    transport
        .declare_service(&ServiceSpec {
            name: JOBS_SERVICE.to_owned(),
            routes: ROUTES.iter().map(|r| (*r).to_owned()).collect(),
        })
        .await?;
    let mut requests = transport.consume(JOBS_SERVICE, PREFETCH).await?;
    Ok(tokio::spawn(async move {
        let mut tasks = tokio::task::JoinSet::new();
        while let Some(Ok(delivery)) = requests.next().await {
            let jobs = jobs.clone();
            tasks.spawn(async move { answer(&jobs, delivery).await });
            while tasks.try_join_next().is_some() {}
        }
    }))
}

async fn answer(jobs: &Jobs, delivery: Delivery) {
    let request: Request = match decode(&delivery.payload) {
        Ok(request) => request,
        Err(e) => {
            tracing::warn!(error = %e, "dead-lettering an undecodable job request");
            let _ = delivery
                .reject(format!("undecodable job request: {e}"))
                .await;
            return;
        }
    };
    let node = jobs.node().to_owned();
    let refusal = if delivery.route().is_some_and(|r| r != request.handler)
        || !ROUTES.contains(&request.handler.as_str())
    {
        Some((
            ReplyStatus::BadRequest,
            "route_mismatch",
            "not a job request of this route",
        ))
    } else if (request.user.is_some()
        || request.handler == LIST_ROUTE
        || request.headers.contains_key(OPERATOR_HEADER))
        && !jobs.dispatcher.trusts(delivery.publisher())
    {
        Some((
            ReplyStatus::Forbidden,
            "untrusted_publisher",
            "this publisher may not send job requests on behalf of a user",
        ))
    } else {
        None
    };
    if let Some((status, code, message)) = refusal {
        tracing::warn!(id = %request.id, publisher = %delivery.publisher(), %code, "dead-lettering a refused job request");
        let reply = Reply::error(request.id.clone(), status, code, message, &node);
        crate::dispatch::send(&delivery, &reply).await;
        let _ = delivery.reject(format!("job request: {message}")).await;
        return;
    }
    if request.handler == GET_ROUTE {
        // A read that may wait long (`?wait=`): it holds no delivery meanwhile, which
        // the broker would take back past its `consumer_timeout`. Lost with this
        // server, it costs the gateway a timeout (504), and its client a retry.
        let replier = match delivery.ack_then_reply().await {
            Ok(replier) => replier,
            Err(e) => {
                tracing::debug!(error = %e, "could not ack a status request; it comes again");
                return;
            }
        };
        let reply = status(jobs, &request)
            .await
            .unwrap_or_else(|(status, code, message)| {
                Reply::error(request.id.clone(), status, code, message, &node)
            });
        if let Ok(bytes) = keelson_protocol::encode(&reply)
            && let Err(e) = replier.reply(bytes).await
        {
            tracing::debug!(error = %e, "could not answer a status request");
        }
        return;
    }
    let reply = match request.handler.as_str() {
        SUBMIT_ROUTE => submit(jobs, &request).await,
        CANCEL_ROUTE => cancel(jobs, &request).await,
        _ => list(jobs, &request).await,
    }
    .unwrap_or_else(|(status, code, message)| {
        Reply::error(request.id.clone(), status, code, message, &node)
    });
    crate::dispatch::send(&delivery, &reply).await;
    let _ = delivery.ack().await;
}

pub(crate) type Refused = (ReplyStatus, &'static str, String);

fn not_found() -> Refused {
    (
        ReplyStatus::NotFound,
        "job_not_found",
        "no such job (or it expired)".to_owned(),
    )
}

fn bad(code: &'static str, message: impl Into<String>) -> Refused {
    (ReplyStatus::BadRequest, code, message.into())
}

fn answer_with(jobs: &Jobs, request: &Request, record: &JobRecord, http: u16) -> Reply {
    let mut reply = Reply::ok(
        request.id.clone(),
        record.status_json().to_string().into_bytes(),
        jobs.node(),
    );
    reply.http_status = (http != 200).then_some(http);
    reply
}

/// The id of a job submitted with `key` by `user`: the same key of the same user
/// names the same job, and no other user's.
fn keyed_id(user: Option<&str>, key: &str) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3Default::new();
    h.update(user.unwrap_or("\u{0}anonymous").as_bytes());
    h.update(&[0]);
    h.update(key.as_bytes());
    format!("{:032x}", h.digest128())
}

/// What the same key must come with: the same handler and body.
fn fingerprint(handler: &str, body: &[u8]) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3Default::new();
    h.update(handler.as_bytes());
    h.update(&[0]);
    h.update(body);
    format!("{:032x}", h.digest128())
}

fn options(jobs: &Jobs, submit: &Submit) -> Result<JobOptions, Refused> {
    let c = &jobs.config;
    let within = |name: &'static str, v: Option<u64>, default: u64, limit: u64| match v {
        None => Ok(default),
        Some(v) if (1..=limit).contains(&v) => Ok(v),
        Some(v) => Err(bad(
            "invalid_job_option",
            format!("{name} = {v} is out of range: 1 to {limit}"),
        )),
    };
    Ok(JobOptions {
        max_attempts: within(
            "max_attempts",
            submit.max_attempts.map(u64::from),
            u64::from(c.max_attempts),
            u64::from(c.max_attempts_limit),
        )? as u32,
        timeout_ms: within(
            "timeout_ms",
            submit.timeout_ms,
            c.timeout_ms,
            c.timeout_ms_limit,
        )?,
        result_ttl_s: within(
            "result_ttl_s",
            submit.result_ttl_s,
            c.result_ttl_s,
            c.result_ttl_s_limit,
        )?,
        max_result_bytes: c.max_result_bytes,
    })
}

/// Queue the new job `spec` and replicate its record (`queued`); the record.
pub(crate) async fn accept(jobs: &Jobs, spec: JobSpec) -> Result<JobRecord, Refused> {
    let handler = spec.handler.clone();
    let message = JobMessage {
        v: ProtocolVersion::CURRENT,
        kind: JobKind::Run,
        attempt: 1,
        lost: 0,
        job: spec,
    };
    // Queued before recorded: a record whose message was never queued would say
    // `queued` for ever; a message whose record is late is recorded by its runner.
    match jobs.enqueue(&message, Duration::ZERO).await {
        Ok(()) => {}
        Err(RequestError::Unroutable(_)) => {
            return Err((
                ReplyStatus::NotFound,
                "unknown_handler",
                format!("no logic server runs jobs of a handler named `{handler}`"),
            ));
        }
        Err(e) => {
            return Err((
                ReplyStatus::Overloaded,
                "unavailable",
                format!("the job could not be queued: {e}"),
            ));
        }
    }
    let now = message.job.created_ms;
    let record = JobRecord::queued(&message.job, now.saturating_add(UNFINISHED_TTL_MS));
    let deadline = Instant::now() + Duration::from_secs(5);
    if let Err(e) = jobs
        .dispatcher
        .store
        .commit(
            &Effects::default(),
            Some(RecordWrite::job(record.clone())),
            deadline,
        )
        .await
    {
        // The job is queued and runs; its record stands here and goes out when the
        // transport is back (its runner records it anyway).
        tracing::warn!(id = %record.id, error = %e, "a job's record is not replicated yet");
    }
    Ok(record)
}

/// The options of a job submitted without any: the server's defaults.
pub(crate) fn default_options(jobs: &Jobs) -> JobOptions {
    let c = &jobs.config;
    JobOptions {
        max_attempts: c.max_attempts,
        timeout_ms: c.timeout_ms,
        result_ttl_s: c.result_ttl_s,
        max_result_bytes: c.max_result_bytes,
    }
}

async fn submit(jobs: &Jobs, request: &Request) -> Result<Reply, Refused> {
    let submit: Submit = serde_json::from_slice(&request.body)
        .map_err(|e| bad("invalid_job", format!("invalid job submission: {e}")))?;
    if submit.handler.is_empty() || submit.handler.starts_with('_') {
        return Err(bad("invalid_job", "no such handler name"));
    }
    let options = options(jobs, &submit)?;
    let body = serde_json::to_vec(&submit.body).unwrap_or_default();
    let user = request.user.clone();
    let (id, fingerprint) = match &request.idempotency_key {
        Some(key) => (
            keyed_id(user.as_deref(), key),
            Some(fingerprint(&submit.handler, &body)),
        ),
        None => (uuid::Uuid::new_v4().simple().to_string(), None),
    };
    if fingerprint.is_some()
        && let Some(existing) = jobs.fresh_record(&id).await
    {
        if existing.fingerprint != fingerprint {
            return Err((
                ReplyStatus::KeyReused,
                "idempotency_key_reused",
                "this Idempotency-Key was used with another job (handler or body)".to_owned(),
            ));
        }
        let mut reply = answer_with(jobs, request, &existing, 202);
        reply.headers = vec![("location".to_owned(), format!("/jobs/{id}"))];
        return Ok(reply);
    }
    let spec = JobSpec {
        id: id.clone(),
        handler: submit.handler.clone(),
        user,
        body,
        options,
        created_ms: unix_ms_now(),
        fingerprint,
        headers: request.headers.clone(),
        traceparent: None,
    };
    let record = accept(jobs, spec).await?;
    jobs.dispatcher.metrics.job_submitted();
    let mut reply = answer_with(jobs, request, &record, 202);
    reply.headers = vec![("location".to_owned(), format!("/jobs/{id}"))];
    Ok(reply)
}

/// The record of the job a request names, if the requester may see it: its
/// submitter, anyone for an anonymous job, an operator (a trusted publisher naming
/// no user) for any job.
async fn visible(jobs: &Jobs, request: &Request, id: &str) -> Result<JobRecord, Refused> {
    if !keelson_protocol::job::is_job_id(id) {
        return Err(not_found());
    }
    let record = jobs.fresh_record(id).await.ok_or_else(not_found)?;
    let operator = request.user.is_none() && request.headers.contains_key(OPERATOR_HEADER);
    if record.user.is_some() && record.user != request.user && !operator {
        return Err(not_found());
    }
    Ok(record)
}

/// A header an operator's request (`keelson jobs`) carries; honoured only from a
/// trusted publisher (checked before: see [`answer`]).
pub const OPERATOR_HEADER: &str = "x-keelson-operator";

fn query(request: &Request) -> Result<Query, Refused> {
    serde_json::from_slice(&request.body).map_err(|e| bad("invalid_job_query", e.to_string()))
}

async fn status(jobs: &Jobs, request: &Request) -> Result<Reply, Refused> {
    let q = query(request)?;
    let mut record = visible(jobs, request, &q.id).await?;
    if let Some(wait_s) = q.wait_s.filter(|w| *w > 0)
        && !record.state.is_terminal()
    {
        let wait = Duration::from_secs(wait_s.min(jobs.config.max_wait_s));
        let until_deadline = Duration::from_millis(
            request
                .deadline_unix_ms
                .saturating_sub(unix_ms_now())
                .saturating_sub(WAIT_MARGIN.as_millis() as u64),
        );
        let until = Instant::now() + wait.min(until_deadline);
        record = wait_for_end(jobs, &q.id, record, until).await;
    }
    Ok(answer_with(jobs, request, &record, 200))
}

/// Hold until the record of `id` is terminal or `until`; the last record seen.
async fn wait_for_end(jobs: &Jobs, id: &str, mut record: JobRecord, until: Instant) -> JobRecord {
    let waiting = jobs.waiters.register(id);
    loop {
        let notified = waiting.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(now) = jobs.dispatcher.store.job(id) {
            record = now;
        }
        if record.state.is_terminal() {
            return record;
        }
        // Woken by a change of this record; a recheck every second covers a change
        // that came in a snapshot merge (which announces nothing).
        let wake = until.min(Instant::now() + Duration::from_secs(1));
        if tokio::time::timeout_at(wake, notified).await.is_err() && Instant::now() >= until {
            return jobs.dispatcher.store.job(id).unwrap_or(record);
        }
    }
}

async fn cancel(jobs: &Jobs, request: &Request) -> Result<Reply, Refused> {
    let q = query(request)?;
    let record = visible(jobs, request, &q.id).await?;
    let now = unix_ms_now();
    let (next, http) = match record.state {
        s if s.is_terminal() => return Ok(answer_with(jobs, request, &record, 200)),
        JobState::Queued => {
            let mut next = record.clone();
            next.state = JobState::Cancelled;
            next.finished_ms = Some(now);
            next.error = Some(cancelled_error());
            next.expires_unix_ms =
                now.saturating_add(next.options.result_ttl_s.saturating_mul(1000));
            (next, 200)
        }
        _ => {
            let mut next = record.clone();
            next.cancel_requested = true;
            (next, 202)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    jobs.dispatcher
        .store
        .commit(
            &Effects::default(),
            Some(RecordWrite::job(next.clone())),
            deadline,
        )
        .await
        .map_err(|e| {
            (
                ReplyStatus::Overloaded,
                "unavailable",
                format!("the cancellation could not be replicated: {e}"),
            )
        })?;
    // What every server holds now may have got further than this write (the job
    // finished meanwhile): answer that.
    let shown = jobs.dispatcher.store.job(&q.id).unwrap_or(next);
    Ok(answer_with(jobs, request, &shown, http))
}

pub(crate) fn cancelled_error() -> ErrorInfo {
    ErrorInfo {
        code: "cancelled".to_owned(),
        message: "the job was cancelled".to_owned(),
    }
}

async fn list(jobs: &Jobs, request: &Request) -> Result<Reply, Refused> {
    let q: ListQuery = if request.body.is_empty() {
        ListQuery::default()
    } else {
        serde_json::from_slice(&request.body)
            .map_err(|e| bad("invalid_job_query", e.to_string()))?
    };
    // Like a status, after the barrier: a job another server just accepted or
    // finished is listed as it stands.
    if !jobs.dispatcher.store.barrier(super::BARRIER_WITHIN).await {
        tracing::debug!("job barrier timed out; listing what is here");
    }
    let mut records = jobs.dispatcher.store.jobs();
    records.retain(|r| q.state.is_none_or(|s| r.state == s));
    records.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
    let list: Vec<_> = records
        .iter()
        .map(|r| {
            let mut s = r.status_json();
            s["user"] = r.user.clone().into();
            s
        })
        .collect();
    let body = serde_json::json!({ "jobs": list }).to_string().into_bytes();
    Ok(Reply::ok(request.id.clone(), body, jobs.node()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_ids_differ_by_user_and_look_like_job_ids() {
        let a = keyed_id(Some("alice"), "k");
        assert!(keelson_protocol::job::is_job_id(&a));
        assert_eq!(a, keyed_id(Some("alice"), "k"));
        assert_ne!(a, keyed_id(Some("bob"), "k"));
        assert_ne!(a, keyed_id(None, "k"));
    }
}
