//! Slot arithmetic: which instants a schedule fires at, which of them are due now,
//! and the job id of each. Pure code, no clock and no I/O: the scheduler passes the
//! time and the watermark (the last slot fired) in.
//!
//! All instants are UTC with whole seconds. A *slot* is an instant the cron pattern
//! matches, its fields read as the wall clock of the schedule's time zone; the set of
//! slots is a fixed subset of the time line, so [`Schedule::next_after`] gives the
//! same answer wherever a walk over it starts, and a slot's id
//! ([`slot_job_id`]) is the same on every server.
//!
//! # Daylight saving time
//!
//! As the croner crate that evaluates the patterns has it, a pattern is
//! *fixed-time* when its second, minute and hour fields are one value each
//! (`0 30 2 * * *`), and *interval* otherwise (`0 */15 * * * *`, and also
//! `0 0 2,14 * * *`, which Vixie cron, from which the rules come, would count as
//! fixed-time):
//!
//! * when the clock jumps forward (the wall-clock hour 02:00-03:00 of
//!   `Europe/Berlin` on 2026-03-29 does not exist), a fixed-time slot in the gap
//!   fires at the first instant after it, 03:00 local (01:00 UTC), once; an
//!   interval pattern's times in the gap do not happen;
//! * when the clock goes back (02:00-03:00 happens twice on 2026-10-25), a
//!   fixed-time slot fires at the first pass only (02:30 CEST, 00:30 UTC); an
//!   interval pattern fires at each pass (every 15 minutes keeps every 15 minutes
//!   of real time).
//!
//! So a daily job runs once on every local day. The tests walk both of 2026's
//! changes in Berlin and check it.

use crate::config::{Misfire, Overlap, ScheduleConfig};
use chrono::{DateTime, SecondsFormat, TimeDelta, Timelike, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use std::collections::{HashMap, VecDeque};
use std::time::Duration;

/// The most slots one [`Schedule::due`] looks at. Past it, the slots missed longest
/// ago are not enumerated but estimated (see [`Due::skipped`]).
pub const MAX_ENUMERATED_SLOTS: u64 = 100_000;

/// The most slots one [`Schedule::due`] returns to fire; the oldest past it are
/// skipped.
pub const MAX_FIRED_SLOTS: usize = 10_000;

/// The longest schedule name.
pub const MAX_NAME_LEN: usize = 64;

/// How far behind `now` the newest slot may be and still be on time: it is fired
/// whatever the misfire policy says.
const ON_TIME: TimeDelta = TimeDelta::seconds(1);

const ONE_SECOND: TimeDelta = TimeDelta::seconds(1);

/// A checked schedule, built from a [`ScheduleConfig`] by [`ScheduleConfig::build`].
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// Unique name (`[a-z0-9_-]`, 1 to 64 long); part of each slot's key and id.
    pub name: String,
    /// The handler each slot's job runs.
    pub handler: String,
    /// The request body of each slot's job.
    pub body: serde_json::Value,
    /// What to do with missed slots.
    pub misfire: Misfire,
    /// Missed slots older than this are not caught up.
    pub catch_up_window: Duration,
    /// Whether a slot runs while an earlier one's job still runs.
    pub overlap: Overlap,
    cron: Cron,
    tz: Tz,
    pattern: String,
    timezone: String,
}

/// What to fire now, from [`Schedule::due`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Due {
    /// Slots to fire, oldest first (the on-time slot, if any, last); at most
    /// [`MAX_FIRED_SLOTS`].
    pub fire: Vec<DateTime<Utc>>,
    /// Slots since the watermark that will never fire: missed ones the misfire
    /// policy or the catch-up window leaves out, and the oldest past
    /// [`MAX_FIRED_SLOTS`]. Exact while the walk over them stays within
    /// [`MAX_ENUMERATED_SLOTS`] (at least 80 000 slots since the watermark); the
    /// ones past that are estimated at the rate of those counted, exactly for a
    /// pattern with a constant period (every N seconds, N dividing 60).
    pub skipped: u64,
    /// How many of `fire` are missed slots caught up (the rest, 0 or 1, is on time).
    pub caught_up: u64,
}

