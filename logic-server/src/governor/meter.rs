//! The busy ratio: the integral of requests in flight over time, divided by the
//! wall time and the concurrency slots.

use std::sync::Mutex;
use tokio::time::Instant;

/// Measures how much of a server's handler capacity is in use.
#[derive(Debug)]
pub(crate) struct BusyMeter {
    slots: f64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    in_flight: u32,
    since: Instant,
    window_start: Instant,
    /// Slot-seconds spent in handlers since `window_start`.
    area: f64,
}

impl State {
    fn advance(&mut self, now: Instant) {
        self.area += f64::from(self.in_flight) * now.duration_since(self.since).as_secs_f64();
        self.since = now;
    }
}

impl BusyMeter {
    pub(crate) fn new(slots: u16) -> Self {
        let now = Instant::now();
        Self {
            slots: f64::from(slots.max(1)),
            state: Mutex::new(State {
                in_flight: 0,
                since: now,
                window_start: now,
                area: 0.0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Plain arithmetic under the lock: a poisoned lock still holds valid numbers.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A request entered a handler.
    pub(crate) fn enter(&self) {
        let mut s = self.lock();
        s.advance(Instant::now());
        s.in_flight += 1;
    }

    /// A request left its handler.
    pub(crate) fn exit(&self) {
        let mut s = self.lock();
        s.advance(Instant::now());
        s.in_flight = s.in_flight.saturating_sub(1);
    }

    /// The busy ratio since the previous call, in 0..=1; starts a new window.
    pub(crate) fn take(&self) -> f64 {
        let now = Instant::now();
        let mut s = self.lock();
        s.advance(now);
        let wall = now.duration_since(s.window_start).as_secs_f64();
        let ratio = if wall > 0.0 {
            s.area / (wall * self.slots)
        } else {
            0.0
        };
        s.area = 0.0;
        s.window_start = now;
        ratio.clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn half_the_slots_busy_half_the_time_is_a_quarter() {
        let m = BusyMeter::new(2);
        m.take();
        m.enter();
        tokio::time::advance(Duration::from_millis(500)).await;
        m.exit();
        tokio::time::advance(Duration::from_millis(500)).await;
        let r = m.take();
        assert!((r - 0.25).abs() < 1e-6, "{r}");
        // A request still running counts up to now.
        m.enter();
        m.enter();
        tokio::time::advance(Duration::from_millis(1000)).await;
        assert!((m.take() - 1.0).abs() < 1e-6);
    }
}
