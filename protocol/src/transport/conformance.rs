//! The conformance suite every [`Transport`] must pass.
//!
//! Each check is a plain async function taking a fresh, isolated transport (its own
//! queues, its own channels). [`crate::transport_conformance_tests!`] turns them into
//! `#[tokio::test]`s for one implementation:
//!
//! ```text
//! keelson_protocol::transport_conformance_tests!(my_transport_factory().await);
//! ```
//!
//! The suite asserts what a user of the mesh observes: that a request gets its one
//! reply, that each message reaches one consumer, that settling works, that pausing
//! hands work to peers, that broadcasts reach every subscriber, and that background
//! work (`enqueue`) waits on its queue, now or after its delay.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use super::{DEAD_LETTER_REASON_HEADER, Message, RequestError, ServiceSpec, Transport};
use bytes::Bytes;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long a check waits for something that should happen promptly.
const PROMPT: Duration = Duration::from_secs(5);
/// How long a check watches for something that must not happen.
const QUIET: Duration = Duration::from_millis(300);

fn service(name: &str, routes: &[&str]) -> ServiceSpec {
    ServiceSpec {
        name: name.to_owned(),
        routes: routes.iter().map(|r| (*r).to_owned()).collect(),
    }
}

fn soon() -> Instant {
    Instant::now() + PROMPT
}

async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(PROMPT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A consumer that replies to every request with the payload prefixed by `tag`.
fn spawn_echo(consumer: Box<dyn super::Consumer>, tag: &'static str) {
    let mut consumer = consumer;
    tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let mut out = tag.as_bytes().to_vec();
            out.extend_from_slice(&d.payload);
            d.reply(out).await.unwrap();
            d.ack().await.unwrap();
        }
    });
}

pub async fn request_reply_round_trip(t: Arc<dyn Transport>) {
    t.declare_service(&service("svc", &["echo"])).await.unwrap();
    spawn_echo(t.consume("svc", 4).await.unwrap(), "re:");
    let reply = t
        .request("echo", Message::new(&b"hello"[..]), soon())
        .await
        .unwrap();
    assert_eq!(reply, Bytes::from_static(b"re:hello"));
}

pub async fn concurrent_requests_get_their_own_replies(t: Arc<dyn Transport>) {
    t.declare_service(&service("svc", &["echo"])).await.unwrap();
    spawn_echo(t.consume("svc", 8).await.unwrap(), "");
    spawn_echo(t.consume("svc", 8).await.unwrap(), "");
    let calls = (0..64).map(|i| {
        let t = t.clone();
        async move {
            let body = format!("m{i}");
            let reply = t
                .request("echo", Message::new(body.clone().into_bytes()), soon())
                .await
                .unwrap();
            assert_eq!(reply, Bytes::from(body));
        }
    });
    within("64 replies", futures_join_all(calls)).await;
}

pub async fn unbound_route_is_unroutable_at_once(t: Arc<dyn Transport>) {
    t.declare_service(&service("svc", &["echo"])).await.unwrap();
    let started = Instant::now();
    let err = t
        .request("nobody.serves.this", Message::new(&b"x"[..]), soon())
        .await
        .unwrap_err();
    assert!(matches!(err, RequestError::Unroutable(_)), "got {err:?}");
    assert!(
        started.elapsed() < PROMPT / 2,
        "unroutable took {:?}",
        started.elapsed()
    );
}

pub async fn request_without_reply_times_out_at_deadline(t: Arc<dyn Transport>) {
    t.declare_service(&service("svc", &["silent"]))
        .await
        .unwrap();
    let started = Instant::now();
    let deadline = started + Duration::from_millis(300);
    let err = t
        .request("silent", Message::new(&b"x"[..]), deadline)
        .await
        .unwrap_err();
    assert!(matches!(err, RequestError::Timeout), "got {err:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(290),
        "returned early: {took:?}"
    );
    assert!(took < Duration::from_secs(2), "returned late: {took:?}");
}

pub async fn expired_request_is_not_delivered(t: Arc<dyn Transport>) {
    t.declare_service(&service("svc", &["late"])).await.unwrap();
    let deadline = Instant::now() + Duration::from_millis(100);
    let err = t
        .request("late", Message::new(&b"stale"[..]), deadline)
        .await
        .unwrap_err();
    assert!(matches!(err, RequestError::Timeout), "got {err:?}");
    // A consumer that arrives after the deadline must not see the stale request.
    let mut c = t.consume("svc", 1).await.unwrap();
    let got = tokio::time::timeout(QUIET, c.next()).await;
    assert!(got.is_err(), "an expired request was delivered: {got:?}");
}

