//! [`ReplicatedContextStore`]: the CRDT state of `state.rs`, kept in step with the
//! peers through the transport.

use super::clock::Clock;
use super::divergence::{Divergence, PERSISTENT_AFTER, Verdict};
use super::gaps::Gaps;
use super::metrics::ReplicationMetrics;
use super::state::{Node, Stamp, State};
use crate::config::ContextConfig;
use crate::context::{ContextError, ContextStore, Effects, Pending, RecordValue, RecordWrite};
use async_trait::async_trait;
use bytes::Bytes;
use keelson_protocol::context::{
    ContextDelta, ContextDigest, ContextMark, ContextOp, Hlc, SNAPSHOT_ROUTE, SNAPSHOT_SERVICE,
    SnapshotChunk, SnapshotRequest,
};
use keelson_protocol::idempotency::{OutcomeRecord, RECORD_KEY_PREFIX};
use keelson_protocol::job::{JobRecord, record_location};
use keelson_protocol::topic::CONTEXT_DELTAS;
use keelson_protocol::transport::{Message, Publisher, RequestError, ServiceSpec};
use keelson_protocol::{ProtocolVersion, Transport, decode, encode};
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{OwnedMutexGuard, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How often the store looks for gaps in what it applied of its peers' deltas.
const GAP_CHECK_EVERY: Duration = Duration::from_millis(100);

/// How often a delta that could not be published is tried again.
const REPUBLISH_EVERY: Duration = Duration::from_millis(200);

/// Per-user write turns: one writing request of a user at a time on this server.
type Turns = HashMap<Box<str>, Weak<tokio::sync::Mutex<()>>>;

/// How often a failed snapshot chunk is asked again before the server gives up and
/// serves with what it has.
const CHUNK_ATTEMPTS: u32 = 4;

/// How often a pull may get this server's own (empty, immediate) answer before it
/// concludes no peer serves snapshots. Consumers compete for the request, and the
/// one that just answered is often the first to ask for the next: each own answer
/// is followed by a random pause out of a growing range (1–4 ms, 2–8 ms, ...; 150
/// to 540 ms in all), so a peer's consumer gets the next request. Counted per chunk.
const OWN_ANSWERS_BEFORE_ALONE: u32 = 16;

/// Job ids changed but not yet seen by a slow watcher before it lags (and rechecks all).
const JOB_CHANGES_BUFFER: usize = 4096;

/// Per-user contexts replicated between all logic servers of a mesh.
pub struct ReplicatedContextStore {
    node: Node,
    transport: Arc<dyn Transport>,
    config: ContextConfig,
    inner: Mutex<Inner>,
    ready: AtomicBool,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    turns: Mutex<Turns>,
    /// The last barrier marker sent, and the highest one received back.
    markers_sent: AtomicU64,
    markers_back: watch::Sender<u64>,
    /// The `seq` of the last delta this store numbered.
    published: AtomicU64,
    /// What this store applied of each peer's deltas, and the gaps it sees.
    gaps: Mutex<Gaps>,
    /// A repair (a pull of the peers' state) is under way.
    repairing: AtomicBool,
    /// How this store's digest compared with its peers'.
    divergence: Mutex<Divergence>,
    metrics: ReplicationMetrics,
    /// The ids of job records written (here or by a peer), for those who wait on them.
    job_changes: tokio::sync::broadcast::Sender<Arc<str>>,
}

struct Inner {
    state: State,
    clock: Clock,
}

impl fmt::Debug for ReplicatedContextStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicatedContextStore")
            .field("node", &self.node)
            .field("users", &self.user_count())
            .finish()
    }
}

fn to_hlc(s: &Stamp) -> Hlc {
    Hlc {
        wall_ms: s.wall_ms,
        logical: s.logical,
        node: s.node.to_string(),
    }
}

/// Broadcast a delta on the context channel, trying again every [`REPUBLISH_EVERY`]
/// until it goes out or `until` passes (never, for `None`).
async fn broadcast_until(
    transport: &Arc<dyn Transport>,
    payload: Bytes,
    until: Option<Instant>,
) -> Result<(), keelson_protocol::transport::TransportError> {
    loop {
        match CONTEXT_DELTAS
            .publish_encoded(transport.as_ref(), payload.clone())
            .await
        {
            Ok(()) => return Ok(()),
            Err(e) if until.is_some_and(|u| Instant::now() + REPUBLISH_EVERY >= u) => {
                return Err(e);
            }
            Err(_) => tokio::time::sleep(REPUBLISH_EVERY).await,
        }
    }
}

