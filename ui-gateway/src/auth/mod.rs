//! Who the caller is.
//!
//! Identity is a bearer token: `Authorization: Bearer <jwt>`, HS256-signed with the
//! mesh's secret or RS256/ES256-signed by an identity provider whose public keys are
//! in a JWKS file, whose `sub` claim is the user id. The gateway is the only component
//! that looks at tokens; what it verified travels on as
//! [`Request::user`](keelson_protocol::Request::user). No header, query parameter or
//! body field can set the user: a request without a token is anonymous, a request with
//! a bad one is refused.
//!
//! * [`secret`]: the `[auth]` configuration and how the signing secret is loaded;
//! * [`verifier`]: checking a token's header, key and signature;
//! * [`claims`]: the rules its claims must meet, one [`TokenRejection`] each;
//! * [`jwks`]: public keys from a JWKS file, reloaded when it changes;
//! * [`token`]: issuing tokens, and reading the `Authorization` header.

mod claims;
mod jwks;
mod secret;
mod token;
mod verifier;

pub use claims::{MAX_SUBJECT_BYTES, TokenRejection};
pub use jwks::MISS_RELOAD_INTERVAL;
pub use secret::{AuthConfig, Secret, TokenAlgorithm};
pub(crate) use token::user_from_headers;
pub use token::{issue_token, issue_token_for, verify_token};
pub use verifier::{MAX_TOKEN_BYTES, TokenVerifier};

use std::io;
use std::path::PathBuf;

/// Why a secret could not be loaded, or a token issued or verified.
///
/// No variant ever carries the secret itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// Neither `auth.secret` nor `auth.secret_file` is configured.
    #[error(
        "no token signing secret is configured: set auth.secret_file to the path of a file \
         holding it, or the KEELSON__AUTH__SECRET environment variable"
    )]
    MissingSecret,
    /// The configured secret is empty (or only whitespace, when read from a file).
    #[error("the token signing secret from {origin} is empty")]
    EmptySecret {
        /// Where the secret came from: `auth.secret` or the file's path.
        origin: String,
    },
    /// The secret file exists but could not be read.
    #[error("cannot read the token signing secret file {}: {source}", path.display())]
    ReadSecretFile {
        /// The configured path.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: io::Error,
    },
    /// `generate_if_missing` is on and the secret file could not be created.
    #[error("cannot create the token signing secret file {}: {source}", path.display())]
    CreateSecretFile {
        /// The configured path.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: io::Error,
    },
    /// The JWKS file could not be read, or holds no usable key.
    #[error("cannot load the JWKS file {}: {message}", path.display())]
    Jwks {
        /// The configured `auth.jwks_file`.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// The `[auth]` settings contradict each other or are out of range.
    #[error("{0}")]
    Config(String),
    /// A token could not be signed.
    #[error("cannot sign a token: {0}")]
    Sign(#[source] jsonwebtoken::errors::Error),
    /// The token (or the subject asked for) breaks a rule; the message names it.
    #[error("{0}")]
    Rejected(TokenRejection),
    /// The `Authorization` header is present but is not one `Bearer <token>`.
    #[error("malformed Authorization header: {0}")]
    MalformedHeader(&'static str),
}
