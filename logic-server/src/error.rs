//! [`Error`]: what a handler function returns when it fails, so that `?` works on any
//! error.
//!
//! A [`HandlerError`] keeps its status (400, 401, 404, ...); a [`ContextError`] maps
//! as the context API documents; anything else (an I/O error, a database driver's
//! error, an `anyhow::Error`) is a failure of the handler: the caller gets a generic
//! 500 and the cause, with its chain, goes to the log. Like `anyhow::Error`, this type
//! does not implement `std::error::Error` itself, which is what lets it convert from
//! every type that does.

use crate::context::ContextError;
use crate::handler::HandlerError;
use std::fmt;

/// A handler's failure: a [`HandlerError`] or a foreign error (a 500).
pub struct Error {
    inner: HandlerError,
}

impl Error {
    /// The status, code and message this failure answers with.
    pub fn into_handler_error(self) -> HandlerError {
        self.inner
    }

    /// A 500 whose `cause` is logged, not shown.
    pub fn internal(cause: impl fmt::Display) -> Self {
        Self {
            inner: HandlerError::internal(cause.to_string()),
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.inner, f)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner, f)
    }
}

impl<E> From<E> for Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn from(error: E) -> Self {
        let any: &(dyn std::error::Error + 'static) = &error;
        if let Some(e) = any.downcast_ref::<HandlerError>() {
            return Self { inner: e.clone() };
        }
        if let Some(e) = any.downcast_ref::<ContextError>() {
            return Self {
                inner: HandlerError::from(e.clone()),
            };
        }
        // A foreign error: the whole chain of causes goes to the log.
        let mut cause = error.to_string();
        let mut source = error.source();
        while let Some(s) = source {
            cause.push_str(": ");
            cause.push_str(&s.to_string());
            source = s.source();
        }
        Self::internal(cause)
    }
}

impl From<Error> for HandlerError {
    fn from(e: Error) -> Self {
        e.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("pool exhausted")]
    struct Pool(#[source] std::io::Error);

    #[test]
    fn handler_errors_keep_their_status_and_foreign_ones_are_internal_with_their_chain() {
        let e: Error = HandlerError::bad_request("no").into();
        assert_eq!(
            e.into_handler_error(),
            HandlerError::BadRequest("no".into())
        );
        let e: Error = Pool(std::io::Error::other("socket closed")).into();
        assert_eq!(
            e.into_handler_error(),
            HandlerError::Internal("pool exhausted: socket closed".into())
        );
        let e: Error = ContextError::NotANumber { key: "k".into() }.into();
        assert!(matches!(e.into_handler_error(), HandlerError::Conflict(_)));
    }
}