/// The job id a record key holds the record of, if it is a job's.
fn job_id_of(key: &str) -> Option<&str> {
    key.strip_prefix(RECORD_KEY_PREFIX)?.strip_prefix("j/")
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Why the peers' state is pulled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pull {
    /// Before serving: not ready until done (or alone).
    Join,
    /// Now and then while serving, to catch writes missed since.
    Resync,
}

/// Figures of a completed join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JoinReport {
    /// Users received from peers.
    pub users: usize,
    /// Chunks received.
    pub chunks: usize,
    /// Whether a peer answered at all.
    pub alone: bool,
}

impl ReplicatedContextStore {
    /// Subscribe to the context channel, pull the peers' state (or conclude this
    /// server is alone), and start answering peers' snapshot requests. Returns once
    /// this server holds every context its peers have: only then may it serve.
    ///
    /// It answers snapshot requests only from its peers: the same broker user as its
    /// own (logic servers of a namespace share one), or this process on an in-process
    /// transport. Anyone else who may publish requests (a gateway's user, say) is
    /// refused and the request dead-lettered: a snapshot holds every user's context.
    pub async fn start(
        transport: Arc<dyn Transport>,
        node_id: &str,
        config: ContextConfig,
    ) -> Result<Arc<Self>, ContextError> {
        Self::start_with(transport, node_id, config, false).await
    }

