//! Accepting and serving HTTP connections within limits, so that clients that are slow
//! or many on purpose cost a socket and a little memory each, never the service.
//!
//! * **Open connections** are bounded by `max_connections`, and by the process's
//!   file-descriptor limit (its soft limit is raised to the hard one at start; the
//!   bound is lowered to fit, keeping [`FD_RESERVE`] descriptors for everything
//!   else). A connection past the bound is accepted and closed at once, so its
//!   socket does not wait in the kernel's backlog.
//! * **Per client address**, at most `max_connections_per_client` (0: no bound): one
//!   address that opens thousands of connections is refused the excess, the others
//!   are not affected.
//! * **Slow or idle clients**: a connection must deliver a complete request head
//!   within `header_read_timeout_ms` of being accepted or of its previous response
//!   (hyper's header-read timer: it closes slow-header, silent and idle keep-alive
//!   connections alike); a connection with no request being handled and no byte
//!   moving for `idle_timeout_ms` is closed (a client that stops reading its
//!   response); the body's bound is in [`crate::api`] (`body_read_timeout_ms`). A
//!   request takes an in-flight slot only once its body is complete.
//!
//! Refusals are logged at most once per [`LOG_EVERY`], with how many there were, and
//! so is running at 90% of `max_connections` or more.

use crate::config::GatewayConfig;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// File descriptors kept for what is not a client connection (broker connections,
/// log files, the listener itself, DNS lookups).
pub(crate) const FD_RESERVE: u64 = 64;

/// Least time between two log lines about refused connections.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// How long the accept loop pauses after an accept error (out of descriptors, out of
/// memory), so it does not spin while the condition lasts.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Figures of the connections a gateway serves.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    open: AtomicUsize,
    accepted: AtomicU64,
    refused: AtomicU64,
}

impl ConnectionStats {
    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections accepted and served since start.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Connections refused since start (over a bound, or an accept error).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// The bound on open connections that fits the file-descriptor limit: raises the
/// soft limit to the hard one, and lowers `configured` if it still does not fit.
pub(crate) fn fit_to_fd_limit(configured: usize) -> usize {
    let soft = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(soft) => soft,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-file limit");
            return configured;
        }
    };
    let fits = usize::try_from(soft.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX);
    if configured > fits {
        tracing::warn!(
            max_connections = configured,
            open_file_limit = soft,
            effective = fits,
            "gateway.max_connections does not fit the open-file limit; serving at most {fits} connections (raise LimitNOFILE)"
        );
        fits
    } else {
        configured
    }
}

/// The address a client's connections are counted under: IPv4 addresses (also
/// mapped into IPv6) as they are, IPv6 addresses by their /64 prefix, which one
/// host or one subscriber usually holds whole.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Full,
    PerClient,
    AcceptError,
}

/// Rate-limited logging of refusals.
#[derive(Debug)]
struct RefusalLog {
    last: Option<Instant>,
    since_last: u64,
    /// When the last warning that connections run near the bound was logged.
    near_logged: Option<Instant>,
}

/// Open connections, as a share of `max_connections`, from which the gateway warns
/// that it runs near its bound (at most once per [`LOG_EVERY`]).
const NEAR_SHARE: f64 = 0.9;

impl RefusalLog {
    fn near(&mut self, open: usize, max: usize) {
        let now = Instant::now();
        if self
            .near_logged
            .is_some_and(|at| now.duration_since(at) < LOG_EVERY)
        {
            return;
        }
        self.near_logged = Some(now);
        tracing::warn!(
            open,
            max_connections = max,
            "open connections near gateway.max_connections"
        );
    }

