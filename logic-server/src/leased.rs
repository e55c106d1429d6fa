//! Running a task only while this server holds a lease: the singletons and the
//! scheduler.
//!
//! A [`Leased`] is a candidate for one lease. When the lease is acquired it starts
//! the task with the token and a cancellation token; when the lease is lost it
//! cancels the task and waits for it (briefly); when it is stopped (drain) it cancels
//! the task, waits for it and *then* gives the lease up, so the next holder starts
//! at once and never beside this one. A task that returns while the lease is still
//! held is started again after [`RESTART_DELAY`].

use futures_util::future::BoxFuture;
use keelson_protocol::Transport;
use keelson_protocol::transport::{Fence, LeaseEvent};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How long a cancelled task may take to return before it is aborted.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Delay before a task that returned by itself is started again.
const RESTART_DELAY: Duration = Duration::from_secs(1);
/// Delay before asking the transport for the lease again after it refused.
const RETRY_DELAY: Duration = Duration::from_secs(1);

/// Starts the task: `(token, fence, cancel)`.
pub(crate) type TaskFn =
    Arc<dyn Fn(u64, Fence, CancellationToken) -> BoxFuture<'static, ()> + Send + Sync>;

/// The leases this server holds now, by name, with their tokens (for heartbeats).
#[derive(Debug, Default)]
pub(crate) struct LeaseBoard {
    held: Mutex<BTreeMap<String, u64>>,
}

impl LeaseBoard {
    fn set(&self, name: &str, token: Option<u64>) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        match token {
            Some(t) => held.insert(name.to_owned(), t),
            None => held.remove(name),
        };
    }

    /// Every lease held now, with its token.
    pub(crate) fn held(&self) -> Vec<(String, u64)> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.iter().map(|(n, t)| (n.clone(), *t)).collect()
    }
}

/// A candidate for one lease, running its task while it holds it.
#[derive(Debug)]
pub(crate) struct Leased {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Leased {
    pub(crate) fn start(
        transport: Arc<dyn Transport>,
        lease: String,
        board: Arc<LeaseBoard>,
        run: TaskFn,
    ) -> Self {
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(candidate(transport, lease, board, run, stopped));
        Self { stop, task }
    }

    /// Cancel the task, wait for it, then give the lease up; bounded (a broker that
    /// does not answer cannot hold a drain up): after [`STOP_GRACE`] twice, the
    /// candidate is dropped, which closes its channel in the background.
    pub(crate) async fn stop(self) {
        self.stop.send_replace(true);
        let mut task = self.task;
        if tokio::time::timeout(STOP_GRACE * 2, &mut task)
            .await
            .is_err()
        {
            warn!("a lease candidate did not stop in time; dropped");
            task.abort();
        }
    }
}

async fn wait_stop(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Cancel `running` and wait for it (aborted after [`STOP_GRACE`]).
async fn end(running: &mut Option<(CancellationToken, JoinHandle<()>)>) {
    if let Some((cancel, mut task)) = running.take() {
        cancel.cancel();
        if tokio::time::timeout(STOP_GRACE, &mut task).await.is_err() {
            warn!("a leased task did not return within its grace after cancellation; aborted");
            task.abort();
        }
    }
}

async fn candidate(
    transport: Arc<dyn Transport>,
    name: String,
    board: Arc<LeaseBoard>,
    run: TaskFn,
    mut stop: watch::Receiver<bool>,
) {
    let mut lease = loop {
        match transport.lease(&name).await {
            Ok(lease) => break lease,
            Err(e) => {
                warn!(lease = %name, error = %e, "cannot join the line for a lease; retrying");
                tokio::select! {
                    () = wait_stop(&mut stop) => return,
                    () = tokio::time::sleep(RETRY_DELAY) => {}
                }
            }
        }
    };
    let fence = lease.fence();
    let mut running: Option<(CancellationToken, JoinHandle<()>)> = None;
    let mut token = None;
    loop {
        let finished = async {
            match running.as_mut() {
                Some((_, task)) => {
                    let _ = task.await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = wait_stop(&mut stop) => break,
            () = finished => {
                running = None;
                if let Some(t) = token {
                    warn!(lease = %name, token = t, "a leased task returned while its lease is held; starting it again");
                    tokio::select! {
                        () = wait_stop(&mut stop) => break,
                        () = tokio::time::sleep(RESTART_DELAY) => {}
                    }
                    if fence.check() == Some(t) {
                        let cancel = CancellationToken::new();
                        running = Some((cancel.clone(), tokio::spawn(run(t, fence.clone(), cancel))));
                    }
                }
            }
            event = lease.next() => match event {
                Some(LeaseEvent::Acquired { token: t }) => {
                    info!(lease = %name, token = t, "lease acquired: starting its task");
                    metrics::counter!("keelson_lease_acquisitions_total", "lease" => name.clone())
                        .increment(1);
                    end(&mut running).await;
                    token = Some(t);
                    board.set(&name, Some(t));
                    let cancel = CancellationToken::new();
                    running = Some((cancel.clone(), tokio::spawn(run(t, fence.clone(), cancel))));
                }
                Some(LeaseEvent::Lost { token: t, reason }) => {
                    warn!(lease = %name, token = t, %reason, "lease lost: stopping its task");
                    metrics::counter!("keelson_lease_losses_total", "lease" => name.clone())
                        .increment(1);
                    token = None;
                    board.set(&name, None);
                    end(&mut running).await;
                }
                None => {
                    board.set(&name, None);
                    end(&mut running).await;
                    return;
                }
            },
        }
    }
    // Drain: the task first, then the lease, so that the next holder never runs
    // beside this one, and starts without waiting for a timeout.
    end(&mut running).await;
    board.set(&name, None);
    lease.release().await;
    if let Some(t) = token {
        info!(lease = %name, token = t, "lease released");
    }
}
