//! The Rust client API: call handlers over a transport without HTTP.
//!
//! For services written in Rust that sit beside the mesh (batch jobs, other
//! services, benchmarks), a [`Client`] does what a gateway does minus HTTP: it
//! builds the [`Request`] envelope, sends it on the transport, and decodes the
//! [`Reply`]. It is trusted like a gateway: the user it names is believed.
//!
//! ```
//! # async fn demo(transport: std::sync::Arc<dyn keelson_protocol::Transport>) {
//! use keelson_protocol::client::Client;
//! use std::time::Duration;
//!
//! let client = Client::new(transport);
//! let reply = client.call("echo", br#"{"hi":1}"#.to_vec(), None, Duration::from_secs(5)).await;
//! # let _ = reply;
//! # }
//! ```

use crate::envelope::{Reply, Request};
use crate::transport::{Message, RequestError, Transport};
use crate::{DecodeError, EncodeError, decode, encode};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

/// Why a call produced no [`Reply`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// The transport could not deliver the request or bring back the reply.
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The request could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The reply could not be decoded.
    #[error("undecodable reply: {0}")]
    Decode(#[from] DecodeError),
}

/// Calls handlers over a transport. Cheap to clone and to share between tasks.
#[derive(Debug, Clone)]
pub struct Client {
    transport: Arc<dyn Transport>,
    prefix: Arc<str>,
    counter: Arc<AtomicU64>,
}

impl Client {
    /// A client sending on `transport`.
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Self {
            transport,
            prefix: format!("c{:x}-{:x}", std::process::id(), nanos & 0xffff_ffff).into(),
            counter: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Call `handler` with the JSON `body` for `user` (or anonymously), waiting at
    /// most `timeout`. A reply with a failure status is still `Ok`: look at
    /// [`Reply::status`].
    pub async fn call(
        &self,
        handler: &str,
        body: Vec<u8>,
        user: Option<String>,
        timeout: Duration,
    ) -> Result<Reply, CallError> {
        let id = format!(
            "{}-{}",
            self.prefix,
            self.counter.fetch_add(1, Ordering::Relaxed)
        );
        let deadline_unix_ms = SystemTime::now()
            .checked_add(timeout)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(u64::MAX, |d| {
                u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
            });
        let mut request = Request::new(id, handler, body, deadline_unix_ms);
        request.user = user;
        self.send(&request, Instant::now() + timeout).await
    }

    /// Send a request built by the caller (its id, user, headers, deadline), waiting
    /// until `deadline`.
    pub async fn send(&self, request: &Request, deadline: Instant) -> Result<Reply, CallError> {
        let payload = encode(request)?;
        let bytes = self
            .transport
            .request(
                &request.handler,
                message_with_trace(payload, request),
                deadline,
            )
            .await?;
        Ok(decode(&bytes)?)
    }
}

/// The message of `request`: its trace context (`traceparent`, `tracestate`) in the
/// message headers too, as OpenTelemetry's messaging conventions place it.
fn message_with_trace(payload: Vec<u8>, request: &Request) -> Message {
    let mut message = Message::new(payload);
    for name in ["traceparent", "tracestate"] {
        if let Some(value) = request.headers.get(name) {
            message.headers.insert(name.to_owned(), value.clone());
        }
    }
    message
}
