//! Helpers shared by the logic server's tests: requests sent the way a gateway sends
//! them on a `MemoryTransport`, servers started on it, and failure guards.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use keelson_logic_server::{
    ContextConfig, Handler, LogicServer, LogicServerConfig, Registry, ReplicatedContextStore,
    RunningServer,
};
use keelson_protocol::transport::memory::MemoryTransport;
use keelson_protocol::transport::{Message, RequestError};
use keelson_protocol::{Reply, ReplyStatus, Request, Transport, decode, encode};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// The service every test server belongs to.
pub const SERVICE: &str = "svc";
/// Upper bound on any wait that should succeed; hitting it fails the test.
pub const GUARD: Duration = Duration::from_secs(5);
/// How long a test watches for something that must not happen.
pub const QUIET: Duration = Duration::from_millis(300);
/// Deadline of requests that are expected to be answered.
pub const LONG: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

pub fn now_unix_ms() -> u64 {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    u64::try_from(d.as_millis()).unwrap()
}

pub fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap()
}

pub fn next_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("req-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A request as a gateway builds it: deadline `ttl` from now.
pub fn request(handler: &str, user: Option<&str>, body: &[u8], ttl: Duration) -> Request {
    let mut r = Request::new(next_id(), handler, body.to_vec(), now_unix_ms() + ms(ttl));
    r.user = user.map(str::to_owned);
    r
}

/// Publish `req` on its handler's route and decode the reply; the transport waits
/// until `wait_until`.
pub async fn send(
    transport: &MemoryTransport,
    req: &Request,
    wait_until: Instant,
) -> Result<Reply, RequestError> {
    let bytes = encode(req).unwrap();
    let raw = transport
        .request(&req.handler, Message::new(bytes), wait_until)
        .await?;
    Ok(decode::<Reply>(&raw).expect("the server's reply decodes"))
}

/// Build a request with deadline `ttl` and send it with the same transport deadline,
/// as a gateway does.
pub async fn ask(
    transport: &MemoryTransport,
    handler: &str,
    user: Option<&str>,
    body: &[u8],
    ttl: Duration,
) -> Result<Reply, RequestError> {
    let req = request(handler, user, body, ttl);
    send(transport, &req, Instant::now() + ttl).await
}

/// `ask` with a long deadline, for requests that must be answered.
pub async fn ask_ok(
    transport: &MemoryTransport,
    handler: &str,
    user: Option<&str>,
    body: &[u8],
) -> Reply {
    guard("a reply", ask(transport, handler, user, body, LONG))
        .await
        .expect("the request is answered")
}

/// Await `f`, failing the test if it takes longer than `GUARD`.
pub async fn guard<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(GUARD, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

pub fn config(concurrency: u16, drain_timeout_ms: u64) -> LogicServerConfig {
    LogicServerConfig {
        service: SERVICE.to_owned(),
        concurrency,
        drain_timeout_ms,
        ..LogicServerConfig::default()
    }
}

pub fn registry(handlers: Vec<(&str, Arc<dyn Handler>)>) -> Registry {
    let mut r = Registry::default();
    for (name, h) in handlers {
        r.insert(name, h);
    }
    r
}

pub async fn start_with(
    transport: &MemoryTransport,
    node: &str,
    config: LogicServerConfig,
    registry: Registry,
) -> RunningServer {
    let transport: Arc<dyn keelson_protocol::Transport> = Arc::new(transport.clone());
    let store = ReplicatedContextStore::start(transport.clone(), node, ContextConfig::default())
        .await
        .expect("the context store starts");
    LogicServer::new(config, node, transport, registry, store)
        .start()
        .await
        .expect("the server starts")
}

/// A server "node-a" with default concurrency and drain timeout.
pub async fn start(
    transport: &MemoryTransport,
    handlers: Vec<(&str, Arc<dyn Handler>)>,
) -> RunningServer {
    start_with(transport, "node-a", config(8, 10_000), registry(handlers)).await
}

pub fn assert_error(reply: &Reply, status: ReplyStatus, code: &str) {
    assert_error_from(reply, status, code, "node-a");
}

/// An error reply with `status` and `code`, produced by `node`.
pub fn assert_error_from(reply: &Reply, status: ReplyStatus, code: &str, node: &str) {
    assert_eq!(reply.status, status, "reply: {reply:?}");
    let error = reply
        .error
        .as_ref()
        .expect("an error reply carries ErrorInfo");
    assert_eq!(error.code, code, "reply: {reply:?}");
    assert!(
        reply.body.is_empty(),
        "an error reply has no body: {reply:?}"
    );
    assert_eq!(reply.served_by, node);
}