pub async fn late_reply_is_discarded(t: Arc<dyn Transport>) {
    t.declare_service(&service("svc", &["slow"])).await.unwrap();
    let mut c = t.consume("svc", 1).await.unwrap();
    let deadline = Instant::now() + Duration::from_millis(500);
    let req = {
        let t = t.clone();
        tokio::spawn(async move { t.request("slow", Message::new(&b"1"[..]), deadline).await })
    };
    let d = within("delivery", c.next()).await.unwrap().unwrap();
    let err = req.await.unwrap().unwrap_err();
    assert!(matches!(err, RequestError::Timeout), "got {err:?}");
    // Replying after the requester gave up is not an error for the replier.
    d.reply(&b"too late"[..]).await.unwrap();
    d.ack().await.unwrap();
    // And the next request still gets its own reply, not the stale one.
    spawn_echo(c, "fresh:");
    let reply = t
        .request("slow", Message::new(&b"2"[..]), soon())
        .await
        .unwrap();
    assert_eq!(reply, Bytes::from_static(b"fresh:2"));
}

pub async fn competing_consumers_each_message_once(t: Arc<dyn Transport>) {
    t.declare_service(&service("work", &["job"])).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for consumer_no in 0..3 {
        let mut c = t.consume("work", 2).await.unwrap();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = c.next().await {
                tx.send((consumer_no, d.payload.clone())).unwrap();
                d.reply(&b"ok"[..]).await.unwrap();
                d.ack().await.unwrap();
            }
        });
    }
    drop(tx);
    let n = 90;
    let calls = (0..n).map(|i| {
        let t = t.clone();
        async move {
            t.request("job", Message::new(format!("{i}").into_bytes()), soon())
                .await
                .unwrap()
        }
    });
    within("all jobs", futures_join_all(calls)).await;
    let mut seen = HashSet::new();
    for _ in 0..n {
        let (_, payload) = within("consumption record", rx.recv()).await.unwrap();
        assert!(seen.insert(payload.clone()), "delivered twice: {payload:?}");
    }
    assert_eq!(seen.len(), n);
    let extra = tokio::time::timeout(QUIET, rx.recv()).await;
    assert!(
        !matches!(extra, Ok(Some(_))),
        "a message was consumed twice"
    );
}

pub async fn prefetch_limits_unsettled_deliveries(t: Arc<dyn Transport>) {
    t.declare_service(&service("pf", &["pf"])).await.unwrap();
    let mut c = t.consume("pf", 2).await.unwrap();
    for i in 0..3 {
        let t = t.clone();
        tokio::spawn(async move {
            let _ = t
                .request("pf", Message::new(format!("{i}").into_bytes()), soon())
                .await;
        });
    }
    let a = within("first", c.next()).await.unwrap().unwrap();
    let _b = within("second", c.next()).await.unwrap().unwrap();
    let third = tokio::time::timeout(QUIET, c.next()).await;
    assert!(
        third.is_err(),
        "a third delivery arrived while two were unsettled"
    );
    a.ack().await.unwrap();
    let _c = within("third after an ack", c.next())
        .await
        .unwrap()
        .unwrap();
}

pub async fn requeue_redelivers(t: Arc<dyn Transport>) {
    t.declare_service(&service("rq", &["rq"])).await.unwrap();
    let mut c = t.consume("rq", 1).await.unwrap();
    let req = {
        let t = t.clone();
        tokio::spawn(async move { t.request("rq", Message::new(&b"again"[..]), soon()).await })
    };
    let first = within("delivery", c.next()).await.unwrap().unwrap();
    assert!(!first.redelivered);
    first.requeue().await.unwrap();
    let second = within("redelivery", c.next()).await.unwrap().unwrap();
    assert!(
        second.redelivered,
        "a requeued message must be marked redelivered"
    );
    assert_eq!(second.payload, Bytes::from_static(b"again"));
    second.reply(&b"done"[..]).await.unwrap();
    second.ack().await.unwrap();
    assert_eq!(req.await.unwrap().unwrap(), Bytes::from_static(b"done"));
}

