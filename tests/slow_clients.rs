//! Slow and idle clients (5,000 connections) against a gateway (the embedded mesh's, the real `keelson`
//! binary) running under the 1,024 open-file limit that systemd gives by default:
//! they cost it sockets for a bounded time, never its service to other clients.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{Bin, Process, Scratch, embedded_config, http};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;

const SLOW_HEADERS: usize = 2000;
const SLOW_BODIES: usize = 2000;
const IDLE: usize = 1000;
const HEADER_TIMEOUT_MS: u64 = 2000;
const BODY_TIMEOUT_MS: u64 = 2000;
/// Allowed past a timeout before a connection counts as not closed in time (the
/// accept queue, a loaded 2-core machine).
const SLACK: Duration = Duration::from_millis(4000);

/// How one slow connection ended, seen from the client.
#[derive(Debug)]
enum Ending {
    /// The connection was never established (the listen backlog was full).
    NotConnected,
    /// Closed by the gateway this long after it was established.
    Closed(Duration),
    /// Still open when the test stopped waiting.
    StillOpen,
}

/// Open a connection from `from` (a loopback address of its own) to `to`, send
/// `prefix` and then nothing more; wait for the gateway to close it.
///
/// Connects take turns (`connecting`): past the listen backlog, the kernel would
/// complete handshakes the gateway never sees, and a client that then sends nothing
/// could not tell.
async fn slow_client(
    from: [u8; 4],
    to: SocketAddr,
    prefix: &'static [u8],
    connecting: Arc<Semaphore>,
) -> Ending {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    let turn = connecting.acquire_owned().await.unwrap();
    let Ok(Ok(mut stream)) =
        tokio::time::timeout(Duration::from_secs(10), socket.connect(to)).await
    else {
        return Ending::NotConnected;
    };
    drop(turn);
    let connected = Instant::now();
    // A refused connection may be closed before this write lands.
    let _ = stream.write_all(prefix).await;
    let mut buf = [0u8; 1024];
    let wait = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {} // a 408 before the close
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(30), wait).await {
        Ok(()) => Ending::Closed(connected.elapsed()),
        Err(_) => Ending::StillOpen,
    }
}

fn resident_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

fn p99(mut latencies: Vec<Duration>) -> Duration {
    latencies.sort();
    latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)]
}

