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

/// Where the token signing secret comes from, and the lifetime of issued tokens.
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
    /// Lifetime of the tokens that `issue_token` callers create, in seconds.
    pub token_ttl_s: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            secret: None,
            secret_file: None,
            generate_if_missing: false,
            token_ttl_s: 86_400,
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
            .finish()
    }
}

impl AuthConfig {
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
    fn unknown_key_is_refused() {
        let err = serde_json::from_str::<AuthConfig>(r#"{"secrets":"x"}"#).unwrap_err();
        assert!(err.to_string().contains("secrets"), "{err}");
    }
}
