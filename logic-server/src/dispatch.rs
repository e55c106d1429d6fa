//! One delivery, from bytes to reply: decode, check the deadline, answer from the
//! outcome record when the request was seen before, else run the handler (catching
//! panics, bounded by the deadline) and replicate its effects with its outcome,
//! reply, then settle.

use crate::config::IdempotencyConfig;
use crate::context::{ContextStore, Effects, RecordValue, RecordWrite, UserContext};
use crate::handler::{Handler, HandlerError, RequestCtx};
use crate::plugin::Registry;
use crate::stats::ServerStats;
use futures_util::FutureExt;
use keelson_protocol::control::{ClusterView, NodeState};
use keelson_protocol::idempotency::{ANONYMOUS_SCOPE, OutcomeRecord, RecordPhase, record_key};
use keelson_protocol::transport::{Delivery, Publisher};
use keelson_protocol::{ProtocolVersion, Reply, ReplyStatus, Request, decode, encode, peek_id};
use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// How the dead-letter reason of a request refused by [`Dispatcher::check_origin`]
/// begins: its routing key and handler disagree.
pub const ROUTE_MISMATCH: &str = "route mismatch";
/// How the dead-letter reason of a request refused by [`Dispatcher::check_origin`]
/// begins: it names a user, and its publisher is not trusted to.
pub const UNTRUSTED_PUBLISHER: &str = "untrusted publisher";

/// What a server needs to handle a delivery; shared by all its tasks.
#[derive(Debug)]
pub(crate) struct Dispatcher {
    pub(crate) node_id: String,
    pub(crate) registry: Registry,
    pub(crate) store: Arc<dyn ContextStore>,
    /// The peers heard on the control channel: who hosts which handlers.
    pub(crate) peers: Arc<Mutex<ClusterView>>,
    pub(crate) limits: Limits,
    /// Broker users whose requests may name a user (`trusted_publishers`).
    pub(crate) trusted_publishers: BTreeSet<String>,
    /// `trust_unstamped_requests`: an unknown publisher is trusted (upgrades only).
    pub(crate) trust_unstamped: bool,
    /// The server's live figures (refusals are counted here).
    pub(crate) stats: Arc<ServerStats>,
    /// The plugins' resources and the client for handler-to-handler calls.
    pub(crate) shared: Arc<crate::handler::Shared>,
    /// The server's metric handles.
    pub(crate) metrics: crate::metrics::ServerMetrics,
}

/// The bounds a server puts on the requests it takes.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) max_deadline_ms: u64,
    pub(crate) max_deliveries: u32,
    pub(crate) idempotency: IdempotencyConfig,
}

/// How long a request for a handler hosted only by peers is held before it goes back
/// to the queue, so that servers of different versions sharing a queue do not pass
/// it back and forth in a tight loop.
const HAND_OVER_DELAY: Duration = Duration::from_millis(5);

/// How long the record of a request without a client key outlives its deadline: a
/// redelivery later than that is dropped as expired anyway; the margin covers clocks
/// that disagree.
const REQUEST_RECORD_MARGIN_MS: u64 = 60_000;

/// How a delivery ended, for logs and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handled {
    Replied(ReplyStatus),
    /// Answered from the outcome record; the handler did not run.
    Replayed(ReplyStatus),
    /// Refused before the handler: deadline past or too far, key reused or busy.
    Refused(ReplyStatus),
    DeadLettered,
    /// Given back to the queue for a peer that hosts the handler.
    HandedOver,
    /// A redelivery, put back as a copy that counts it; the copy runs.
    Recounted,
}

pub(crate) fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Why a request may not run as it says (see [`Dispatcher::check_origin`]).
struct Refusal {
    status: ReplyStatus,
    code: &'static str,
    /// The dead-letter reason, for the operator.
    reason: String,
}

/// Where a request's outcome is recorded.
struct Keyed {
    scope: String,
    key: String,
    /// The client sent an `Idempotency-Key` (else the request id is the key).
    client: bool,
}

