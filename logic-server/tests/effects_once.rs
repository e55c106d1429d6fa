//! Effects happen once (issue 11) on the in-memory transport: outcome records answer
//! redeliveries and client retries on any server, a key in use or reused is refused,
//! deadlines are bounded, and a request a server cannot read is answered.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;
use support::*;

use keelson_logic_server::{
    ContextConfig, Handler, HandlerError, IdempotencyConfig, ReplicatedContextStore, RequestCtx,
    Response, async_trait,
};
use keelson_protocol::context::CONTEXT_CHANNEL;
use keelson_protocol::transport::memory::MemoryTransport;
use keelson_protocol::transport::{DEAD_LETTER_REASON_HEADER, DELIVERIES_HEADER, Message};
use keelson_protocol::{ProtocolVersion, ReplyStatus, Request, Transport, encode};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

/// Increments the user's `n` counter and answers `{"value": n, "calls": c}`, where
/// `c` counts the handler's runs on this server; waits for a permit of `gate` first
/// when it has one.
#[derive(Default)]
struct Increment {
    calls: AtomicUsize,
    gate: Option<Arc<Semaphore>>,
    entered: Notify,
}

#[async_trait]
impl Handler for Increment {
    async fn call(&self, req: RequestCtx) -> Result<Response, HandlerError> {
        if let Some(gate) = &self.gate {
            self.entered.notify_one();
            gate.acquire().await.unwrap().forget();
        }
        let calls = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let value = req.context()?.increment("n", 1).await?;
        Response::json(&serde_json::json!({ "value": value, "calls": calls }))
    }
}

/// Reads the user's `n` counter.
struct Read;

#[async_trait]
impl Handler for Read {
    async fn call(&self, req: RequestCtx) -> Result<Response, HandlerError> {
        let value = req.context()?.counter("n").await?;
        Response::json(&serde_json::json!({ "value": value }))
    }
}

fn keyed(user: &str, key: &str, fingerprint: &str) -> Request {
    let mut r = request("inc", Some(user), b"{}", LONG);
    r.idempotency_key = Some(key.to_owned());
    r.idempotency_fingerprint = Some(fingerprint.to_owned());
    r
}

