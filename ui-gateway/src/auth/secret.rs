//! The token signing secret: where it comes from and how it is kept.
//!
//! STYLE.md: secrets come from the environment or a file path, never from a committed
//! TOML. `auth.secret` exists for the environment override `KEELSON__AUTH__SECRET`;
//! `auth.secret_file` is the normal way. The development default configuration sets
//! `generate_if_missing` so that `cargo run` works on a fresh clone and `keelson token`
//! signs with the same secret the running gateway verifies with.

use super::AuthError;
use serde::Deserialize;
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How bearer tokens are verified (keys, algorithms, claim rules), where the HS256
/// signing secret comes from, and the lifetime of issued tokens.
///
/// Its `Debug` output shows whether an inline secret is set, never the secret.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The HS256 secret itself. Discouraged in files: meant for the environment
    /// override `KEELSON__AUTH__SECRET`. Takes precedence over `secret_file`.
    pub secret: Option<String>,
    /// Path of a file holding the secret; surrounding whitespace is ignored.
    pub secret_file: Option<PathBuf>,
    /// When `secret_file` does not exist, create it (and its parent directories, mode
    /// 0600 on unix) holding 32 random bytes, hex-encoded. For development setups.
    pub generate_if_missing: bool,
    /// Lifetime of the tokens that `issue_token` callers create, in seconds. At most
    /// `max_token_lifetime_s`.
    pub token_ttl_s: u64,
    /// Longest a token may still be valid when the gateway sees it, in seconds: a
    /// token whose `exp` lies further ahead (plus `leeway_s`) is refused, so a leaked
    /// token cannot be one that never expires. Between 1 and 31 536 000 (a year).
    pub max_token_lifetime_s: u64,
    /// Clock skew tolerated between token issuers and this gateway when checking
    /// `exp`, `nbf` and `iat`, in seconds. At most 300.
    pub leeway_s: u64,
    /// When set, a token's `iss` claim must be exactly this.
    pub issuer: Option<String>,
    /// When set, a token's `aud` claim (a string, or an array of strings) must
    /// contain this.
    pub audience: Option<String>,
    /// Signature algorithms accepted, among `HS256` (with the shared secret),
    /// `RS256` and `ES256` (with keys from `jwks_file`). An algorithm is only usable
    /// with its key configured; leave `HS256` out to accept only the identity
    /// provider's tokens (no secret is loaded then).
    pub algorithms: Vec<TokenAlgorithm>,
    /// Path of a JWKS file (RFC 7517) with the public keys of RS256/ES256 tokens.
    /// Tokens must name their key with `kid`. The file is re-read when it changes:
    /// looked at every `jwks_refresh_s`, and when a token names an unknown `kid`
    /// (at most every two seconds).
    pub jwks_file: Option<PathBuf>,
    /// How often the JWKS file is checked for changes, in seconds.
    pub jwks_refresh_s: u64,
}

/// A signature algorithm the gateway can accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[allow(clippy::upper_case_acronyms)]
pub enum TokenAlgorithm {
    /// HMAC-SHA256 with the shared secret (`secret` / `secret_file`).
    HS256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, with an RSA key from `jwks_file`.
    RS256,
    /// ECDSA P-256 with SHA-256, with an EC key from `jwks_file`.
    ES256,
}

/// Upper bound of `max_token_lifetime_s`: a year.
const MAX_LIFETIME_CEILING_S: u64 = 365 * 86_400;
/// Upper bound of `leeway_s`.
const MAX_LEEWAY_S: u64 = 300;

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            secret: None,
            secret_file: None,
            generate_if_missing: false,
            token_ttl_s: 86_400,
            max_token_lifetime_s: 86_400,
            leeway_s: 30,
            issuer: None,
            audience: None,
            algorithms: vec![
                TokenAlgorithm::HS256,
                TokenAlgorithm::RS256,
                TokenAlgorithm::ES256,
            ],
            jwks_file: None,
            jwks_refresh_s: 300,
        }
    }
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("secret_file", &self.secret_file)
            .field("generate_if_missing", &self.generate_if_missing)
            .field("token_ttl_s", &self.token_ttl_s)
            .field("max_token_lifetime_s", &self.max_token_lifetime_s)
            .field("leeway_s", &self.leeway_s)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("algorithms", &self.algorithms)
            .field("jwks_file", &self.jwks_file)
            .field("jwks_refresh_s", &self.jwks_refresh_s)
            .finish()
    }
}