impl Dispatcher {
    /// Whether `delivery` must run alone on this server: an earlier delivery of it
    /// reached a consumer and ended without an outcome (that server may have died of
    /// it), so that if it kills this one too, nothing else is lost with it or blamed
    /// for it.
    pub(crate) fn needs_isolation(&self, delivery: &Delivery) -> bool {
        !delivery.redelivered && (2..=self.limits.max_deliveries).contains(&delivery.deliveries())
    }

    /// Handle one delivery, and count how it ended.
    pub(crate) async fn handle(&self, delivery: Delivery) -> Handled {
        let handled = self.handle_uncounted(delivery).await;
        self.metrics.delivery(handled);
        handled
    }

    async fn handle_uncounted(&self, delivery: Delivery) -> Handled {
        if delivery.redelivered {
            // It reached a consumer before and was not settled (that server died or
            // lost its connection). Not every queue counts deliveries (classic queues
            // and the memory transport do not): count it in a copy, which runs.
            if let Err(e) = delivery.count_redelivery().await {
                tracing::warn!(error = %e, "could not count a redelivery; it comes again");
            }
            return Handled::Recounted;
        }
        let mut request: Request = match decode(&delivery.payload) {
            Ok(r) => r,
            Err(e) => return self.undecodable(delivery, e).await,
        };
        // Tracing: the rest runs in the request's `process` span (see crate::trace).
        let span = crate::trace::process_span(&mut request, &delivery.headers);
        tracing::Instrument::instrument(self.handle_request(delivery, request), span).await
    }

    /// [`Dispatcher::handle`] of a decoded request.
    async fn handle_request(&self, delivery: Delivery, request: Request) -> Handled {
        if let Err(refusal) = self.check_origin(&delivery, &request) {
            return self.refuse_origin(delivery, &request.id, refusal).await;
        }
        let now_ms = unix_ms_now();
        let deadline = match self.time_left(&request, now_ms) {
            Ok(left) => Instant::now() + left,
            Err(reply) => return self.refuse(delivery, *reply).await,
        };
        let handler = self.registry.get(&request.handler).cloned();
        if handler.is_none() && self.peer_hosts(&request.handler) {
            // During a rolling upgrade servers of two versions share one queue; a
            // handler only the newer ones host must reach one of them.
            tokio::time::sleep(HAND_OVER_DELAY).await;
            if let Err(e) = delivery.hand_back().await {
                tracing::debug!(error = %e, "hand-back failed; the request will be redelivered");
            }
            return Handled::HandedOver;
        }
        let keyed = Keyed {
            scope: request
                .user
                .clone()
                .unwrap_or_else(|| ANONYMOUS_SCOPE.to_owned()),
            key: record_key(request.idempotency_key.as_deref(), &request.id),
            client: request.idempotency_key.is_some(),
        };
        let deliveries = delivery.deliveries();
        let mut record = self.store.record(&keyed.scope, &keyed.key);
        if deliveries > 1 && record.is_none() {
            // The server that held it before may have replicated its effects and
            // outcome just before it died: let them arrive before deciding to run.
            let within = Duration::from_millis(self.limits.idempotency.redelivery_barrier_ms);
            if !self.store.barrier(within).await {
                tracing::debug!(id = %request.id, "redelivery barrier timed out");
            }
            record = self.store.record(&keyed.scope, &keyed.key);
        }
        if let Some(reply) =
            record.and_then(|r| self.answer_from_record(&request, &keyed, r, now_ms))
        {
            let status = reply.status;
            send(&delivery, &reply).await;
            settle_ack(delivery).await;
            return if reply.replayed {
                Handled::Replayed(status)
            } else {
                Handled::Refused(status)
            };
        }
        if deliveries > self.limits.max_deliveries {
            return self.poison(delivery, request, deliveries).await;
        }
        if keyed.client
            && let Err(reply) = self.mark_running(&request, &keyed, deadline).await
        {
            return self.refuse(delivery, reply).await;
        }
        let effects = Arc::new(Effects::default());
        #[cfg(feature = "test-failpoints")]
        let handler_name = request.handler.clone();
        let fingerprint = request.idempotency_fingerprint.clone();
        let id = request.id.clone();
        let deadline_ms = request.deadline_unix_ms;
        let mut reply = self
            .run(handler, request, deadline, effects.clone(), None)
            .await;
        crate::trace::record_status(reply.status);
        // A timeout that wrote nothing may simply run again; any other outcome of a
        // keyed request, and any request that wrote, is recorded with its effects.
        let wrote = !effects.is_empty();
        let record = (wrote || (keyed.client && reply.status != ReplyStatus::Timeout))
            .then(|| self.outcome(keyed, &id, fingerprint, deadline_ms, &reply));
        if let Err(e) = self.store.commit(&effects, record, deadline).await {
            // The effects and the outcome stand here and go out when the transport
            // is back; the caller must not take this as done.
            tracing::warn!(%id, error = %e, "the request's effects are not replicated yet");
            reply = self.error(
                id,
                ReplyStatus::Overloaded,
                "not_replicated",
                "the request's effects could not be replicated yet; retry with the same Idempotency-Key",
            );
        }
        #[cfg(feature = "test-failpoints")]
        crate::failpoint::after_commit(&handler_name);
        let status = reply.status;
        match encode(&reply) {
            Ok(bytes) => {
                if let Err(e) = delivery.reply(bytes).await {
                    // Not acked: the broker redelivers it, to us or a peer, which
                    // answers it from the record.
                    tracing::warn!(error = %e, "could not publish a reply; requeueing");
                    let _ = delivery.requeue().await;
                    return Handled::Replied(status);
                }
            }
            Err(e) => tracing::error!(error = %e, "could not encode a reply"),
        }
        settle_ack(delivery).await;
        Handled::Replied(status)
    }

