//! [`Schedule::due`]: the misfire policies, the catch-up window, the bounds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::{config, utc, with};
use crate::config::Misfire;
use crate::schedules::plan::{Due, MAX_FIRED_SLOTS, ONE_SECOND};
use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};

fn fire(due: &Due) -> Vec<String> {
    due.fire
        .iter()
        .map(|s| s.to_rfc3339_opts(SecondsFormat::Secs, true))
        .collect()
}

#[test]
fn due_without_a_watermark_starts_from_now() {
    let s = with("*/10 * * * * *", Misfire::FireAll, 300);
    // Now is a slot (inside its second): fired.
    let due = s.due(None, utc("2026-05-01T12:00:10.300Z"));
    assert_eq!(fire(&due), ["2026-05-01T12:00:10Z"]);
    assert_eq!((due.skipped, due.caught_up), (0, 0));
    // Not a slot: nothing, and nothing from before.
    assert_eq!(s.due(None, utc("2026-05-01T12:00:11Z")), Due::default());
    assert_eq!(s.due(None, utc("2026-05-01T12:00:19.999Z")), Due::default());
}

#[test]
fn due_table() {
    const EVERY_10S: &str = "*/10 * * * * *";
    struct Case {
        what: &'static str,
        cron: &'static str,
        misfire: Misfire,
        window_s: u64,
        last: &'static str,
        now: &'static str,
        fire: Vec<&'static str>,
        skipped: u64,
        caught_up: u64,
    }
    let case =
        |what, misfire, window_s, last, now, fire: &[&'static str], skipped, caught_up| Case {
            what,
            cron: EVERY_10S,
            misfire,
            window_s,
            last,
            now,
            fire: fire.to_vec(),
            skipped,
            caught_up,
        };
    let mut cases = Vec::new();
    for misfire in [Misfire::FireAll, Misfire::FireOnce, Misfire::Skip] {
        cases.extend([
            case(
                "nothing new",
                misfire,
                300,
                "2026-05-01T12:00:00Z",
                "2026-05-01T12:00:09.900Z",
                &[],
                0,
                0,
            ),
            case(
                "on time",
                misfire,
                300,
                "2026-05-01T12:00:00Z",
                "2026-05-01T12:00:10.200Z",
                &["2026-05-01T12:00:10Z"],
                0,
                0,
            ),
            case(
                "one second late is on time",
                misfire,
                300,
                "2026-05-01T12:00:00Z",
                "2026-05-01T12:00:11Z",
                &["2026-05-01T12:00:10Z"],
                0,
                0,
            ),
            case(
                "a watermark ahead of the clock",
                misfire,
                300,
                "2026-05-01T12:00:20Z",
                "2026-05-01T12:00:10Z",
                &[],
                0,
                0,
            ),
        ]);
    }
    cases.extend([
        // 12:00:10 is 1.5 s old: missed.
        case(
            "missed, fire_all",
            Misfire::FireAll,
            300,
            "2026-05-01T12:00:00Z",
            "2026-05-01T12:00:11.500Z",
            &["2026-05-01T12:00:10Z"],
            0,
            1,
        ),
        case(
            "missed, fire_once",
            Misfire::FireOnce,
            300,
            "2026-05-01T12:00:00Z",
            "2026-05-01T12:00:11.500Z",
            &["2026-05-01T12:00:10Z"],
            0,
            1,
        ),
        case(
            "missed, skip",
            Misfire::Skip,
            300,
            "2026-05-01T12:00:00Z",
            "2026-05-01T12:00:11.500Z",
            &[],
            1,
            0,
        ),
        // An hour down: 360 slots, 12:00:00 on time, 29 missed within 5 minutes
        // (11:55:10 to 11:59:50; 11:55:00 is 300.5 s old), 330 older.
        case(
            "an hour down, fire_all",
            Misfire::FireAll,
            300,
            "2026-05-01T11:00:00Z",
            "2026-05-01T12:00:00.500Z",
            &[],
            330,
            29,
        ),
        case(
            "an hour down, fire_once",
            Misfire::FireOnce,
            300,
            "2026-05-01T11:00:00Z",
            "2026-05-01T12:00:00.500Z",
            &["2026-05-01T11:59:50Z", "2026-05-01T12:00:00Z"],
            358,
            1,
        ),
        case(
            "an hour down, skip",
            Misfire::Skip,
            300,
            "2026-05-01T11:00:00Z",
            "2026-05-01T12:00:00.500Z",
            &["2026-05-01T12:00:00Z"],
            359,
            0,
        ),
        // The window holds a slot exactly its length old.
        case(
            "the window's edge",
            Misfire::FireAll,
            30,
            "2026-05-01T11:00:00Z",
            "2026-05-01T12:00:00Z",
            &[
                "2026-05-01T11:59:30Z",
                "2026-05-01T11:59:40Z",
                "2026-05-01T11:59:50Z",
                "2026-05-01T12:00:00Z",
            ],
            356,
            3,
        ),
        // The newest missed slot is outside the window: fire_once fires nothing
        // but the slot due now.
        case(
            "fire_once, all outside the window",
            Misfire::FireOnce,
            5,
            "2026-05-01T11:00:00Z",
            "2026-05-01T12:00:00Z",
            &["2026-05-01T12:00:00Z"],
            359,
            0,
        ),
        case(
            "fire_once, all outside, none on time",
            Misfire::FireOnce,
            4,
            "2026-05-01T11:00:00Z",
            "2026-05-01T12:00:05Z",
            &[],
            360,
            0,
        ),
        // A window of 0 catches nothing up, even a slot one second old.
        case(
            "a window of 0",
            Misfire::FireAll,
            0,
            "2026-05-01T11:59:40Z",
            "2026-05-01T12:00:01.500Z",
            &[],
            2,
            0,
        ),
    ]);
    cases.push(Case {
        what: "every second, one second late: the newest is on time, the other missed",
        cron: "* * * * * *",
        misfire: Misfire::FireAll,
        window_s: 0,
        last: "2026-05-01T11:59:59Z",
        now: "2026-05-01T12:00:01Z",
        fire: vec!["2026-05-01T12:00:01Z"],
        skipped: 1,
        caught_up: 0,
    });
    for c in cases {
        let s = with(c.cron, c.misfire, c.window_s);
        let due = s.due(Some(utc(c.last)), utc(c.now));
        let what = format!("{} ({:?})", c.what, c.misfire);
        if c.what.starts_with("an hour down, fire_all") {
            // 29 caught up and the one on time, oldest first.
            assert_eq!(due.fire.len(), 30, "{what}: {due:?}");
            assert_eq!(due.fire[0], utc("2026-05-01T11:55:10Z"), "{what}");
            assert_eq!(due.fire[29], utc("2026-05-01T12:00:00Z"), "{what}");
        } else {
            assert_eq!(fire(&due), c.fire, "{what}");
        }
        assert!(
            due.fire.windows(2).all(|w| w[0] < w[1]),
            "{what}: not in order"
        );
        assert_eq!(due.skipped, c.skipped, "{what}: skipped");
        assert_eq!(due.caught_up, c.caught_up, "{what}: caught up");
    }
}

