//! One delivery, from bytes to reply: decode, check the deadline, run the handler
//! (catching panics, bounded by the deadline), reply, then settle.

use crate::context::{ContextStore, UserContext};
use crate::handler::{Handler, HandlerError, RequestCtx};
use crate::plugin::Registry;
use futures_util::FutureExt;
use keelson_protocol::control::{ClusterView, NodeState};
use keelson_protocol::transport::Delivery;
use keelson_protocol::{Reply, ReplyStatus, Request, decode, encode};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// What a server needs to handle a delivery; shared by all its tasks.
#[derive(Debug)]
pub(crate) struct Dispatcher {
    pub(crate) node_id: String,
    pub(crate) registry: Registry,
    pub(crate) store: Arc<dyn ContextStore>,
    /// The peers heard on the control channel: who hosts which handlers.
    pub(crate) peers: Arc<Mutex<ClusterView>>,
}

/// How long a request for a handler hosted only by peers is held before it goes back
/// to the queue, so that servers of different versions sharing a queue do not pass
/// it back and forth in a tight loop.
const HAND_OVER_DELAY: Duration = Duration::from_millis(5);

/// How a delivery ended, for logs and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Handled {
    Replied(ReplyStatus),
    Expired,
    DeadLettered,
    /// Requeued for a peer that hosts the handler.
    HandedOver,
}

pub(crate) fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Dispatcher {
    pub(crate) async fn handle(&self, delivery: Delivery) -> Handled {
        let request: Request = match decode(&delivery.payload) {
            Ok(r) => r,
            Err(e) => {
                let reason = format!("undecodable request: {e}");
                tracing::warn!(%reason, "dead-lettering a message");
                if let Err(e) = delivery.reject(reason).await {
                    tracing::warn!(error = %e, "could not dead-letter; it will be redelivered");
                }
                return Handled::DeadLettered;
            }
        };
        let now_ms = unix_ms_now();
        if request.deadline_unix_ms <= now_ms {
            // The caller has given up; running it would only waste a slot.
            tracing::debug!(id = %request.id, handler = %request.handler, "dropping expired request");
            settle_ack(delivery).await;
            return Handled::Expired;
        }
        let deadline = Instant::now() + Duration::from_millis(request.deadline_unix_ms - now_ms);
        let handler = self.registry.get(&request.handler).cloned();
        if handler.is_none() && self.peer_hosts(&request.handler) {
            // During a rolling upgrade servers of two versions share one queue; a
            // handler only the newer ones host must reach one of them.
            tokio::time::sleep(HAND_OVER_DELAY).await;
            if let Err(e) = delivery.requeue().await {
                tracing::debug!(error = %e, "requeue failed; the request will be redelivered");
            }
            return Handled::HandedOver;
        }
        let reply = self.run(handler, request, deadline).await;
        let status = reply.status;
        match encode(&reply) {
            Ok(bytes) => {
                if let Err(e) = delivery.reply(bytes).await {
                    // Not acked: the broker redelivers it, to us or a peer.
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

    async fn run(&self, h: Option<Arc<dyn Handler>>, request: Request, deadline: Instant) -> Reply {
        let Request {
            id,
            handler,
            user,
            attempt,
            idempotency_key,
            headers,
            body,
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
            .map(|u| UserContext::new(self.store.clone(), u.clone()));
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
        };
        let call = AssertUnwindSafe(h.call(ctx)).catch_unwind();
        match tokio::time::timeout_at(deadline, call).await {
            Ok(Ok(Ok(response))) => Reply::ok(id, response.into_body().into(), &self.node_id),
            Ok(Ok(Err(e))) => {
                if let HandlerError::Internal(cause) = &e {
                    tracing::error!(%id, %handler, %cause, "handler failed");
                }
                let (status, code, message) = e.to_reply_parts();
                Reply::error(id, status, code, message, &self.node_id)
            }
            Ok(Err(panic)) => {
                let cause = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "non-string panic".to_owned());
                tracing::error!(%id, %handler, %cause, "handler panicked");
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

async fn settle_ack(delivery: Delivery) {
    if let Err(e) = delivery.ack().await {
        // At-least-once: the message will come again and be answered again.
        tracing::warn!(error = %e, "ack failed; the request may be redelivered");
    }
}
