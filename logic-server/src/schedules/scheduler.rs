//! The scheduler: a singleton (lease `scheduler`) that fires each slot of each
//! schedule as a background job.
//!
//! A slot's job has an id derived from the schedule and the slot
//! ([`plan::slot_job_id`]), so a slot fired twice (by two schedulers that both
//! believe they lead, or by a new leader replaying a slot the old one fired just
//! before it died) is one job: the second submission finds the first's record and
//! queues nothing. After each firing the scheduler writes the schedule's
//! [`ScheduleMark`] (slot and lease token) into the replicated context; a new leader
//! reads the marks (after a barrier) to know which slots were missed, and replays
//! them by the schedule's misfire policy. A scheduler that sees a mark with a higher
//! token than its own no longer leads: it drops the firing (counted) and stops.

use super::plan::{self, Schedule};
use crate::context::{Effects, RecordWrite};
use crate::dispatch::unix_ms_now;
use crate::jobs::{Jobs, api};
use chrono::{DateTime, Utc};
use keelson_protocol::job::{JobSpec, JobState};
use keelson_protocol::schedule::{SCHEDULE_HEADER, SLOT_HEADER, ScheduleMark, TOKEN_HEADER};
use keelson_protocol::transport::Fence;
use keelson_protocol::version::ProtocolVersion;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The lease every scheduler of the cluster is a candidate for.
pub(crate) const LEASE: &str = keelson_protocol::schedule::SCHEDULER_LEASE;

/// How long a mark is kept without a new firing (a schedule removed from the
/// configuration is forgotten after this).
const MARK_TTL_MS: u64 = 400 * 24 * 3600 * 1000;
/// How long the scheduler waits for the context channel's barrier.
const BARRIER_WITHIN: Duration = Duration::from_secs(5);
/// Delay before a firing that failed (broker away) is tried again.
const RETRY_DELAY: Duration = Duration::from_millis(500);

/// The schedules of a server and what it last fired of each.
#[derive(Debug)]
pub(crate) struct Scheduler {
    pub(crate) schedules: Vec<Schedule>,
    pub(crate) jobs: Arc<Jobs>,
}

/// How one firing ended.
enum Firing {
    /// Queued (or found already queued): the slot is done.
    Done,
    /// Not fired, and never will be (`overlap`: the previous run is unfinished;
    /// `no_handler`: no server runs jobs of the handler): the slot is done.
    Skipped(&'static str),
    /// A newer leader's mark was seen: this scheduler no longer leads.
    Stale,
    /// The lease is not held now.
    Fenced,
    /// Could not be queued now (the broker is away): try again.
    Failed(String),
}

fn from_unix(s: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(s, 0)
}

/// Whether the failpoint of the schedule tests is on: a scheduler told that it
/// lost its lease makes one more firing with its old token, as a leader frozen
/// between its checks and its act would, once a newer leader's mark is here (see
/// `tests/schedules.rs`). Only in builds with the `test-failpoints` feature.
fn stale_fire_on_loss() -> bool {
    cfg!(feature = "test-failpoints")
        && std::env::var("KEELSON_TEST_STALE_FIRE_ON_LOSS").is_ok_and(|v| v == "1")
}

impl Scheduler {
    pub(crate) fn new(schedules: Vec<Schedule>, jobs: Arc<Jobs>) -> Self {
        Self { schedules, jobs }
    }

    fn store(&self) -> &Arc<dyn crate::context::ContextStore> {
        &self.jobs.dispatcher.store
    }

    /// The last fired slot of `name`, as the replicated marks say, and its token.
    pub(crate) fn mark(&self, name: &str) -> Option<ScheduleMark> {
        self.store().schedule_mark(name)
    }

