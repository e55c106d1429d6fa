//! The governor under paused time: pauses above the high mark, resumes below the low
//! mark, does not flap between them, and respects the minimum pause.

#![allow(clippy::unwrap_used)]

use super::*;

fn config() -> GovernorConfig {
    GovernorConfig {
        smoothing: 1.0, // raw samples, so each test states loads directly
        high_watermark: 0.8,
        low_watermark: 0.5,
        min_pause_ms: 1000,
        ..GovernorConfig::default()
    }
}

const STEP: Duration = Duration::from_millis(500);

#[tokio::test(start_paused = true)]
async fn pauses_above_the_high_mark_and_resumes_below_the_low_mark() {
    let mut g = Governor::new(config());
    assert_eq!(g.observe(0.7, Instant::now()), None);
    assert_eq!(g.observe(0.81, Instant::now()), Some(Transition::Pause));
    assert!(g.is_paused());
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(
        g.observe(0.6, Instant::now()),
        None,
        "0.6 is not below the low mark"
    );
    assert_eq!(g.observe(0.49, Instant::now()), Some(Transition::Resume));
    assert!(!g.is_paused());
}

#[tokio::test(start_paused = true)]
async fn load_oscillating_between_the_marks_does_not_flap() {
    let mut g = Governor::new(config());
    let mut transitions = Vec::new();
    for i in 0..40 {
        let load = if i % 2 == 0 { 0.55 } else { 0.79 };
        if let Some(t) = g.observe(load, Instant::now()) {
            transitions.push(t);
        }
        tokio::time::advance(STEP).await;
    }
    assert!(transitions.is_empty(), "{transitions:?}");
    // Once paused, the same oscillation keeps it paused.
    assert_eq!(g.observe(0.9, Instant::now()), Some(Transition::Pause));
    for i in 0..40 {
        let load = if i % 2 == 0 { 0.55 } else { 0.79 };
        assert_eq!(g.observe(load, Instant::now()), None);
        tokio::time::advance(STEP).await;
    }
    assert!(g.is_paused());
}

#[tokio::test(start_paused = true)]
async fn the_minimum_pause_is_respected() {
    let mut g = Governor::new(config());
    assert_eq!(g.observe(0.95, Instant::now()), Some(Transition::Pause));
    tokio::time::advance(Duration::from_millis(999)).await;
    assert_eq!(
        g.observe(0.0, Instant::now()),
        None,
        "resumed before min_pause_ms"
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(g.observe(0.0, Instant::now()), Some(Transition::Resume));
}

#[tokio::test(start_paused = true)]
async fn smoothing_ignores_a_single_spike() {
    let mut g = Governor::new(GovernorConfig {
        smoothing: 0.3,
        ..config()
    });
    for _ in 0..10 {
        assert_eq!(g.observe(0.3, Instant::now()), None);
    }
    assert_eq!(g.observe(1.0, Instant::now()), None, "one spike paused it");
    let mut paused = false;
    for _ in 0..10 {
        paused |= g.observe(1.0, Instant::now()) == Some(Transition::Pause);
    }
    assert!(paused, "sustained load did not pause it");
}

#[tokio::test(start_paused = true)]
async fn a_disabled_governor_measures_but_never_pauses() {
    let mut g = Governor::new(GovernorConfig {
        enabled: false,
        ..config()
    });
    assert_eq!(g.observe(1.0, Instant::now()), None);
    assert!((g.load() - 1.0).abs() < f64::EPSILON);
}

#[test]
fn parts_combine_as_configured_and_bad_marks_are_refused() {
    let c = GovernorConfig::default();
    assert!(
        (c.combine(0.2, 0.7, 0.99) - 0.2).abs() < 1e-9,
        "busy ratio alone by default"
    );
    let c = GovernorConfig {
        use_process_cpu: true,
        ..GovernorConfig::default()
    };
    assert!((c.combine(0.2, 0.7, 0.99) - 0.7).abs() < 1e-9);
    let c = GovernorConfig {
        use_system_cpu: true,
        ..GovernorConfig::default()
    };
    assert!((c.combine(0.2, 0.7, 0.99) - 0.99).abs() < 1e-9);
    let bad = GovernorConfig {
        low_watermark: 0.9,
        high_watermark: 0.8,
        ..GovernorConfig::default()
    };
    assert!(bad.validate().unwrap_err().contains("low_watermark"));
}