pub async fn a_delivery_acked_before_its_reply_is_answered_and_frees_its_slot(
    t: Arc<dyn Transport>,
) {
    t.declare_service(&service("ar", &["ar"])).await.unwrap();
    let mut c = t.consume("ar", 1).await.unwrap();
    let ask = |body: &'static [u8]| {
        let t = t.clone();
        tokio::spawn(async move { t.request("ar", Message::new(body), soon()).await })
    };
    let first = ask(b"first");
    let held = within("delivery", c.next()).await.unwrap().unwrap();
    assert_eq!(held.payload, Bytes::from_static(b"first"));
    let replier = held.ack_then_reply().await.unwrap();
    // The slot is free while the first is still being answered.
    let second = ask(b"second");
    let next = within("the next delivery", c.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        next.payload,
        Bytes::from_static(b"second"),
        "not a redelivery"
    );
    assert!(!next.redelivered);
    next.reply(&b"2"[..]).await.unwrap();
    next.ack().await.unwrap();
    replier.reply(&b"1"[..]).await.unwrap();
    assert_eq!(first.await.unwrap().unwrap(), Bytes::from_static(b"1"));
    assert_eq!(second.await.unwrap().unwrap(), Bytes::from_static(b"2"));
}

pub async fn dropped_delivery_is_requeued(t: Arc<dyn Transport>) {
    t.declare_service(&service("dr", &["dr"])).await.unwrap();
    let mut c = t.consume("dr", 1).await.unwrap();
    let req = {
        let t = t.clone();
        tokio::spawn(async move { t.request("dr", Message::new(&b"x"[..]), soon()).await })
    };
    drop(within("delivery", c.next()).await.unwrap().unwrap());
    let again = within("redelivery", c.next()).await.unwrap().unwrap();
    assert!(again.redelivered);
    again.reply(&b"y"[..]).await.unwrap();
    again.ack().await.unwrap();
    assert_eq!(req.await.unwrap().unwrap(), Bytes::from_static(b"y"));
}

pub async fn hand_back_is_not_a_redelivery_and_keeps_the_reply_address(t: Arc<dyn Transport>) {
    t.declare_service(&service("hb", &["hb"])).await.unwrap();
    let mut c = t.consume("hb", 1).await.unwrap();
    let req = {
        let t = t.clone();
        tokio::spawn(async move { t.request("hb", Message::new(&b"back"[..]), soon()).await })
    };
    let first = within("delivery", c.next()).await.unwrap().unwrap();
    assert_eq!(first.deliveries(), 1);
    // Given back many times, as a governor that pauses again and again would.
    let mut d = first;
    for _ in 0..10 {
        d.hand_back().await.unwrap();
        d = within("the handed-back message", c.next())
            .await
            .unwrap()
            .unwrap();
        assert!(!d.redelivered, "a hand-back is not a redelivery");
        assert_eq!(d.deliveries(), 1, "a hand-back does not count");
    }
    assert_eq!(d.payload, Bytes::from_static(b"back"));
    d.reply(&b"answered"[..]).await.unwrap();
    d.ack().await.unwrap();
    assert_eq!(req.await.unwrap().unwrap(), Bytes::from_static(b"answered"));
}

pub async fn counted_redeliveries_carry_their_count(t: Arc<dyn Transport>) {
    t.declare_service(&service("cr", &["cr"])).await.unwrap();
    let mut c = t.consume("cr", 1).await.unwrap();
    let req = {
        let t = t.clone();
        let mut msg = Message::new(&b"count"[..]);
        msg.headers.insert("x-test".into(), "kept".into());
        tokio::spawn(async move { t.request("cr", msg, soon()).await })
    };
    let mut d = within("delivery", c.next()).await.unwrap().unwrap();
    for expected in 2..=4 {
        // The consumer died with it (dropped unsettled): it comes back redelivered,
        // and counting it puts a copy with the count on the queue.
        drop(d);
        let again = within("redelivery", c.next()).await.unwrap().unwrap();
        assert!(again.redelivered);
        again.count_redelivery().await.unwrap();
        d = within("the counted copy", c.next()).await.unwrap().unwrap();
        assert!(!d.redelivered);
        assert_eq!(d.deliveries(), expected);
        assert_eq!(d.headers.get("x-test").map(String::as_str), Some("kept"));
    }
    d.reply(&b"fourth"[..]).await.unwrap();
    d.ack().await.unwrap();
    assert_eq!(req.await.unwrap().unwrap(), Bytes::from_static(b"fourth"));
}

