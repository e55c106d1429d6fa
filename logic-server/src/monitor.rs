//! The monitor of a running server: samples the load, drives the governor, publishes
//! heartbeats on the control channel, and listens to the peers' heartbeats.

use crate::context::ContextStore;
use crate::dispatch::Dispatcher;
use crate::governor::{CpuSampler, Governor, GovernorConfig, Transition};
use crate::stats::ServerStats;
use keelson_protocol::control::{
    ClusterView, Heartbeat, JobCounts, JobsBeat, LeaseBeat, Load, NodeState,
};
use keelson_protocol::topic::HEARTBEATS;
use keelson_protocol::{ProtocolVersion, Transport};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How often the context gauges are set, and the job records counted (both walk
/// every context).
const CONTEXT_SIZES_EVERY: Duration = Duration::from_secs(10);

pub(crate) struct Monitor {
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) dispatcher: Arc<Dispatcher>,
    pub(crate) stats: Arc<ServerStats>,
    pub(crate) governor: GovernorConfig,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) service: String,
    pub(crate) version: String,
    pub(crate) concurrency: u16,
    pub(crate) intake_paused: watch::Sender<bool>,
    pub(crate) peers: Arc<Mutex<ClusterView>>,
    /// Told of every heartbeat that went out (the jobs' liveness lease).
    pub(crate) liveness: Arc<crate::jobs::Liveness>,
    /// The job records by state as last counted, and when: heartbeats carry them,
    /// but counting decodes every record, so it is done with the context gauges.
    pub(crate) job_counts: Mutex<Option<(JobCounts, Instant)>>,
    /// The leases this server holds (heartbeats carry them).
    pub(crate) leases: Arc<crate::leased::LeaseBoard>,
    /// The schedules, when this server has any and runs jobs.
    pub(crate) scheduler: Option<Arc<crate::schedules::scheduler::Scheduler>>,
}