    /// Run while holding the lease with `token`, until `cancel`.
    pub(crate) async fn run(self: Arc<Self>, token: u64, fence: Fence, cancel: CancellationToken) {
        if !self.store().barrier(BARRIER_WITHIN).await {
            warn!("scheduler: the context barrier timed out; replaying from the marks held here");
        }
        let mut last: HashMap<String, Option<DateTime<Utc>>> = HashMap::new();
        // The last slot of each schedule that ran as a job (for `overlap = "skip"`).
        let mut ran: HashMap<String, Option<DateTime<Utc>>> = HashMap::new();
        let mut highest_mark = 0;
        for s in &self.schedules {
            let mark = self.mark(&s.name);
            highest_mark = highest_mark.max(mark.as_ref().map_or(0, |m| m.token));
            ran.insert(
                s.name.clone(),
                mark.as_ref().and_then(|m| m.run_slot_s).and_then(from_unix),
            );
            // A schedule never fired starts from now: the current second's slot,
            // if it is one, and on.
            let start = mark
                .and_then(|m| from_unix(m.slot_s))
                .or_else(|| from_unix(Utc::now().timestamp() - 1));
            last.insert(s.name.clone(), start);
        }
        // The token this scheduler fires with: the lease's, unless the marks carry a
        // higher one. This server just gained the lease, so no newer leader exists:
        // the lease's tokens restarted (its queue deleted or lost with the broker),
        // and the scheduler fires above the marks, so that they keep fencing older
        // leaders and a newer one still outranks it.
        let lease_token = token;
        let token = if highest_mark > lease_token {
            warn!(
                lease_token,
                highest_mark,
                "scheduler: the schedules' marks carry a higher token than the lease (its queue was deleted or lost?); firing above them"
            );
            highest_mark.saturating_add(lease_token)
        } else {
            lease_token
        };
        info!(
            token,
            lease_token,
            schedules = self.schedules.len(),
            "scheduler leading"
        );
        'lead: loop {
            let now = Utc::now();
            let mut retry = false;
            for s in &self.schedules {
                let previous = last.get(&s.name).copied().flatten();
                let due = s.due(previous, now);
                if due.skipped > 0 {
                    metrics::counter!("keelson_schedule_skipped_total", "schedule" => s.name.clone(), "reason" => "misfire")
                        .increment(due.skipped);
                }
                let mut complete = true;
                for (i, slot) in due.fire.iter().enumerate() {
                    // The missed slots come first, oldest first.
                    let kind = if (i as u64) < due.caught_up {
                        "catch_up"
                    } else {
                        "on_time"
                    };
                    let ran_before = ran.get(&s.name).copied().flatten();
                    match self
                        .fire(s, *slot, ran_before, token, lease_token, &fence)
                        .await
                    {
                        Firing::Done => {
                            ran.insert(s.name.clone(), Some(*slot));
                            metrics::counter!("keelson_schedule_firings_total", "schedule" => s.name.clone(), "kind" => kind)
                                .increment(1);
                            last.insert(s.name.clone(), Some(*slot));
                        }
                        Firing::Skipped(reason) => {
                            metrics::counter!("keelson_schedule_skipped_total", "schedule" => s.name.clone(), "reason" => reason)
                                .increment(1);
                            last.insert(s.name.clone(), Some(*slot));
                        }
                        Firing::Stale => {
                            // Not started again while this lease token is held: a
                            // newer leader exists, and this server will hear that it
                            // lost the lease.
                            self.stale(&s.name);
                            cancel.cancelled().await;
                            return;
                        }
                        Firing::Fenced => {
                            debug!(schedule = %s.name, "scheduler fenced: not firing");
                            break 'lead;
                        }
                        Firing::Failed(e) => {
                            warn!(schedule = %s.name, slot = %slot, error = %e, "scheduler: a firing failed; trying again");
                            retry = true;
                            complete = false;
                            break;
                        }
                    }
                    if cancel.is_cancelled() {
                        complete = false;
                        break;
                    }
                }
                // Every slot up to now was fired or counted as skipped: the next
                // look starts after now (so skipped slots are counted once).
                if complete && let Some(now_s) = from_unix(now.timestamp()) {
                    let l = last.entry(s.name.clone()).or_default();
                    *l = Some(l.map_or(now_s, |l| l.max(now_s)));
                }
            }
            let wake = if retry {
                Instant::now() + RETRY_DELAY
            } else {
                self.next_wake(&last, Utc::now())
            };
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep_until(wake) => {}
            }
        }
        // Lost the lease (fenced or cancelled).
        if stale_fire_on_loss() {
            self.fire_stale(token, &last).await;
        }
    }

    /// When the next slot of any schedule is due.
    fn next_wake(
        &self,
        last: &HashMap<String, Option<DateTime<Utc>>>,
        now: DateTime<Utc>,
    ) -> Instant {
        let next = self
            .schedules
            .iter()
            .filter_map(|s| {
                let from = last
                    .get(&s.name)
                    .copied()
                    .flatten()
                    .map_or(now, |l| l.max(now));
                s.next_after(from)
            })
            .min();
        let wait = next.map_or(Duration::from_secs(60), |n| {
            (n - now).to_std().unwrap_or(Duration::ZERO)
        });
        // Never sleep long: a clock that jumped, or a schedule whose next slot is a
        // year away, is looked at again within a minute.
        Instant::now() + wait.min(Duration::from_secs(60))
    }

    fn stale(&self, name: &str) {
        warn!(schedule = %name, "scheduler: a firing with a stale lease token was dropped");
        metrics::counter!("keelson_schedule_stale_dropped_total", "schedule" => name.to_owned())
            .increment(1);
    }

    async fn fire(
        &self,
        s: &Schedule,
        slot: DateTime<Utc>,
        ran_before: Option<DateTime<Utc>>,
        token: u64,
        lease_token: u64,
        fence: &Fence,
    ) -> Firing {
        // The token fence: a newer leader's mark means this one no longer leads.
        if self.mark(&s.name).is_some_and(|m| m.token > token) {
            return Firing::Stale;
        }
        if fence.check() != Some(lease_token) {
            return Firing::Fenced;
        }
        let id = plan::slot_job_id(&s.name, slot);
        let overlapping = s.overlap == crate::config::Overlap::Skip
            && ran_before.is_some_and(|prev| {
                self.store()
                    .job(&plan::slot_job_id(&s.name, prev))
                    .is_some_and(|r| matches!(r.state, JobState::Queued | JobState::Running))
            });
        let mut skipped = overlapping.then_some("overlap");
        if overlapping {
            debug!(schedule = %s.name, %slot, "the previous run is not finished: slot skipped");
        } else if self.jobs.fresh_record(&id).await.is_none() {
            let slot_text = slot.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            let headers = BTreeMap::from([
                (SCHEDULE_HEADER.to_owned(), s.name.clone()),
                (SLOT_HEADER.to_owned(), slot_text),
                (TOKEN_HEADER.to_owned(), token.to_string()),
            ]);
            let spec = JobSpec {
                id: id.clone(),
                handler: s.handler.clone(),
                user: None,
                body: serde_json::to_vec(&s.body).unwrap_or_default(),
                options: api::default_options(&self.jobs),
                created_ms: unix_ms_now(),
                fingerprint: None,
                headers,
                traceparent: None,
            };
            // Checked again after the barrier, and the queueing bounded by what is
            // left of the fence: a scheduler that loses its lease while the broker
            // is slow must not queue the slot after a new leader did.
            if fence.check() != Some(lease_token) {
                return Firing::Fenced;
            }
            let accepted =
                tokio::time::timeout(fence.remaining(), api::accept(&self.jobs, spec)).await;
            let Ok(accepted) = accepted else {
                return Firing::Fenced;
            };
            match accepted {
                Ok(_) => self.jobs.dispatcher.metrics.job_submitted(),
                Err((_, "unknown_handler", message)) => {
                    // Nothing can run it (no server ever declared its job queue):
                    // the slot is skipped, not retried for ever.
                    warn!(schedule = %s.name, %slot, %message, "scheduler: slot skipped");
                    skipped = Some("no_handler");
                }
                Err((_, _, message)) => return Firing::Failed(message),
            }
        }
        let mark = ScheduleMark {
            v: ProtocolVersion::CURRENT,
            name: s.name.clone(),
            slot_s: slot.timestamp(),
            token,
            run_slot_s: if skipped.is_some() {
                ran_before.map(|r| r.timestamp())
            } else {
                Some(slot.timestamp())
            },
            node: self.jobs.node().to_owned(),
            fired_ms: unix_ms_now(),
            expires_unix_ms: unix_ms_now().saturating_add(MARK_TTL_MS),
        };
        let deadline = Instant::now() + BARRIER_WITHIN;
        if let Err(e) = self
            .store()
            .commit(
                &Effects::default(),
                Some(RecordWrite::schedule(mark)),
                deadline,
            )
            .await
        {
            // Applied here and sent when the channel is back; the job id keeps the
            // slot from running twice even if a new leader replays it meanwhile.
            warn!(schedule = %s.name, error = %e, "a schedule mark is not replicated yet");
        }
        match skipped {
            Some(reason) => Firing::Skipped(reason),
            None => Firing::Done,
        }
    }

    /// The failpoint: fire the next slot of the first schedule with the old token,
    /// once a newer leader's mark has arrived (within 4 s), skipping the local
    /// fence as a frozen leader's already-passed check would; the token fence must
    /// drop it.
    async fn fire_stale(&self, token: u64, last: &HashMap<String, Option<DateTime<Utc>>>) {
        let Some(s) = self.schedules.first() else {
            return;
        };
        // Within the grace a cancelled leased task has (see `leased.rs`).
        let give_up = Instant::now() + Duration::from_secs(4);
        loop {
            if Instant::now() >= give_up {
                // No newer leader yet (a drain, say): nothing to prove.
                return;
            }
            let _ = self.store().barrier(Duration::from_secs(1)).await;
            if self.mark(&s.name).is_some_and(|m| m.token > token) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let from = last
            .get(&s.name)
            .copied()
            .flatten()
            .unwrap_or_else(Utc::now);
        let Some(slot) = s.next_after(from) else {
            return;
        };
        warn!(schedule = %s.name, token, "test failpoint: firing once more with a lost lease's token");
        let stale_fence = Fence::new();
        stale_fence.hold(token, Instant::now() + Duration::from_secs(5));
        if let Firing::Stale = self.fire(s, slot, None, token, token, &stale_fence).await {
            self.stale(&s.name);
        }
    }
}

impl Scheduler {
    /// The schedules as heartbeats carry them: last slot from the replicated mark,
    /// next slot from the pattern.
    pub(crate) fn beats(&self) -> Vec<keelson_protocol::control::ScheduleBeat> {
        let now = Utc::now();
        self.schedules
            .iter()
            .map(|s| {
                let mark = self.mark(&s.name);
                let last = mark.as_ref().and_then(|m| from_unix(m.slot_s));
                let from = last.map_or(now, |l| l.max(now));
                keelson_protocol::control::ScheduleBeat {
                    name: s.name.clone(),
                    cron: s.pattern().to_owned(),
                    timezone: s.timezone().to_owned(),
                    handler: s.handler.clone(),
                    last_slot_s: mark.as_ref().map(|m| m.slot_s),
                    last_token: mark.map_or(0, |m| m.token),
                    next_slot_s: s.next_after(from).map(|n| n.timestamp()),
                }
            })
            .collect()
    }
}
