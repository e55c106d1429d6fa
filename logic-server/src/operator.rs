//! Answering operator requests (`keelson context get`): a consumer of the queue
//! [`OPERATOR_SERVICE`] beside the server's own, started once the context store
//! joined, stopped with the server.
//!
//! An operator request reads any user's context, so who may send one matters more
//! than for a handler: its route starts with `_` (no gateway forwards it from
//! HTTP), it must name the user, and its publisher must be one the server trusts to
//! name users (`trusted_publishers`, validated by the broker). Anything else is
//! answered `forbidden` or `bad_request` and dead-lettered, like a refused request
//! of the server's own queue.

use crate::config::LogicServerConfig;
use crate::context::ContextStore;
use keelson_protocol::operator::{CONTEXT_GET_ROUTE, OPERATOR_SERVICE};
use keelson_protocol::transport::{Delivery, Publisher, ServiceSpec, TransportError};
use keelson_protocol::{Reply, ReplyStatus, Request, Transport, decode};
use std::collections::BTreeSet;
use std::sync::Arc;

/// How many operator requests a server holds at once: they are rare and quick.
const PREFETCH: u16 = 4;

/// Who may send operator requests, from the server's configuration.
#[derive(Debug, Clone)]
struct Trust {
    publishers: BTreeSet<String>,
    unstamped: bool,
}

impl Trust {
    /// `trusted_publishers`, or when unset the server's own broker user, as for the
    /// requests of its own queue.
    fn of(config: &LogicServerConfig, transport: &dyn Transport) -> Self {
        let publishers = match (&config.trusted_publishers, transport.publisher()) {
            (Some(list), _) => list.iter().cloned().collect(),
            (None, Publisher::User(user)) => BTreeSet::from([user]),
            (None, _) => BTreeSet::new(),
        };
        Self {
            publishers,
            unstamped: config.trust_unstamped_requests,
        }
    }

    fn trusts(&self, publisher: &Publisher) -> bool {
        match publisher {
            Publisher::Local => true,
            Publisher::User(user) => self.publishers.contains(user),
            Publisher::Unknown => self.unstamped,
            _ => false,
        }
    }
}

/// The running consumer of operator requests; stopped on drop or with [`stop`](Self::stop).
#[derive(Debug)]
pub struct OperatorService {
    task: tokio::task::JoinHandle<()>,
}

impl OperatorService {
    /// Declare [`OPERATOR_SERVICE`] (bound to the operator routes) and answer its
    /// requests from `store`, as node `node_id`.
    pub async fn start(
        config: &LogicServerConfig,
        node_id: &str,
        transport: Arc<dyn Transport>,
        store: Arc<dyn ContextStore>,
    ) -> Result<Self, TransportError> {
        transport
            .declare_service(&ServiceSpec {
                name: OPERATOR_SERVICE.to_owned(),
                routes: vec![CONTEXT_GET_ROUTE.to_owned()],
            })
            .await?;
        let mut requests = transport.consume(OPERATOR_SERVICE, PREFETCH).await?;
        let trust = Trust::of(config, transport.as_ref());
        let node_id = node_id.to_owned();
        let task = tokio::spawn(async move {
            while let Some(Ok(delivery)) = requests.next().await {
                answer(&trust, &node_id, store.as_ref(), delivery).await;
            }
        });
        Ok(Self { task })
    }

    /// Stop answering; what is unsettled goes back to the queue for a peer.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for OperatorService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(trust: &Trust, node_id: &str, store: &dyn ContextStore, delivery: Delivery) {
    let request: Request = match decode(&delivery.payload) {
        Ok(request) => request,
        Err(e) => {
            let _ = delivery
                .reject(format!("undecodable operator request: {e}"))
                .await;
            return;
        }
    };
    let refuse = |status, code: &str, message: &str| {
        Reply::error(request.id.clone(), status, code, message, node_id)
    };
    let refusal = if delivery.route().is_some_and(|r| r != request.handler)
        || request.handler != CONTEXT_GET_ROUTE
    {
        Some(refuse(
            ReplyStatus::BadRequest,
            "route_mismatch",
            "not an operator request of this route",
        ))
    } else if !trust.trusts(delivery.publisher()) {
        Some(refuse(
            ReplyStatus::Forbidden,
            "untrusted_publisher",
            "only trusted publishers may send operator requests",
        ))
    } else if request.user.is_none() {
        Some(refuse(
            ReplyStatus::BadRequest,
            "user_required",
            "name the user whose context to read",
        ))
    } else {
        None
    };
    if let Some(reply) = refusal {
        tracing::warn!(
            id = %request.id,
            publisher = %delivery.publisher(),
            "dead-lettering a refused operator request"
        );
        crate::dispatch::send(&delivery, &reply).await;
        let reason = reply.error.map(|e| e.message).unwrap_or_default();
        let _ = delivery.reject(format!("operator request: {reason}")).await;
        return;
    }
    let user = request.user.as_deref().unwrap_or_default();
    let reply = match store.user_view(user) {
        Some(view) => Reply::ok(request.id.clone(), view.to_string().into_bytes(), node_id),
        None => refuse(
            ReplyStatus::NotFound,
            "no_context",
            "no context is held for this user",
        ),
    };
    crate::dispatch::send(&delivery, &reply).await;
    let _ = delivery.ack().await;
}