impl ScheduleConfig {
    /// Check this schedule and build it. An error names the field and says what
    /// was expected (`cron: ...`); [`build_schedules`] puts the table's key
    /// (`logic_server.schedules[2].`) in front.
    pub fn build(&self) -> Result<Schedule, String> {
        check_name(&self.name).map_err(|e| format!("name: {e}"))?;
        let cron = parse_cron(&self.cron).map_err(|e| format!("cron: {e}"))?;
        let tz: Tz = self.timezone.parse().map_err(|_| {
            format!(
                "timezone: `{}` is not an IANA time zone name; expected e.g. `UTC` or `Europe/Berlin`",
                self.timezone
            )
        })?;
        if self.handler.trim().is_empty() {
            return Err("handler: empty; expected the name of a handler".to_owned());
        }
        let schedule = Schedule {
            name: self.name.clone(),
            handler: self.handler.clone(),
            body: self.body.clone(),
            misfire: self.misfire,
            catch_up_window: Duration::from_secs(self.catch_up_window_s),
            overlap: self.overlap,
            cron,
            tz,
            pattern: self.cron.clone(),
            timezone: self.timezone.clone(),
        };
        // A pattern has no year field, so one that matches any date matches again
        // within a few hundred years of any other; one that matches none (`0 0 0
        // 31 4 *`, April 31) would never fire.
        if schedule.next_after(DateTime::UNIX_EPOCH).is_none() {
            return Err(format!(
                "cron: `{}` matches no date; expected a pattern that fires",
                self.cron
            ));
        }
        Ok(schedule)
    }
}

/// Check every schedule of `logic_server.schedules` and build them, in order. The
/// first problem is the error, naming the key: `logic_server.schedules[2].cron:
/// ...`; two schedules with one name are an error.
pub fn build_schedules(configs: &[ScheduleConfig]) -> Result<Vec<Schedule>, String> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut schedules = Vec::with_capacity(configs.len());
    for (i, config) in configs.iter().enumerate() {
        let schedule = config
            .build()
            .map_err(|e| format!("logic_server.schedules[{i}].{e}"))?;
        if let Some(first) = seen.insert(&config.name, i) {
            return Err(format!(
                "logic_server.schedules[{i}].name: `{}` is also the name of logic_server.schedules[{first}]; expected unique names",
                config.name
            ));
        }
        schedules.push(schedule);
    }
    Ok(schedules)
}

fn check_name(name: &str) -> Result<(), String> {
    let allowed = |b: u8| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-');
    if name.is_empty() || name.len() > MAX_NAME_LEN || !name.bytes().all(allowed) {
        return Err(format!(
            "`{name}` is not a schedule name; expected 1 to {MAX_NAME_LEN} of a-z, 0-9, `_` and `-`"
        ));
    }
    Ok(())
}

fn parse_cron(pattern: &str) -> Result<Cron, String> {
    const FIELDS: &str = "expected 6 fields `sec min hour day-of-month month day-of-week`";
    let fields = pattern.split_whitespace().count();
    if fields == 5 && !pattern.contains('@') {
        return Err(format!(
            "`{pattern}` has 5 fields, but a seconds field is needed first (`0 {}` for second 0): {FIELDS}",
            pattern.trim()
        ));
    }
    CronParser::builder()
        .seconds(Seconds::Required)
        .year(Year::Disallowed)
        .build()
        .parse(pattern)
        .map_err(|e| {
            format!(
                "`{pattern}` is not a cron pattern ({e}); {FIELDS}, e.g. `0 30 2 * * *` for 02:30 every day"
            )
        })
}

impl Schedule {
    /// The cron pattern, as configured.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// The time zone the pattern is read in, as configured.
    pub fn timezone(&self) -> &str {
        &self.timezone
    }