    /// [`start`](Self::start), also answering snapshot requests that carry no
    /// publisher the broker vouches for when `trust_unstamped` (the logic server's
    /// `trust_unstamped_requests`: only while upgrading from a release whose servers
    /// did not stamp their requests).
    pub async fn start_with(
        transport: Arc<dyn Transport>,
        node_id: &str,
        config: ContextConfig,
        trust_unstamped: bool,
    ) -> Result<Arc<Self>, ContextError> {
        // Each process is its own writer: a server restarted under the same node id
        // must not continue (and possibly contradict) its predecessor's counter
        // shares, which peers may hold newer than its snapshot.
        let node: Node = format!("{node_id}/{}", now_ms()).into();
        let store = Arc::new(Self {
            node: node.clone(),
            transport: transport.clone(),
            config,
            inner: Mutex::new(Inner {
                state: State::default(),
                clock: Clock::new(node),
            }),
            ready: AtomicBool::new(false),
            tasks: Mutex::new(Vec::new()),
            turns: Mutex::new(HashMap::new()),
            markers_sent: AtomicU64::new(0),
            markers_back: watch::channel(0).0,
            job_changes: tokio::sync::broadcast::channel(JOB_CHANGES_BUFFER).0,
            published: AtomicU64::new(0),
            gaps: Mutex::new(Gaps::default()),
            repairing: AtomicBool::new(false),
            divergence: Mutex::new(Divergence::default()),
            metrics: ReplicationMetrics::new(node_id),
        });
        let unavailable = |e: keelson_protocol::transport::TransportError| {
            ContextError::Unavailable(e.to_string())
        };
        // Deltas first, so nothing written while the snapshot travels is missed.
        let mut deltas = CONTEXT_DELTAS
            .subscribe(transport.as_ref())
            .await
            .map_err(unavailable)?;
        let weak = Arc::downgrade(&store);
        store.spawn(async move {
            while let Some(delta) = deltas.next().await {
                let Some(store) = weak.upgrade() else { break };
                store.receive(delta);
            }
        });
        let report = store.pull(Pull::Join).await;
        tracing::info!(
            users = report.users,
            chunks = report.chunks,
            alone = report.alone,
            "context store ready"
        );
        transport
            .declare_service(&ServiceSpec {
                name: SNAPSHOT_SERVICE.to_owned(),
                routes: vec![SNAPSHOT_ROUTE.to_owned()],
            })
            .await
            .map_err(unavailable)?;
        let mut requests = transport
            .consume(SNAPSHOT_SERVICE, 2)
            .await
            .map_err(unavailable)?;
        let weak = Arc::downgrade(&store);
        let own = transport.publisher();
        store.spawn(async move {
            while let Some(Ok(delivery)) = requests.next().await {
                let Some(store) = weak.upgrade() else { break };
                let peer = match delivery.publisher() {
                    Publisher::Unknown => trust_unstamped,
                    publisher => *publisher == own,
                };
                if !peer {
                    tracing::warn!(
                        publisher = %delivery.publisher(),
                        "dead-lettering a snapshot request from a publisher that is not a peer"
                    );
                    let reason = format!(
                        "untrusted publisher: a snapshot request from {}, which is not this server's broker user",
                        delivery.publisher()
                    );
                    let _ = delivery.reject(reason).await;
                    continue;
                }
                if !delivery.redelivered && store.is_own_request(&delivery.payload) {
                    // Hand its own request back once: a peer's consumer, free while
                    // this one is busy with it, takes it. Only if it comes back
                    // (no peer, or all busy) does this server answer itself.
                    let _ = delivery.requeue().await;
                    continue;
                }
                match store.answer_snapshot(&delivery.payload) {
                    Ok(chunk) => {
                        if let Err(e) = delivery.reply(chunk).await {
                            tracing::warn!(error = %e, "could not send a snapshot chunk");
                        }
                        let _ = delivery.ack().await;
                    }
                    Err(reason) => {
                        let _ = delivery.reject(reason).await;
                    }
                }
            }
        });
        let weak = Arc::downgrade(&store);
        // Every server sweeps at the same wall-clock multiples of the period, as of
        // that multiple, so servers that swept the same one expired the same.
        let every_ms = (store.config.idle_ttl_s / 10).clamp(1, 60) * 1000;
        store.expire((now_ms() / every_ms) * every_ms);
        store.spawn(async move {
            loop {
                let now = now_ms();
                let next = (now / every_ms + 1) * every_ms;
                tokio::time::sleep(Duration::from_millis(next - now)).await;
                let Some(store) = weak.upgrade() else { break };
                store.expire(next);
            }
        });
        let weak = Arc::downgrade(&store);
        store.spawn(async move {
            let mut tick = tokio::time::interval(GAP_CHECK_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(store) = weak.upgrade() else { break };
                store.repair_gaps();
            }
        });
        if store.config.resync_interval_s > 0 {
            let weak = Arc::downgrade(&store);
            // 0.8 to 1.2 times the interval, so servers started together do not
            // resync in step.
            let every = Duration::from_secs(store.config.resync_interval_s)
                .mul_f64(0.8 + (now_ms() % 400) as f64 / 1000.0);
            store.spawn(async move {
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                // A pull that outlasts the interval is not followed by others at once.
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(store) = weak.upgrade() else { break };
                    store.pull(Pull::Resync).await;
                }
            });
        }
        store.ready.store(true, Ordering::Release);
        Ok(store)
    }

    /// Whether the join completed.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Stop the background tasks (delta intake, snapshot answers, expiry).
    pub fn stop(&self) {
        for task in self.lock_tasks().drain(..) {
            task.abort();
        }
    }

    fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.lock_tasks().push(tokio::spawn(task));
    }

    fn lock_tasks(&self) -> MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section applies whole operations; a panic cannot leave the
        // state half-merged, so a poisoned lock still guards a valid state.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Apply a peer's delta.
    fn receive(&self, delta: ContextDelta) {
        if *delta.origin == *self.node {
            if let Some(marker) = delta.marker {
                self.markers_back.send_if_modified(|back| {
                    let newer = marker > *back;
                    *back = (*back).max(marker);
                    newer
                });
            }
            return;
        }
        // Tracing: a span linked to the write's (export on, see crate::trace).
        let span = crate::trace::apply_span(&delta.origin, delta.trace.as_deref());
        let _entered = span.as_ref().map(tracing::Span::enter);
        let mut inner = self.lock();
        let mut written_ms = None;
        for op in &delta.ops {
            if let ContextOp::Set { ts, .. } | ContextOp::Touch { ts, .. } = op {
                inner.clock.observe(ts.wall_ms, ts.logical);
                written_ms = written_ms.max(Some(ts.wall_ms));
            }
            inner.state.apply(op);
        }
        self.announce_jobs(&delta.ops);
        if let Some(written_ms) = written_ms {
            self.metrics.applied(written_ms, now_ms());
        }
        // Under the state's lock, so a digest never sees the ops without their number.
        if let Some(seq) = delta.seq {
            self.lock_gaps().applied(&delta.origin, seq, Instant::now());
        }
    }

    /// Tell job watchers which job records `ops` wrote.
    fn announce_jobs(&self, ops: &[ContextOp]) {
        if self.job_changes.receiver_count() == 0 {
            return;
        }
        for op in ops {
            if let ContextOp::Set { key, .. } = op
                && let Some(id) = job_id_of(key)
            {
                let _ = self.job_changes.send(Arc::from(id));
            }
        }
    }

    /// Lock order: the state ([`Self::lock`]) before the gaps, never the other way.
    fn lock_gaps(&self) -> MutexGuard<'_, Gaps> {
        // Plain bookkeeping; a poisoned lock still holds valid counters.
        self.gaps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a request's writes are applied here but not yet broadcast (its user's
    /// write turn is held from its first write until its delta is out).
    fn writing(&self) -> bool {
        self.turns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|t| t.strong_count() > 0)
    }

    /// If a peer's delta has been missing for a while (lost while this server's
    /// connection was down, or its subscription was recreated), pull the peers'
    /// state now rather than at the next periodic resync.
    fn repair_gaps(self: &Arc<Self>) {
        if self.repairing.load(Ordering::Acquire) {
            return;
        }
        let Some(missing) = self.lock_gaps().due(Instant::now()) else {
            return;
        };
        tracing::info!(origins = ?missing.origins(), "context deltas were missed; pulling the peers' state now");
        self.metrics.gaps.increment(missing.origins().len() as u64);
        self.pull_in_background(move |store, report| {
            if report.chunks > 0 || report.alone {
                store.lock_gaps().repaired(&missing, Instant::now());
            }
        });
    }

    /// Pull the peers' state now, unless a pull for a repair is under way; `then`
    /// sees the result.
    fn pull_in_background(self: &Arc<Self>, then: impl FnOnce(&Self, JoinReport) + Send + 'static) {
        if self.repairing.swap(true, Ordering::AcqRel) {
            return;
        }
        let store = self.clone();
        tokio::spawn(async move {
            let report = store.pull(Pull::Resync).await;
            then(&store, report);
            store.repairing.store(false, Ordering::Release);
        });
    }

    /// Encode a delta of `ops` (numbered), or a barrier `marker` (not numbered: only
    /// its sender applies it).
    fn delta(&self, ops: Vec<ContextOp>, marker: Option<u64>) -> Result<Bytes, ContextError> {
        let seq = marker
            .is_none()
            .then(|| self.published.fetch_add(1, Ordering::AcqRel) + 1);
        let delta = ContextDelta {
            v: ProtocolVersion::CURRENT,
            origin: self.node.to_string(),
            ops,
            marker,
            seq,
            // Tracing: the writer's span, for the receivers' link (see crate::trace).
            trace: marker
                .is_none()
                .then(keelson_protocol::trace::current_traceparent)
                .flatten(),
        };
        CONTEXT_DELTAS
            .encode(&delta)
            .map_err(|e| ContextError::Unavailable(e.to_string()))
    }

    async fn broadcast(&self, payload: Bytes) -> Result<(), ContextError> {
        CONTEXT_DELTAS
            .publish_encoded(self.transport.as_ref(), payload)
            .await
            .map_err(|e| ContextError::Unavailable(format!("cannot replicate the write: {e}")))
    }

    /// Publish a delta, trying again until `deadline`; past it, go on trying in the
    /// background (the writes stand here and must reach the peers) and report the
    /// error.
    async fn publish(&self, payload: Bytes, deadline: Instant) -> Result<(), ContextError> {
        let Err(error) = broadcast_until(&self.transport, payload.clone(), Some(deadline)).await
        else {
            return Ok(());
        };
        tracing::warn!(error = %error, "a context delta is not replicated yet; trying again in the background");
        let transport = self.transport.clone();
        self.spawn(async move {
            if broadcast_until(&transport, payload, None).await.is_ok() {
                tracing::info!("a delayed context delta is replicated");
            }
        });
        Err(ContextError::Unavailable(format!(
            "cannot replicate the write: {error}"
        )))
    }

    /// The write turn of `user`, unless `effects` holds it already.
    async fn take_turn(&self, effects: &Effects, user: &str) -> Result<(), ContextError> {
        if effects.ended() {
            return Err(ContextError::Ended);
        }
        if effects.has_turn() {
            return Ok(());
        }
        let lock = {
            let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
            if turns.len() > 1024 {
                turns.retain(|_, w| w.strong_count() > 0);
            }
            match turns.get(user).and_then(Weak::upgrade) {
                Some(lock) => lock,
                None => {
                    let lock = Arc::new(tokio::sync::Mutex::new(()));
                    turns.insert(user.into(), Arc::downgrade(&lock));
                    lock
                }
            }
        };
        let turn: OwnedMutexGuard<()> = lock.lock_owned().await;
        effects.hold_turn(turn);
        Ok(())
    }

    /// Pull the peers' state chunk by chunk and merge it: to join, or to resync.
    async fn pull(&self, why: Pull) -> JoinReport {
        let resync = why == Pull::Resync;
        let timeout = Duration::from_millis(self.config.join_timeout_ms);
        let started = Instant::now();
        let mut report = JoinReport {
            users: 0,
            chunks: 0,
            alone: false,
        };
        let mut after: Option<String> = None;
        let mut failures = 0;
        let mut own_answers = 0;
        loop {
            let request = SnapshotRequest {
                v: ProtocolVersion::CURRENT,
                requester: self.node.to_string(),
                after: after.clone(),
                max_users: self.config.snapshot_chunk_users,
            };
            let Ok(payload) = encode(&request) else { break };
            let answer = self
                .transport
                .request(
                    SNAPSHOT_ROUTE,
                    Message::new(payload),
                    Instant::now() + timeout,
                )
                .await;
            let chunk = match answer {
                Err(RequestError::Unroutable(_) | RequestError::Timeout)
                    if resync && report.chunks == 0 =>
                {
                    tracing::debug!("no peer answered the context resync");
                    report.alone = true;
                    break;
                }
                Err(RequestError::Unroutable(_)) if report.chunks == 0 => {
                    tracing::info!(
                        "no peer serves context snapshots: this server is alone; starting with an empty context"
                    );
                    report.alone = true;
                    break;
                }
                Err(RequestError::Timeout) if report.chunks == 0 => {
                    tracing::warn!(
                        ?timeout,
                        "no peer answered the context snapshot request: this server is alone; starting with an empty context"
                    );
                    report.alone = true;
                    break;
                }
                Err(e) => Err(e.to_string()),
                Ok(bytes) => decode::<SnapshotChunk>(&bytes).map_err(|e| e.to_string()),
            };
            match chunk {
                // This server answered its own request (it consumes snapshot
                // requests too): ask again, a peer takes the next one.
                Ok(chunk) if chunk.responder == *self.node => {
                    own_answers += 1;
                    if own_answers >= OWN_ANSWERS_BEFORE_ALONE {
                        tracing::debug!("only this server answered the context resync");
                        report.alone = report.chunks == 0;
                        break;
                    }
                    // Leave this server's consumer free a moment for a peer's
                    // request, and ask again after a random part of a growing pause:
                    // two servers pulling at once (both found the same divergence)
                    // otherwise stay in step, each answering itself every time.
                    let pause = u64::from(own_answers) * 4;
                    let pause = rand::random_range(pause / 4..=pause);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                Ok(chunk) => {
                    failures = 0;
                    own_answers = 0;
                    let mut inner = self.lock();
                    for user in &chunk.users {
                        inner
                            .clock
                            .observe(user.last_active.wall_ms, user.last_active.logical);
                    }
                    inner.state.merge_snapshots(&chunk.users);
                    report.chunks += 1;
                    report.users += chunk.users.len();
                    match chunk.next {
                        Some(next) => after = Some(next),
                        None => break,
                    }
                }
                Err(e) if resync => {
                    failures += 1;
                    if failures >= CHUNK_ATTEMPTS {
                        tracing::warn!(error = %e, users = report.users, "context resync incomplete; the next one tries again");
                        break;
                    }
                }
                Err(e) => {
                    failures += 1;
                    if failures >= CHUNK_ATTEMPTS {
                        tracing::error!(error = %e, users = report.users, "context snapshot incomplete; serving with what was received");
                        break;
                    }
                    tracing::warn!(error = %e, "a context snapshot chunk failed; asking again");
                }
            }
        }
        let elapsed_ms = started.elapsed().as_millis() as u64;
        if resync {
            self.metrics.resyncs.increment(1);
            tracing::debug!(
                users = report.users,
                chunks = report.chunks,
                elapsed_ms,
                "context resync done"
            );
        } else {
            tracing::info!(
                users = report.users,
                chunks = report.chunks,
                elapsed_ms,
                "context snapshot done"
            );
        }
        report
    }

    fn is_own_request(&self, payload: &[u8]) -> bool {
        decode::<SnapshotRequest>(payload).is_ok_and(|r| r.requester == *self.node)
    }

    fn answer_snapshot(&self, payload: &[u8]) -> Result<Vec<u8>, String> {
        let request: SnapshotRequest =
            decode(payload).map_err(|e| format!("undecodable snapshot request: {e}"))?;
        if request.requester == *self.node {
            // Its own resync: an empty answer, at once; it asks a peer again.
            return encode(&SnapshotChunk {
                v: ProtocolVersion::CURRENT,
                responder: self.node.to_string(),
                users: Vec::new(),
                next: None,
            })
            .map_err(|e| e.to_string());
        }
        let max = request
            .max_users
            .min(self.config.snapshot_chunk_users)
            .max(1) as usize;
        let (users, next) = self
            .lock()
            .state
            .snapshot_after(request.after.as_deref(), max);
        tracing::debug!(requester = %request.requester, users = users.len(), "answering a snapshot chunk");
        let chunk = SnapshotChunk {
            v: ProtocolVersion::CURRENT,
            responder: self.node.to_string(),
            users,
            next,
        };
        encode(&chunk).map_err(|e| e.to_string())
    }

    /// Expire what is stale as of `at` (Unix ms).
    fn expire(&self, at: u64) {
        let idle = at.saturating_sub(self.config.idle_ttl_s.saturating_mul(1000));
        let tombstones = at.saturating_sub(self.config.tombstone_ttl_s.saturating_mul(1000));
        let dropped = self.lock().state.expire(at, idle, tombstones);
        if dropped > 0 {
            tracing::debug!(dropped, "expired idle user contexts");
        }
    }

    /// Check the bounds for a write of `len` bytes under `key`, and stamp it.
    fn admit(
        &self,
        inner: &mut Inner,
        user: &str,
        key: &str,
        len: usize,
    ) -> Result<Stamp, ContextError> {
        let limit = self.config.max_bytes_per_user;
        let size = match inner.state.user(user) {
            Some(u) => u.size_with(key, len),
            None => {
                if inner.state.user_count() >= self.config.max_users {
                    return Err(ContextError::StoreFull {
                        limit: self.config.max_users,
                    });
                }
                key.len() + len + 16
            }
        };
        if size > limit {
            return Err(ContextError::TooLarge { size, limit });
        }
        Ok(inner.clock.tick())
    }

    /// Reads keep a context alive: say so to the peers now and then, so an active
    /// user who only reads is not expired anywhere.
    fn touch_if_stale(&self, user: &str) {
        let quarter_ttl = self.config.idle_ttl_s.saturating_mul(250);
        let op = {
            let mut inner = self.lock();
            let stale = inner
                .state
                .user(user)
                .is_some_and(|u| u.last_active_ms().saturating_add(quarter_ttl) < now_ms());
            if !stale {
                return;
            }
            let ts = inner.clock.tick();
            let op = ContextOp::Touch {
                user: user.to_owned(),
                ts: to_hlc(&ts),
            };
            inner.state.apply(&op);
            op
        };
        let Ok(payload) = self.delta(vec![op], None) else {
            return;
        };
        let transport = self.transport.clone();
        tokio::spawn(async move {
            let _ = CONTEXT_DELTAS
                .publish_encoded(transport.as_ref(), payload)
                .await;
        });
    }
}

