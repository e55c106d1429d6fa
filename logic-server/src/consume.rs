//! The consume loop: a task per delivery under the concurrency cap, intake paused
//! and resumed by the governor, and the drain on shutdown.

use crate::dispatch::Dispatcher;
use crate::stats::{InFlight, ServerStats};
use keelson_protocol::transport::Consumer;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

pub(crate) struct ConsumeLoop {
    pub(crate) consumer: Box<dyn Consumer>,
    pub(crate) dispatcher: Arc<Dispatcher>,
    pub(crate) concurrency: usize,
    pub(crate) drain_timeout: Duration,
    pub(crate) stats: Arc<ServerStats>,
    /// `true` asks to stop and drain.
    pub(crate) stopped: watch::Receiver<bool>,
    /// `true` while the governor wants intake paused.
    pub(crate) intake_paused: watch::Receiver<bool>,
    /// `true` cuts the drain short: unfinished work goes back to the queue now.
    pub(crate) abort: watch::Receiver<bool>,
}

impl ConsumeLoop {
    pub(crate) async fn run(self) {
        let ConsumeLoop {
            mut consumer,
            dispatcher,
            concurrency,
            drain_timeout,
            stats,
            mut stopped,
            mut intake_paused,
            mut abort,
        } = self;
        let limit = Arc::new(Semaphore::new(concurrency));
        let mut tasks = JoinSet::new();
        // Set when the `RunningServer` handle was dropped without `shutdown`: the
        // server then serves until its transport closes.
        let mut detached = false;
        let mut governed = true;
        loop {
            tokio::select! {
                biased;
                changed = stopped.changed(), if !detached => match changed {
                    Ok(()) => break,
                    Err(_) => detached = true,
                },
                changed = intake_paused.changed(), if governed => {
                    if changed.is_err() {
                        governed = false;
                        continue;
                    }
                    let pause = *intake_paused.borrow_and_update();
                    let result = if pause { consumer.pause().await } else { consumer.resume().await };
                    if let Err(e) = result {
                        tracing::warn!(error = %e, pause, "could not change intake");
                    }
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                next = consumer.next() => match next {
                    None => {
                        tracing::info!("transport closed; consume loop ends");
                        break;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "consumer error");
                    }
                    Some(Ok(delivery)) => {
                        // The transport's prefetch is the real cap; this guards
                        // against a transport delivering more than it should.
                        let Ok(permit) = limit.clone().acquire_owned().await else { break };
                        let dispatcher = dispatcher.clone();
                        let in_flight = InFlight::enter(stats.clone());
                        let stats = stats.clone();
                        tasks.spawn(async move {
                            dispatcher.handle(delivery).await;
                            stats.count_handled();
                            drop(in_flight);
                            drop(permit);
                        });
                    }
                }
            }
        }
        stats.set_ready(false);
        if let Err(e) = consumer.pause().await {
            tracing::warn!(error = %e, "could not stop intake while draining");
        }
        drop(consumer);
        let in_flight = tasks.len();
        if in_flight > 0 {
            tracing::info!(in_flight, ?drain_timeout, "draining in-flight requests");
        }
        let drained = tokio::select! {
            finished = tokio::time::timeout(drain_timeout, async {
                while tasks.join_next().await.is_some() {}
            }) => if finished.is_ok() { "drained" } else { "drain timeout" },
            _ = abort.wait_for(|abort| *abort) => "stopping at once",
        };
        if !tasks.is_empty() {
            // Aborting drops the unsettled deliveries, which hands them back to the
            // queue for a peer.
            tracing::warn!(
                left = tasks.len(),
                "{drained}; handing unfinished requests back to the queue"
            );
            tasks.shutdown().await;
        }
    }
}
