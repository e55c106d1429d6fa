#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use chrono::{NaiveDate, TimeZone};
use std::collections::BTreeMap;

mod due;

fn utc(at: &str) -> DateTime<Utc> {
    at.parse().unwrap()
}

fn config(name: &str, cron: &str, timezone: &str) -> ScheduleConfig {
    ScheduleConfig {
        name: name.to_owned(),
        cron: cron.to_owned(),
        timezone: timezone.to_owned(),
        handler: "report.build".to_owned(),
        body: serde_json::json!({}),
        misfire: Misfire::FireAll,
        catch_up_window_s: ScheduleConfig::DEFAULT_CATCH_UP_WINDOW_S,
        overlap: Overlap::Skip,
    }
}

fn schedule(cron: &str, timezone: &str) -> Schedule {
    config("test", cron, timezone).build().unwrap()
}

fn with(cron: &str, misfire: Misfire, window_s: u64) -> Schedule {
    let mut c = config("test", cron, "UTC");
    c.misfire = misfire;
    c.catch_up_window_s = window_s;
    c.build().unwrap()
}

/// Every slot in (`from`, `to`], by walking `next_after`.
fn slots(s: &Schedule, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let mut out = Vec::new();
    let mut t = from;
    while let Some(next) = s.next_after(t).filter(|n| *n <= to) {
        assert!(next > t, "{next} does not follow {t}");
        out.push(next);
        t = next;
    }
    out
}

fn berlin_midnight(y: i32, m: u32, d: u32) -> DateTime<Utc> {
    chrono_tz::Europe::Berlin
        .with_ymd_and_hms(y, m, d, 0, 0, 0)
        .unwrap()
        .with_timezone(&Utc)
}

#[test]
fn every_second() {
    let s = schedule("* * * * * *", "UTC");
    assert_eq!(
        s.next_after(utc("2026-05-01T12:00:00Z")),
        Some(utc("2026-05-01T12:00:01Z"))
    );
    // Slots are whole seconds, strictly after `after` even inside a second.
    assert_eq!(
        s.next_after(utc("2026-05-01T12:00:00.500Z")),
        Some(utc("2026-05-01T12:00:01Z"))
    );
    assert_eq!(
        s.next_after(utc("2026-05-01T11:59:59.999Z")),
        Some(utc("2026-05-01T12:00:00Z"))
    );
    // Across a minute, an hour, a day and a year.
    assert_eq!(
        s.next_after(utc("2026-12-31T23:59:59Z")),
        Some(utc("2027-01-01T00:00:00Z"))
    );
    let minute = slots(&s, utc("2026-05-01T12:00:00Z"), utc("2026-05-01T12:01:00Z"));
    assert_eq!(minute.len(), 60);
}

#[test]
fn every_five_seconds() {
    let s = schedule("*/5 * * * * *", "UTC");
    for (after, next) in [
        ("2026-05-01T12:00:00Z", "2026-05-01T12:00:05Z"),
        ("2026-05-01T12:00:03Z", "2026-05-01T12:00:05Z"),
        ("2026-05-01T12:00:04.999Z", "2026-05-01T12:00:05Z"),
        ("2026-05-01T12:00:55Z", "2026-05-01T12:01:00Z"),
        ("2026-05-01T12:00:57Z", "2026-05-01T12:01:00Z"),
    ] {
        assert_eq!(s.next_after(utc(after)), Some(utc(next)), "after {after}");
    }
    let hour = slots(&s, utc("2026-05-01T12:00:00Z"), utc("2026-05-01T13:00:00Z"));
    assert_eq!(hour.len(), 720);
    assert!(
        hour.windows(2)
            .all(|w| w[1] - w[0] == TimeDelta::seconds(5))
    );
}

#[test]
fn a_time_zone_shifts_the_slots() {
    let s = schedule("0 30 2 * * *", "America/New_York");
    // 02:30 EDT is 06:30 UTC.
    assert_eq!(
        s.next_after(utc("2026-07-01T00:00:00Z")),
        Some(utc("2026-07-01T06:30:00Z"))
    );
    assert_eq!(s.pattern(), "0 30 2 * * *");
    assert_eq!(s.timezone(), "America/New_York");
}