#[async_trait]
impl ContextStore for ReplicatedContextStore {
    async fn get(&self, user: &str, key: &str) -> Result<Option<Bytes>, ContextError> {
        let value = self.lock().state.get(user, key).map(Bytes::copy_from_slice);
        self.touch_if_stale(user);
        Ok(value)
    }

    async fn counter(&self, user: &str, key: &str) -> Result<i64, ContextError> {
        let value = self.lock().state.counter(user, key);
        self.touch_if_stale(user);
        Ok(value)
    }

    async fn set_in(
        &self,
        effects: &Effects,
        user: &str,
        key: &str,
        value: Bytes,
    ) -> Result<(), ContextError> {
        self.take_turn(effects, user).await?;
        let mut inner = self.lock();
        let ts = self.admit(&mut inner, user, key, value.len())?;
        let op = ContextOp::Set {
            user: user.to_owned(),
            key: key.to_owned(),
            value: Some(value.to_vec()),
            ts: to_hlc(&ts),
        };
        effects.push([op.clone()])?;
        inner.state.apply(&op);
        Ok(())
    }

    async fn delete_in(
        &self,
        effects: &Effects,
        user: &str,
        key: &str,
    ) -> Result<bool, ContextError> {
        self.take_turn(effects, user).await?;
        let mut inner = self.lock();
        if inner.state.get(user, key).is_none() {
            return Ok(false);
        }
        let ts = inner.clock.tick();
        let op = ContextOp::Set {
            user: user.to_owned(),
            key: key.to_owned(),
            value: None,
            ts: to_hlc(&ts),
        };
        effects.push([op.clone()])?;
        inner.state.apply(&op);
        Ok(true)
    }

