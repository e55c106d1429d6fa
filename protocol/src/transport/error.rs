//! Transport errors. Distinct types so that each maps to its own HTTP status and
//! metric at the gateway.

/// A transport-level failure.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The transport is not connected to its broker right now.
    #[error("transport disconnected: {0}")]
    Disconnected(String),
    /// The transport was closed.
    #[error("transport closed")]
    Closed,
    /// A queue or service that does not exist was named.
    #[error("unknown service queue `{0}`")]
    UnknownService(String),
    /// The broker refused an operation.
    #[error("broker refused the operation: {0}")]
    Refused(String),
}

/// Why a request got no reply.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// No queue is bound for the route: nobody serves that handler.
    #[error("no service is bound for route `{0}`")]
    Unroutable(String),
    /// No reply arrived before the deadline.
    #[error("no reply before the deadline")]
    Timeout,
    /// The transport cannot carry the request now.
    #[error("transport unavailable: {0}")]
    Unavailable(String),
}

impl From<TransportError> for RequestError {
    fn from(e: TransportError) -> Self {
        RequestError::Unavailable(e.to_string())
    }
}