    fn refused(&mut self, why: Refusal, open: usize, peer: Option<IpAddr>) {
        self.since_last += 1;
        let now = Instant::now();
        if self
            .last
            .is_some_and(|at| now.duration_since(at) < LOG_EVERY)
        {
            return;
        }
        let refused = std::mem::take(&mut self.since_last);
        self.last = Some(now);
        match why {
            Refusal::Full => tracing::warn!(
                open,
                refused,
                "refusing connections: gateway.max_connections reached"
            ),
            Refusal::PerClient => tracing::warn!(
                open,
                refused,
                client = ?peer,
                "refusing connections: a client address is at gateway.max_connections_per_client"
            ),
            Refusal::AcceptError => tracing::warn!(
                open,
                refused,
                "accepting connections fails (out of file descriptors?)"
            ),
        }
    }
}

/// One open connection's place, given back when it closes.
struct Slot {
    stats: Arc<ConnectionStats>,
    per_client: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
        let mut per_client = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_client.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_client.remove(&self.ip);
            }
        }
    }
}

/// When a connection last moved a byte, and whether a request is in progress on it.
#[derive(Debug)]
struct Activity {
    started: Instant,
    /// Milliseconds after `started` of the last byte read or written.
    last_ms: AtomicU64,
    /// Requests being handled (a slow handler moves no byte, and is not idleness).
    busy: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// How long it has been idle now: zero while a request is in progress.
    fn idle(&self) -> Duration {
        if self.busy.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}

/// Counts a request in progress until dropped (the response produced or abandoned).
struct Busy(Arc<Activity>);

impl Busy {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.busy.fetch_add(1, Ordering::AcqRel);
        Self(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A socket that notes in [`Activity`] every byte it moves.
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        poll
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write(cx, data);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Resolves once `activity` has been idle for `limit` (checked a few times per
/// `limit`, so a connection is closed at most a quarter of it late).
async fn idle_for(activity: &Activity, limit: Duration) {
    let check = (limit / 4).max(Duration::from_millis(10));
    loop {
        let idle = activity.idle();
        if idle >= limit {
            return;
        }
        tokio::time::sleep((limit - idle).min(check)).await;
    }
}

/// The accept loop's bounds and bookkeeping.
struct Acceptor {
    max_connections: usize,
    max_per_client: usize,
    stats: Arc<ConnectionStats>,
    per_client: Arc<Mutex<HashMap<IpAddr, usize>>>,
    log: RefusalLog,
}

impl Acceptor {
    /// A slot for a connection from `peer`, or why not.
    fn admit(&mut self, peer: SocketAddr) -> Result<Slot, Refusal> {
        let open = self.stats.open.load(Ordering::Relaxed);
        if open >= self.max_connections {
            return Err(Refusal::Full);
        }
        let ip = client_key(peer.ip());
        {
            let mut per_client = self.per_client.lock().unwrap_or_else(|p| p.into_inner());
            let n = per_client.entry(ip).or_default();
            if self.max_per_client > 0 && *n >= self.max_per_client {
                return Err(Refusal::PerClient);
            }
            *n += 1;
        }
        let open = self.stats.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        if open as f64 >= self.max_connections as f64 * NEAR_SHARE {
            self.log.near(open, self.max_connections);
        }
        Ok(Slot {
            stats: self.stats.clone(),
            per_client: self.per_client.clone(),
            ip,
        })
    }

    fn refuse(&mut self, why: Refusal, peer: Option<IpAddr>) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        let open = self.stats.open.load(Ordering::Relaxed);
        self.log.refused(why, open, peer);
    }
}

/// Serve `router` on `listener` within `config`'s limits until `shutdown` completes;
/// then stop accepting and give open connections up to `grace` to finish.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    config: &GatewayConfig,
    stats: Arc<ConnectionStats>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> io::Result<()> {
    let mut acceptor = Acceptor {
        max_connections: fit_to_fd_limit(config.max_connections),
        max_per_client: config.max_connections_per_client,
        stats,
        per_client: Arc::default(),
        log: RefusalLog {
            last: None,
            since_last: 0,
            near_logged: None,
        },
    };
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout())
        .keep_alive(true);
    let idle_timeout = config.idle_timeout();
    let graceful = GracefulShutdown::new();
    let service = TowerToHyperService::new(router);
    tokio::pin!(shutdown);
    loop {
        let accepted: io::Result<(TcpStream, SocketAddr)> = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_per_connection_error(&e) => continue,
            Err(_) => {
                acceptor.refuse(Refusal::AcceptError, None);
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let slot = match acceptor.admit(peer) {
            Ok(slot) => slot,
            Err(why) => {
                // Closed at once: a refused client costs no descriptor past this.
                drop(stream);
                acceptor.refuse(why, Some(peer.ip()));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let io = Watched {
            stream,
            activity: activity.clone(),
        };
        let per_request = {
            let (service, activity) = (service.clone(), activity.clone());
            hyper::service::service_fn(move |request| {
                let busy = Busy::new(&activity);
                let response = hyper::service::Service::call(&service, request);
                async move {
                    let response = response.await;
                    drop(busy);
                    response
                }
            })
        };
        let connection = graceful.watch(http.serve_connection(TokioIo::new(io), per_request));
        tokio::spawn(async move {
            tokio::select! {
                ended = connection => {
                    // A client that goes away mid-request or breaks the protocol ends
                    // its own connection; nothing to report above debug.
                    if let Err(e) = ended {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                }
                // Dropping the connection closes its socket.
                () = idle_for(&activity, idle_timeout) => {}
            }
            drop(slot);
        });
    }
    drop(listener);
    tracing::info!(
        open = graceful.count(),
        "gateway shutting down: no longer accepting"
    );
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
            "connections still open after the shutdown timeout; no longer waiting for them"
        );
    }
    Ok(())
}

/// Accept errors that concern one connection only (it was reset before it was
/// accepted): the next accept goes on at once.
fn is_per_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn acceptor(max: usize, per_client: usize) -> Acceptor {
        Acceptor {
            max_connections: max,
            max_per_client: per_client,
            stats: Arc::default(),
            per_client: Arc::default(),
            log: RefusalLog {
                last: None,
                since_last: 0,
                near_logged: None,
            },
        }
    }

    fn addr(ip: [u8; 4]) -> SocketAddr {
        SocketAddr::from((ip, 40000))
    }

    #[test]
    fn one_address_is_bounded_and_the_others_are_not() {
        let mut a = acceptor(10, 2);
        let s1 = a.admit(addr([127, 0, 0, 2])).unwrap();
        let _s2 = a.admit(addr([127, 0, 0, 2])).unwrap();
        assert_eq!(
            a.admit(addr([127, 0, 0, 2])).err(),
            Some(Refusal::PerClient)
        );
        let _other = a.admit(addr([127, 0, 0, 1])).unwrap();
        drop(s1);
        let _s3 = a
            .admit(addr([127, 0, 0, 2]))
            .expect("a closed one frees its place");
        assert_eq!(a.stats.open(), 3);
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64_prefix_and_mapped_ipv4_as_ipv4() {
        let mut a = acceptor(10, 1);
        let v6 = |last: u16| {
            SocketAddr::from((
                std::net::Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, last),
                40000,
            ))
        };
        let _s1 = a.admit(v6(1)).unwrap();
        assert_eq!(a.admit(v6(2)).err(), Some(Refusal::PerClient));
        let _mapped = a
            .admit(SocketAddr::from((
                std::net::Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped(),
                1,
            )))
            .unwrap();
        assert_eq!(
            a.admit(addr([192, 0, 2, 1])).err(),
            Some(Refusal::PerClient),
            "the same IPv4 client, mapped or not"
        );
    }

    #[test]
    fn the_total_is_bounded() {
        let mut a = acceptor(2, 0);
        let _s1 = a.admit(addr([10, 0, 0, 1])).unwrap();
        let _s2 = a.admit(addr([10, 0, 0, 2])).unwrap();
        assert_eq!(a.admit(addr([10, 0, 0, 3])).err(), Some(Refusal::Full));
    }
}
