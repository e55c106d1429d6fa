//! The transport conformance suite on the AMQP transport, against a real RabbitMQ.
//!
//! The broker is `KEELSON_TEST_AMQP_URL` (default: the local dev broker). Each test
//! gets its own namespace, so tests run in parallel on one broker, and deletes its
//! topology afterwards. No broker is a failure, never a skip.

#![cfg(feature = "amqp")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use keelson_protocol::transport::amqp::{AmqpConfig, AmqpTransport};
use std::sync::Arc;

fn broker_url() -> String {
    std::env::var("KEELSON_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

async fn amqp_transport() -> Arc<AmqpTransport> {
    let config = AmqpConfig {
        urls: vec![broker_url()],
        namespace: format!("test-{}", uuid::Uuid::new_v4()),
        queue_expires_ms: Some(60_000),
        ..AmqpConfig::default()
    };
    match AmqpTransport::connect(config, "conformance-test").await {
        Ok(t) => Arc::new(t),
        Err(e) => panic!(
            "no RabbitMQ broker for the AMQP conformance tests at {} ({e}); start one \
             (e.g. `rabbitmq-server -detached`) or set KEELSON_TEST_AMQP_URL",
            keelson_protocol::transport::amqp::redact(&broker_url())
        ),
    }
}

async fn delete_topology(transport: &Arc<AmqpTransport>) {
    transport
        .delete_topology()
        .await
        .expect("deleting the test namespace's queues and exchanges");
}

keelson_protocol::transport_conformance_tests!(amqp_transport().await, cleanup = delete_topology);

/// What only a broker has: URL lists, connection loss, heartbeats, quorum queues.
mod amqp_specific {
    use super::{broker_url, delete_topology};
    use bytes::Bytes;
    use futures_util::StreamExt;
    use keelson_protocol::transport::amqp::{AmqpConfig, AmqpTransport, QueueType};
    use keelson_protocol::transport::{
        DEAD_LETTER_REASON_HEADER, Message, Publisher, RequestError, ServiceSpec, Transport,
    };
    use lapin::uri::AMQPUri;
    use std::future::Future;
    use std::io::Write;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex, OnceLock};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;
    use tokio::task::JoinHandle;
    use tokio::time::Instant;

    fn service(name: &str, routes: &[&str]) -> ServiceSpec {
        ServiceSpec {
            name: name.to_owned(),
            routes: routes.iter().map(|r| (*r).to_owned()).collect(),
        }
    }

    fn test_config(urls: Vec<String>) -> AmqpConfig {
        AmqpConfig {
            urls,
            namespace: format!("test-{}", uuid::Uuid::new_v4()),
            queue_expires_ms: Some(60_000),
            ..AmqpConfig::default()
        }
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    /// Connect with `config`, run `body` in a task, then (whatever happened) close the
    /// transport and delete its topology, and re-raise a failure of `body`.
    async fn with_transport<F, Fut>(config: AmqpConfig, body: F)
    where
        F: FnOnce(Arc<AmqpTransport>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let t = Arc::new(
            AmqpTransport::connect(config, "amqp-test")
                .await
                .expect("connecting to the test broker"),
        );
        let outcome = tokio::spawn(body(t.clone())).await;
        t.close().await;
        delete_topology(&t).await;
        if let Err(e) = outcome {
            match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(e) => panic!("test body did not finish: {e}"),
            }
        }
    }

    /// Wait until `ready` is what `t.is_ready()` says, polling; returns how long it took.
    async fn until_ready(t: &AmqpTransport, ready: bool, within: Duration) -> Duration {
        let started = Instant::now();
        while t.is_ready() != ready {
            assert!(
                started.elapsed() < within,
                "is_ready() not {ready} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        started.elapsed()
    }

    /// Replies to every request with its payload, through one `Consumer` object for
    /// the whole test (so it must survive reconnections by itself).
    fn spawn_echo(mut consumer: Box<dyn keelson_protocol::transport::Consumer>) {
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let payload = d.payload.clone();
                let _ = d.reply(payload).await;
                let _ = d.ack().await;
            }
        });
    }

    /// A TCP proxy in front of the broker whose connections a test can cut or freeze:
    /// connection loss for one transport only (`rabbitmqctl close_all_connections`
    /// would hit every test running on the broker).
    struct Proxy {
        addr: SocketAddr,
        pipes: Arc<Mutex<Vec<JoinHandle<()>>>>,
        frozen: watch::Sender<bool>,
    }

    impl Proxy {
        async fn start(target: String) -> Proxy {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let pipes: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
            let frozen = watch::Sender::new(false);
            let (p, f) = (pipes.clone(), frozen.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(&target).await else {
                        continue;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let (f1, f2) = (f.subscribe(), f.subscribe());
                    p.lock().unwrap().push(tokio::spawn(async move {
                        tokio::select! {
                            () = forward(cr, sw, f1) => {}
                            () = forward(sr, cw, f2) => {}
                        }
                    }));
                }
            });
            Proxy {
                addr,
                pipes,
                frozen,
            }
        }

        /// The broker URL through this proxy.
        fn url(&self) -> String {
            let mut uri: AMQPUri = broker_url().parse().unwrap();
            uri.authority.host = "127.0.0.1".into();
            uri.authority.port = self.addr.port();
            uri.to_string()
        }

        /// Close every proxied connection (both sockets).
        fn cut(&self) {
            for pipe in self.pipes.lock().unwrap().drain(..) {
                pipe.abort();
            }
        }

        /// Stop forwarding without closing anything: a dead peer behind a live socket.
        fn freeze(&self, frozen: bool) {
            self.frozen.send_replace(frozen);
        }
    }

    async fn forward(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut frozen: watch::Receiver<bool>,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if frozen.wait_for(|f| !*f).await.is_err() {
                return;
            }
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if frozen.wait_for(|f| !*f).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    fn broker_target() -> String {
        let uri: AMQPUri = broker_url().parse().unwrap();
        format!("{}:{}", uri.authority.host, uri.authority.port)
    }

    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Everything logged at WARN and above in this test binary, from the first call on.
    /// A global subscriber: a scoped one (`set_default`) misses events when other
    /// threads register the same callsites first.
    fn captured_logs() -> Logs {
        static LOGS: OnceLock<Logs> = OnceLock::new();
        LOGS.get_or_init(|| {
            let logs = Logs::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_ansi(false)
                .with_max_level(tracing::Level::WARN)
                .with_writer(move || writer.clone())
                .finish();
            tracing::subscriber::set_global_default(subscriber)
                .expect("no other global subscriber in this test binary");
            logs
        })
        .clone()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn skips_unreachable_urls_and_says_so_without_the_password() {
        let logs = captured_logs();
        // Every URL names the same broker user (it is the requests' `user_id`): the
        // dead one is told apart by its vhost.
        let url = broker_url();
        let user = url
            .split_once("://")
            .and_then(|(_, rest)| rest.split(['@', ':']).next())
            .unwrap_or("guest")
            .to_owned();
        let vhost = format!("skip-{}", uuid::Uuid::new_v4());
        let dead = format!("amqp://{user}:hunter2@127.0.0.1:1/{vhost}");
        with_transport(test_config(vec![dead, broker_url()]), |t| async move {
            assert!(t.is_ready());
        })
        .await;
        let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
        let line = text
            .lines()
            .find(|l| l.contains("skipping") && l.contains(&vhost))
            .unwrap_or_else(|| panic!("no 'skipping' line for the dead URL in:\n{text}"));
        assert!(line.contains("WARN"), "{line}");
        assert!(
            line.contains(&format!("amqp://{user}:***@127.0.0.1:1/{vhost}")),
            "{line}"
        );
        assert!(
            !text.contains("hunter2"),
            "the password leaked into the logs:\n{text}"
        );
    }

    #[tokio::test]
    async fn no_broker_fails_fast_and_says_why() {
        let started = Instant::now();
        let config = test_config(vec!["amqp://guest:hunter2@127.0.0.1:1/%2f".into()]);
        let err = AmqpTransport::connect(config, "amqp-test")
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("no broker reachable"), "{text}");
        assert!(
            text.contains("127.0.0.1:1") && !text.contains("hunter2"),
            "{text}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn recovers_transparently_after_connection_loss() {
        let proxy = Proxy::start(broker_target()).await;
        let mut config = test_config(vec![proxy.url()]);
        config.heartbeat_s = 1;
        config.reconnect_min_ms = 50;
        config.reconnect_max_ms = 500;
        with_transport(config, move |t| async move {
            t.declare_service(&service("rc", &["rc"])).await.unwrap();
            t.declare_service(&service("held", &["hold"]))
                .await
                .unwrap();
            spawn_echo(t.consume("rc", 4).await.unwrap());
            let mut sub = t.subscribe("events").await.unwrap();
            let (tx, mut heard) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move {
                while let Some(m) = sub.next().await {
                    let _ = tx.send(m.payload);
                }
            });
            let reply = t
                .request("rc", Message::new(&b"before"[..]), soon())
                .await
                .unwrap();
            assert_eq!(reply, Bytes::from_static(b"before"));

            // A request waiting for its reply when the connection drops fails at once.
            let waiting = {
                let t = t.clone();
                let deadline = Instant::now() + Duration::from_secs(10);
                tokio::spawn(
                    async move { t.request("hold", Message::new(&b"w"[..]), deadline).await },
                )
            };
            tokio::time::sleep(Duration::from_millis(200)).await;
            let cut = Instant::now();
            proxy.cut();
            let err = tokio::time::timeout(Duration::from_secs(2), waiting)
                .await
                .expect("a pending request hung after the connection dropped")
                .unwrap()
                .unwrap_err();
            assert!(matches!(err, RequestError::Unavailable(_)), "got {err:?}");

            // Meanwhile requests fail fast or succeed; none waits for its deadline.
            let started = Instant::now();
            let during = t.request("rc", Message::new(&b"during"[..]), soon()).await;
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "{:?}",
                started.elapsed()
            );
            assert!(
                matches!(&during, Ok(_) | Err(RequestError::Unavailable(_))),
                "got {during:?}"
            );

            until_ready(&t, true, Duration::from_secs(10)).await;
            eprintln!("ready again {:?} after the cut", cut.elapsed());
            // The consumer and subscription handed out before the cut serve on.
            let reply = t
                .request("rc", Message::new(&b"after"[..]), soon())
                .await
                .unwrap();
            assert_eq!(reply, Bytes::from_static(b"after"));
            eprintln!("first reply {:?} after the cut", cut.elapsed());
            // A subscriber misses what is broadcast before it re-subscribed: repeat.
            let got = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    t.broadcast("events", Message::new(&b"again"[..]))
                        .await
                        .unwrap();
                    if let Ok(Some(m)) =
                        tokio::time::timeout(Duration::from_millis(100), heard.recv()).await
                    {
                        break m;
                    }
                }
            })
            .await
            .expect("the subscription did not come back");
            assert_eq!(got, Bytes::from_static(b"again"));
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dead_socket_is_noticed_by_heartbeat() {
        let proxy = Proxy::start(broker_target()).await;
        let mut config = test_config(vec![proxy.url()]);
        config.heartbeat_s = 1;
        config.connect_timeout_ms = 2_000;
        config.reconnect_min_ms = 50;
        config.reconnect_max_ms = 500;
        with_transport(config, move |t| async move {
            t.declare_service(&service("hb", &["hb"])).await.unwrap();
            spawn_echo(t.consume("hb", 4).await.unwrap());
            proxy.freeze(true);
            let noticed = until_ready(&t, false, Duration::from_secs(6)).await;
            eprintln!("a frozen connection was noticed after {noticed:?}");
            let err = t
                .request("hb", Message::new(&b"x"[..]), soon())
                .await
                .unwrap_err();
            assert!(matches!(err, RequestError::Unavailable(_)), "got {err:?}");
            proxy.cut();
            proxy.freeze(false);
            until_ready(&t, true, Duration::from_secs(10)).await;
            let reply = t
                .request("hb", Message::new(&b"back"[..]), soon())
                .await
                .unwrap();
            assert_eq!(reply, Bytes::from_static(b"back"));
        })
        .await;
    }

    /// The lease holder `a` (through `proxy`) and a candidate `b` (direct), same
    /// namespace and heartbeat; returns them with `a` holding.
    async fn lease_pair(
        proxy: &Proxy,
        heartbeat_s: u16,
    ) -> (
        Arc<AmqpTransport>,
        Arc<AmqpTransport>,
        Box<dyn keelson_protocol::transport::Lease>,
        Box<dyn keelson_protocol::transport::Lease>,
        u64,
    ) {
        let mut direct = test_config(vec![broker_url()]);
        direct.heartbeat_s = heartbeat_s;
        let mut proxied = direct.clone();
        proxied.urls = vec![proxy.url()];
        let a = Arc::new(AmqpTransport::connect(proxied, "lease-a").await.unwrap());
        let b = Arc::new(AmqpTransport::connect(direct, "lease-b").await.unwrap());
        let mut la = a.lease("pair").await.unwrap();
        let token = match tokio::time::timeout(Duration::from_secs(5), la.next()).await {
            Ok(Some(keelson_protocol::transport::LeaseEvent::Acquired { token })) => token,
            other => panic!("a did not acquire: {other:?}"),
        };
        let lb = b.lease("pair").await.unwrap();
        (a, b, la, lb, token)
    }

    /// Waits for `lease` to be acquired; returns its token and when.
    async fn acquired_within(
        lease: &mut Box<dyn keelson_protocol::transport::Lease>,
        within: Duration,
    ) -> (u64, Instant) {
        match tokio::time::timeout(within, lease.next()).await {
            Ok(Some(keelson_protocol::transport::LeaseEvent::Acquired { token })) => {
                (token, Instant::now())
            }
            other => panic!("the lease was not acquired within {within:?}: {other:?}"),
        }
    }

    /// A holder whose connection goes silent (a frozen process, a partition) fences
    /// itself before the broker gives its baton to another candidate, which gets a
    /// greater token.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_lease_holder_fences_itself_before_the_hand_over() {
        let proxy = Proxy::start(broker_target()).await;
        let (a, b, la, mut lb, first) = lease_pair(&proxy, 2).await;
        let fence = la.fence();
        assert_eq!(fence.check(), Some(first));
        proxy.freeze(true);
        let frozen_at = Instant::now();
        let watcher = tokio::spawn(async move {
            while fence.check().is_some() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Instant::now()
        });
        let (second, acquired_at) = acquired_within(&mut lb, Duration::from_secs(15)).await;
        let fenced_at = watcher.await.unwrap();
        eprintln!(
            "frozen holder fenced after {:?}, baton handed over after {:?}",
            fenced_at - frozen_at,
            acquired_at - frozen_at
        );
        assert!(second > first, "token {second} after {first}");
        assert!(
            fenced_at < acquired_at,
            "the old holder was still valid when the new one acquired"
        );
        assert!(fenced_at - frozen_at <= Duration::from_secs(2) + Duration::from_millis(500));
        drop(la);
        drop(lb);
        proxy.cut();
        a.close().await;
        b.close().await;
        delete_topology(&b).await;
    }

    /// A holder whose connection closes (a killed process) hands the lease over at
    /// once, without waiting for heartbeats.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_closed_lease_holder_connection_hands_over_at_once() {
        let proxy = Proxy::start(broker_target()).await;
        let (a, b, mut la, mut lb, first) = lease_pair(&proxy, 5).await;
        let cut_at = Instant::now();
        proxy.cut();
        let (second, acquired_at) = acquired_within(&mut lb, Duration::from_secs(3)).await;
        eprintln!("handed over {:?} after the cut", acquired_at - cut_at);
        assert!(second > first);
        match tokio::time::timeout(Duration::from_secs(5), la.next()).await {
            Ok(Some(keelson_protocol::transport::LeaseEvent::Lost { token, .. })) => {
                assert_eq!(token, first)
            }
            other => panic!("the old holder was not told it lost the lease: {other:?}"),
        }
        assert_eq!(la.fence().check(), None);
        drop(la);
        drop(lb);
        a.close().await;
        b.close().await;
        delete_topology(&b).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropped_consumer_keeps_unsettled_deliveries() {
        with_transport(test_config(vec![broker_url()]), |t| async move {
            t.declare_service(&service("dc", &["dc"])).await.unwrap();
            let mut first = t.consume("dc", 1).await.unwrap();
            let req = {
                let t = t.clone();
                tokio::spawn(async move { t.request("dc", Message::new(&b"x"[..]), soon()).await })
            };
            let d = first.next().await.unwrap().unwrap();
            drop(first);
            let mut second = t.consume("dc", 1).await.unwrap();
            // The delivery outlives its consumer: no one else gets it ...
            let stolen = tokio::time::timeout(Duration::from_millis(300), second.next()).await;
            assert!(
                stolen.is_err(),
                "requeued while still being handled: {stolen:?}"
            );
            // ... and its reply and ack still work.
            d.reply(&b"done"[..]).await.unwrap();
            d.ack().await.unwrap();
            assert_eq!(req.await.unwrap().unwrap(), Bytes::from_static(b"done"));
            let again = tokio::time::timeout(Duration::from_millis(300), second.next()).await;
            assert!(again.is_err(), "an acked message came back: {again:?}");
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn quorum_delivery_limit_dead_letters_with_reason() {
        let mut config = test_config(vec![broker_url()]);
        config.queue_type = QueueType::Quorum;
        config.delivery_limit = Some(1);
        with_transport(config, |t| async move {
            t.declare_service(&service("ql", &["ql"])).await.unwrap();
            let mut dead = t.consume_dead_letters(4).await.unwrap();
            let mut c = t.consume("ql", 1).await.unwrap();
            let req = {
                let t = t.clone();
                tokio::spawn(
                    async move { t.request("ql", Message::new(&b"crashy"[..]), soon()).await },
                )
            };
            // A consumer that never finishes it: requeued until over the limit.
            tokio::spawn(async move {
                while let Some(Ok(d)) = c.next().await {
                    let _ = d.requeue().await;
                }
            });
            let dl = tokio::time::timeout(Duration::from_secs(5), dead.next())
                .await
                .expect("no dead letter within 5 s")
                .unwrap()
                .unwrap();
            assert_eq!(dl.payload, Bytes::from_static(b"crashy"));
            assert_eq!(
                dl.headers
                    .get(DEAD_LETTER_REASON_HEADER)
                    .map(String::as_str),
                Some("broker: delivery_limit")
            );
            dl.ack().await.unwrap();
            req.abort();
        })
        .await;
    }

    /// 100 pause/resume cycles of a consumer that, like a logic server, hands back
    /// what it took and did not begin, and counts the redeliveries it gets (a copy).
    /// Returns how many of the deliveries it took were marked redelivered.
    async fn pause_resume_cycles(t: Arc<dyn Transport>, queue: &str) -> usize {
        t.declare_service(&service(queue, &[queue])).await.unwrap();
        let mut dead = t.consume_dead_letters(4).await.unwrap();
        let mut c = t.consume(queue, 8).await.unwrap();
        let requests: Vec<_> = (0..8)
            .map(|i| {
                let (t, queue) = (t.clone(), queue.to_owned());
                tokio::spawn(async move {
                    let deadline = Instant::now() + Duration::from_secs(60);
                    let message = Message::new(format!("m{i}").into_bytes());
                    t.request(&queue, message, deadline).await
                })
            })
            .collect();
        let mut redelivered = 0;
        for _ in 0..100 {
            let d = tokio::time::timeout(Duration::from_secs(5), c.next())
                .await
                .expect("a delivery")
                .unwrap()
                .unwrap();
            c.pause().await.unwrap();
            if d.redelivered {
                redelivered += 1;
                d.count_redelivery().await.unwrap();
            } else {
                d.hand_back().await.unwrap();
            }
            c.resume().await.unwrap();
        }
        let mut answered = 0;
        while answered < 8 {
            let d = tokio::time::timeout(Duration::from_secs(5), c.next())
                .await
                .expect("a delivery")
                .unwrap()
                .unwrap();
            if d.redelivered {
                redelivered += 1;
                d.count_redelivery().await.unwrap();
                continue;
            }
            let mut reply = b"re:".to_vec();
            reply.extend_from_slice(&d.payload);
            d.reply(reply).await.unwrap();
            d.ack().await.unwrap();
            answered += 1;
        }
        for (i, r) in requests.into_iter().enumerate() {
            assert_eq!(r.await.unwrap().unwrap(), Bytes::from(format!("re:m{i}")));
        }
        let got = tokio::time::timeout(Duration::from_millis(300), dead.next()).await;
        assert!(got.is_err(), "a message was dead-lettered: {got:?}");
        redelivered
    }

    /// A hand-back is a republished copy, so 100 pause/resume cycles on a classic
    /// queue give no redelivery at all.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hand_backs_are_never_redeliveries() {
        with_transport(test_config(vec![broker_url()]), |t| async move {
            assert_eq!(pause_resume_cycles(t, "hb").await, 0);
        })
        .await;
    }

    /// RabbitMQ 3.10 counts every return toward a quorum queue's delivery limit (the
    /// check above dead-letters a message requeued past a limit of 1), and returns, as
    /// redelivered, the deliveries in flight to a consumer when it is cancelled.
    /// Hand-backs and counted redeliveries are copies, whose broker count starts
    /// afresh: 100 pause/resume cycles never reach a limit of 2.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hand_backs_never_reach_a_quorum_delivery_limit() {
        let mut config = test_config(vec![broker_url()]);
        config.queue_type = QueueType::Quorum;
        config.delivery_limit = Some(2);
        with_transport(config, |t| async move {
            let redelivered = pause_resume_cycles(t, "hbq").await;
            println!("deliveries returned by the quorum queue on cancel: {redelivered}");
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn expired_requests_are_not_dead_lettered() {
        with_transport(test_config(vec![broker_url()]), |t| async move {
            t.declare_service(&service("ex", &["ex"])).await.unwrap();
            let mut dead = t.consume_dead_letters(4).await.unwrap();
            let deadline = Instant::now() + Duration::from_millis(100);
            let err = t
                .request("ex", Message::new(&b"x"[..]), deadline)
                .await
                .unwrap_err();
            assert!(matches!(err, RequestError::Timeout), "got {err:?}");
            let got = tokio::time::timeout(Duration::from_millis(700), dead.next()).await;
            assert!(
                got.is_err(),
                "an expired request was dead-lettered: {got:?}"
            );
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delete_topology_leaves_nothing() {
        let mut ns = String::new();
        let config = test_config(vec![broker_url()]);
        ns.push_str(&config.namespace);
        with_transport(config, |t| async move {
            t.declare_service(&service("gone", &["gone"]))
                .await
                .unwrap();
            t.broadcast("events", Message::new(&b"x"[..]))
                .await
                .unwrap();
        })
        .await;
        let conn =
            lapin::Connection::connect(&broker_url(), lapin::ConnectionProperties::default())
                .await
                .unwrap();
        for queue in [
            format!("{ns}.svc.gone"),
            format!("{ns}.dead-letter"),
            format!("{ns}.delay.1"),
            format!("{ns}.delay.4096"),
        ] {
            let ch = conn.create_channel().await.unwrap();
            let passive = lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            let found = ch
                .queue_declare(queue.as_str().into(), passive, Default::default())
                .await;
            assert!(found.is_err(), "queue {queue} survived");
        }
        for exchange in [
            "requests",
            "dead-letter",
            "dead-letter.broker",
            "delay",
            "events",
        ] {
            let ch = conn.create_channel().await.unwrap();
            let passive = lapin::options::ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            };
            let name = format!("{ns}.{exchange}");
            let kind = lapin::ExchangeKind::Fanout;
            let found = ch
                .exchange_declare(name.as_str().into(), kind, passive, Default::default())
                .await;
            assert!(found.is_err(), "exchange {name} survived");
        }
        let _ = conn.close(200, "OK".into()).await;
    }

    /// The broker user every message of `t` carries as `user_id`.
    fn broker_user(t: &AmqpTransport) -> String {
        match t.publisher() {
            Publisher::User(user) => user,
            other => panic!("an AMQP transport publishes as {other}"),
        }
    }

    /// The next message of a plain lapin consumer, within 5 s.
    async fn next_raw(consumer: &mut lapin::Consumer) -> lapin::message::Delivery {
        tokio::time::timeout(Duration::from_secs(5), consumer.next())
            .await
            .expect("no message within 5 s")
            .unwrap()
            .unwrap()
    }

    /// What a peer in another language reads off the wire (TOPOLOGY.md, "Background
    /// work"): an enqueued message, sent now or after a delay, comes through the
    /// request exchange with its route as routing key, persistent, with the
    /// publisher's `user_id`, no expiry and no reply address; a server's copy of one
    /// (hand-back) stays persistent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn enqueued_messages_are_persistent_and_stamped_on_the_wire() {
        with_transport(test_config(vec![broker_url()]), |t| async move {
            t.declare_service(&service("_jobs.raw", &["_job.raw"]))
                .await
                .unwrap();
            let user = broker_user(&t);
            let queue = format!("{}.svc._jobs.raw", t.namespace());
            let requests = format!("{}.requests", t.namespace());
            let conn = lapin::Connection::connect(&broker_url(), Default::default())
                .await
                .unwrap();
            let raw_consumer = || async {
                let ch = conn.create_channel().await.unwrap();
                let consumer = ch
                    .basic_consume(
                        queue.as_str().into(),
                        "".into(),
                        Default::default(),
                        Default::default(),
                    )
                    .await
                    .unwrap();
                (ch, consumer)
            };
            let (ch, mut raw) = raw_consumer().await;
            t.enqueue("_job.raw", Message::new(&b"now"[..]), Duration::ZERO)
                .await
                .unwrap();
            t.enqueue(
                "_job.raw",
                Message::new(&b"later"[..]),
                Duration::from_millis(200),
            )
            .await
            .unwrap();
            for expected in [&b"now"[..], &b"later"[..]] {
                let d = next_raw(&mut raw).await;
                assert_eq!(d.data, expected);
                assert_eq!(d.exchange.as_str(), requests);
                assert_eq!(d.routing_key.as_str(), "_job.raw");
                assert_eq!(*d.properties.delivery_mode(), Some(2));
                assert_eq!(
                    d.properties.user_id().as_ref().map(|u| u.as_str()),
                    Some(user.as_str())
                );
                assert_eq!(d.properties.expiration(), &None);
                assert_eq!(d.properties.reply_to(), &None);
                d.acker.ack(Default::default()).await.unwrap();
            }
            ch.close(200, "OK".into()).await.unwrap();

            // A server takes one, pauses and hands it back: the copy is persistent too.
            let mut c = t.consume("_jobs.raw", 1).await.unwrap();
            t.enqueue("_job.raw", Message::new(&b"copied"[..]), Duration::ZERO)
                .await
                .unwrap();
            let d = tokio::time::timeout(Duration::from_secs(5), c.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            c.pause().await.unwrap();
            d.hand_back().await.unwrap();
            let (_ch, mut raw) = raw_consumer().await;
            let copy = next_raw(&mut raw).await;
            assert_eq!(copy.data, b"copied");
            assert_eq!(*copy.properties.delivery_mode(), Some(2));
            copy.acker.ack(Default::default()).await.unwrap();
            let _ = conn.close(200, "OK".into()).await;
        })
        .await;
    }

    /// A delayed message that a quorum service queue dead-letters later (over its
    /// delivery limit) reaches the dead-letter queue with that reason, although the
    /// broker's `x-first-death-reason` is its expiry in the delay queue.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delayed_message_over_the_delivery_limit_is_dead_lettered() {
        let mut config = test_config(vec![broker_url()]);
        config.queue_type = QueueType::Quorum;
        config.delivery_limit = Some(1);
        with_transport(config, |t| async move {
            t.declare_service(&service("_jobs.ql", &["_job.ql"]))
                .await
                .unwrap();
            let mut dead = t.consume_dead_letters(4).await.unwrap();
            let mut c = t.consume("_jobs.ql", 1).await.unwrap();
            t.enqueue(
                "_job.ql",
                Message::new(&b"crashy job"[..]),
                Duration::from_millis(100),
            )
            .await
            .unwrap();
            // A consumer that never finishes it: requeued until over the limit.
            tokio::spawn(async move {
                while let Some(Ok(d)) = c.next().await {
                    let _ = d.requeue().await;
                }
            });
            let dl = tokio::time::timeout(Duration::from_secs(5), dead.next())
                .await
                .expect("no dead letter within 5 s")
                .unwrap()
                .unwrap();
            assert_eq!(dl.payload, Bytes::from_static(b"crashy job"));
            assert_eq!(
                dl.headers
                    .get(DEAD_LETTER_REASON_HEADER)
                    .map(String::as_str),
                Some("broker: delivery_limit")
            );
            dl.ack().await.unwrap();
        })
        .await;
    }

    /// With `declare_topology = false` a process checks that the delay queues exist,
    /// and names the one missing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_passive_transport_names_a_missing_delay_queue() {
        let config = test_config(vec![broker_url()]);
        let passive = AmqpConfig {
            declare_topology: false,
            ..config.clone()
        };
        with_transport(config, |t| async move {
            // The whole topology is there: a passive transport starts and delays work.
            let checked = AmqpTransport::connect(passive.clone(), "passive-test")
                .await
                .expect("a passive transport on a declared topology");
            checked.close().await;
            let missing = format!("{}.delay.8", t.namespace());
            let conn = lapin::Connection::connect(&broker_url(), Default::default())
                .await
                .unwrap();
            let ch = conn.create_channel().await.unwrap();
            ch.queue_delete(missing.as_str().into(), Default::default())
                .await
                .unwrap();
            let _ = conn.close(200, "OK".into()).await;
            let err = AmqpTransport::connect(passive, "passive-test")
                .await
                .expect_err("a passive transport started without a delay queue");
            let message = err.to_string();
            assert!(
                message.contains(&format!("queue {missing}"))
                    && message.contains("keelson topology declare"),
                "{message}"
            );
        })
        .await;
    }

    #[derive(Debug, serde::Deserialize)]
    struct File {
        transport: keelson_protocol::TransportConfig,
    }

    #[test]
    fn transport_section_parses_and_refuses_unknown_keys() {
        use keelson_protocol::TransportConfig;
        let parse = |text: &str| toml::from_str::<File>(text).map(|f| f.transport);
        let minimal = parse("[transport]\nkind = \"amqp\"\n").unwrap();
        assert_eq!(minimal, TransportConfig::Amqp(AmqpConfig::default()));
        assert_eq!(minimal.kind(), "amqp");
        let full = parse(
            r#"
            [transport]
            kind = "amqp"
            urls = ["amqp://a@h1:5672/%2f", "amqp://a@h2:5672/%2f"]
            password_env = "BROKER_PASSWORD"
            namespace = "prod"
            heartbeat_s = 10
            queue_type = "quorum"
            delivery_limit = 5
            queue_expires_ms = 60000
            connect_timeout_ms = 2000
            reconnect_min_ms = 200
            reconnect_max_ms = 10000
            "#,
        )
        .unwrap();
        let TransportConfig::Amqp(full) = full else {
            panic!("not amqp: {full:?}")
        };
        assert_eq!(full.urls.len(), 2);
        assert_eq!(full.password_env.as_deref(), Some("BROKER_PASSWORD"));
        assert_eq!((full.namespace.as_str(), full.heartbeat_s), ("prod", 10));
        assert_eq!(
            (full.queue_type, full.delivery_limit),
            (QueueType::Quorum, Some(5))
        );
        assert_eq!(full.queue_expires_ms, Some(60_000));
        assert_eq!(
            (
                full.connect_timeout_ms,
                full.reconnect_min_ms,
                full.reconnect_max_ms
            ),
            (2000, 200, 10_000)
        );
        let unknown = parse("[transport]\nkind = \"amqp\"\nurl = \"amqp://h\"\n").unwrap_err();
        assert!(unknown.to_string().contains("url"), "{unknown}");
        let bad_type =
            parse("[transport]\nkind = \"amqp\"\nqueue_type = \"quorom\"\n").unwrap_err();
        assert!(bad_type.to_string().contains("quorom"), "{bad_type}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn transport_config_builds_a_connected_transport() {
        let config = test_config(vec![broker_url()]);
        let built = keelson_protocol::TransportConfig::Amqp(config.clone())
            .build("config-test")
            .await
            .unwrap();
        assert!(built.is_ready());
        built.close().await;
        assert!(!built.is_ready());
        // Only the shared base was declared: delete it through a transport of the same
        // namespace.
        with_transport(config, |_| async {}).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn started_transport_connects_in_the_background() {
        let config = test_config(vec![broker_url()]);
        let t = Arc::new(AmqpTransport::start(config, "start-test").unwrap());
        until_ready(&t, true, Duration::from_secs(5)).await;
        t.close().await;
        delete_topology(&t).await;
    }
}