    /// The first slot strictly after `after`; `None` past the year 5000 (or for a
    /// pattern that matches no date, which [`ScheduleConfig::build`] refuses).
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Slots are whole seconds, so one is after `after` exactly when it is
        // after `after`'s whole second.
        let after = after.with_nanosecond(0)?.with_timezone(&self.tz);
        let next = self.cron.find_next_occurrence(&after, false).ok()?;
        Some(next.with_timezone(&Utc))
    }

    /// The last slot at or before `at` (`inclusive`) or strictly before it. Only a
    /// hint for [`Schedule::due`], which walks forward from it: croner searches
    /// backwards with its own code, and the slots are what
    /// [`Schedule::next_after`] says they are.
    fn previous(&self, at: DateTime<Utc>, inclusive: bool) -> Option<DateTime<Utc>> {
        let at = at.with_timezone(&self.tz);
        let previous = self.cron.find_previous_occurrence(&at, inclusive).ok()?;
        Some(previous.with_timezone(&Utc))
    }

    /// Whether `at` (a whole second) is a slot.
    fn is_slot(&self, at: DateTime<Utc>) -> bool {
        at.checked_sub_signed(ONE_SECOND)
            .and_then(|before| self.next_after(before))
            == Some(at)
    }

    /// What to fire at `now`, given `last`, the last slot already fired (the
    /// replicated watermark), or `None` for a schedule that never fired.
    ///
    /// The slots after `last` up to `now` are due. The newest of them, when at most
    /// one second before `now`, is on time and always fired. The others were
    /// missed: [`Misfire::FireAll`] fires each one no older than the catch-up
    /// window, [`Misfire::FireOnce`] the newest of them if it is in the window,
    /// [`Misfire::Skip`] none; the rest are counted in [`Due::skipped`].
    ///
    /// A schedule that never fired starts from now and does not back-fill: only
    /// `now`'s whole second, if it is a slot, is due. The caller should then keep a
    /// watermark of `now` even when nothing fired, or a late call would fire
    /// nothing again. A `last` at or after `now` (a clock behind the one that
    /// fired it) fires nothing.
    pub fn due(&self, last: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Due {
        let Some(now_s) = now.with_nanosecond(0) else {
            return Due::default();
        };
        let Some(last) = last else {
            return Due {
                fire: self.is_slot(now_s).then_some(now_s).into_iter().collect(),
                ..Due::default()
            };
        };
        if last >= now_s {
            return Due::default();
        }
        let on_time_from = now
            .checked_sub_signed(ON_TIME)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        let window = TimeDelta::new(
            i64::try_from(self.catch_up_window.as_secs()).unwrap_or(i64::MAX),
            0,
        )
        .unwrap_or(TimeDelta::MAX);
        let window_from = now
            .checked_sub_signed(window)
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        // The slots the policy may fire are among the newest `keep`, none older
        // than `candidates_from`; older ones are only counted.
        let (keep, candidates_from) = match self.misfire {
            Misfire::Skip => (1, on_time_from),
            Misfire::FireOnce => (2, on_time_from.min(window_from)),
            Misfire::FireAll => (MAX_FIRED_SLOTS, on_time_from.min(window_from)),
        };
        let mut budget = Budget(MAX_ENUMERATED_SLOTS);

        // 1. Walk back from now over the newest `keep` candidates, only to learn
        // where the oldest of them is (at most `keep` steps).
        let mut start = None;
        let mut at = (now_s, true);
        for _ in 0..keep {
            if !budget.spend() {
                break;
            }
            match self.previous(at.0, at.1) {
                Some(p) if p > last && p >= candidates_from => {
                    start = Some(p);
                    at = (p, false);
                }
                _ => break,
            }
        }

        // 2. Walk forward from there to now: these are the candidates, the newest
        // `keep` of them kept (more only if the backward walk missed some).
        let mut newest: VecDeque<DateTime<Utc>> = VecDeque::new();
        let mut older: u64 = 0;
        if let Some(start) = start {
            // `start` is after `last`, so this is at or after it.
            let mut t = start.checked_sub_signed(ONE_SECOND).unwrap_or(last);
            while budget.spend() {
                match self.next_after(t) {
                    Some(s) if s <= now_s => {
                        newest.push_back(s);
                        if newest.len() > keep {
                            newest.pop_front();
                            older += 1;
                        }
                        t = s;
                    }
                    _ => break,
                }
            }
        }

        // 3. Count the slots between the watermark and the candidates, all
        // skipped. Past the budget, the rest are estimated at the rate of those
        // counted rather than enumerated: after a long outage of a dense schedule
        // (every second for days) the count stays right without walking it.
        let end = start.unwrap_or_else(|| {
            now_s
                .checked_add_signed(ONE_SECOND)
                .unwrap_or(DateTime::<Utc>::MAX_UTC)
        });
        let (mut counted, mut t) = (0u64, last);
        loop {
            if !budget.spend() {
                older += estimate(last, t, counted, end);
                break;
            }
            match self.next_after(t) {
                Some(s) if s < end => {
                    counted += 1;
                    t = s;
                }
                _ => break,
            }
        }
        older += counted;

        let on_time = newest.back().is_some_and(|s| *s >= on_time_from);
        let missed = newest.len() - usize::from(on_time);
        let mut catch_up = newest.iter().take(missed).filter(|s| **s >= window_from);
        let mut fire: Vec<DateTime<Utc>> = match self.misfire {
            Misfire::Skip => Vec::new(),
            Misfire::FireOnce => catch_up.next_back().into_iter().copied().collect(),
            Misfire::FireAll => catch_up.copied().collect(),
        };
        let caught_up = fire.len() as u64;
        if on_time {
            fire.extend(newest.back());
        }
        Due {
            skipped: older + newest.len() as u64 - fire.len() as u64,
            fire,
            caught_up,
        }
    }
}

