//! Typed broadcast channels: one envelope type per fanout channel, encoded on
//! publish and decoded on receipt in one place, instead of a subscribe-and-decode
//! loop at every use.
//!
//! ```
//! use keelson_protocol::topic::HEARTBEATS;
//! use keelson_protocol::transport::memory::MemoryTransport;
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let transport = MemoryTransport::new();
//! let mut heartbeats = HEARTBEATS.subscribe(&transport).await.unwrap();
//! // ... a logic server publishes with `HEARTBEATS.publish(&transport, &heartbeat)`;
//! // `heartbeats.next().await` gives each one decoded, or `None` once closed.
//! # drop(heartbeats);
//! # }
//! ```

use crate::codec::{EncodeError, decode, encode};
use crate::context::{CONTEXT_CHANNEL, ContextDelta};
use crate::control::{CONTROL_CHANNEL, Heartbeat};
use crate::envelope::Envelope;
use crate::transport::{Message, Subscription, Transport, TransportError};
use bytes::Bytes;
use std::fmt;
use std::marker::PhantomData;

/// A fanout channel that carries envelopes of type `T`.
pub struct Topic<T> {
    channel: &'static str,
    _message: PhantomData<fn() -> T>,
}

/// Heartbeats of logic servers, on [`CONTROL_CHANNEL`].
pub const HEARTBEATS: Topic<Heartbeat> = Topic::new(CONTROL_CHANNEL);

/// Context deltas (and barrier markers), on [`CONTEXT_CHANNEL`].
pub const CONTEXT_DELTAS: Topic<ContextDelta> = Topic::new(CONTEXT_CHANNEL);

impl<T> fmt::Debug for Topic<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Topic").field(&self.channel).finish()
    }
}

/// Why a message could not be published.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The envelope could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The transport refused or could not carry it.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

impl<T: Envelope> Topic<T> {
    /// The topic on fanout channel `channel`.
    pub const fn new(channel: &'static str) -> Self {
        Self {
            channel,
            _message: PhantomData,
        }
    }

    /// The fanout channel's name.
    pub fn channel(&self) -> &'static str {
        self.channel
    }

    /// Encode `message` for [`Topic::publish_encoded`] (to publish the same bytes again).
    pub fn encode(&self, message: &T) -> Result<Bytes, EncodeError> {
        encode(message).map(Bytes::from)
    }

    /// Publish `message` to every current subscriber.
    pub async fn publish(
        &self,
        transport: &dyn Transport,
        message: &T,
    ) -> Result<(), PublishError> {
        let payload = self.encode(message)?;
        Ok(self.publish_encoded(transport, payload).await?)
    }

    /// Publish bytes made by [`Topic::encode`].
    pub async fn publish_encoded(
        &self,
        transport: &dyn Transport,
        payload: Bytes,
    ) -> Result<(), TransportError> {
        transport
            .broadcast(self.channel, Message::new(payload))
            .await
    }

    /// Subscribe: every message published after this returns is received.
    pub async fn subscribe(
        &self,
        transport: &dyn Transport,
    ) -> Result<Subscriber<T>, TransportError> {
        Ok(Subscriber {
            inner: transport.subscribe(self.channel).await?,
            channel: self.channel,
            _message: PhantomData,
        })
    }
}

/// The receiving end of a [`Topic`].
pub struct Subscriber<T> {
    inner: Box<dyn Subscription>,
    channel: &'static str,
    _message: PhantomData<fn() -> T>,
}

impl<T> fmt::Debug for Subscriber<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Subscriber").field(&self.channel).finish()
    }
}

impl<T: Envelope> Subscriber<T> {
    /// The next message that decodes (one that does not, from a peer of another
    /// major version or a stranger, is logged at debug level and skipped); `None`
    /// once the transport is closed. Cancel-safe.
    pub async fn next(&mut self) -> Option<T> {
        loop {
            let message = self.inner.next().await?;
            match decode::<T>(&message.payload) {
                Ok(m) => return Some(m),
                Err(e) => tracing::debug!(
                    channel = self.channel,
                    error = %e,
                    "ignoring an undecodable {}",
                    T::KIND
                ),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::transport::memory::MemoryTransport;
    use crate::version::ProtocolVersion;

    #[tokio::test]
    async fn published_envelopes_arrive_decoded_and_garbage_is_skipped() {
        let t = MemoryTransport::new();
        let mut sub = CONTEXT_DELTAS.subscribe(&t).await.unwrap();
        t.broadcast(CONTEXT_CHANNEL, Message::new(&b"\xc1 garbage"[..]))
            .await
            .unwrap();
        let delta = ContextDelta {
            v: ProtocolVersion::CURRENT,
            origin: "a/1".into(),
            ops: Vec::new(),
            marker: None,
            seq: Some(7),
            trace: None,
        };
        CONTEXT_DELTAS.publish(&t, &delta).await.unwrap();
        assert_eq!(sub.next().await, Some(delta));
    }
}
