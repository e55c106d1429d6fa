//! Protocol versioning.
//!
//! Every envelope carries the [`ProtocolVersion`] of its writer. Peers with the same
//! major version interoperate: a minor bump may only add optional fields (marked
//! `#[serde(default)]`), which older readers ignore. A different major version is
//! refused by [`crate::decode`] with [`crate::DecodeError::IncompatibleVersion`],
//! never misread.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A `major.minor` protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProtocolVersion {
    /// Incremented on any change an older peer cannot read.
    pub major: u16,
    /// Incremented when optional fields are added.
    pub minor: u16,
}

impl ProtocolVersion {
    /// The version this build writes.
    pub const CURRENT: ProtocolVersion = ProtocolVersion {
        major: 1,
        minor: if cfg!(feature = "next-preview") { 3 } else { 2 },
    };

    /// Whether a message written at `self` can be read by this build.
    pub fn is_compatible(self) -> bool {
        self.major == Self::CURRENT.major
    }
}

impl Default for ProtocolVersion {
    fn default() -> Self {
        Self::CURRENT
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}