impl AuthConfig {
    /// Whether the settings fit together: `token_ttl_s` within `max_token_lifetime_s`,
    /// bounds on the lifetime and the leeway, at least one algorithm, and a JWKS file
    /// only with RS256 or ES256 allowed. The message names the keys.
    pub fn validate(&self) -> Result<(), AuthError> {
        let fail = |m: String| Err(AuthError::Config(m));
        if self.max_token_lifetime_s == 0 || self.max_token_lifetime_s > MAX_LIFETIME_CEILING_S {
            return fail(format!(
                "auth.max_token_lifetime_s must be between 1 and {MAX_LIFETIME_CEILING_S} \
                 (a year), not {}",
                self.max_token_lifetime_s
            ));
        }
        if self.token_ttl_s > self.max_token_lifetime_s {
            return fail(format!(
                "auth.token_ttl_s ({}) exceeds auth.max_token_lifetime_s ({}): the gateway \
                 would refuse the tokens `keelson token` issues",
                self.token_ttl_s, self.max_token_lifetime_s
            ));
        }
        if self.leeway_s > MAX_LEEWAY_S {
            return fail(format!(
                "auth.leeway_s must be at most {MAX_LEEWAY_S}, not {}",
                self.leeway_s
            ));
        }
        if self.algorithms.is_empty() {
            return fail("auth.algorithms is empty: no token could be accepted".to_owned());
        }
        let asymmetric = self
            .algorithms
            .iter()
            .any(|a| matches!(a, TokenAlgorithm::RS256 | TokenAlgorithm::ES256));
        if self.jwks_file.is_some() && !asymmetric {
            return fail(
                "auth.jwks_file is set but auth.algorithms allows neither RS256 nor ES256"
                    .to_owned(),
            );
        }
        if self.jwks_refresh_s == 0 {
            return fail("auth.jwks_refresh_s must be at least 1".to_owned());
        }
        Ok(())
    }

    /// The secret: `secret` if set, else the trimmed contents of `secret_file`
    /// (created first when missing and `generate_if_missing` is on).
    ///
    /// Errors when neither is set, when the file cannot be read or created, and when
    /// the secret is empty.
    pub fn load_secret(&self) -> Result<Secret, AuthError> {
        if let Some(secret) = &self.secret {
            return Secret::with_origin(secret.clone(), "auth.secret");
        }
        let Some(path) = &self.secret_file else {
            return Err(AuthError::MissingSecret);
        };
        if self.generate_if_missing {
            create_if_missing(path)?;
        }
        let text = fs::read_to_string(path).map_err(|source| AuthError::ReadSecretFile {
            path: path.clone(),
            source,
        })?;
        Secret::with_origin(text.trim().to_owned(), &path.display().to_string())
    }

    /// The lifetime of issued tokens as a duration.
    pub fn token_ttl(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.token_ttl_s)
    }
}

