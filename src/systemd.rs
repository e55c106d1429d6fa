//! systemd readiness: what a process under a `Type=notify` unit tells its service
//! manager (the sd-notify protocol, through the `sd-notify` crate).
//!
//! * `READY=1` once the process does what it is for: a logic server after its
//!   context join, when it consumes its queue; a gateway once its transport is up
//!   and it listens. `systemctl start` and `restart` return then, so a rolling
//!   upgrade waits for nothing else.
//! * `STOPPING=1` when the shutdown begins (the drain).
//! * `WATCHDOG=1` every half of `WATCHDOG_USEC` (`WatchdogSec=` of the unit), from a
//!   task of the process's runtime: a runtime that no longer runs its tasks (blocked
//!   workers, a deadlock) stops the pings, and systemd restarts the process.
//!
//! Without `NOTIFY_SOCKET` in the environment every call here does nothing. A
//! notification that cannot be sent is logged at debug level and otherwise ignored:
//! readiness is an aid to the service manager, never a reason to stop serving.

use sd_notify::NotifyState;
use std::time::Duration;

/// Tell the service manager the process is ready, with `status` as its status
/// line (`systemctl status` shows it).
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tell the service manager the process is stopping (draining).
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// When the service manager asks for a watchdog (`WATCHDOG_USEC`, for this process
/// if `WATCHDOG_PID` is set), ping it at half the interval from a task of the
/// current runtime, for as long as the runtime runs. Must be called inside the
/// runtime. The pings stop when the returned [`Watchdog`] is dropped.
pub fn spawn_watchdog() -> Option<Watchdog> {
    let interval = sd_notify::watchdog_enabled()?;
    // systemd's own advice (sd_watchdog_enabled(3)): ping at half the interval.
    let every = (interval / 2).max(Duration::from_millis(1));
    tracing::info!(
        interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
        "systemd watchdog on"
    );
    Some(Watchdog(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        // A runtime that fell behind pings once, not in a burst: the pings say it
        // runs now, not that it ran then.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    })))
}

/// The watchdog's ping task, stopped when dropped (the mesh stopped, or failed to
/// start): a process that no longer serves must not tell systemd it is alive.
#[derive(Debug)]
pub struct Watchdog(tokio::task::JoinHandle<()>);

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "cannot notify the service manager");
    }
}