pub async fn reject_dead_letters_with_reason(t: Arc<dyn Transport>) {
    t.declare_service(&service("dl", &["dl"])).await.unwrap();
    let mut dead = t.consume_dead_letters(10).await.unwrap();
    let mut c = t.consume("dl", 1).await.unwrap();
    let mut msg = Message::new(&b"poison"[..]);
    msg.headers.insert("x-test".into(), "kept".into());
    let t2 = t.clone();
    let req = tokio::spawn(async move {
        t2.request("dl", msg, Instant::now() + Duration::from_millis(500))
            .await
    });
    let d = within("delivery", c.next()).await.unwrap().unwrap();
    d.reject("cannot decode: test").await.unwrap();
    // Rejected messages are never retried on the service queue.
    let retried = tokio::time::timeout(QUIET, c.next()).await;
    assert!(
        retried.is_err(),
        "a rejected message came back: {retried:?}"
    );
    let mut found = false;
    while !found {
        let dl = within("dead letter", dead.next()).await.unwrap().unwrap();
        if dl.payload == Bytes::from_static(b"poison") {
            assert_eq!(
                dl.headers
                    .get(DEAD_LETTER_REASON_HEADER)
                    .map(String::as_str),
                Some("cannot decode: test")
            );
            assert_eq!(dl.headers.get("x-test").map(String::as_str), Some("kept"));
            found = true;
        }
        dl.ack().await.unwrap();
    }
    assert!(matches!(req.await.unwrap(), Err(RequestError::Timeout)));
}

pub async fn paused_consumer_leaves_work_to_peers(t: Arc<dyn Transport>) {
    t.declare_service(&service("pz", &["pz"])).await.unwrap();
    let mut busy = t.consume("pz", 4).await.unwrap();
    busy.pause().await.unwrap();
    assert!(busy.is_paused());
    spawn_echo(t.consume("pz", 4).await.unwrap(), "peer:");
    for i in 0..20 {
        let reply = t
            .request("pz", Message::new(format!("{i}").into_bytes()), soon())
            .await
            .unwrap();
        assert_eq!(reply, Bytes::from(format!("peer:{i}")));
    }
    let got = tokio::time::timeout(QUIET, busy.next()).await;
    assert!(got.is_err(), "a paused consumer received a delivery");
    busy.resume().await.unwrap();
    assert!(!busy.is_paused());
}

pub async fn resumed_consumer_takes_work_again(t: Arc<dyn Transport>) {
    t.declare_service(&service("rs", &["rs"])).await.unwrap();
    let mut c = t.consume("rs", 4).await.unwrap();
    c.pause().await.unwrap();
    let req = {
        let t = t.clone();
        tokio::spawn(async move { t.request("rs", Message::new(&b"waiting"[..]), soon()).await })
    };
    // The request waits on the queue while the only consumer is paused ...
    let got = tokio::time::timeout(QUIET, c.next()).await;
    assert!(got.is_err(), "a paused consumer received a delivery");
    // ... and is served once it resumes.
    c.resume().await.unwrap();
    let d = within("delivery after resume", c.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.payload, Bytes::from_static(b"waiting"));
    d.reply(&b"served"[..]).await.unwrap();
    d.ack().await.unwrap();
    assert_eq!(req.await.unwrap().unwrap(), Bytes::from_static(b"served"));
}

