//! The consume loop of a logic server, driven the way a gateway drives it: encoded
//! `Request`s published on the in-memory transport, `Reply`s decoded from what comes
//! back. Every test runs a real `LogicServer` on a fresh `MemoryTransport`.
//!
//! Synchronisation is by channels and semaphores signalled from inside the handlers.
//! Timeouts appear only as failure guards (`GUARD`) and, where a test asserts that
//! something does *not* happen while a handler is held, as a quiet window (`QUIET`)
//! in which the forbidden event would fail the test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use keelson_logic_server::{Handler, HandlerError, RequestCtx, Response, async_trait};
use keelson_protocol::transport::memory::MemoryTransport;
use keelson_protocol::transport::{DEAD_LETTER_REASON_HEADER, Message, RequestError, ServiceSpec};
use keelson_protocol::{Reply, ReplyStatus, Transport};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

mod support;
use support::*;

// ---------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------

/// Returns its body unchanged.
struct Echo;

#[async_trait]
impl Handler for Echo {
    async fn call(&self, req: RequestCtx) -> Result<Response, HandlerError> {
        Ok(Response::raw_json(req.body().clone()))
    }
}

/// Answers `{"calls": n}` and counts its invocations.
#[derive(Default)]
struct Counting {
    calls: AtomicUsize,
}

#[async_trait]
impl Handler for Counting {
    async fn call(&self, _req: RequestCtx) -> Result<Response, HandlerError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        Response::json(&serde_json::json!({ "calls": n }))
    }
}

/// Panics.
struct Panics;

#[async_trait]
impl Handler for Panics {
    async fn call(&self, _req: RequestCtx) -> Result<Response, HandlerError> {
        panic!("the panicking handler panicked on purpose");
    }
}

/// Fails with a fixed error.
struct Fails(HandlerError);

#[async_trait]
impl Handler for Fails {
    async fn call(&self, _req: RequestCtx) -> Result<Response, HandlerError> {
        Err(self.0.clone())
    }
}

/// Needs the user's context; fails for an anonymous request.
struct NeedsContext;

#[async_trait]
impl Handler for NeedsContext {
    async fn call(&self, req: RequestCtx) -> Result<Response, HandlerError> {
        let ctx = req.context()?;
        Response::json(ctx.user())
    }
}

/// Writes the caller's own user id under `k` in their context.
struct CtxSet;

#[async_trait]
impl Handler for CtxSet {
    async fn call(&self, req: RequestCtx) -> Result<Response, HandlerError> {
        let ctx = req.context()?;
        ctx.set("k", ctx.user()).await?;
        Response::json(&serde_json::Value::Null)
    }
}

/// Reads `k` from the caller's context (`null` when absent).
struct CtxGet;

#[async_trait]
impl Handler for CtxGet {
    async fn call(&self, req: RequestCtx) -> Result<Response, HandlerError> {
        let v: Option<String> = req.context()?.get("k").await?;
        Response::json(&v)
    }
}

/// Increments the caller's counter `n`, answering its new value.
struct CtxIncr;

#[async_trait]
impl Handler for CtxIncr {
    async fn call(&self, req: RequestCtx) -> Result<Response, HandlerError> {
        let n = req.context()?.increment("n", 1).await?;
        Response::json(&n)
    }
}

/// Signals when it starts, then waits for a permit of `release` before answering
/// `"released"`. Tracks how many calls run at once.
struct Gate {
    started: mpsc::UnboundedSender<String>,
    release: Arc<Semaphore>,
    calls: AtomicUsize,
    running: AtomicUsize,
    max_running: AtomicUsize,
}

impl Gate {
    fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<String>) {
        let (started, rx) = mpsc::unbounded_channel();
        let gate = Arc::new(Self {
            started,
            release: Arc::new(Semaphore::new(0)),
            calls: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            max_running: AtomicUsize::new(0),
        });
        (gate, rx)
    }
}

#[async_trait]
impl Handler for Gate {
    async fn call(&self, req: RequestCtx) -> Result<Response, HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_running.fetch_max(now, Ordering::SeqCst);
        let _ = self.started.send(req.id().to_owned());
        self.release.acquire().await.unwrap().forget();
        self.running.fetch_sub(1, Ordering::SeqCst);
        Response::json("released")
    }
}