#[test]
fn a_daily_schedule_catches_up_the_days_it_missed() {
    let mut c = config("nightly", "0 30 2 * * *", "Europe/Berlin");
    c.catch_up_window_s = 7 * 86_400;
    let s = c.build().unwrap();
    // Last fired on the 20th; back at noon on the 25th: the 21st to the 25th.
    let due = s.due(
        Some(utc("2026-03-20T01:30:00Z")),
        utc("2026-03-25T12:00:00Z"),
    );
    assert_eq!(
        fire(&due),
        [
            "2026-03-21T01:30:00Z",
            "2026-03-22T01:30:00Z",
            "2026-03-23T01:30:00Z",
            "2026-03-24T01:30:00Z",
            "2026-03-25T01:30:00Z"
        ]
    );
    assert_eq!((due.skipped, due.caught_up), (0, 5));
    // Over the spring change, its slot is 03:00 CEST.
    let due = s.due(
        Some(utc("2026-03-28T01:30:00Z")),
        utc("2026-03-29T01:00:00.200Z"),
    );
    assert_eq!(fire(&due), ["2026-03-29T01:00:00Z"]);
    assert_eq!((due.skipped, due.caught_up), (0, 0));
}

#[test]
fn at_most_ten_thousand_slots_fire_the_newest() {
    // Every second, a day's window, 20 000 s down: the newest 10 000 fire (the
    // on-time one last), the 10 000 before are skipped.
    let s = with("* * * * * *", Misfire::FireAll, 86_400);
    let now = utc("2026-05-01T12:00:00Z");
    let due = s.due(Some(now - TimeDelta::seconds(20_000)), now);
    assert_eq!(due.fire.len(), MAX_FIRED_SLOTS);
    assert_eq!(due.fire[0], now - TimeDelta::seconds(9_999));
    assert_eq!(due.fire.last(), Some(&now));
    assert!(due.fire.windows(2).all(|w| w[1] - w[0] == ONE_SECOND));
    assert_eq!((due.skipped, due.caught_up), (10_000, 9_999));
}