    /// A request that cannot be read: dead-lettered, and answered when it has a
    /// readable id and a reply address (a peer of another version may be waiting).
    async fn undecodable(&self, delivery: Delivery, e: keelson_protocol::DecodeError) -> Handled {
        let reason = format!("undecodable request: {e}");
        if let Some(id) = peek_id(&delivery.payload) {
            let code = match e {
                keelson_protocol::DecodeError::IncompatibleVersion { .. } => "incompatible_version",
                _ => "undecodable_request",
            };
            let reply = self.error(id, ReplyStatus::BadRequest, code, reason.clone());
            send(&delivery, &reply).await;
        }
        tracing::warn!(%reason, "dead-lettering a message");
        if let Err(e) = delivery.reject(reason).await {
            tracing::warn!(error = %e, "could not dead-letter; it will be redelivered");
        }
        Handled::DeadLettered
    }

    /// Whether the request may run as it says: published on the route of the handler
    /// it names, and, when it names a user, by a trusted publisher (a gateway).
    fn check_origin(&self, delivery: &Delivery, request: &Request) -> Result<(), Refusal> {
        if let Some(route) = delivery.route()
            && route != request.handler
        {
            self.stats.count_route_mismatch();
            return Err(Refusal {
                status: ReplyStatus::BadRequest,
                code: "route_mismatch",
                reason: format!(
                    "{ROUTE_MISMATCH}: published on route `{route}` but the envelope names handler `{}`",
                    request.handler
                ),
            });
        }
        if request.user.is_some() && !self.trusts(delivery.publisher()) {
            self.stats.count_untrusted_publisher();
            return Err(Refusal {
                status: ReplyStatus::Forbidden,
                code: "untrusted_publisher",
                reason: format!(
                    "{UNTRUSTED_PUBLISHER}: a request naming a user from {}, which is not in trusted_publishers",
                    delivery.publisher()
                ),
            });
        }
        Ok(())
    }