/// The slots of a daily 02:30 in Berlin from local midnight of `from` to local
/// midnight of `to`, counted per local date.
fn daily_per_local_date(
    from: (i32, u32, u32),
    to: (i32, u32, u32),
) -> BTreeMap<NaiveDate, Vec<DateTime<Utc>>> {
    let s = schedule("0 30 2 * * *", "Europe/Berlin");
    let mut per_date: BTreeMap<NaiveDate, Vec<DateTime<Utc>>> = BTreeMap::new();
    for slot in slots(
        &s,
        berlin_midnight(from.0, from.1, from.2),
        berlin_midnight(to.0, to.1, to.2),
    ) {
        let local = slot.with_timezone(&chrono_tz::Europe::Berlin).date_naive();
        per_date.entry(local).or_default().push(slot);
    }
    per_date
}

#[test]
fn a_daily_slot_fires_once_on_the_day_the_clock_jumps_forward() {
    // 2026-03-29 in Berlin: 02:00 CET is followed by 03:00 CEST, so 02:30 does
    // not exist; the slot is the first instant after the gap, 03:00 CEST.
    let per_date = daily_per_local_date((2026, 3, 27), (2026, 4, 1));
    let dates: Vec<String> = per_date.keys().map(|d| d.to_string()).collect();
    assert_eq!(
        dates,
        [
            "2026-03-27",
            "2026-03-28",
            "2026-03-29",
            "2026-03-30",
            "2026-03-31"
        ]
    );
    for (date, fired) in &per_date {
        assert_eq!(fired.len(), 1, "{date}: {fired:?}");
    }
    let at = |d: u32| per_date[&NaiveDate::from_ymd_opt(2026, 3, d).unwrap()][0];
    assert_eq!(at(28), utc("2026-03-28T01:30:00Z")); // 02:30 CET
    assert_eq!(at(29), utc("2026-03-29T01:00:00Z")); // 03:00 CEST
    assert_eq!(at(30), utc("2026-03-30T00:30:00Z")); // 02:30 CEST
}

#[test]
fn a_daily_slot_fires_once_on_the_day_the_clock_goes_back() {
    // 2026-10-25 in Berlin: 03:00 CEST is followed by 02:00 CET, so 02:30 happens
    // twice; the slot is the first, 02:30 CEST.
    let per_date = daily_per_local_date((2026, 10, 23), (2026, 10, 28));
    let dates: Vec<String> = per_date.keys().map(|d| d.to_string()).collect();
    assert_eq!(
        dates,
        [
            "2026-10-23",
            "2026-10-24",
            "2026-10-25",
            "2026-10-26",
            "2026-10-27"
        ]
    );
    for (date, fired) in &per_date {
        assert_eq!(fired.len(), 1, "{date}: {fired:?}");
    }
    let at = |d: u32| per_date[&NaiveDate::from_ymd_opt(2026, 10, d).unwrap()][0];
    assert_eq!(at(24), utc("2026-10-24T00:30:00Z")); // 02:30 CEST
    assert_eq!(at(25), utc("2026-10-25T00:30:00Z")); // 02:30 CEST, not 02:30 CET
    assert_eq!(at(26), utc("2026-10-26T01:30:00Z")); // 02:30 CET
}

#[test]
fn an_interval_pattern_keeps_real_time_across_both_changes() {
    // Every 30 minutes of the wall clock is every 30 minutes of real time on both
    // days: the wall-clock times in the gap do not happen, the repeated ones
    // happen twice.
    let s = schedule("0 */30 * * * *", "Europe/Berlin");
    for (from, to) in [
        ("2026-03-28T22:00:00Z", "2026-03-29T04:00:00Z"),
        ("2026-10-24T22:00:00Z", "2026-10-25T04:00:00Z"),
    ] {
        let all = slots(&s, utc(from), utc(to));
        assert_eq!(all.len(), 12, "{from}: {all:?}");
        assert!(
            all.windows(2)
                .all(|w| w[1] - w[0] == TimeDelta::minutes(30)),
            "{from}: {all:?}"
        );
    }
}

#[test]
fn a_list_of_hours_is_an_interval_pattern_across_the_changes() {
    // Not one fixed hour: croner treats `2,14` as an interval pattern, so 02:00
    // does not happen on the spring day and happens twice on the autumn day.
    let s = schedule("0 0 2,14 * * *", "Europe/Berlin");
    let spring = slots(
        &s,
        berlin_midnight(2026, 3, 29),
        berlin_midnight(2026, 3, 30),
    );
    assert_eq!(spring, [utc("2026-03-29T12:00:00Z")]);
    let autumn = slots(
        &s,
        berlin_midnight(2026, 10, 25),
        berlin_midnight(2026, 10, 26),
    );
    assert_eq!(
        autumn,
        [
            utc("2026-10-25T00:00:00Z"),
            utc("2026-10-25T01:00:00Z"),
            utc("2026-10-25T13:00:00Z")
        ]
    );
}