pub async fn narrowed_window_leaves_work_to_peers(t: Arc<dyn Transport>) {
    t.declare_service(&service("nw", &["nw"])).await.unwrap();
    let request = |body: String| {
        let t = t.clone();
        tokio::spawn(async move {
            t.request("nw", Message::new(body.into_bytes()), soon())
                .await
        })
    };
    let mut c = t.consume("nw", 8).await.unwrap();
    assert_eq!(c.window(), 8);
    let mut pending = Vec::new();
    let mut held = Vec::new();
    for i in 0..3 {
        pending.push(request(format!("held{i}")));
        held.push(within("delivery", c.next()).await.unwrap().unwrap());
    }
    assert_eq!(c.set_window(2).await.unwrap(), 2);
    assert_eq!(c.window(), 2);
    // Three unsettled in a window of two: everything new goes to the peer.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut peer = t.consume("nw", 4).await.unwrap();
    let peer = tokio::spawn(async move {
        tokio::pin!(stopped);
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                Some(Ok(d)) = peer.next() => {
                    let mut out = b"peer:".to_vec();
                    out.extend_from_slice(&d.payload);
                    d.reply(out).await.unwrap();
                    d.ack().await.unwrap();
                }
            }
        }
        peer.pause().await.unwrap();
        peer
    });
    for i in 0..10 {
        let reply = request(format!("{i}")).await.unwrap().unwrap();
        assert_eq!(reply, Bytes::from(format!("peer:{i}")));
    }
    let got = tokio::time::timeout(QUIET, c.next()).await;
    assert!(
        got.is_err(),
        "a consumer over its window received a delivery"
    );
    stop.send(()).unwrap();
    let _peer = peer.await.unwrap();
    // Once what was taken before the change is settled, it takes work again.
    for d in held.drain(..) {
        d.reply(&b"done"[..]).await.unwrap();
        d.ack().await.unwrap();
    }
    let after = request("after".into());
    let d = within("delivery in a free place", c.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.payload, Bytes::from_static(b"after"));
    held.push(d);
    // Widened again: six unsettled at once fit in a window of eight.
    assert_eq!(c.set_window(8).await.unwrap(), 8);
    for i in 0..5 {
        pending.push(request(format!("wide{i}")));
    }
    for _ in 0..5 {
        held.push(
            within("delivery in the wider window", c.next())
                .await
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(held.len(), 6);
    for d in held {
        d.reply(&b"done"[..]).await.unwrap();
        d.ack().await.unwrap();
    }
    assert_eq!(after.await.unwrap().unwrap(), Bytes::from_static(b"done"));
    for p in pending {
        assert_eq!(p.await.unwrap().unwrap(), Bytes::from_static(b"done"));
    }
}

pub async fn fanout_reaches_every_subscriber(t: Arc<dyn Transport>) {
    let mut a = t.subscribe("events").await.unwrap();
    let mut b = t.subscribe("events").await.unwrap();
    let mut other = t.subscribe("other").await.unwrap();
    for i in 0..10u8 {
        let mut m = Message::new(vec![i]);
        m.headers.insert("n".into(), i.to_string());
        t.broadcast("events", m).await.unwrap();
    }
    for sub in [&mut a, &mut b] {
        for i in 0..10u8 {
            let m = within("broadcast", sub.next()).await.unwrap();
            assert_eq!(m.payload, Bytes::from(vec![i]), "out of order or lost");
            assert_eq!(m.headers.get("n"), Some(&i.to_string()));
        }
    }
    let leak = tokio::time::timeout(QUIET, other.next()).await;
    assert!(leak.is_err(), "a broadcast leaked to another channel");
}

pub async fn headers_travel_with_requests(t: Arc<dyn Transport>) {
    t.declare_service(&service("hd", &["hd"])).await.unwrap();
    let mut c = t.consume("hd", 1).await.unwrap();
    let mut m = Message::new(&b"h"[..]);
    m.headers
        .insert("traceparent".into(), "00-abc-def-01".into());
    let req = {
        let t = t.clone();
        tokio::spawn(async move { t.request("hd", m, soon()).await })
    };
    let d = within("delivery", c.next()).await.unwrap().unwrap();
    assert_eq!(
        d.headers.get("traceparent").map(String::as_str),
        Some("00-abc-def-01")
    );
    assert!(d.expects_reply);
    d.reply(&b"ok"[..]).await.unwrap();
    d.ack().await.unwrap();
    req.await.unwrap().unwrap();
}

pub async fn closed_transport_ends_consumers(t: Arc<dyn Transport>) {
    t.declare_service(&service("cl", &["cl"])).await.unwrap();
    let mut c = t.consume("cl", 1).await.unwrap();
    let mut s = t.subscribe("cl-events").await.unwrap();
    t.close().await;
    assert!(within("consumer end", c.next()).await.is_none());
    assert!(within("subscription end", s.next()).await.is_none());
    assert!(!t.is_ready());
    let err = t
        .request("cl", Message::new(&b"x"[..]), soon())
        .await
        .unwrap_err();
    assert!(matches!(err, RequestError::Unavailable(_)), "got {err:?}");
}

/// A job message as a logic server would enqueue it: a payload and a header.
fn job(payload: &'static [u8]) -> Message {
    let mut m = Message::new(payload);
    m.headers
        .insert("traceparent".into(), "00-abc-def-01".into());
    m
}

pub async fn enqueued_message_reaches_a_consumer_of_its_route(t: Arc<dyn Transport>) {
    t.declare_service(&service("_jobs.svc", &["_job.report.build"]))
        .await
        .unwrap();
    let mut c = t.consume("_jobs.svc", 4).await.unwrap();
    let sent = job(b"build it");
    t.enqueue("_job.report.build", sent.clone(), Duration::ZERO)
        .await
        .unwrap();
    let d = within("the enqueued message", c.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.payload, sent.payload);
    assert_eq!(d.headers, sent.headers);
    assert_eq!(d.route(), Some("_job.report.build"));
    assert_eq!(d.publisher(), &t.publisher());
    assert!(!d.redelivered);
    assert!(!d.expects_reply, "nobody awaits a reply to background work");
    assert_eq!(d.deliveries(), 1);
    d.ack().await.unwrap();
}

pub async fn enqueue_to_an_unbound_route_is_unroutable(t: Arc<dyn Transport>) {
    t.declare_service(&service("_jobs.svc", &["_job.a"]))
        .await
        .unwrap();
    let started = Instant::now();
    let err = t
        .enqueue("_job.nobody", job(b"x"), Duration::ZERO)
        .await
        .unwrap_err();
    assert!(matches!(err, RequestError::Unroutable(_)), "got {err:?}");
    assert!(
        started.elapsed() < PROMPT / 2,
        "unroutable took {:?}",
        started.elapsed()
    );
    // A delayed message is routed when its delay is over: accepted now (and lost
    // then, as nothing binds the route).
    t.enqueue("_job.nobody", job(b"x"), Duration::from_millis(100))
        .await
        .unwrap();
}

pub async fn enqueued_message_waits_for_a_consumer(t: Arc<dyn Transport>) {
    t.declare_service(&service("_jobs.svc", &["_job.a"]))
        .await
        .unwrap();
    for body in [&b"first"[..], &b"second"[..]] {
        t.enqueue("_job.a", Message::new(body), Duration::ZERO)
            .await
            .unwrap();
    }
    // Nobody consumed while they were enqueued: a consumer started later gets both.
    let mut c = t.consume("_jobs.svc", 4).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let d = within("a waiting message", c.next())
            .await
            .unwrap()
            .unwrap();
        assert!(!d.redelivered);
        got.push(d.payload.clone());
        d.ack().await.unwrap();
    }
    got.sort();
    assert_eq!(
        got,
        vec![Bytes::from_static(b"first"), Bytes::from_static(b"second")]
    );
}

