//! The consume loop: a task per delivery under the concurrency cap, intake paused
//! and resumed by the governor, the intake window narrowed and widened by how long
//! work waits inside the server, and the drain on shutdown.

use crate::dispatch::Dispatcher;
use crate::governor::WindowControl;
use crate::stats::{InFlight, ServerStats};
use keelson_protocol::transport::{Consumer, Delivery};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// A delivery taken and not begun, with its count as in flight: whoever takes it out
/// (its task, or a hand-back) ends that count.
type Held = Option<(Delivery, InFlight)>;
type Slot = Arc<Mutex<Held>>;

fn take(slot: &Slot) -> Held {
    // Only ever a take of an Option: a poisoned lock still holds a valid value.
    slot.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// Deliveries whose task has not begun yet, in arrival order with the time each
/// arrived: the ones a pause, a narrower window or a drain can still give back to the
/// queue instead of running late here.
struct Unstarted {
    slots: Vec<(Instant, Weak<Mutex<Held>>)>,
    /// Counts the deliveries given back (`keelson_deliveries_total{outcome="handed_back"}`).
    handed_back: metrics::Counter,
}

fn waiting(slot: &Weak<Mutex<Held>>) -> Option<Slot> {
    slot.upgrade()
        .filter(|s| s.lock().unwrap_or_else(|p| p.into_inner()).is_some())
}

impl Unstarted {
    fn track(&mut self, delivery: Delivery, in_flight: InFlight, concurrency: usize) -> Slot {
        // Forget finished and begun ones now and then (at most `concurrency` can be
        // live), not on every delivery: this is the consume loop's hot path.
        if self.slots.len() >= concurrency.saturating_mul(2).max(16) {
            self.slots.retain(|(_, w)| waiting(w).is_some());
        }
        let slot = Arc::new(Mutex::new(Some((delivery, in_flight))));
        self.slots.push((Instant::now(), Arc::downgrade(&slot)));
        slot
    }

    /// How long the oldest delivery not begun has waited.
    fn oldest_wait(&self, now: Instant) -> Duration {
        self.slots
            .iter()
            .find(|(_, w)| waiting(w).is_some())
            .map_or(Duration::ZERO, |(at, _)| now.duration_since(*at))
    }

    /// Give every delivery not begun back to the queue.
    async fn hand_back(&mut self) -> usize {
        let mut handed = 0;
        for (_, weak) in self.slots.drain(..) {
            let Some((delivery, in_flight)) = weak.upgrade().and_then(|slot| take(&slot)) else {
                continue;
            };
            if let Err(e) = delivery.hand_back().await {
                tracing::debug!(error = %e, "hand-back failed; the request will be redelivered");
            }
            drop(in_flight);
            handed += 1;
        }
        self.handed_back.increment(handed as u64);
        handed
    }
}

/// The governor's control of the intake window.
pub(crate) struct WindowSettings {
    pub(crate) control: WindowControl,
    pub(crate) interval: Duration,
    /// Narrow even when no other server of the service takes requests.
    pub(crate) narrow_alone: bool,
}

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
    /// `None`: the window stays at the concurrency.
    pub(crate) window: Option<WindowSettings>,
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
            window,
        } = self;
        let (mut control, interval, narrow_alone) = match window {
            Some(w) => (Some(w.control), w.interval, w.narrow_alone),
            None => (None, Duration::from_secs(3600), false),
        };
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The most requests in flight since the last tick.
        let mut peak = 0;
        let mut paused = false;
        stats.set_window(consumer.window());
        let limit = Arc::new(Semaphore::new(concurrency));
        let mut tasks = JoinSet::new();
        // Set when the `RunningServer` handle was dropped without `shutdown`: the
        // server then serves until its transport closes.
        let mut detached = false;
        let mut governed = true;
        let mut unstarted = Unstarted {
            slots: Vec::new(),
            handed_back: dispatcher.metrics.handed_back.clone(),
        };
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
                    paused = pause;
                    // The ticks missed while paused were not late.
                    tick.reset();
                    let result = if pause { consumer.pause().await } else { consumer.resume().await };
                    if let Err(e) = result {
                        tracing::warn!(error = %e, pause, "could not change intake");
                    }
                    if pause {
                        // Work taken but not begun (its task has not run yet, e.g. on
                        // a starved core) goes back to the queue for the peers.
                        let handed = unstarted.hand_back().await;
                        if handed > 0 {
                            tracing::info!(handed, "handed not-yet-started requests back to the queue");
                        }
                    }
                }
                due = tick.tick(), if control.is_some() && !paused => {
                    // How late this tick runs is how long a task woken now waits for
                    // a thread (this loop too, with the deliveries it has not taken).
                    let now = Instant::now();
                    let wait = now.duration_since(due).max(unstarted.oldest_wait(now));
                    let filled = peak >= usize::from(consumer.window());
                    // Requests still in flight count towards the next interval.
                    peak = stats.in_flight();
                    let Some(control) = control.as_mut() else { continue };
                    // With no peer to leave work to, a narrower window only delays it.
                    let alone = stats.others_active() == 0 && !narrow_alone;
                    let next = if alone { control.reset() } else { control.observe(wait, filled) };
                    let Some(size) = next else { continue };
                    let before = consumer.window();
                    match consumer.set_window(size).await {
                        Ok(set) => {
                            stats.set_window(set);
                            // Whether the new window fills is for new deliveries to show.
                            peak = 0;
                            // Work waits in here: what has not begun goes to the peers.
                            let handed = if set < before { unstarted.hand_back().await } else { 0 };
                            let cap = u16::try_from(concurrency).unwrap_or(u16::MAX);
                            if before == cap {
                                tracing::info!(window = set, handed, "intake window narrowed: requests wait in this server before their handlers start");
                            } else if set == cap {
                                tracing::info!(window = set, "intake window whole again");
                            } else {
                                tracing::debug!(window = set, before, handed, "intake window changed");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "could not change the intake window"),
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
                    Some(Ok(delivery)) if dispatcher.needs_isolation(&delivery) => {
                        // Alone: nothing else taken, nothing else in flight.
                        tracing::info!(deliveries = delivery.deliveries(), "running a request that came back without an outcome alone");
                        if let Err(e) = consumer.pause().await {
                            tracing::warn!(error = %e, "could not stop intake to run a request alone");
                        }
                        unstarted.hand_back().await;
                        while tasks.join_next().await.is_some() {}
                        let in_flight = InFlight::enter(stats.clone());
                        dispatcher.handle(delivery).await;
                        stats.count_handled();
                        drop(in_flight);
                        if !paused && let Err(e) = consumer.resume().await {
                            tracing::warn!(error = %e, "could not resume intake");
                        }
                    }
                    Some(Ok(delivery)) => {
                        // The transport's prefetch is the real cap; this guards
                        // against a transport delivering more than it should.
                        let Ok(permit) = limit.clone().acquire_owned().await else { break };
                        let dispatcher = dispatcher.clone();
                        let in_flight = InFlight::enter(stats.clone());
                        let stats = stats.clone();
                        let slot = unstarted.track(delivery, in_flight, concurrency);
                        peak = peak.max(stats.in_flight());
                        tasks.spawn(async move {
                            // Empty when the delivery was handed back before this ran.
                            if let Some((delivery, in_flight)) = take(&slot) {
                                dispatcher.handle(delivery).await;
                                stats.count_handled();
                                drop(in_flight);
                            }
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
        let handed = unstarted.hand_back().await;
        if handed > 0 {
            tracing::info!(handed, "handed not-yet-started requests back to the queue");
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
