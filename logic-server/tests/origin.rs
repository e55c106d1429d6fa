//! Where a request comes from, on the in-memory transport: its route must match the
//! handler its envelope names (else it is dead-lettered, answered 400 and counted,
//! and the handler never runs), and a request naming a user is taken, since the
//! memory transport's publisher is this very process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use keelson_logic_server::{Handler, HandlerError, RequestCtx, Response, async_trait};
use keelson_protocol::transport::memory::MemoryTransport;
use keelson_protocol::transport::{DEAD_LETTER_REASON_HEADER, Message};
use keelson_protocol::{Reply, ReplyStatus, Transport, decode, encode};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::time::Instant;

mod support;
use support::*;

/// Counts its calls and answers with the user it ran for.
#[derive(Default)]
struct Counting(AtomicUsize);

#[async_trait]
impl Handler for Counting {
    async fn call(&self, req: RequestCtx) -> Result<Response, HandlerError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(Response::json(&serde_json::json!({ "user": req.user() }))?)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_route_and_handler_disagree_is_dead_lettered_not_run() {
    let transport = MemoryTransport::new();
    let echo = Arc::new(Counting::default());
    let boom = Arc::new(Counting::default());
    let server = start(
        &transport,
        vec![("echo", echo.clone()), ("boom", boom.clone())],
    )
    .await;
    let mut dead_letters = transport.consume_dead_letters(1).await.unwrap();

    // Published on `echo`'s route, but the envelope names `boom`.
    let forged = request("boom", None, b"{}", LONG);
    let raw = guard(
        "a reply",
        transport.request(
            "echo",
            Message::new(encode(&forged).unwrap()),
            Instant::now() + LONG,
        ),
    )
    .await
    .expect("the requester is answered, not left waiting");
    let reply: Reply = decode(&raw).unwrap();
    assert_error(&reply, ReplyStatus::BadRequest, "route_mismatch");

    let dl = guard("a dead letter", dead_letters.next())
        .await
        .expect("the transport is open")
        .unwrap();
    let reason = dl.headers.get(DEAD_LETTER_REASON_HEADER).expect("a reason");
    assert!(reason.starts_with("route mismatch"), "reason: {reason}");
    dl.ack().await.unwrap();
    assert_eq!(
        boom.0.load(Ordering::SeqCst),
        0,
        "the named handler never ran"
    );
    assert_eq!(echo.0.load(Ordering::SeqCst), 0, "nor the routed one");
    assert_eq!(server.stats().route_mismatches(), 1);

    // The same request on its own route runs, for its user: in one process every
    // publisher is trusted.
    let reply = ask_ok(&transport, "boom", Some("alice"), b"{}").await;
    assert_eq!(reply.status, ReplyStatus::Ok, "reply: {reply:?}");
    let body: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
    assert_eq!(body["user"], "alice");
    assert_eq!(boom.0.load(Ordering::SeqCst), 1);
    assert_eq!(server.stats().untrusted_publishers(), 0);
}