    pub(crate) fn trusts(&self, publisher: &Publisher) -> bool {
        match publisher {
            Publisher::Local => true,
            Publisher::User(user) => self.trusted_publishers.contains(user),
            Publisher::Unknown => self.trust_unstamped,
            _ => false,
        }
    }

    /// A request that failed [`Dispatcher::check_origin`]: dead-lettered with the
    /// reason, never run nor retried; its requester is told why.
    async fn refuse_origin(&self, delivery: Delivery, id: &str, refusal: Refusal) -> Handled {
        tracing::warn!(%id, reason = %refusal.reason, "dead-lettering a refused request");
        let message = match refusal.status {
            ReplyStatus::Forbidden => "this publisher may not send requests on behalf of a user",
            _ => "the request's route and handler disagree",
        };
        let reply = self.error(id, refusal.status, refusal.code, message);
        send(&delivery, &reply).await;
        if let Err(e) = delivery.reject(refusal.reason).await {
            tracing::warn!(error = %e, "could not dead-letter; it will be redelivered");
        }
        Handled::DeadLettered
    }

    /// The time left until the request's deadline, or the refusal of a deadline past
    /// or farther than `max_deadline_ms`.
    fn time_left(&self, request: &Request, now_ms: u64) -> Result<Duration, Box<Reply>> {
        if request.deadline_unix_ms <= now_ms {
            // The caller has most likely given up; if not, it learns why.
            tracing::debug!(id = %request.id, handler = %request.handler, "refusing an expired request");
            return Err(Box::new(self.error(
                request.id.clone(),
                ReplyStatus::Timeout,
                "deadline_passed",
                "the request's deadline passed before a server took it",
            )));
        }
        let ahead = request.deadline_unix_ms - now_ms;
        if ahead > self.limits.max_deadline_ms {
            return Err(Box::new(self.error(
                request.id.clone(),
                ReplyStatus::BadRequest,
                "deadline_out_of_range",
                format!(
                    "the request's deadline is {ahead} ms away; this server takes at most {} ms",
                    self.limits.max_deadline_ms
                ),
            )));
        }
        Ok(Duration::from_millis(ahead))
    }

    /// The record of a request's outcome: kept `ttl_s` for a client's key, until the
    /// deadline has surely passed for a request id.
    fn outcome(
        &self,
        keyed: Keyed,
        id: &str,
        fingerprint: Option<String>,
        deadline_ms: u64,
        reply: &Reply,
    ) -> RecordWrite {
        let expires_unix_ms = if keyed.client {
            unix_ms_now().saturating_add(self.limits.idempotency.ttl_s.saturating_mul(1000))
        } else {
            deadline_ms.saturating_add(REQUEST_RECORD_MARGIN_MS)
        };
        RecordWrite {
            scope: keyed.scope,
            key: keyed.key,
            record: RecordValue::Outcome(OutcomeRecord {
                v: ProtocolVersion::CURRENT,
                request_id: id.to_owned(),
                fingerprint,
                expires_unix_ms,
                phase: RecordPhase::Done {
                    status: reply.status,
                    body: reply.body.clone(),
                    error: reply.error.clone(),
                    served_by: self.node_id.clone(),
                    http_status: reply.http_status,
                    headers: reply.headers.clone(),
                },
            }),
        }
    }

    fn error(
        &self,
        id: impl Into<String>,
        status: ReplyStatus,
        code: &str,
        message: impl Into<String>,
    ) -> Reply {
        Reply::error(id, status, code, message, &self.node_id)
    }

