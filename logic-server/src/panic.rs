//! Panics in handlers: caught by the server and logged once, with the request.
//!
//! A process's panic hook (Keelson's binaries install one) asks [`caught`] first:
//! when the panic happens while the server polls a handler, the server catches it
//! and answers 500, so the hook only leaves the message and location here and
//! prints nothing; the server then logs one line with the handler, the request id,
//! the message and the location.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

thread_local! {
    /// Set while this thread polls a handler whose panics the server catches.
    static CATCHING: Cell<bool> = const { Cell::new(false) };
    /// The location of the last panic caught on this thread.
    static LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// A panic's message, from its payload.
pub fn message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic".to_owned())
}

/// For a panic hook: whether this panic happens in a handler the server catches
/// (then its location is kept for the server's log line, and the hook should print
/// nothing).
pub fn caught(_message: &str, location: &str) -> bool {
    if !CATCHING.with(Cell::get) {
        return false;
    }
    LOCATION.with(|l| *l.borrow_mut() = Some(location.to_owned()));
    true
}

/// The location of the panic just caught on this thread, if a hook left it.
pub(crate) fn take_location() -> Option<String> {
    LOCATION.with(|l| l.borrow_mut().take())
}

/// Polls `F` with [`caught`] answering yes.
pub(crate) struct Catching<F>(pub(crate) F);

impl<F: Future + Unpin> Future for Catching<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let before = CATCHING.with(|c| c.replace(true));
        let polled = Pin::new(&mut self.0).poll(cx);
        CATCHING.with(|c| c.set(before));
        polled
    }
}