/// Echo requests one after another on one kept-alive connection until `until`.
async fn normal_client(url: String, until: Instant) -> (Vec<Duration>, Vec<u16>) {
    let client = http();
    let (mut latencies, mut failures) = (Vec::new(), Vec::new());
    while Instant::now() < until {
        let started = Instant::now();
        let status = match client.post(&url).body(r#"{"n":1}"#).send().await {
            Ok(resp) => resp.status().as_u16(),
            Err(_) => 0,
        };
        latencies.push(started.elapsed());
        if status != 200 {
            failures.push(status);
        }
    }
    (latencies, failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_cannot_starve_a_gateway_under_1024_file_descriptors() {
    // This test holds 4,000 sockets of its own.
    rlimit::increase_nofile_limit(u64::MAX).unwrap();
    let scratch = Scratch::new();
    let config = scratch.write("keelson.toml", &embedded_config(""));
    let log = scratch.path().join("keelson.log");
    let header_timeout = HEADER_TIMEOUT_MS.to_string();
    let body_timeout = BODY_TIMEOUT_MS.to_string();
    let node = Process::start_with_fd_limit(
        Bin::Keelson,
        &config,
        &log,
        &[
            ("KEELSON__GATEWAY__HEADER_READ_TIMEOUT_MS", &header_timeout),
            ("KEELSON__GATEWAY__BODY_READ_TIMEOUT_MS", &body_timeout),
            // No per-address bound: the flood reaches the total (fitted to the
            // open-file limit), the harder case.
            ("KEELSON__GATEWAY__MAX_CONNECTIONS_PER_CLIENT", "0"),
        ],
        1024,
    )
    .await;
    let url = node.url("echo");
    let addr: SocketAddr = node
        .base_url
        .as_deref()
        .unwrap()
        .trim_start_matches("http://")
        .parse()
        .unwrap();

    // Unloaded: the figures to compare with.
    let (unloaded, failures) =
        normal_client(url.clone(), Instant::now() + Duration::from_secs(2)).await;
    assert!(failures.is_empty(), "unloaded: {failures:?}");
    let unloaded_p99 = p99(unloaded);
    let rss_before = resident_kb(node.pid());

    // The flood: some connect and send nothing, some send part of a request head and
    // stop, some send a whole head announcing 100 body bytes, and one byte. Normal
    // traffic goes on meanwhile.
    let flood_started = Instant::now();
    let normal = tokio::spawn(normal_client(
        url.clone(),
        flood_started + Duration::from_secs(8),
    ));
    let mut slow = Vec::new();
    let connecting = Arc::new(Semaphore::new(256));
    for i in 0..SLOW_HEADERS.max(SLOW_BODIES).max(IDLE) {
        if i < IDLE {
            // Connects and sends nothing at all.
            slow.push((
                "idle",
                tokio::spawn(slow_client([127, 0, 0, 4], addr, b"", connecting.clone())),
            ));
        }
        if i < SLOW_HEADERS {
            slow.push((
                "header",
                tokio::spawn(slow_client(
                    [127, 0, 0, 2],
                    addr,
                    b"POST /api/echo HTTP/1.1\r\nHost: x\r\nX-Slow: ",
                    connecting.clone(),
                )),
            ));
        }
        if i < SLOW_BODIES {
            slow.push((
                "body",
                tokio::spawn(slow_client(
                    [127, 0, 0, 3],
                    addr,
                    b"POST /api/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
                    connecting.clone(),
                )),
            ));
        }
    }
    let mut closed = 0;
    let mut not_connected = 0;
    let mut longest = Duration::ZERO;
    for (kind, task) in slow {
        match task.await.unwrap() {
            Ending::Closed(after) => {
                closed += 1;
                let bound = Duration::from_millis(match kind {
                    "header" | "idle" => HEADER_TIMEOUT_MS,
                    _ => HEADER_TIMEOUT_MS + BODY_TIMEOUT_MS,
                }) + SLACK;
                assert!(
                    after <= bound,
                    "a slow-{kind} connection was closed only after {after:?}"
                );
                longest = longest.max(after);
            }
            Ending::NotConnected => not_connected += 1,
            Ending::StillOpen => panic!("a slow-{kind} connection was never closed"),
        }
    }
    let (latencies, failures) = normal.await.unwrap();
    let loaded_p99 = p99(latencies.clone());
    println!(
        "slow connections: {closed} closed by the gateway (longest {longest:?}), {not_connected} never connected; normal requests during the flood: {}, p99 {loaded_p99:?} (unloaded {unloaded_p99:?})",
        latencies.len()
    );
    assert!(failures.is_empty(), "normal requests failed: {failures:?}");
    assert_eq!(not_connected, 0, "the listen backlog holds the connects");
    // 10x the unloaded p99, with a floor of 5 ms for a sub-millisecond baseline.
    let bound = (unloaded_p99 * 10).max(Duration::from_millis(5));
    assert!(
        loaded_p99 <= bound,
        "normal p99 {loaded_p99:?} during the flood, unloaded {unloaded_p99:?}"
    );

    // Its memory comes back (while it serves as before: memory freed by one thread
    // for another's heap is given back when that thread next allocates).
    let mut rss_after = resident_kb(node.pid());
    let settle = Instant::now();

    while rss_after * 10 > rss_before * 12 && settle.elapsed() < Duration::from_secs(20) {
        normal_client(url.clone(), Instant::now() + Duration::from_millis(200)).await;
        rss_after = resident_kb(node.pid());
    }
    println!("resident size: {rss_before} kB before the flood, {rss_after} kB after");
    assert!(
        rss_after * 10 <= rss_before * 12,
        "resident size {rss_after} kB after the flood, {rss_before} kB before"
    );
    let log = node.log_text();
    assert!(
        log.contains("max_connections does not fit the open-file limit"),
        "the gateway says it lowered its bound to fit 1,024 descriptors: {log}"
    );
    assert!(
        log.contains("refusing connections"),
        "the gateway says it refused connections"
    );
    assert!(
        log.contains("open connections near gateway.max_connections"),
        "the gateway says it ran near its bound"
    );
}
