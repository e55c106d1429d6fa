//! One lifecycle for every task of a process: what runs, and in which order it
//! stops.
//!
//! A process starts its parts in order (join the context channel, set up the
//! plugins, start serving) and stops them in phases, each finished before the next
//! begins:
//!
//! 1. [`Phase::Intake`]: stop taking new work (the gateway stops accepting
//!    connections and finishes its open requests);
//! 2. [`Phase::Drain`]: let the work taken finish (a logic server drains: requests
//!    in flight answer, the rest goes back to the queue for a peer; then its
//!    plugins' shutdown hooks run);
//! 3. [`Phase::Background`]: background work that outlives requests (jobs,
//!    schedules, subscriptions) winds down;
//! 4. [`Phase::Close`]: connections close (the transport).
//!
//! A part registers here instead of in the shutdown path: [`Lifecycle::spawn`]
//! runs a task until its phase is reached (it gets the phase's cancellation token
//! and shutdown waits for it to return), [`Lifecycle::on_shutdown`] runs a hook when
//! its phase is reached. Built on tokio-util's `TaskTracker` and
//! `CancellationToken`.

use futures_util::future::BoxFuture;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A phase of shutdown, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    /// Stop taking new work.
    Intake,
    /// Finish the work taken.
    Drain,
    /// Wind down background work.
    Background,
    /// Close connections.
    Close,
}

impl Phase {
    const ALL: [Phase; 4] = [Phase::Intake, Phase::Drain, Phase::Background, Phase::Close];

    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        match self {
            Phase::Intake => "intake",
            Phase::Drain => "drain",
            Phase::Background => "background",
            Phase::Close => "close",
        }
    }
}

type Hook = (&'static str, BoxFuture<'static, ()>);

#[derive(Default)]
struct PhaseState {
    token: CancellationToken,
    tracker: TaskTracker,
    hooks: Mutex<Vec<Hook>>,
}

/// The tasks and shutdown hooks of one process. Cheap to clone; clones share it.
#[derive(Clone, Default)]
pub struct Lifecycle {
    phases: Arc<[PhaseState; 4]>,
}

impl fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tasks: Vec<_> = Phase::ALL
            .iter()
            .map(|p| (p.name(), self.phases[p.index()].tracker.len()))
            .collect();
        f.debug_struct("Lifecycle").field("tasks", &tasks).finish()
    }
}

impl Lifecycle {
    /// An empty lifecycle.
    pub fn new() -> Self {
        Self::default()
    }

    /// Run `task` until shutdown reaches `phase`: it receives the phase's token,
    /// cancelled then, and should wrap up and return; shutdown waits for it before
    /// the next phase. A task that ends earlier by itself is simply done.
    pub fn spawn<F, Fut>(&self, phase: Phase, name: &'static str, task: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let state = &self.phases[phase.index()];
        let future = task(state.token.clone());
        state.tracker.spawn(async move {
            future.await;
            tracing::debug!(task = name, "task ended");
        });
    }

    /// Run `hook` when shutdown reaches `phase`, after that phase's tasks were told
    /// to stop; hooks of one phase run one after another, in registration order,
    /// and shutdown waits for them.
    pub fn on_shutdown(
        &self,
        phase: Phase,
        name: &'static str,
        hook: impl Future<Output = ()> + Send + 'static,
    ) {
        self.phases[phase.index()]
            .hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name, Box::pin(hook)));
    }

    /// Whether shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        self.phases[0].token.is_cancelled()
    }

    /// Stop everything, phase by phase. Only the first call does the work; later
    /// ones return at once.
    pub async fn shutdown(&self) {
        for phase in Phase::ALL {
            let state = &self.phases[phase.index()];
            if state.token.is_cancelled() {
                continue;
            }
            let started = Instant::now();
            state.token.cancel();
            let hooks = std::mem::take(&mut *state.hooks.lock().unwrap_or_else(|p| p.into_inner()));
            for (name, hook) in hooks {
                tracing::debug!(phase = phase.name(), hook = name, "running a shutdown hook");
                hook.await;
            }
            state.tracker.close();
            state.tracker.wait().await;
            tracing::debug!(
                phase = phase.name(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "shutdown phase done"
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[tokio::test]
    async fn phases_stop_in_order_and_each_waits_for_its_tasks_and_hooks() {
        let lifecycle = Lifecycle::new();
        let log = Arc::new(Mutex::new(Vec::new()));
        let push = |log: &Arc<Mutex<Vec<String>>>, s: &str| log.lock().unwrap().push(s.to_owned());
        let l = log.clone();
        lifecycle.spawn(Phase::Intake, "accept", move |stop| async move {
            stop.cancelled().await;
            tokio::task::yield_now().await;
            push(&l, "intake task");
        });
        let l = log.clone();
        lifecycle.on_shutdown(
            Phase::Close,
            "transport",
            async move { push(&l, "close hook") },
        );
        let l = log.clone();
        lifecycle.on_shutdown(
            Phase::Drain,
            "server",
            async move { push(&l, "drain hook") },
        );
        let l = log.clone();
        lifecycle.spawn(Phase::Background, "job", move |stop| async move {
            stop.cancelled().await;
            push(&l, "background task");
        });
        assert!(!lifecycle.is_stopping());
        lifecycle.shutdown().await;
        assert!(lifecycle.is_stopping());
        assert_eq!(
            *log.lock().unwrap(),
            ["intake task", "drain hook", "background task", "close hook"]
        );
        // Once.
        lifecycle.shutdown().await;
        assert_eq!(log.lock().unwrap().len(), 4);
    }

    #[tokio::test]
    async fn a_task_that_ended_by_itself_does_not_hold_shutdown() {
        let lifecycle = Lifecycle::new();
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        lifecycle.spawn(Phase::Drain, "short", move |_| async move {
            r.store(true, Ordering::SeqCst);
        });
        tokio::time::timeout(std::time::Duration::from_secs(5), lifecycle.shutdown())
            .await
            .unwrap();
        assert!(ran.load(Ordering::SeqCst));
    }
}
