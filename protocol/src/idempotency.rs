//! Outcome records: how a logic server remembers what a keyed request did, so that a
//! redelivery of it, or a client's retry with the same key, is answered from the
//! record instead of running the handler again.
//!
//! A record lives in the replicated context of its **scope** (the verified user, or
//! [`ANONYMOUS_SCOPE`] for anonymous requests) as a value register under a key that
//! starts with [`RECORD_KEY_PREFIX`], so it travels in the same [`ContextDelta`] as
//! the handler's own writes: on every replica the effects and the outcome appear
//! together or not at all. Peers of protocol 1.0, which do not know records, store
//! and forward them as ordinary values.
//!
//! The value is an [`OutcomeRecord`] encoded like every envelope (MessagePack map with
//! named fields). Of two records under one key the later write wins, as for any value.
//!
//! [`ContextDelta`]: crate::context::ContextDelta

use crate::envelope::{Envelope, ErrorInfo, ReplyStatus};
use crate::version::ProtocolVersion;
use serde::{Deserialize, Serialize};

/// Every record key starts with this; no handler can read or write such a key.
pub const RECORD_KEY_PREFIX: &str = "\u{0}keelson.idem/";

/// The scope of records of anonymous requests (a user id no token can carry).
pub const ANONYMOUS_SCOPE: &str = "\u{0}keelson.anonymous";

/// The record key of a request: `c/{key}` for a client's idempotency key, `r/{id}`
/// for a request without one (its id is its key), after [`RECORD_KEY_PREFIX`].
///
/// ```
/// use keelson_protocol::idempotency::{RECORD_KEY_PREFIX, record_key};
///
/// assert_eq!(record_key(Some("k-1"), "r-9"), format!("{RECORD_KEY_PREFIX}c/k-1"));
/// assert_eq!(record_key(None, "r-9"), format!("{RECORD_KEY_PREFIX}r/r-9"));
/// ```
pub fn record_key(client_key: Option<&str>, request_id: &str) -> String {
    match client_key {
        Some(k) => format!("{RECORD_KEY_PREFIX}c/{k}"),
        None => format!("{RECORD_KEY_PREFIX}r/{request_id}"),
    }
}

/// Whether a record key holds a client's key (bounded per scope) rather than a
/// request id (kept only until the request's deadline has surely passed).
pub fn is_client_key(record_key: &str) -> bool {
    record_key
        .strip_prefix(RECORD_KEY_PREFIX)
        .is_some_and(|k| k.starts_with("c/"))
}

/// The expiry of an encoded record, or `None` when it is not one.
pub fn expiry_of(bytes: &[u8]) -> Option<u64> {
    crate::decode::<OutcomeRecord>(bytes)
        .ok()
        .map(|r| r.expires_unix_ms)
}

/// What a logic server remembers of one keyed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeRecord {
    /// Protocol version of the writer.
    pub v: ProtocolVersion,
    /// The request that wrote this record.
    pub request_id: String,
    /// The request's [`crate::Request::idempotency_fingerprint`], when a client key
    /// was given: a later request with the same key and another fingerprint is
    /// refused ([`ReplyStatus::KeyReused`]).
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// After this time (milliseconds since the Unix epoch) every server forgets it.
    pub expires_unix_ms: u64,
    /// Where the request is.
    pub phase: RecordPhase,
}

/// The phase of a recorded request. A later write replaces an earlier one, so the
/// phase only moves forward: `running` is written before the handler runs (for client
/// keys only), `done` with the handler's effects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordPhase {
    /// A server runs the request now; another request with the same key is refused
    /// ([`ReplyStatus::Conflict`]) until it is done or `until_unix_ms` (its deadline)
    /// passed.
    Running {
        /// The running request's deadline.
        until_unix_ms: u64,
    },
    /// The request ended; this is its reply.
    Done {
        /// The reply status.
        status: ReplyStatus,
        /// The reply body (the handler's JSON) on success.
        #[serde(with = "serde_bytes", default)]
        body: Vec<u8>,
        /// The error on any other status.
        #[serde(default)]
        error: Option<ErrorInfo>,
        /// The server that ran it.
        #[serde(default)]
        served_by: String,
        /// The success status the handler chose, if not 200 (protocol 1.2).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        http_status: Option<u16>,
        /// The response headers the handler set (protocol 1.2).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        headers: Vec<(String, String)>,
    },
}

impl Envelope for OutcomeRecord {
    const KIND: &'static str = "outcome record";
    fn version(&self) -> ProtocolVersion {
        self.v
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{decode, encode};

    #[test]
    fn records_round_trip_and_keys_tell_their_kind() {
        let record = OutcomeRecord {
            v: ProtocolVersion::CURRENT,
            request_id: "r-1".into(),
            fingerprint: Some("f".into()),
            expires_unix_ms: 9,
            phase: RecordPhase::Done {
                status: ReplyStatus::Ok,
                body: b"{\"value\":1}".to_vec(),
                error: None,
                served_by: "n".into(),
                http_status: Some(201),
                headers: vec![("location".into(), "/x".into())],
            },
        };
        assert_eq!(
            decode::<OutcomeRecord>(&encode(&record).unwrap()).unwrap(),
            record
        );
        assert!(is_client_key(&record_key(Some("a"), "r")));
        assert!(!is_client_key(&record_key(None, "r")));
        assert!(!is_client_key("cart"));
    }
}