    async fn increment_in(
        &self,
        effects: &Effects,
        user: &str,
        key: &str,
        by: i64,
    ) -> Result<i64, ContextError> {
        self.take_turn(effects, user).await?;
        let mut inner = self.lock();
        let ts = self.admit(&mut inner, user, key, 8)?;
        let (seq, sum) = inner.state.share(user, key, &self.node);
        let sum = sum
            .checked_add(by)
            .ok_or_else(|| ContextError::NotANumber {
                key: key.to_owned(),
            })?;
        let ops = [
            ContextOp::Count {
                user: user.to_owned(),
                key: key.to_owned(),
                node: self.node.to_string(),
                seq: seq + 1,
                sum,
            },
            ContextOp::Touch {
                user: user.to_owned(),
                ts: to_hlc(&ts),
            },
        ];
        effects.push(ops.iter().cloned())?;
        // Applied at once so that the request (and this server) reads it back; the
        // running sum makes a lost broadcast heal with the next one.
        for op in &ops {
            inner.state.apply(op);
        }
        Ok(inner.state.counter(user, key))
    }

    async fn commit(
        &self,
        effects: &Effects,
        record: Option<RecordWrite>,
        deadline: Instant,
    ) -> Result<(), ContextError> {
        if effects.is_deferred() {
            // A job's run: its writes are applied now, as one request's would be.
            let now = Effects::default();
            for write in effects.take_pending() {
                match write {
                    Pending::Set {
                        user,
                        key,
                        value: Some(value),
                    } => self.set_in(&now, &user, &key, value).await?,
                    Pending::Set {
                        user,
                        key,
                        value: None,
                    } => {
                        self.delete_in(&now, &user, &key).await?;
                    }
                    Pending::Add { user, key, by } => {
                        self.increment_in(&now, &user, &key, by).await?;
                    }
                }
            }
            effects.end();
            return self.commit_applied(&now, record, deadline).await;
        }
        self.commit_applied(effects, record, deadline).await
    }

