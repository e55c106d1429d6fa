//! The one MessagePack codec of the protocol.
//!
//! [`encode`] writes maps with named fields (`rmp_serde::to_vec_named`), so optional
//! fields can be added without breaking older readers. [`decode`] is the only way
//! bytes from the network become an envelope, and it is bounded:
//!
//! * input longer than [`MAX_MESSAGE_BYTES`] is refused before any parsing;
//! * nesting deeper than [`MAX_DEPTH`] is refused (the default depth limit of
//!   rmp-serde, 1024, still overflows a 2 MiB stack);
//! * truncated input, absurd length prefixes and wrong types are plain errors;
//! * a message from another major protocol version is refused with
//!   [`DecodeError::IncompatibleVersion`], never misread.
//!
//! Like rmp-serde itself, `decode` also reads a struct written as an array (fields by
//! position) and ignores bytes after a complete message; neither can smuggle a field
//! past the type's own checks.

use crate::envelope::Envelope;
use crate::version::ProtocolVersion;
use serde::Deserialize;

/// Largest encoded message [`decode`] accepts: 16 MiB.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Deepest nesting of arrays and maps [`decode`] accepts.
pub const MAX_DEPTH: usize = 32;

/// Why bytes could not be decoded into an envelope.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input is larger than [`MAX_MESSAGE_BYTES`].
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size of the input.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The writer spoke another major protocol version.
    #[error("incompatible protocol version {found} in {kind} message (this peer speaks {ours})")]
    IncompatibleVersion {
        /// Envelope kind.
        kind: &'static str,
        /// Version found in the message.
        found: ProtocolVersion,
        /// Version of this build.
        ours: ProtocolVersion,
    },
    /// The input is not a valid MessagePack encoding of the envelope.
    #[error("malformed {kind} message: {source}")]
    Malformed {
        /// Envelope kind.
        kind: &'static str,
        /// What the MessagePack decoder said.
        #[source]
        source: rmp_serde::decode::Error,
    },
}

/// Why an envelope could not be encoded.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode message: {0}")]
pub struct EncodeError(#[from] rmp_serde::encode::Error);

/// Encode an envelope as a MessagePack map with named fields.
pub fn encode<T: Envelope>(message: &T) -> Result<Vec<u8>, EncodeError> {
    Ok(rmp_serde::to_vec_named(message)?)
}

/// Decode an envelope from untrusted bytes; never panics.
pub fn decode<T: Envelope>(bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            limit: MAX_MESSAGE_BYTES,
        });
    }
    match bounded::<T>(bytes) {
        Ok(message) => {
            check_version::<T>(message.version())?;
            Ok(message)
        }
        Err(source) => {
            // A message of another major version may fail to decode as our type at
            // all; say so instead of reporting a confusing field error.
            if let Ok(probe) = bounded::<VersionProbe>(bytes) {
                check_version::<T>(probe.v)?;
            }
            Err(DecodeError::Malformed {
                kind: T::KIND,
                source,
            })
        }
    }
}

fn bounded<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> Result<T, rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    // rmp-serde counts the level down before checking it, so `n` admits `n - 1`.
    de.set_max_depth(MAX_DEPTH + 1);
    T::deserialize(&mut de)
}

fn check_version<T: Envelope>(found: ProtocolVersion) -> Result<(), DecodeError> {
    if found.is_compatible() {
        Ok(())
    } else {
        Err(DecodeError::IncompatibleVersion {
            kind: T::KIND,
            found,
            ours: ProtocolVersion::CURRENT,
        })
    }
}

/// The `id` of a message that [`decode`] refused (another major version, a field of
/// the wrong type), when it has a readable one: so that its sender can still be
/// told why, in a reply it can match to its request. Bounded like [`decode`].
pub fn peek_id(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct IdProbe {
        id: String,
    }
    if bytes.len() > MAX_MESSAGE_BYTES {
        return None;
    }
    bounded::<IdProbe>(bytes).ok().map(|p| p.id)
}

/// Reads only the version of any envelope; every other field is skipped.
#[derive(Deserialize)]
struct VersionProbe {
    v: ProtocolVersion,
}

#[cfg(test)]
mod tests;