pub async fn delayed_message_arrives_after_its_delay(t: Arc<dyn Transport>) {
    t.declare_service(&service("_jobs.svc", &["_job.later"]))
        .await
        .unwrap();
    let mut c = t.consume("_jobs.svc", 4).await.unwrap();
    let delay = Duration::from_millis(1_500);
    let sent = job(b"retry");
    let started = Instant::now();
    t.enqueue("_job.later", sent.clone(), delay).await.unwrap();
    let d = tokio::time::timeout(delay + Duration::from_secs(1), c.next())
        .await
        .expect("the delayed message did not arrive within a second of its delay")
        .unwrap()
        .unwrap();
    let took = started.elapsed();
    assert!(
        took >= delay - Duration::from_millis(20),
        "arrived {took:?} after it was enqueued with a delay of {delay:?}"
    );
    // It arrives as it was enqueued, as if published on its route at that time.
    assert_eq!(d.payload, sent.payload);
    assert_eq!(d.headers, sent.headers);
    assert_eq!(d.route(), Some("_job.later"));
    assert_eq!(d.publisher(), &t.publisher());
    assert!(!d.redelivered);
    assert!(!d.expects_reply);
    d.ack().await.unwrap();
}

pub async fn delayed_message_is_routed_when_its_delay_is_over(t: Arc<dyn Transport>) {
    // Nothing binds the route when the message is enqueued ...
    t.enqueue(
        "_job.bound.later",
        job(b"patient"),
        Duration::from_millis(300),
    )
    .await
    .unwrap();
    // ... but something does by the time its delay is over.
    t.declare_service(&service("_jobs.svc", &["_job.bound.later"]))
        .await
        .unwrap();
    let mut c = t.consume("_jobs.svc", 4).await.unwrap();
    let d = within("the delayed message", c.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.payload, Bytes::from_static(b"patient"));
    assert_eq!(d.route(), Some("_job.bound.later"));
    d.ack().await.unwrap();
}

pub async fn acked_enqueued_message_is_not_delivered_again(t: Arc<dyn Transport>) {
    t.declare_service(&service("_jobs.svc", &["_job.once"]))
        .await
        .unwrap();
    let mut c = t.consume("_jobs.svc", 4).await.unwrap();
    t.enqueue("_job.once", job(b"once"), Duration::ZERO)
        .await
        .unwrap();
    let d = within("the enqueued message", c.next())
        .await
        .unwrap()
        .unwrap();
    d.ack().await.unwrap();
    let again = tokio::time::timeout(QUIET, c.next()).await;
    assert!(again.is_err(), "an acked message came back: {again:?}");
    // Nor to a consumer that starts afterwards.
    drop(c);
    let mut later = t.consume("_jobs.svc", 4).await.unwrap();
    let again = tokio::time::timeout(QUIET, later.next()).await;
    assert!(
        again.is_err(),
        "an acked message reached a later consumer: {again:?}"
    );
}