    fn record(&self, scope: &str, key: &str) -> Option<OutcomeRecord> {
        let inner = self.lock();
        let bytes = inner.state.record(scope, key, now_ms())?;
        decode(bytes).ok()
    }

    fn job(&self, id: &str) -> Option<JobRecord> {
        let (scope, key) = record_location(id);
        let inner = self.lock();
        let bytes = inner.state.record(&scope, &key, now_ms())?;
        decode(bytes).ok()
    }

    fn jobs(&self) -> Vec<JobRecord> {
        self.lock().state.jobs(now_ms())
    }

    fn schedule_mark(&self, name: &str) -> Option<keelson_protocol::schedule::ScheduleMark> {
        let key = keelson_protocol::schedule::mark_key(name);
        let inner = self.lock();
        let bytes =
            inner
                .state
                .record(keelson_protocol::schedule::SCHEDULES_SCOPE, &key, now_ms())?;
        decode(bytes).ok()
    }

    fn job_changes(&self) -> Option<tokio::sync::broadcast::Receiver<Arc<str>>> {
        Some(self.job_changes.subscribe())
    }

    fn client_keys(&self, scope: &str) -> usize {
        self.lock().state.client_keys(scope)
    }

    async fn barrier(&self, within: Duration) -> bool {
        let marker = self.markers_sent.fetch_add(1, Ordering::AcqRel) + 1;
        let mut back = self.markers_back.subscribe();
        let Ok(payload) = self.delta(Vec::new(), Some(marker)) else {
            return false;
        };
        if self.broadcast(payload).await.is_err() {
            return false;
        }
        tokio::time::timeout(within, back.wait_for(|b| *b >= marker))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn user_count(&self) -> usize {
        self.lock().state.user_count()
    }

    fn context_bytes(&self) -> Option<u64> {
        Some(self.lock().state.total_size() as u64)
    }

    fn user_view(&self, user: &str) -> Option<serde_json::Value> {
        let inner = self.lock();
        let view = inner.state.view(user)?;
        // Values are JSON as handlers wrote them; one that is not (impossible
        // through the handler API) is shown as a string rather than dropped.
        let values: serde_json::Map<_, _> = view
            .values
            .iter()
            .map(|(k, v)| {
                let value = serde_json::from_slice(v).unwrap_or_else(|_| {
                    serde_json::Value::String(String::from_utf8_lossy(v).into_owned())
                });
                ((*k).to_owned(), value)
            })
            .collect();
        let counters: serde_json::Map<_, _> = view
            .counters
            .iter()
            .map(|(k, n)| ((*k).to_owned(), serde_json::Value::from(*n)))
            .collect();
        Some(serde_json::json!({ "user": user, "values": values, "counters": counters }))
    }

    fn mark(&self) -> Option<ContextMark> {
        Some(ContextMark {
            origin: self.node.to_string(),
            seq: self.published.load(Ordering::Acquire),
        })
    }

    fn observe_mark(&self, mark: &ContextMark) {
        if *mark.origin != *self.node {
            self.lock_gaps()
                .announced(&mark.origin, mark.seq, Instant::now());
        }
    }

    fn digest(&self) -> Option<ContextDigest> {
        // Under the state's lock: a write applies under it, so none slips in between
        // this check and the hash.
        let inner = self.lock();
        if self.writing() {
            return None;
        }
        let mut applied = self.lock_gaps().applied_marks()?;
        applied.push(ContextMark {
            origin: self.node.to_string(),
            seq: self.published.load(Ordering::Acquire),
        });
        Some(ContextDigest {
            hash: inner.state.digest(),
            swept_ms: inner.state.swept_ms(),
            applied,
        })
    }

    fn observe_digest(self: Arc<Self>, peer: &str, theirs: &ContextDigest) {
        if *peer == *self.node {
            return;
        }
        let Some(mine) = self.digest() else { return };
        let verdict = self
            .divergence
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(peer, &mine, theirs);
        if verdict == Verdict::Diverged {
            tracing::warn!(
                peer,
                mine = format_args!("{:016x}", mine.hash),
                theirs = format_args!("{:016x}", theirs.hash),
                "context state differs from a peer's that applied the same deltas ({PERSISTENT_AFTER} heartbeats in a row); pulling the peers' state"
            );
            self.pull_in_background(|_, _| {});
        }
    }

    fn divergences(&self) -> u64 {
        self.divergence
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .total
    }
}

impl Drop for ReplicatedContextStore {
    fn drop(&mut self) {
        self.stop();
    }
}

impl ReplicatedContextStore {
    /// [`ContextStore::commit`] of writes already applied here.
    async fn commit_applied(
        &self,
        effects: &Effects,
        record: Option<RecordWrite>,
        deadline: Instant,
    ) -> Result<(), ContextError> {
        // The user's turn is held until the delta is out: a later request's delta
        // must not overtake this one's running sums.
        let (mut ops, _turn) = effects.end();
        let payload = match record {
            Some(RecordWrite { scope, key, record }) => {
                let value = match &record {
                    RecordValue::Outcome(r) => encode(r),
                    RecordValue::Job(r) => encode(r.as_ref()),
                    RecordValue::Schedule(m) => encode(m),
                }
                .map_err(|e| ContextError::Unavailable(e.to_string()))?;
                let mut inner = self.lock();
                let ts = inner.clock.tick();
                let op = ContextOp::Set {
                    user: scope,
                    key,
                    value: Some(value),
                    ts: to_hlc(&ts),
                };
                inner.state.apply(&op);
                ops.push(op);
                self.announce_jobs(&ops[ops.len() - 1..]);
                // Numbered under the state's lock (a record may be written without a
                // write turn): a digest never sees the record without its number.
                self.delta(ops, None)?
            }
            None if ops.is_empty() => return Ok(()),
            None => self.delta(ops, None)?,
        };
        self.publish(payload, deadline).await
    }
}