/// The slots do not depend on where a walk starts: from any instant, `next_after`
/// is the first of the slots enumerated from before it, across both changes, in
/// zones with whole-hour and half-hour shifts; and the backward search `due` takes
/// as a hint agrees with them.
#[test]
fn the_slots_are_the_same_from_any_starting_point() {
    let cases = [
        (
            "0 30 2 * * *",
            "Europe/Berlin",
            "2026-03-28T12:00:00Z",
            "2026-03-30T12:00:00Z",
        ),
        (
            "0 30 2 * * *",
            "Europe/Berlin",
            "2026-10-24T12:00:00Z",
            "2026-10-26T12:00:00Z",
        ),
        (
            "0 0 2 * * *",
            "Europe/Berlin",
            "2026-03-28T12:00:00Z",
            "2026-03-30T12:00:00Z",
        ),
        (
            "0 */20 * * * *",
            "Europe/Berlin",
            "2026-10-24T22:00:00Z",
            "2026-10-25T04:00:00Z",
        ),
        (
            "0 */20 * * * *",
            "Europe/Berlin",
            "2026-03-28T22:00:00Z",
            "2026-03-29T04:00:00Z",
        ),
        (
            "0 0 2,14 * * *",
            "Europe/Berlin",
            "2026-10-24T12:00:00Z",
            "2026-10-26T12:00:00Z",
        ),
        (
            "0 45 1 * * *",
            "Australia/Lord_Howe",
            "2026-04-04T00:00:00Z",
            "2026-04-07T00:00:00Z",
        ),
        (
            "0 15 2 * * *",
            "Australia/Lord_Howe",
            "2026-10-03T00:00:00Z",
            "2026-10-06T00:00:00Z",
        ),
        (
            "*/15 * 1 * * *",
            "America/New_York",
            "2026-11-01T04:00:00Z",
            "2026-11-01T08:00:00Z",
        ),
    ];
    for (cron, tz, from, to) in cases {
        let s = schedule(cron, tz);
        let (from, to) = (utc(from), utc(to));
        let all = slots(&s, from, to);
        assert!(!all.is_empty(), "{cron} {tz}");
        let mut t = from;
        while t < to {
            let expected = all.iter().find(|slot| **slot > t).copied();
            if let Some(expected) = expected {
                assert_eq!(s.next_after(t), Some(expected), "{cron} {tz} after {t}");
            }
            let before = all.iter().rev().find(|slot| **slot <= t).copied();
            if let Some(before) = before {
                assert_eq!(s.previous(t, true), Some(before), "{cron} {tz} at {t}");
            }
            t += TimeDelta::seconds(131);
        }
        for pair in all.windows(2) {
            assert_eq!(s.previous(pair[1], false), Some(pair[0]), "{cron} {tz}");
        }
    }
}

#[test]
fn slot_keys_and_job_ids() {
    let slot = utc("2026-03-29T00:30:00Z");
    assert_eq!(
        slot_key("nightly", slot),
        "sched:nightly:2026-03-29T00:30:00Z"
    );
    // A slot from a time zone's instant is keyed in UTC.
    let local = chrono_tz::Europe::Berlin
        .with_ymd_and_hms(2026, 3, 29, 3, 0, 0)
        .unwrap()
        .with_timezone(&Utc);
    assert_eq!(
        slot_key("nightly", local),
        "sched:nightly:2026-03-29T01:00:00Z"
    );

    let id = slot_job_id("nightly", slot);
    assert!(keelson_protocol::job::is_job_id(&id), "{id}");
    assert_eq!(
        id,
        format!(
            "{:032x}",
            xxhash_rust::xxh3::xxh3_128(b"sched:nightly:2026-03-29T00:30:00Z")
        )
    );
    // Pinned: ids must not change between releases, or a slot fired by an old
    // server and again by a new one would run twice.
    assert_eq!(id, PINNED_ID);
    assert_ne!(id, slot_job_id("nightly", slot + ONE_SECOND));
    assert_ne!(id, slot_job_id("weekly", slot));
    // Leading zeros are kept: every id is 32 digits.
    for n in 0..2000 {
        let id = slot_job_id("n", slot + TimeDelta::seconds(n));
        assert!(keelson_protocol::job::is_job_id(&id), "{id}");
    }
}