    /// A request delivered more than `max_deliveries` times without an outcome: its
    /// handler most likely kills the server. Dead-lettered with the reason and the
    /// count (in its headers); its requester gets an error, not a timeout.
    async fn poison(&self, delivery: Delivery, request: Request, deliveries: u32) -> Handled {
        let max = self.limits.max_deliveries;
        let reason = format!(
            "delivered {deliveries} times without an outcome (max_deliveries = {max}): its handler `{}` may kill the server",
            request.handler
        );
        tracing::error!(id = %request.id, handler = %request.handler, deliveries, "dead-lettering a request that never completed");
        let reply = self.error(
            request.id,
            ReplyStatus::HandlerError,
            "delivery_limit",
            reason.clone(),
        );
        send(&delivery, &reply).await;
        if let Err(e) = delivery.reject(reason).await {
            tracing::warn!(error = %e, "could not dead-letter; it will be redelivered");
        }
        Handled::DeadLettered
    }

    /// Answer without running the handler, and settle.
    async fn refuse(&self, delivery: Delivery, reply: Reply) -> Handled {
        send(&delivery, &reply).await;
        settle_ack(delivery).await;
        Handled::Refused(reply.status)
    }

    /// The answer owed to a request whose key has `record`: the recorded reply, a
    /// refusal of a reused or busy key; `None` when the handler should run.
    fn answer_from_record(
        &self,
        request: &Request,
        keyed: &Keyed,
        record: OutcomeRecord,
        now_ms: u64,
    ) -> Option<Reply> {
        if keyed.client && record.fingerprint != request.idempotency_fingerprint {
            return Some(self.error(
                request.id.clone(),
                ReplyStatus::KeyReused,
                "idempotency_key_reused",
                "this Idempotency-Key was used with another request (handler or body)",
            ));
        }
        match record.phase {
            RecordPhase::Done {
                status,
                body,
                error,
                served_by,
                http_status,
                headers,
            } => Some(Reply {
                v: ProtocolVersion::CURRENT,
                id: request.id.clone(),
                status,
                body,
                error,
                served_by,
                replayed: true,
                http_status,
                headers,
            }),
            // A redelivery of the request that is running (its server died), or one
            // whose deadline has passed: run it.
            RecordPhase::Running { until_unix_ms }
                if record.request_id == request.id || until_unix_ms <= now_ms =>
            {
                None
            }
            RecordPhase::Running { .. } => Some(self.error(
                request.id.clone(),
                ReplyStatus::Conflict,
                "request_in_progress",
                "a request with this Idempotency-Key is still running; retry later",
            )),
        }
    }

    /// Record that a request with a client key runs now, so that a retry meanwhile is
    /// told so rather than run beside it. Refused when the scope holds too many keys.
    async fn mark_running(
        &self,
        request: &Request,
        keyed: &Keyed,
        deadline: Instant,
    ) -> Result<(), Reply> {
        let limit = if request.user.is_some() {
            self.limits.idempotency.max_keys_per_user
        } else {
            self.limits.idempotency.max_anonymous_keys
        };
        if self.store.client_keys(&keyed.scope) >= limit {
            return Err(self.error(
                request.id.clone(),
                ReplyStatus::TooManyRequests,
                "idempotency_keys_exhausted",
                format!(
                    "{limit} idempotency keys are held for this user; retry once older ones expire ({} s after use)",
                    self.limits.idempotency.ttl_s
                ),
            ));
        }
        let record = RecordWrite {
            scope: keyed.scope.clone(),
            key: keyed.key.clone(),
            record: RecordValue::Outcome(OutcomeRecord {
                v: ProtocolVersion::CURRENT,
                request_id: request.id.clone(),
                fingerprint: request.idempotency_fingerprint.clone(),
                expires_unix_ms: request.deadline_unix_ms,
                phase: RecordPhase::Running {
                    until_unix_ms: request.deadline_unix_ms,
                },
            }),
        };
        // Best effort: if it cannot be replicated, a concurrent retry elsewhere is
        // not refused, and the outcome record still settles which reply counts.
        if let Err(e) = self
            .store
            .commit(&Effects::default(), Some(record), deadline)
            .await
        {
            tracing::debug!(error = %e, "the running mark is not replicated yet");
        }
        Ok(())
    }