impl Monitor {
    /// Listen to the peers' heartbeats (to know when this server is the last active
    /// one of its service, and whether it missed context writes).
    pub(crate) async fn listen(
        transport: Arc<dyn Transport>,
        peers: Arc<Mutex<ClusterView>>,
        store: Arc<dyn ContextStore>,
    ) {
        let mut heartbeats = match HEARTBEATS.subscribe(transport.as_ref()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen to the control channel");
                return;
            }
        };
        while let Some(hb) = heartbeats.next().await {
            if let Some(mark) = &hb.context {
                store.observe_mark(mark);
            }
            if let (Some(mark), Some(digest)) = (&hb.context, &hb.digest) {
                store.clone().observe_digest(&mark.origin, digest);
            }
            let mut view = peers.lock().unwrap_or_else(|p| p.into_inner());
            view.observe(hb, Instant::now());
            view.prune(Instant::now(), 20);
        }
    }

    pub(crate) fn heartbeat(&self, leaving: bool) -> Heartbeat {
        let leaving = leaving
            || self
                .stats
                .leaving
                .load(std::sync::atomic::Ordering::Acquire);
        Heartbeat {
            v: ProtocolVersion::CURRENT,
            node: self.dispatcher.node_id.clone(),
            version: self.version.clone(),
            services: vec![self.service.clone()],
            handlers: self.dispatcher.registry.names(),
            load: self.stats.load(),
            paused: self.stats.is_paused(),
            in_flight: u32::try_from(self.stats.in_flight()).unwrap_or(u32::MAX),
            concurrency: u32::from(self.concurrency),
            window: u32::from(self.stats.window()),
            ready: self.stats.is_ready() && !leaving,
            contexts: self.dispatcher.store.user_count() as u64,
            interval_ms: u64::try_from(self.heartbeat_interval.as_millis()).unwrap_or(u64::MAX),
            leaving,
            context: self.dispatcher.store.mark(),
            digest: self.dispatcher.store.digest(),
            jobs: Some(self.jobs_beat()),
            leases: self
                .leases
                .held()
                .into_iter()
                .map(|(name, token)| LeaseBeat { name, token })
                .collect(),
            schedules: self
                .scheduler
                .as_ref()
                .map(|s| s.beats())
                .unwrap_or_default(),
        }
    }

    fn jobs_beat(&self) -> JobsBeat {
        let counted = *self.job_counts.lock().unwrap_or_else(|p| p.into_inner());
        JobsBeat {
            running_here: u32::try_from(self.stats.jobs_running()).unwrap_or(u32::MAX),
            records: counted.map(|(counts, _)| counts),
            counted_ms_ago: counted.map_or(0, |(_, at)| {
                u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX)
            }),
        }
    }

    pub(crate) async fn publish(&self, heartbeat: &Heartbeat) {
        match HEARTBEATS.publish(self.transport.as_ref(), heartbeat).await {
            Ok(()) => self.liveness.beat(),
            Err(e) => tracing::debug!(error = %e, "heartbeat not sent"),
        }
    }

    /// Sample, govern and beat until `stopped` turns true.
    pub(crate) async fn run(self: Arc<Self>, mut stopped: watch::Receiver<bool>) {
        let mut governor = Governor::new(self.governor.clone());
        let mut sampler = CpuSampler::new();
        let mut sample = tokio::time::interval(Duration::from_millis(self.governor.sample_ms));
        let mut beat = tokio::time::interval(self.heartbeat_interval);
        sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sizes = tokio::time::interval(CONTEXT_SIZES_EVERY);
        sizes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                changed = stopped.changed() => {
                    if changed.is_err() || *stopped.borrow() { break; }
                }
                _ = sample.tick() => self.sample(&mut governor, &mut sampler),
                _ = beat.tick() => self.publish(&self.heartbeat(false)).await,
                _ = sizes.tick() => self.count_contexts(),
            }
        }
    }

    /// Set the context gauges (the byte count walks every context, hence seldom).
    fn count_contexts(&self) {
        let store = &self.dispatcher.store;
        self.dispatcher
            .metrics
            .contexts(store.user_count(), store.context_bytes());
        let mut counts = JobCounts::default();
        for job in store.jobs() {
            counts.add(job.state);
        }
        self.dispatcher.metrics.job_states(&counts);
        *self.job_counts.lock().unwrap_or_else(|p| p.into_inner()) = Some((counts, Instant::now()));
    }

    fn sample(&self, governor: &mut Governor, sampler: &mut CpuSampler) {
        let busy = self.stats.meter.take();
        let (process_cpu, system_cpu) = sampler.sample();
        let raw = self.governor.combine(busy, process_cpu, system_cpu);
        let transition = governor.observe(raw, Instant::now());
        let load = Load {
            factor: governor.load(),
            busy,
            process_cpu,
            system_cpu,
        };
        self.stats.set_load(load);
        let (others, peers) = {
            let view = self.peers.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let me = &self.dispatcher.node_id;
            let peers = view
                .nodes(now)
                .iter()
                .filter(|n| {
                    &n.heartbeat.node != me && !matches!(n.state, NodeState::Gone | NodeState::Left)
                })
                .count();
            (view.active_in_service(&self.service, me, now), peers)
        };
        self.stats.set_others_active(others);
        self.dispatcher.metrics.sample(&self.stats, &load, peers);
        match transition {
            Some(Transition::Pause) => {
                if others == 0 && !self.governor.pause_last_consumer {
                    governor.cancel_pause();
                    if !self
                        .stats
                        .overloaded_alone
                        .swap(true, std::sync::atomic::Ordering::Relaxed)
                    {
                        tracing::warn!(
                            load = load.factor,
                            service = %self.service,
                            "load above the high watermark, but no other server of this service takes requests: not pausing (set governor.pause_last_consumer to pause anyway)"
                        );
                    }
                    return;
                }
                self.stats
                    .overloaded_alone
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                self.stats.set_paused(true);
                if others == 0 {
                    tracing::warn!(
                        load = load.factor,
                        service = %self.service,
                        "pausing intake: load above the high watermark; every server of this service is now paused, so its requests wait on the queue until one resumes or their deadline passes"
                    );
                } else {
                    tracing::info!(
                        load = load.factor,
                        busy,
                        process_cpu,
                        others,
                        "pausing intake: load above the high watermark"
                    );
                }
                let _ = self.intake_paused.send(true);
            }
            Some(Transition::Resume) => {
                self.stats.set_paused(false);
                tracing::info!(
                    load = load.factor,
                    "resuming intake: load below the low watermark"
                );
                let _ = self.intake_paused.send(false);
            }
            None => {
                if load.factor < self.governor.low_watermark {
                    self.stats
                        .overloaded_alone
                        .store(false, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    }
}