// ---- leases ----

/// A unique lease name per check run (checks of one transport may share a broker).
fn lease_name(check: &str) -> String {
    format!("conf-{check}-{}", std::process::id())
}

async fn acquired(lease: &mut Box<dyn super::Lease>) -> u64 {
    match within("the lease", lease.next()).await {
        Some(super::LeaseEvent::Acquired { token }) => token,
        other => panic!("expected the lease to be acquired, got {other:?}"),
    }
}

pub async fn first_candidate_holds_a_lease_and_others_wait(t: Arc<dyn Transport>) {
    let name = lease_name("first");
    let mut a = t.lease(&name).await.unwrap();
    let token = acquired(&mut a).await;
    assert!(token >= 1);
    assert_eq!(a.fence().check(), Some(token));
    let mut b = t.lease(&name).await.unwrap();
    let waited = tokio::time::timeout(QUIET, b.next()).await;
    assert!(
        waited.is_err(),
        "a second candidate got the lease: {waited:?}"
    );
    assert_eq!(b.fence().check(), None);
    assert_eq!(a.fence().check(), Some(token), "the holder kept it");
    a.release().await;
    b.release().await;
}

pub async fn a_released_lease_passes_to_the_next_with_a_greater_token(t: Arc<dyn Transport>) {
    let name = lease_name("release");
    let mut a = t.lease(&name).await.unwrap();
    let first = acquired(&mut a).await;
    let mut b = t.lease(&name).await.unwrap();
    let fence_a = a.fence();
    a.release().await;
    assert_eq!(fence_a.check(), None, "released, the old holder is fenced");
    let second = acquired(&mut b).await;
    assert!(second > first, "token {second} after {first}");
    assert!(
        tokio::time::timeout(QUIET, a.next())
            .await
            .unwrap()
            .is_none()
    );
    b.release().await;
}

pub async fn a_dropped_lease_is_handed_over(t: Arc<dyn Transport>) {
    let name = lease_name("drop");
    let mut a = t.lease(&name).await.unwrap();
    let first = acquired(&mut a).await;
    let fence_a = a.fence();
    let mut b = t.lease(&name).await.unwrap();
    drop(a);
    assert_eq!(fence_a.check(), None);
    let second = acquired(&mut b).await;
    assert!(second > first);
    b.release().await;
}

pub async fn lease_tokens_grow_and_one_holder_at_a_time(t: Arc<dyn Transport>) {
    let name = lease_name("rotate");
    let mut line = std::collections::VecDeque::new();
    for _ in 0..3 {
        line.push_back(t.lease(&name).await.unwrap());
    }
    let mut last = 0;
    for _ in 0..6 {
        // Whoever holds it is announced; everyone else's fence is down.
        let mut holder = None;
        let deadline = soon();
        while holder.is_none() {
            for (i, c) in line.iter().enumerate() {
                if c.fence().check().is_some() {
                    holder = Some(i);
                }
            }
            assert!(Instant::now() < deadline, "nobody acquired the lease");
            if holder.is_none() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let i = holder.unwrap();
        let mut h = line.remove(i).unwrap();
        let token = acquired(&mut h).await;
        assert!(token > last, "token {token} after {last}");
        last = token;
        for other in &line {
            assert_eq!(other.fence().check(), None, "two holders at once");
        }
        h.release().await;
        // Back in line as a new candidate.
        line.push_back(t.lease(&name).await.unwrap());
    }
    for mut c in line {
        c.release().await;
    }
}

pub async fn leases_of_other_names_are_independent(t: Arc<dyn Transport>) {
    let mut a = t.lease(&lease_name("one")).await.unwrap();
    let mut b = t.lease(&lease_name("two")).await.unwrap();
    acquired(&mut a).await;
    acquired(&mut b).await;
    assert!(t.lease("Not/A lease").await.is_err());
    a.release().await;
    b.release().await;
}

async fn futures_join_all<F>(futs: impl IntoIterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("a conformance task panicked"));
    }
    out
}