    /// Whether a live peer (not this server) hosts `handler`: taking requests, or
    /// paused by its governor (it will take them again).
    fn peer_hosts(&self, handler: &str) -> bool {
        let view = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        view.nodes(Instant::now()).iter().any(|n| {
            matches!(n.state, NodeState::Up | NodeState::Paused)
                && n.heartbeat.node != self.node_id
                && n.heartbeat.handlers.iter().any(|h| h == handler)
        })
    }

    /// Run handler `h` on `request` (as job `job`, if any) under `deadline` and a
    /// panic guard; its context writes go to `effects`.
    pub(crate) async fn run(
        &self,
        h: Option<Arc<dyn Handler>>,
        request: Request,
        deadline: Instant,
        effects: Arc<Effects>,
        job: Option<crate::job_ctx::JobCtx>,
    ) -> Reply {
        let Request {
            id,
            handler,
            user,
            attempt,
            idempotency_key,
            headers,
            body,
            deadline_unix_ms,
            ..
        } = request;
        let Some(h) = h else {
            return Reply::error(
                id,
                ReplyStatus::NotFound,
                "unknown_handler",
                format!("no handler named `{handler}`"),
                &self.node_id,
            );
        };
        let context = user
            .as_ref()
            .map(|u| UserContext::new(self.store.clone(), u.clone(), effects));
        let ctx = RequestCtx {
            id: id.clone(),
            handler: handler.clone(),
            user,
            deadline,
            attempt,
            idempotency_key,
            headers,
            body: body.into(),
            context,
            shared: self.shared.clone(),
            deadline_unix_ms,
            caller: std::sync::OnceLock::new(),
            job,
        };
        let call =
            tracing::Instrument::instrument(h.call(ctx), crate::trace::handler_span(&handler, &id));
        let call = AssertUnwindSafe(crate::panic::Catching(call)).catch_unwind();
        let started = Instant::now();
        let result = tokio::time::timeout_at(deadline, call).await;
        self.metrics
            .handler_ran(&handler, started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(Ok(response))) => {
                let (body, status, headers) = response.into_parts();
                let mut reply = Reply::ok(id, body.into(), &self.node_id);
                reply.http_status = (status != 200).then_some(status);
                reply.headers = headers;
                reply
            }
            Ok(Ok(Err(e))) => {
                if let HandlerError::Internal(cause) = &e {
                    tracing::error!(%id, %handler, %cause, "handler failed");
                }
                let (status, code, message) = e.to_reply_parts();
                Reply::error(id, status, code, message, &self.node_id)
            }
            Ok(Err(panic)) => {
                // If the hook ran while the panic unwound through the catch
                // (Keelson's binaries install one), the panic's one log line is this.
                let cause = crate::panic::message(panic.as_ref());
                let location = crate::panic::take_location().unwrap_or_default();
                tracing::error!(%id, %handler, %cause, %location, "handler panicked");
                Reply::error(
                    id,
                    ReplyStatus::HandlerError,
                    "handler_panicked",
                    "the handler failed",
                    &self.node_id,
                )
            }
            Err(_) => {
                tracing::warn!(%id, %handler, "handler ran past the deadline; abandoned");
                Reply::error(
                    id,
                    ReplyStatus::Timeout,
                    "timeout",
                    "the deadline passed while the handler ran",
                    &self.node_id,
                )
            }
        }
    }
}

/// Publish `reply` to the requester, if it awaits one; a failure is logged (the
/// requester times out).
pub(crate) async fn send(delivery: &Delivery, reply: &Reply) {
    match encode(reply) {
        Ok(bytes) => {
            if let Err(e) = delivery.reply(bytes).await {
                tracing::debug!(error = %e, "could not publish a reply");
            }
        }
        Err(e) => tracing::error!(error = %e, "could not encode a reply"),
    }
}

async fn settle_ack(delivery: Delivery) {
    if let Err(e) = delivery.ack().await {
        // At-least-once: the message will come again and be answered again.
        tracing::warn!(error = %e, "ack failed; the request may be redelivered");
    }
}