/// Sends on its channel when dropped: tells the test a handler future went away.
struct DropSignal(mpsc::UnboundedSender<()>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// Signals when it starts and never finishes; signals again when its future is
/// dropped.
struct Forever {
    started: mpsc::UnboundedSender<()>,
    dropped: mpsc::UnboundedSender<()>,
    calls: AtomicUsize,
}

impl Forever {
    fn new() -> (
        Arc<Self>,
        mpsc::UnboundedReceiver<()>,
        mpsc::UnboundedReceiver<()>,
    ) {
        let (started, started_rx) = mpsc::unbounded_channel();
        let (dropped, dropped_rx) = mpsc::unbounded_channel();
        let h = Arc::new(Self {
            started,
            dropped,
            calls: AtomicUsize::new(0),
        });
        (h, started_rx, dropped_rx)
    }
}

#[async_trait]
impl Handler for Forever {
    async fn call(&self, _req: RequestCtx) -> Result<Response, HandlerError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let _on_drop = DropSignal(self.dropped.clone());
        let _ = self.started.send(());
        std::future::pending().await
    }
}

// ---------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ok_reply_carries_the_handler_body_unchanged() {
    let transport = MemoryTransport::new();
    let _server = start(&transport, vec![("echo", Arc::new(Echo))]).await;

    // Odd spacing, unicode and key order: nothing may re-serialize it.
    let body = br#"{ "z":1,"a" : [true, null, 1.50], "s":"h\u00e9llo \u2603" }"#;
    let req = request("echo", None, body, LONG);
    let reply = guard(
        "the echo reply",
        send(&transport, &req, Instant::now() + LONG),
    )
    .await
    .unwrap();

    assert_eq!(reply.status, ReplyStatus::Ok, "reply: {reply:?}");
    assert_eq!(reply.body, body.to_vec());
    assert_eq!(reply.id, req.id);
    assert_eq!(reply.served_by, "node-a");
    assert_eq!(reply.error, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_answered_and_the_server_lives_on() {
    let transport = MemoryTransport::new();
    // Concurrency 1: the follow-up request can only be served after the panicking
    // task has released its slot, so a server wedged by the panic would show.
    let _server = start_with(
        &transport,
        "node-a",
        config(1, 10_000),
        registry(vec![("boom", Arc::new(Panics)), ("echo", Arc::new(Echo))]),
    )
    .await;

    let reply = ask_ok(&transport, "boom", None, b"{}").await;
    assert_error(&reply, ReplyStatus::HandlerError, "handler_panicked");
    let message = &reply.error.as_ref().unwrap().message;
    assert!(
        !message.contains("on purpose"),
        "the panic message must not reach the caller: {message}"
    );

    for i in 0..3 {
        let body = format!("{{\"after_panic\":{i}}}");
        let reply = ask_ok(&transport, "echo", None, body.as_bytes()).await;
        assert_eq!(reply.status, ReplyStatus::Ok, "reply: {reply:?}");
        assert_eq!(reply.body, body.as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_bound_to_the_service_but_not_hosted_is_unknown_handler() {
    let transport = MemoryTransport::new();
    let _server = start(&transport, vec![("echo", Arc::new(Echo))]).await;
    // Another deployment of the service declared a route this server lacks.
    transport
        .declare_service(&ServiceSpec {
            name: SERVICE.to_owned(),
            routes: vec!["echo".to_owned(), "ghost".to_owned()],
        })
        .await
        .unwrap();

    let reply = ask_ok(&transport, "ghost", None, b"{}").await;
    assert_error(&reply, ReplyStatus::NotFound, "unknown_handler");
    assert!(
        reply.error.as_ref().unwrap().message.contains("ghost"),
        "the message names the handler: {reply:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_errors_map_to_reply_statuses() {
    let transport = MemoryTransport::new();
    let cases: Vec<(&str, HandlerError, ReplyStatus, &str, &str)> = vec![
        (
            "bad",
            HandlerError::bad_request("field `x` is missing"),
            ReplyStatus::BadRequest,
            "bad_request",
            "field `x` is missing",
        ),
        (
            "forbidden",
            HandlerError::Forbidden("not yours".into()),
            ReplyStatus::Forbidden,
            "forbidden",
            "not yours",
        ),
        (
            "missing",
            HandlerError::NotFound("no such order".into()),
            ReplyStatus::NotFound,
            "not_found",
            "no such order",
        ),
        (
            "conflict",
            HandlerError::Conflict("already shipped".into()),
            ReplyStatus::Conflict,
            "conflict",
            "already shipped",
        ),
        (
            "large",
            HandlerError::TooLarge("context full".into()),
            ReplyStatus::PayloadTooLarge,
            "context_too_large",
            "context full",
        ),
    ];
    let mut handlers: Vec<(&str, Arc<dyn Handler>)> = cases
        .iter()
        .map(|(name, err, ..)| (*name, Arc::new(Fails(err.clone())) as Arc<dyn Handler>))
        .collect();
    handlers.push(("needs_ctx", Arc::new(NeedsContext)));
    handlers.push((
        "internal",
        Arc::new(Fails(HandlerError::internal(
            "db password=hunter2 rejected by 10.0.0.7",
        ))),
    ));
    let _server = start(&transport, handlers).await;

    for (name, _, status, code, message) in &cases {
        let reply = ask_ok(&transport, name, None, b"{}").await;
        assert_error(&reply, *status, code);
        assert_eq!(reply.error.as_ref().unwrap().message, *message);
    }

    // Anonymous call to a handler that needs the user's context.
    let reply = ask_ok(&transport, "needs_ctx", None, b"{}").await;
    assert_error(&reply, ReplyStatus::Unauthorized, "unauthorized");
    // The same handler with a user succeeds: the 401 came from the missing user.
    let reply = ask_ok(&transport, "needs_ctx", Some("alice"), b"{}").await;
    assert_eq!(reply.status, ReplyStatus::Ok, "reply: {reply:?}");
    assert_eq!(reply.body, br#""alice""#);

    // Internal: a generic message, never the cause.
    let reply = ask_ok(&transport, "internal", None, b"{}").await;
    assert_error(&reply, ReplyStatus::HandlerError, "handler_failed");
    let message = &reply.error.as_ref().unwrap().message;
    assert!(!message.is_empty());
    for secret in ["hunter2", "password", "10.0.0.7", "db "] {
        assert!(
            !message.contains(secret),
            "internal cause leaked ({secret}): {message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_already_expired_on_delivery_is_not_run() {
    let transport = MemoryTransport::new();
    let counting = Arc::new(Counting::default());
    // Concurrency 1 and a FIFO queue: the fresh request below is taken only after
    // the expired one ahead of it was taken and settled, which proves the expired
    // one was delivered to the server (and not merely left to expire on the queue).
    let _server = start_with(
        &transport,
        "node-a",
        config(1, 10_000),
        registry(vec![("count", counting.clone())]),
    )
    .await;

    let mut expired = request("count", None, b"{}", Duration::ZERO);
    expired.deadline_unix_ms = now_unix_ms() - 5_000;
    let fresh = request("count", None, b"{}", LONG);
    // `join!` polls in order on its first poll, so `expired` is queued first.
    let (expired_result, fresh_result) = guard("both requests", async {
        tokio::join!(
            send(
                &transport,
                &expired,
                Instant::now() + Duration::from_millis(500)
            ),
            send(&transport, &fresh, Instant::now() + LONG),
        )
    })
    .await;

    // Refused with a reply saying why, not silently dropped.
    let expired_reply = expired_result.unwrap();
    assert_error(&expired_reply, ReplyStatus::Timeout, "deadline_passed");
    let fresh_reply = fresh_result.unwrap();
    assert_eq!(fresh_reply.status, ReplyStatus::Ok);
    assert_eq!(
        fresh_reply.body, br#"{"calls":1}"#,
        "only the fresh request ran"
    );
    assert_eq!(counting.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_past_its_deadline_is_abandoned_and_dropped() {
    let transport = MemoryTransport::new();
    let (forever, mut started, mut dropped) = Forever::new();
    let _server = start(&transport, vec![("forever", forever.clone())]).await;

    // The request's deadline is 300 ms; the transport waits longer so that the
    // server's own timeout reply can be observed.
    let req = request("forever", None, b"{}", Duration::from_millis(300));
    let sent_at = Instant::now();
    let pending = tokio::spawn({
        let transport = transport.clone();
        let req = req.clone();
        async move { send(&transport, &req, Instant::now() + Duration::from_secs(3)).await }
    });

    guard("the handler to start", started.recv()).await.unwrap();
    guard("the handler future to be dropped", dropped.recv())
        .await
        .unwrap();
    assert!(
        sent_at.elapsed() >= Duration::from_millis(250),
        "dropped before the deadline: {:?}",
        sent_at.elapsed()
    );

    let reply = guard("the timeout reply", pending).await.unwrap().unwrap();
    assert_error(&reply, ReplyStatus::Timeout, "timeout");
    assert_eq!(reply.id, req.id);
    assert_eq!(forever.calls.load(Ordering::SeqCst), 1, "not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_than_concurrency_requests_run_at_once() {
    let transport = MemoryTransport::new();
    let (gate, mut started) = Gate::new();
    let server = start_with(
        &transport,
        "node-a",
        config(2, 10_000),
        registry(vec![("gate", gate.clone())]),
    )
    .await;

    let requests: Vec<_> = (0..6)
        .map(|i| {
            let transport = transport.clone();
            tokio::spawn(async move {
                let body = format!("{{\"n\":{i}}}");
                ask(&transport, "gate", None, body.as_bytes(), LONG).await
            })
        })
        .collect();

    for _ in 0..2 {
        guard("two handlers to start", started.recv())
            .await
            .unwrap();
    }
    // While both are held, a third must not start.
    let third = tokio::time::timeout(QUIET, started.recv()).await;
    assert!(third.is_err(), "a third call started while two were held");
    assert_eq!(gate.running.load(Ordering::SeqCst), 2);
    assert_eq!(server.stats().in_flight(), 2);

    gate.release.add_permits(6);
    for r in requests {
        let reply = guard("every reply", r).await.unwrap().unwrap();
        assert_eq!(reply.status, ReplyStatus::Ok, "reply: {reply:?}");
        assert_eq!(reply.body, br#""released""#);
    }
    assert_eq!(gate.calls.load(Ordering::SeqCst), 6);
    assert_eq!(gate.max_running.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_message_is_dead_lettered_without_reply() {
    let transport = MemoryTransport::new();
    let _server = start(&transport, vec![("echo", Arc::new(Echo))]).await;
    let mut dead_letters = transport.consume_dead_letters(1).await.unwrap();

    let garbage: &[u8] = b"\xc1 this is not messagepack \xff";
    let pending = tokio::spawn({
        let transport = transport.clone();
        async move {
            transport
                .request(
                    "echo",
                    Message::new(garbage),
                    Instant::now() + Duration::from_millis(500),
                )
                .await
        }
    });

    let dl = guard("a dead letter", dead_letters.next())
        .await
        .expect("the transport is open")
        .unwrap();
    assert_eq!(dl.payload.as_ref(), garbage);
    let reason = dl
        .headers
        .get(DEAD_LETTER_REASON_HEADER)
        .expect("a dead letter says why");
    assert!(
        reason.starts_with("undecodable request"),
        "reason: {reason}"
    );
    dl.ack().await.unwrap();

    let result = guard("the requester to give up", pending).await.unwrap();
    assert!(
        matches!(result, Err(RequestError::Timeout)),
        "no reply for an undecodable message: {result:?}"
    );

    // Dead-lettered, not requeued: the server goes on with the next request.
    let reply = ask_ok(&transport, "echo", None, b"[1]").await;
    assert_eq!(reply.status, ReplyStatus::Ok);
    assert_eq!(reply.body, b"[1]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_user_sees_only_their_own_context() {
    let transport = MemoryTransport::new();
    let _server = start(
        &transport,
        vec![
            ("ctx.set", Arc::new(CtxSet)),
            ("ctx.get", Arc::new(CtxGet)),
            ("ctx.incr", Arc::new(CtxIncr)),
        ],
    )
    .await;
    let body_of = |reply: Reply| {
        assert_eq!(reply.status, ReplyStatus::Ok, "reply: {reply:?}");
        String::from_utf8(reply.body).unwrap()
    };

    body_of(ask_ok(&transport, "ctx.set", Some("alice"), b"{}").await);
    assert_eq!(
        body_of(ask_ok(&transport, "ctx.get", Some("alice"), b"{}").await),
        r#""alice""#
    );
    assert_eq!(
        body_of(ask_ok(&transport, "ctx.get", Some("bob"), b"{}").await),
        "null",
        "bob must not see alice's value"
    );
    body_of(ask_ok(&transport, "ctx.set", Some("bob"), b"{}").await);
    assert_eq!(
        body_of(ask_ok(&transport, "ctx.get", Some("bob"), b"{}").await),
        r#""bob""#
    );
    assert_eq!(
        body_of(ask_ok(&transport, "ctx.get", Some("alice"), b"{}").await),
        r#""alice""#,
        "bob's write must not touch alice's value"
    );

    for expected in 1..=3 {
        assert_eq!(
            body_of(ask_ok(&transport, "ctx.incr", Some("alice"), b"{}").await),
            expected.to_string()
        );
    }
    assert_eq!(
        body_of(ask_ok(&transport, "ctx.incr", Some("bob"), b"{}").await),
        "1",
        "bob's counter starts from zero"
    );
    assert_eq!(
        body_of(ask_ok(&transport, "ctx.incr", Some("alice"), b"{}").await),
        "4",
        "alice's counter is untouched by bob's"
    );

    // Anonymous requests have no context at all.
    let reply = ask_ok(&transport, "ctx.get", None, b"{}").await;
    assert_error(&reply, ReplyStatus::Unauthorized, "unauthorized");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_in_flight_requests_then_stops_serving() {
    let transport = MemoryTransport::new();
    let (gate, mut started) = Gate::new();
    let server = start(&transport, vec![("gate", gate.clone())]).await;

    let in_flight = tokio::spawn({
        let transport = transport.clone();
        async move { ask(&transport, "gate", None, b"{}", LONG).await }
    });
    guard("the handler to start", started.recv()).await.unwrap();

    let stats = server.stats().clone();
    let mut shutdown = tokio::spawn(server.shutdown());
    let early = tokio::time::timeout(QUIET, &mut shutdown).await;
    assert!(
        early.is_err(),
        "shutdown returned while a request was still in flight"
    );
    assert!(
        !stats.is_ready(),
        "a draining server no longer takes requests"
    );
    assert_eq!(stats.in_flight(), 1);

    gate.release.add_permits(1);
    guard("shutdown to finish", shutdown).await.unwrap();
    let reply = guard("the in-flight reply", in_flight)
        .await
        .unwrap()
        .expect("the in-flight request is answered");
    assert_eq!(reply.status, ReplyStatus::Ok, "reply: {reply:?}");
    assert_eq!(reply.body, br#""released""#);
    assert_eq!(reply.served_by, "node-a");

    // Stopped: a new request waits on the queue until its deadline.
    gate.release.add_permits(1);
    let late = ask(&transport, "gate", None, b"{}", Duration::from_millis(300)).await;
    assert!(
        matches!(late, Err(RequestError::Timeout)),
        "a stopped server served a request: {late:?}"
    );
    assert_eq!(gate.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_hands_unfinished_requests_to_a_peer() {
    let transport = MemoryTransport::new();
    let (forever, mut started, mut dropped) = Forever::new();
    let server_a = start_with(
        &transport,
        "node-a",
        config(4, 200),
        registry(vec![("work", forever.clone())]),
    )
    .await;

    let req = request("work", None, br#"{"job":42}"#, LONG);
    let pending = tokio::spawn({
        let transport = transport.clone();
        let req = req.clone();
        async move { send(&transport, &req, Instant::now() + LONG).await }
    });
    guard("the handler to start", started.recv()).await.unwrap();

    let t0 = Instant::now();
    tokio::time::timeout(Duration::from_secs(2), server_a.shutdown())
        .await
        .expect("shutdown returns soon after the drain timeout");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(200),
        "shutdown did not wait for the drain timeout: {took:?}"
    );
    guard("the unfinished handler to be dropped", dropped.recv())
        .await
        .unwrap();

    // A peer of the same service picks up what node-a handed back.
    let _server_b = start_with(
        &transport,
        "node-b",
        config(4, 10_000),
        registry(vec![("work", Arc::new(Echo))]),
    )
    .await;
    let reply = guard("the peer's reply", pending)
        .await
        .unwrap()
        .expect("the original requester gets the peer's reply");
    assert_eq!(reply.status, ReplyStatus::Ok, "reply: {reply:?}");
    assert_eq!(reply.id, req.id);
    assert_eq!(reply.served_by, "node-b");
    assert_eq!(reply.body, br#"{"job":42}"#);
    assert_eq!(forever.calls.load(Ordering::SeqCst), 1);
}