/// The work one [`Schedule::due`] may do, in slots looked at.
struct Budget(u64);

impl Budget {
    /// Take one step; false when none is left.
    fn spend(&mut self) -> bool {
        let left = self.0 > 0;
        self.0 = self.0.saturating_sub(1);
        left
    }
}

/// How many slots lie in (`reached`, `end`) when `counted` lay in (`from`,
/// `reached`]: the same density extrapolated.
fn estimate(from: DateTime<Utc>, reached: DateTime<Utc>, counted: u64, end: DateTime<Utc>) -> u64 {
    let span = (reached - from).num_seconds();
    let rest = (end - reached).num_seconds() - 1;
    if counted == 0 || span <= 0 || rest <= 0 {
        return 0;
    }
    // Spans within chrono's range (below 2^44 s) times `counted` (below 2^17):
    // no overflow in u128.
    let estimate = u128::from(counted) * rest as u128 / span as u128;
    u64::try_from(estimate).unwrap_or(u64::MAX)
}

/// The key of `slot` of the schedule `name`: `sched:{name}:{RFC 3339, UTC, whole
/// seconds}`, e.g. `sched:nightly:2026-03-29T00:30:00Z`.
pub fn slot_key(name: &str, slot: DateTime<Utc>) -> String {
    format!(
        "sched:{name}:{}",
        slot.to_rfc3339_opts(SecondsFormat::Secs, true)
    )
}

/// The job id of `slot` of the schedule `name`: the 128-bit xxh3 of its
/// [`slot_key`], as 32 lowercase hex digits. Every server derives the same id, so a
/// slot fired twice is one job.
pub fn slot_job_id(name: &str, slot: DateTime<Utc>) -> String {
    format!(
        "{:032x}",
        xxhash_rust::xxh3::xxh3_128(slot_key(name, slot).as_bytes())
    )
}

#[cfg(test)]
mod tests;