async fn send_ok(transport: &MemoryTransport, req: &Request) -> keelson_protocol::Reply {
    guard("a reply", send(transport, req, Instant::now() + LONG))
        .await
        .expect("the request is answered")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_the_same_key_is_answered_from_the_record_on_another_server() {
    let transport = MemoryTransport::new();
    let inc_a = Arc::new(Increment::default());
    let a = start_with(
        &transport,
        "node-a",
        config(4, 5_000),
        registry(vec![("inc", inc_a.clone())]),
    )
    .await;

    let first = send_ok(&transport, &keyed("alice", "k-1", "f-1")).await;
    assert_eq!(first.status, ReplyStatus::Ok);
    assert_eq!(first.body, br#"{"calls":1,"value":1}"#);
    assert!(!first.replayed);

    // B joins (it gets A's state), A leaves: the retry can only reach B.
    let inc_b = Arc::new(Increment::default());
    let _b = start_with(
        &transport,
        "node-b",
        config(4, 5_000),
        registry(vec![("inc", inc_b.clone()), ("read", Arc::new(Read))]),
    )
    .await;
    a.shutdown().await;

    let retry = send_ok(&transport, &keyed("alice", "k-1", "f-1")).await;
    assert_eq!(retry.status, ReplyStatus::Ok);
    assert_eq!(retry.body, first.body, "the stored body, byte for byte");
    assert!(retry.replayed, "marked as a replay");
    assert_eq!(retry.served_by, "node-a", "the server that ran it");
    assert_eq!(
        inc_b.calls.load(Ordering::SeqCst),
        0,
        "the handler did not run again"
    );

    let read = ask_ok(&transport, "read", Some("alice"), b"{}").await;
    assert_eq!(read.body, br#"{"value":1}"#, "the counter moved once");

    // The same key with another request: refused, nothing runs.
    let reused = send_ok(&transport, &keyed("alice", "k-1", "f-other")).await;
    assert_error_from(
        &reused,
        ReplyStatus::KeyReused,
        "idempotency_key_reused",
        "node-b",
    );
    // Keys are per user: bob's k-1 is his own.
    let bob = send_ok(&transport, &keyed("bob", "k-1", "f-other")).await;
    assert_eq!(bob.status, ReplyStatus::Ok);
    assert!(!bob.replayed);
    assert_eq!(inc_b.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_delivered_again_after_it_wrote_is_answered_from_its_record() {
    let transport = MemoryTransport::new();
    let inc = Arc::new(Increment::default());
    let _server = start(
        &transport,
        vec![("inc", inc.clone()), ("read", Arc::new(Read))],
    )
    .await;

    // No client key: the request id is the key. The same envelope twice is what a
    // redelivery after a lost ack looks like.
    let req = request("inc", Some("carol"), b"{}", LONG);
    let first = send_ok(&transport, &req).await;
    let again = send_ok(&transport, &req).await;
    assert_eq!(again.body, first.body);
    assert!(again.replayed);
    assert_eq!(inc.calls.load(Ordering::SeqCst), 1);
    let read = ask_ok(&transport, "read", Some("carol"), b"{}").await;
    assert_eq!(read.body, br#"{"value":1}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_request_without_a_key_sends_nothing_on_the_context_channel() {
    let transport = MemoryTransport::new();
    let _server = start(&transport, vec![("read", Arc::new(Read))]).await;
    let mut context = transport.subscribe(CONTEXT_CHANNEL).await.unwrap();

    for _ in 0..5 {
        let reply = ask_ok(&transport, "read", Some("dave"), b"{}").await;
        assert_eq!(reply.status, ReplyStatus::Ok);
    }
    let sent = tokio::time::timeout(QUIET, context.next()).await;
    assert!(sent.is_err(), "a read sent a delta: {sent:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_while_the_first_request_runs_is_refused_with_a_conflict() {
    let transport = MemoryTransport::new();
    let gate = Arc::new(Semaphore::new(0));
    let inc = Arc::new(Increment {
        gate: Some(gate.clone()),
        ..Increment::default()
    });
    let _server = start(&transport, vec![("inc", inc.clone())]).await;

    let first = tokio::spawn({
        let transport = transport.clone();
        async move { send_ok(&transport, &keyed("erin", "k", "f")).await }
    });
    // The running mark is written before the handler runs.
    guard("the first request in its handler", inc.entered.notified()).await;
    let second = send_ok(&transport, &keyed("erin", "k", "f")).await;
    assert_error(&second, ReplyStatus::Conflict, "request_in_progress");

    gate.add_permits(1);
    let first = guard("the first reply", first).await.unwrap();
    assert_eq!(first.status, ReplyStatus::Ok);
    let third = send_ok(&transport, &keyed("erin", "k", "f")).await;
    assert!(third.replayed);
    assert_eq!(third.body, first.body);
    assert_eq!(inc.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_bounded_per_user_with_a_clear_error() {
    let transport = MemoryTransport::new();
    let mut cfg = config(4, 5_000);
    cfg.idempotency = IdempotencyConfig {
        max_keys_per_user: 2,
        ..IdempotencyConfig::default()
    };
    let _server = start_with(
        &transport,
        "node-a",
        cfg,
        registry(vec![("inc", Arc::new(Increment::default()))]),
    )
    .await;

    for key in ["k1", "k2"] {
        assert_eq!(
            send_ok(&transport, &keyed("frank", key, "f")).await.status,
            ReplyStatus::Ok
        );
    }
    let third = send_ok(&transport, &keyed("frank", "k3", "f")).await;
    assert_error(
        &third,
        ReplyStatus::TooManyRequests,
        "idempotency_keys_exhausted",
    );
    // Keys already held still answer; requests without a key still run.
    assert!(
        send_ok(&transport, &keyed("frank", "k1", "f"))
            .await
            .replayed
    );
    let plain = ask_ok(&transport, "inc", Some("frank"), b"{}").await;
    assert_eq!(plain.status, ReplyStatus::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_past_or_too_far_are_refused_with_an_error_reply() {
    let transport = MemoryTransport::new();
    let inc = Arc::new(Increment::default());
    let _server = start(&transport, vec![("inc", inc.clone())]).await;

    let mut far = request("inc", Some("gina"), b"{}", LONG);
    far.deadline_unix_ms = u64::MAX;
    let reply = send_ok(&transport, &far).await;
    assert_error(&reply, ReplyStatus::BadRequest, "deadline_out_of_range");

    let mut year = request("inc", Some("gina"), b"{}", LONG);
    year.deadline_unix_ms = now_unix_ms() + 365 * 24 * 3600 * 1000;
    let reply = send_ok(&transport, &year).await;
    assert_error(&reply, ReplyStatus::BadRequest, "deadline_out_of_range");
    assert_eq!(inc.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_of_another_major_version_is_answered_and_dead_lettered() {
    let transport = MemoryTransport::new();
    let inc = Arc::new(Increment::default());
    let _server = start(&transport, vec![("inc", inc.clone())]).await;
    let mut dead_letters = transport.consume_dead_letters(1).await.unwrap();

    let mut req = request("inc", Some("hal"), b"{}", LONG);
    req.v = ProtocolVersion { major: 2, minor: 0 };
    let raw = guard(
        "a reply",
        transport.request(
            "inc",
            Message::new(encode(&req).unwrap()),
            Instant::now() + LONG,
        ),
    )
    .await
    .expect("a peer of another version is told why, not left waiting");
    let reply: keelson_protocol::Reply = keelson_protocol::decode(&raw).unwrap();
    assert_eq!(reply.id, req.id, "the reply matches the request");
    assert_error(&reply, ReplyStatus::BadRequest, "incompatible_version");

    let dl = guard("a dead letter", dead_letters.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        dl.headers[DEAD_LETTER_REASON_HEADER].contains("version"),
        "{:?}",
        dl.headers
    );
    assert_eq!(inc.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_kept_apart_from_what_handlers_can_reach() {
    let transport: Arc<dyn Transport> = Arc::new(MemoryTransport::new());
    let store = ReplicatedContextStore::start(transport, "n", ContextConfig::default())
        .await
        .unwrap();
    use keelson_logic_server::ContextStore as _;
    let reserved = store.set("ivy", "\0keelson.idem/c/x", "1".into()).await;
    // The store itself takes it (it is how records travel); handlers cannot, as the
    // UserContext refuses NUL-prefixed keys: checked through a handler below.
    assert!(reserved.is_ok());

    struct Sneaky;
    #[async_trait]
    impl Handler for Sneaky {
        async fn call(&self, req: RequestCtx) -> Result<Response, HandlerError> {
            let e = req
                .context()?
                .set("\0keelson.idem/c/x", &1)
                .await
                .unwrap_err();
            Response::json(&e.to_string())
        }
    }
    let transport = MemoryTransport::new();
    let _server = start(&transport, vec![("sneaky", Arc::new(Sneaky))]).await;
    let reply = ask_ok(&transport, "sneaky", Some("ivy"), b"{}").await;
    assert!(
        String::from_utf8_lossy(&reply.body).contains("reserved"),
        "{reply:?}"
    );
}

/// Counts the handlers running at once, each held until `release` gives a permit;
/// reports on `entered` how many others were running when it started.
struct Held {
    running: Arc<AtomicUsize>,
    release: Arc<Semaphore>,
    entered: tokio::sync::mpsc::UnboundedSender<usize>,
}

#[async_trait]
impl Handler for Held {
    async fn call(&self, _req: RequestCtx) -> Result<Response, HandlerError> {
        let others = self.running.fetch_add(1, Ordering::SeqCst);
        let _ = self.entered.send(others);
        self.release.acquire().await.unwrap().forget();
        self.running.fetch_sub(1, Ordering::SeqCst);
        Response::json(&others)
    }
}

async fn send_with_deliveries(
    transport: &MemoryTransport,
    req: &Request,
    deliveries: u32,
) -> keelson_protocol::Reply {
    let mut message = Message::new(encode(req).unwrap());
    message
        .headers
        .insert(DELIVERIES_HEADER.to_owned(), deliveries.to_string());
    let raw = guard(
        "a reply",
        transport.request(&req.handler, message, Instant::now() + LONG),
    )
    .await
    .unwrap();
    keelson_protocol::decode(&raw).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_came_back_without_an_outcome_runs_alone() {
    let transport = MemoryTransport::new();
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel();
    let release = Arc::new(Semaphore::new(0));
    let held = Arc::new(Held {
        running: Arc::new(AtomicUsize::new(0)),
        release: release.clone(),
        entered: entered_tx,
    });
    let _server = start(&transport, vec![("held", held)]).await;

    let ask_held = |deliveries: u32| {
        let transport = transport.clone();
        tokio::spawn(async move {
            let req = request("held", Some("kim"), b"{}", LONG);
            send_with_deliveries(&transport, &req, deliveries).await
        })
    };
    let first: Vec<_> = (0..3).map(|_| ask_held(1)).collect();
    for _ in 0..3 {
        guard("a first request in its handler", entered.recv()).await;
    }
    // Delivered before without an outcome: it waits until nothing else runs ...
    let suspect = ask_held(2);
    let early = tokio::time::timeout(QUIET, entered.recv()).await;
    assert!(early.is_err(), "it started beside others: {early:?}");
    release.add_permits(3);
    let others = guard("the suspect in its handler", entered.recv())
        .await
        .unwrap();
    assert_eq!(others, 0, "it runs alone");
    // ... and nothing starts beside it.
    let later = ask_held(1);
    let beside = tokio::time::timeout(QUIET, entered.recv()).await;
    assert!(beside.is_err(), "a request started beside it: {beside:?}");
    release.add_permits(1);
    assert_eq!(
        guard("the suspect's reply", suspect).await.unwrap().status,
        ReplyStatus::Ok
    );
    guard("the later request in its handler", entered.recv()).await;
    release.add_permits(1);
    assert_eq!(
        guard("the later reply", later).await.unwrap().status,
        ReplyStatus::Ok
    );
    for f in first {
        assert_eq!(
            guard("a first reply", f).await.unwrap().status,
            ReplyStatus::Ok
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_delivered_too_often_is_dead_lettered_with_an_error_reply() {
    let transport = MemoryTransport::new();
    let inc = Arc::new(Increment::default());
    let _server = start(&transport, vec![("inc", inc.clone())]).await;
    let mut dead_letters = transport.consume_dead_letters(1).await.unwrap();

    let req = request("inc", Some("lee"), b"{}", LONG);
    // max_deliveries is 5 by default: a sixth delivery is one too many.
    let reply = send_with_deliveries(&transport, &req, 6).await;
    assert_error(&reply, ReplyStatus::HandlerError, "delivery_limit");
    let dl = guard("a dead letter", dead_letters.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        dl.headers[DEAD_LETTER_REASON_HEADER].contains("delivered 6 times"),
        "{:?}",
        dl.headers
    );
    assert_eq!(dl.headers[DELIVERIES_HEADER], "6");
    assert_eq!(
        inc.calls.load(Ordering::SeqCst),
        0,
        "the handler did not run"
    );

    // The fifth still runs.
    let req = request("inc", Some("lee"), b"{}", LONG);
    let reply = send_with_deliveries(&transport, &req, 5).await;
    assert_eq!(reply.status, ReplyStatus::Ok);
}