/// Generate one `#[tokio::test]` per conformance check for the transport that
/// `$make` (an expression, may use `.await`) builds afresh for each test.
/// Poll `dead_letters_waiting` until it says `expected`; fails after [`PROMPT`].
async fn wait_for_waiting_dead_letters(t: &dyn Transport, expected: u64) {
    let deadline = soon();
    loop {
        let waiting = t.dead_letters_waiting().await.unwrap();
        if waiting == Some(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "dead letters waiting: {waiting:?}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn dead_letters_waiting_are_counted(t: Arc<dyn Transport>) {
    t.declare_service(&service("dlc", &["dlc"])).await.unwrap();
    wait_for_waiting_dead_letters(t.as_ref(), 0).await;
    let mut c = t.consume("dlc", 2).await.unwrap();
    let requests: Vec<_> = (0..2)
        .map(|i| {
            let t = t.clone();
            tokio::spawn(async move {
                let msg = Message::new(format!("poison {i}"));
                t.request("dlc", msg, Instant::now() + Duration::from_millis(500))
                    .await
            })
        })
        .collect();
    for _ in 0..2 {
        let d = within("delivery", c.next()).await.unwrap().unwrap();
        d.reject("test: counted").await.unwrap();
    }
    wait_for_waiting_dead_letters(t.as_ref(), 2).await;
    // Read and settled: no longer waiting.
    let mut dead = t.consume_dead_letters(10).await.unwrap();
    for _ in 0..2 {
        let dl = within("dead letter", dead.next()).await.unwrap().unwrap();
        dl.ack().await.unwrap();
    }
    wait_for_waiting_dead_letters(t.as_ref(), 0).await;
    for r in requests {
        assert!(matches!(r.await.unwrap(), Err(RequestError::Timeout)));
    }
}

#[macro_export]
macro_rules! transport_conformance_tests {
    ($make:expr) => {
        $crate::transport_conformance_tests!(@each [@tests $make]);
    };
    // `$make` builds an `Arc` of a concrete transport; after each check, passed or
    // failed, the transport is closed and then `$cleanup(&that_arc).await` runs (e.g.
    // to delete what the check declared on a shared broker).
    ($make:expr, cleanup = $cleanup:path) => {
        $crate::transport_conformance_tests!(@each [@cleanup $make, $cleanup]);
    };
    // The one list of checks.
    (@each [$($head:tt)*]) => {
        $crate::transport_conformance_tests!($($head)*;
            request_reply_round_trip,
            concurrent_requests_get_their_own_replies,
            unbound_route_is_unroutable_at_once,
            request_without_reply_times_out_at_deadline,
            expired_request_is_not_delivered,
            late_reply_is_discarded,
            competing_consumers_each_message_once,
            prefetch_limits_unsettled_deliveries,
            requeue_redelivers,
            dropped_delivery_is_requeued,
            a_delivery_acked_before_its_reply_is_answered_and_frees_its_slot,
            hand_back_is_not_a_redelivery_and_keeps_the_reply_address,
            counted_redeliveries_carry_their_count,
            reject_dead_letters_with_reason,
            dead_letters_waiting_are_counted,
            paused_consumer_leaves_work_to_peers,
            resumed_consumer_takes_work_again,
            narrowed_window_leaves_work_to_peers,
            fanout_reaches_every_subscriber,
            headers_travel_with_requests,
            closed_transport_ends_consumers,
            enqueued_message_reaches_a_consumer_of_its_route,
            enqueue_to_an_unbound_route_is_unroutable,
            enqueued_message_waits_for_a_consumer,
            delayed_message_arrives_after_its_delay,
            delayed_message_is_routed_when_its_delay_is_over,
            acked_enqueued_message_is_not_delivered_again,
            first_candidate_holds_a_lease_and_others_wait,
            a_released_lease_passes_to_the_next_with_a_greater_token,
            a_dropped_lease_is_handed_over,
            lease_tokens_grow_and_one_holder_at_a_time,
            leases_of_other_names_are_independent,
        );
    };
    (@cleanup $make:expr, $cleanup:path; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let concrete = $make;
                let transport: ::std::sync::Arc<dyn $crate::transport::Transport> =
                    concrete.clone();
                // Run in a task so that a failed check still gets its clean-up.
                let check = ::tokio::spawn($crate::transport::conformance::$name(transport.clone()));
                let outcome = check.await;
                transport.close().await;
                $cleanup(&concrete).await;
                if let Err(e) = outcome {
                    match e.try_into_panic() {
                        Ok(panic) => ::std::panic::resume_unwind(panic),
                        Err(e) => panic!("conformance check did not finish: {e}"),
                    }
                }
            }
        )*
    };
    (@tests $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let transport: ::std::sync::Arc<dyn $crate::transport::Transport> = $make;
                $crate::transport::conformance::$name(transport.clone()).await;
                transport.close().await;
            }
        )*
    };
}
