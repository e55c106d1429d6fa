//! The intake window of a consumer: how many deliveries may be unsettled at once.
//!
//! A semaphore with one permit per place in the window; each delivery handed out holds
//! one until it is settled. The window can shrink while deliveries are out: the
//! places it loses are taken back as their deliveries settle (a debt paid before any
//! new delivery is handed out), so the limit holds from the moment it is set.

use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug)]
pub(crate) struct Window {
    permits: Arc<Semaphore>,
    /// The prefetch given at `consume`: the window never exceeds it.
    cap: u16,
    size: u16,
    /// Places removed from the window whose permits are still held by deliveries.
    debt: usize,
}

impl Window {
    pub(crate) fn new(cap: u16) -> Self {
        let cap = cap.max(1);
        Self {
            permits: Arc::new(Semaphore::new(usize::from(cap))),
            cap,
            size: cap,
            debt: 0,
        }
    }

    pub(crate) fn size(&self) -> u16 {
        self.size
    }

    /// Set the window to `size`, clamped to `1..=cap`; returns the size set.
    pub(crate) fn resize(&mut self, size: u16) -> u16 {
        let size = size.clamp(1, self.cap);
        if size > self.size {
            let grow = usize::from(size - self.size);
            let cancelled = grow.min(self.debt);
            self.debt -= cancelled;
            self.permits.add_permits(grow - cancelled);
        } else if size < self.size {
            let shrink = usize::from(self.size - size);
            let forgotten = self.permits.forget_permits(shrink);
            self.debt += shrink - forgotten;
        }
        self.size = size;
        size
    }

    /// Wait until no delivery is out (every place in the window is free); `None` if
    /// the semaphore was closed. Cancel-safe.
    #[cfg_attr(not(feature = "amqp"), allow(dead_code))]
    pub(crate) async fn idle(&mut self) -> Option<()> {
        while self.debt > 0 {
            self.permits.clone().acquire_owned().await.ok()?.forget();
            self.debt -= 1;
        }
        drop(self.permits.acquire_many(u32::from(self.size)).await.ok()?);
        Some(())
    }

    /// A place for the next delivery, once one is free; `None` if the semaphore was
    /// closed. Cancel-safe.
    pub(crate) async fn acquire(&mut self) -> Option<OwnedSemaphorePermit> {
        while self.debt > 0 {
            self.permits.clone().acquire_owned().await.ok()?.forget();
            self.debt -= 1;
        }
        self.permits.clone().acquire_owned().await.ok()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// `n` deliveries out.
    fn hold(w: &Window, n: usize) -> Vec<OwnedSemaphorePermit> {
        (0..n)
            .map(|_| w.permits.clone().try_acquire_owned().unwrap())
            .collect()
    }

    #[tokio::test]
    async fn a_shrunk_window_takes_places_back_as_deliveries_settle() {
        let mut w = Window::new(4);
        let held = hold(&w, 3);
        assert_eq!(w.resize(2), 2);
        // The one free place is gone; the other is owed by a delivery out.
        assert_eq!(w.permits.available_permits(), 0);
        assert_eq!(w.debt, 1);
        let mut held = held.into_iter();
        drop(held.next());
        // The settled place pays the debt: still nothing to hand out.
        let next = tokio::time::timeout(std::time::Duration::from_millis(20), w.acquire()).await;
        assert!(next.is_err(), "window of 2 with 2 deliveries out must wait");
        assert_eq!(w.debt, 0);
        drop(held.next());
        let p = w.acquire().await.expect("a place");
        drop(p);
        assert_eq!(w.resize(9), 4, "clamped to the cap");
        assert_eq!(w.permits.available_permits(), 3);
        assert_eq!(w.resize(0), 1, "at least one");
    }

    #[tokio::test]
    async fn idle_waits_for_every_delivery_out_to_settle() {
        let mut w = Window::new(4);
        let mut held = hold(&w, 3);
        w.resize(2);
        let wait = tokio::time::timeout(std::time::Duration::from_millis(20), w.idle()).await;
        assert!(wait.is_err(), "three deliveries out");
        held.truncate(1);
        let wait = tokio::time::timeout(std::time::Duration::from_millis(20), w.idle()).await;
        assert!(wait.is_err(), "one delivery out");
        drop(held);
        assert_eq!(w.idle().await, Some(()));
        assert_eq!(
            w.permits.available_permits(),
            2,
            "the window of two is whole"
        );
    }

    #[tokio::test]
    async fn growing_cancels_debt_first() {
        let mut w = Window::new(4);
        let held = hold(&w, 4);
        w.resize(1);
        assert_eq!(w.debt, 3);
        w.resize(3);
        assert_eq!(w.debt, 1);
        assert_eq!(w.permits.available_permits(), 0);
        drop(held);
        let first = w.acquire().await.unwrap();
        let second = w.acquire().await.unwrap();
        assert!(
            w.permits.clone().try_acquire_owned().is_ok(),
            "3 places: one still free"
        );
        drop((first, second));
    }
}
