//! The wire contract of Keelson.
//!
//! Everything that crosses a process boundary is defined here and nowhere else:
//!
//! * [`envelope`]: the messages ([`Request`], [`Reply`]) and the protocol version
//!   each carries;
//! * [`codec`]: the one [`encode`]/[`decode`] pair (MessagePack with named fields),
//!   bounded so that untrusted bytes can never panic or exhaust the decoder;
//! * [`transport`]: the [`Transport`] trait family for the messaging patterns the
//!   mesh uses, and its implementations;
//! * [`trace`] (feature `trace`): the W3C trace context requests carry, and the
//!   OpenTelemetry spans continued from it.
//!
//! This crate never depends on HTTP or on the handler API: it is what handler
//! authors and peers written in other languages read.

pub mod client;
pub mod codec;
pub mod context;
pub mod control;
pub mod envelope;
pub mod idempotency;
pub mod job;
pub mod operator;
pub mod schedule;
pub mod topic;
#[cfg(feature = "trace")]
pub mod trace;
pub mod transport;
pub mod version;

pub use codec::{DecodeError, EncodeError, decode, encode, peek_id};
pub use envelope::{
    ErrorInfo, MAX_RESPONSE_HEADERS, Reply, ReplyStatus, Request, check_response_header,
};
pub use transport::{Transport, TransportConfig};
pub use version::ProtocolVersion;