#[test]
fn a_long_outage_of_a_dense_schedule_is_counted_without_walking_it() {
    // Three days of every second is 259 200 slots, past the 100 000 looked at:
    // the oldest are estimated, exactly for a constant period.
    let now = utc("2026-05-01T12:00:00Z");
    let last = now - TimeDelta::days(3);
    for (misfire, window_s, fired) in [
        (Misfire::FireAll, 300, 301),
        (Misfire::FireAll, 10 * 86_400, MAX_FIRED_SLOTS as u64),
        (Misfire::FireOnce, 300, 2),
        (Misfire::Skip, 300, 1),
    ] {
        let s = with("* * * * * *", misfire, window_s);
        let started = std::time::Instant::now();
        let due = s.due(Some(last), now);
        let took = started.elapsed();
        assert_eq!(due.fire.len() as u64, fired, "{misfire:?} {window_s}");
        assert_eq!(due.fire.last(), Some(&now));
        assert_eq!(due.skipped + fired, 259_200, "{misfire:?} {window_s}");
        assert_eq!(due.caught_up, fired - 1);
        // Bounded work; generous for an unoptimised build on a busy machine.
        assert!(took < std::time::Duration::from_secs(20), "{took:?}");
    }
    // Ten days of every 5 seconds, from a slot: also exact.
    let s = with("*/5 * * * * *", Misfire::Skip, 300);
    let due = s.due(Some(now - TimeDelta::days(10)), now);
    assert_eq!(due.skipped + 1, 10 * 86_400 / 5);
}

#[test]
fn an_uneven_period_past_the_budget_is_estimated_closely() {
    // Every 7 s within each minute (0, 7, ..., 56): 9 a minute, not a constant
    // period; ten days is 129 600 slots, past the 100 000 looked at.
    let s = with("*/7 * * * * *", Misfire::Skip, 300);
    let now = utc("2026-05-01T12:00:00Z");
    let due = s.due(Some(now - TimeDelta::days(10)), now);
    assert_eq!(fire(&due), ["2026-05-01T12:00:00Z"]);
    let total = due.skipped + 1;
    assert!(total.abs_diff(129_600) <= 9, "{total}");
}

#[test]
fn extreme_times_and_windows_do_not_panic() {
    let s = with("* * * * * *", Misfire::FireAll, u64::MAX);
    let now = utc("2026-05-01T12:00:00Z");
    // The whole time line is in the window: the newest 10 000 fire.
    let due = s.due(Some(now - TimeDelta::days(400)), now);
    assert_eq!(due.fire.len(), MAX_FIRED_SLOTS);
    assert_eq!(due.fire.last(), Some(&now));
    // Past the year 5000 there are no slots.
    let far = DateTime::<Utc>::MAX_UTC;
    assert_eq!(s.next_after(far), None);
    assert_eq!(
        s.due(Some(utc("6000-01-01T00:00:00Z")), far),
        Due::default()
    );
    assert_eq!(s.due(None, far), Due::default());
    let due = s.due(Some(DateTime::<Utc>::MIN_UTC), now);
    assert_eq!(due.fire.last(), Some(&now));
}