const PINNED_ID: &str = "c540afb524a119056bb11b4dba2bd7b8";

#[test]
fn a_good_config_builds() {
    let mut c = config("nightly-report_2", "0 30 2 * * *", "Europe/Berlin");
    c.body = serde_json::json!({"scope": "all"});
    c.misfire = Misfire::FireOnce;
    c.catch_up_window_s = 60;
    c.overlap = Overlap::Allow;
    let s = c.build().unwrap();
    assert_eq!(s.name, "nightly-report_2");
    assert_eq!(s.handler, "report.build");
    assert_eq!(s.body, serde_json::json!({"scope": "all"}));
    assert_eq!(s.misfire, Misfire::FireOnce);
    assert_eq!(s.catch_up_window, Duration::from_secs(60));
    assert_eq!(s.overlap, Overlap::Allow);
    // Names, nicknames and the other croner forms.
    for cron in [
        "0 0 9 * * MON-FRI",
        "@daily",
        "0 0 0 L * *",
        "0 0 12 * * 5#2",
        "0 0 0 29 2 *",
    ] {
        assert!(config("n", cron, "UTC").build().is_ok(), "{cron}");
    }
    assert_eq!(
        schedule("@daily", "UTC").next_after(utc("2026-05-01T12:00:00Z")),
        Some(utc("2026-05-02T00:00:00Z"))
    );
    let names = ["a", "0", "-", "_", &"x".repeat(MAX_NAME_LEN)];
    for name in names {
        assert!(config(name, "* * * * * *", "UTC").build().is_ok(), "{name}");
    }
}

#[test]
fn a_bad_config_names_the_key_and_what_was_expected() {
    let good = config("ok", "0 30 2 * * *", "UTC");
    let cases: Vec<(ScheduleConfig, &str, &str)> = vec![
        (
            config("n", "30 2 * * *", "UTC"),
            "logic_server.schedules[1].cron",
            "seconds field",
        ),
        (
            config("n", "0 30 2 * * * 2026", "UTC"),
            "logic_server.schedules[1].cron",
            "expected 6 fields",
        ),
        (
            config("n", "0 61 2 * * *", "UTC"),
            "logic_server.schedules[1].cron",
            "expected 6 fields",
        ),
        (
            config("n", "often", "UTC"),
            "logic_server.schedules[1].cron",
            "`often` is not a cron pattern",
        ),
        (
            config("n", "", "UTC"),
            "logic_server.schedules[1].cron",
            "expected 6 fields",
        ),
        (
            config("n", "0 0 0 31 4 *", "UTC"),
            "logic_server.schedules[1].cron",
            "matches no date",
        ),
        (
            config("n", "0 30 2 * * *", "Mars/Olympus"),
            "logic_server.schedules[1].timezone",
            "`Mars/Olympus` is not an IANA time zone",
        ),
        (
            config("n", "0 30 2 * * *", ""),
            "logic_server.schedules[1].timezone",
            "expected e.g. `UTC`",
        ),
        (
            config("Nightly", "0 30 2 * * *", "UTC"),
            "logic_server.schedules[1].name",
            "a-z, 0-9",
        ),
        (
            config("", "0 30 2 * * *", "UTC"),
            "logic_server.schedules[1].name",
            "1 to 64",
        ),
        (
            config("a.b", "0 30 2 * * *", "UTC"),
            "logic_server.schedules[1].name",
            "a-z, 0-9",
        ),
        (
            config(&"x".repeat(65), "0 30 2 * * *", "UTC"),
            "logic_server.schedules[1].name",
            "1 to 64",
        ),
        (
            config("ok", "0 30 2 * * *", "UTC"),
            "logic_server.schedules[1].name: `ok` is also the name of logic_server.schedules[0]",
            "unique",
        ),
        (
            ScheduleConfig {
                handler: " ".to_owned(),
                ..config("n", "0 30 2 * * *", "UTC")
            },
            "logic_server.schedules[1].handler",
            "expected the name of a handler",
        ),
    ];
    for (bad, key, expected) in cases {
        let err = build_schedules(&[good.clone(), bad.clone()]).unwrap_err();
        assert!(
            err.starts_with(&format!("{key}: ")) || err.starts_with(key),
            "{err}"
        );
        assert!(err.contains(key), "{err}");
        assert!(err.contains(expected), "{err}");
    }
    assert_eq!(build_schedules(&[]).unwrap(), Vec::new());
    assert_eq!(build_schedules(&[good]).unwrap().len(), 1);
}