/// Write a fresh random secret to `path` unless the file exists. Safe against a
/// concurrent creator: the file is created exclusively, and losing that race is fine.
fn create_if_missing(path: &Path) -> Result<(), AuthError> {
    let err = |source: io::Error| AuthError::CreateSecretFile {
        path: path.to_owned(),
        source,
    };
    if path.exists() {
        return Ok(());
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(err)?;
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(mut file) => {
            let secret = Secret::generate();
            writeln!(file, "{}", secret.0).map_err(err)?;
            file.sync_all().map_err(err)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(err(e)),
    }
}

/// An HS256 signing secret. Cheap to clone; its `Debug` output never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    /// A secret from its text; an empty one is refused.
    pub fn new(secret: impl Into<String>) -> Result<Self, AuthError> {
        Self::with_origin(secret.into(), "the caller")
    }

    /// A fresh secret: 32 random bytes from the OS-seeded generator, hex-encoded.
    pub fn generate() -> Self {
        let bytes: [u8; 32] = rand::random();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Self(hex.into())
    }

    fn with_origin(secret: String, origin: &str) -> Result<Self, AuthError> {
        if secret.is_empty() {
            return Err(AuthError::EmptySecret {
                origin: origin.to_owned(),
            });
        }
        Ok(Self(secret.into()))
    }

    pub(super) fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn inline_secret_wins_over_file() {
        let config = AuthConfig {
            secret: Some("inline".into()),
            secret_file: Some("/nonexistent/secret".into()),
            ..AuthConfig::default()
        };
        assert_eq!(
            config.load_secret().unwrap(),
            Secret::new("inline").unwrap()
        );
    }

    #[test]
    fn missing_secret_says_what_to_set() {
        let err = AuthConfig::default().load_secret().unwrap_err();
        let text = err.to_string();
        assert!(text.contains("auth.secret_file"), "{text}");
        assert!(text.contains("KEELSON__AUTH__SECRET"), "{text}");
    }

    #[test]
    fn empty_secrets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        fs::write(&path, " \n").unwrap();
        let from_file = AuthConfig {
            secret_file: Some(path),
            ..AuthConfig::default()
        };
        assert!(matches!(
            from_file.load_secret(),
            Err(AuthError::EmptySecret { .. })
        ));
        assert!(Secret::new("").is_err());
    }

    #[test]
    fn file_secret_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        fs::write(&path, "  s3cret\n").unwrap();
        let config = AuthConfig {
            secret_file: Some(path),
            ..AuthConfig::default()
        };
        assert_eq!(
            config.load_secret().unwrap(),
            Secret::new("s3cret").unwrap()
        );
    }

    #[test]
    fn missing_file_without_generation_is_an_error() {
        let config = AuthConfig {
            secret_file: Some("/nonexistent/keelson/secret".into()),
            ..AuthConfig::default()
        };
        assert!(matches!(
            config.load_secret(),
            Err(AuthError::ReadSecretFile { .. })
        ));
    }

    #[test]
    fn generated_file_is_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/dir/secret");
        let config = AuthConfig {
            secret_file: Some(path.clone()),
            generate_if_missing: true,
            ..AuthConfig::default()
        };
        let first = config.load_secret().unwrap();
        let second = config.load_secret().unwrap();
        assert_eq!(first, second, "an existing file is never regenerated");
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 64);
        assert!(text.trim().bytes().all(|b| b.is_ascii_hexdigit()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn debug_does_not_show_the_secret() {
        let secret = Secret::new("hunter2").unwrap();
        assert!(!format!("{secret:?}").contains("hunter2"));
        let config = AuthConfig {
            secret: Some("hunter2".into()),
            ..AuthConfig::default()
        };
        assert!(!format!("{config:?}").contains("hunter2"));
        assert!(format!("{config:?}").contains("<redacted>"));
    }

    #[test]
    fn validation_names_the_offending_keys() {
        assert!(AuthConfig::default().validate().is_ok());
        let check = |config: AuthConfig, key: &str| {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        };
        check(
            AuthConfig {
                token_ttl_s: 90_000,
                ..AuthConfig::default()
            },
            "auth.token_ttl_s (90000) exceeds auth.max_token_lifetime_s (86400)",
        );
        check(
            AuthConfig {
                max_token_lifetime_s: 0,
                ..AuthConfig::default()
            },
            "auth.max_token_lifetime_s",
        );
        check(
            AuthConfig {
                leeway_s: 3600,
                ..AuthConfig::default()
            },
            "auth.leeway_s",
        );
        check(
            AuthConfig {
                algorithms: vec![],
                ..AuthConfig::default()
            },
            "auth.algorithms",
        );
        check(
            AuthConfig {
                algorithms: vec![TokenAlgorithm::HS256],
                jwks_file: Some("/keys.json".into()),
                ..AuthConfig::default()
            },
            "auth.jwks_file",
        );
    }

    #[test]
    fn algorithms_are_named_as_in_jose() {
        let config: AuthConfig = serde_json::from_str(r#"{"algorithms":["RS256"]}"#).unwrap();
        assert_eq!(config.algorithms, vec![TokenAlgorithm::RS256]);
        let err = serde_json::from_str::<AuthConfig>(r#"{"algorithms":["none"]}"#).unwrap_err();
        assert!(err.to_string().contains("HS256"), "{err}");
    }

    #[test]
    fn unknown_key_is_refused() {
        let err = serde_json::from_str::<AuthConfig>(r#"{"secrets":"x"}"#).unwrap_err();
        assert!(err.to_string().contains("secrets"), "{err}");
    }
}
