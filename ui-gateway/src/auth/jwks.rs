//! Public keys for RS256 and ES256 tokens, from a JWKS file (RFC 7517) that may be
//! rewritten while the gateway runs.
//!
//! Key rotation without a restart: the file is read again (and its keys parsed
//! when its contents changed) when the keys are older than `auth.jwks_refresh_s`,
//! and when a token
//! names a `kid` not in the set, but the latter at most once per
//! [`MISS_RELOAD_INTERVAL`], so a stream of tokens with made-up key ids cannot make the
//! gateway read the file per request. A file that cannot be read or parsed on a
//! reload leaves the previous keys in place (a rotation tool writing it in place may
//! be caught half-way); at start-up it is an error.

use super::AuthError;
use super::claims::TokenRejection;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Shortest time between two reloads caused by an unknown `kid`.
pub const MISS_RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// Largest JWKS file read, in bytes.
const MAX_JWKS_BYTES: u64 = 1024 * 1024;

/// One usable key: what verifies, and the one algorithm it may verify.
#[derive(Clone)]
pub(crate) struct PublicKey {
    pub(crate) key: DecodingKey,
    pub(crate) algorithm: Algorithm,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

type KeySet = HashMap<String, PublicKey>;

/// The keys of one JWKS file, reloaded as described in the module documentation.
#[derive(Debug)]
pub(crate) struct JwksFile {
    path: PathBuf,
    refresh: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    keys: Arc<KeySet>,
    /// SHA-256 of the contents the keys came from: a rewrite of the same length
    /// within one modification-time tick is still seen.
    stamp: Option<[u8; 32]>,
    /// When the file was last looked at (for the periodic refresh).
    checked: Instant,
    /// When a reload was last caused by an unknown `kid`.
    miss_reload: Option<Instant>,
}

impl JwksFile {
    /// Read `path` now; an unreadable file or one without usable keys is an error.
    pub(crate) fn open(path: &Path, refresh: Duration) -> Result<Self, AuthError> {
        let err = |message: String| AuthError::Jwks {
            path: path.to_owned(),
            message,
        };
        let text = read_text(path).map_err(err)?;
        let keys = parse_keys(&text).map_err(err)?;
        let stamp = content_stamp(&text);
        Ok(Self {
            path: path.to_owned(),
            refresh,
            state: Mutex::new(State {
                keys: Arc::new(keys),
                stamp: Some(stamp),
                checked: Instant::now(),
                miss_reload: None,
            }),
        })
    }

    /// The key with id `kid`, reloading the file first when it is due.
    pub(crate) fn key(&self, kid: &str) -> Result<PublicKey, TokenRejection> {
        // A poisoned lock only means another request panicked mid-reload; the state
        // it left is a whole key set either way.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if now.duration_since(state.checked) >= self.refresh {
            self.reload_if_changed(&mut state, now);
        }
        if let Some(key) = state.keys.get(kid) {
            return Ok(key.clone());
        }
        let may_reload = state
            .miss_reload
            .is_none_or(|at| now.duration_since(at) >= MISS_RELOAD_INTERVAL);
        if may_reload {
            state.miss_reload = Some(now);
            self.reload_if_changed(&mut state, now);
        }
        state
            .keys
            .get(kid)
            .cloned()
            .ok_or(TokenRejection::UnknownKeyId)
    }

    fn reload_if_changed(&self, state: &mut State, now: Instant) {
        state.checked = now;
        let text = match read_text(&self.path) {
            Ok(text) => text,
            Err(message) => {
                tracing::warn!(path = %self.path.display(), %message, "cannot read the JWKS file; keeping the keys loaded before");
                return;
            }
        };
        let current = content_stamp(&text);
        if state.stamp == Some(current) {
            return;
        }
        match parse_keys(&text) {
            Ok(keys) => {
                tracing::info!(path = %self.path.display(), keys = keys.len(), "JWKS reloaded");
                state.keys = Arc::new(keys);
                state.stamp = Some(current);
            }
            Err(message) => {
                tracing::warn!(path = %self.path.display(), %message, "cannot load the JWKS file; keeping the keys loaded before");
            }
        }
    }
}

fn content_stamp(text: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(text.as_bytes()).into()
}

/// The file's text (at most [`MAX_JWKS_BYTES`]). Read whole at each check (a key
/// set is a few KiB; checks are at most every `jwks_refresh_s`, or every 2 s on an
/// unknown `kid`).
fn read_text(path: &Path) -> Result<String, String> {
    let mut text = String::new();
    fs::File::open(path)
        .and_then(|f| f.take(MAX_JWKS_BYTES + 1).read_to_string(&mut text))
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_JWKS_BYTES {
        return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
    }
    Ok(text)
}

/// The signing keys of a JWKS document, by `kid`. Keys for encryption, without a
/// `kid`, or of a type other than RSA or EC P-256 are skipped; a set with no usable
/// key is an error.
pub(crate) fn parse_keys(text: &str) -> Result<KeySet, String> {
    let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = KeySet::new();
    for jwk in &set.keys {
        let Some(kid) = jwk.common.key_id.clone().filter(|k| !k.is_empty()) else {
            tracing::warn!("JWKS key without a kid skipped");
            continue;
        };
        if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
            continue;
        }
        let algorithm = match (&jwk.algorithm, jwk.common.key_algorithm) {
            (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
            (AlgorithmParameters::EllipticCurve(p), None | Some(KeyAlgorithm::ES256))
                if p.curve == EllipticCurve::P256 =>
            {
                Algorithm::ES256
            }
            _ => {
                tracing::warn!(%kid, "JWKS key of an unsupported type or algorithm skipped");
                continue;
            }
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key `{kid}`: {e}"))?;
        if keys
            .insert(kid.clone(), PublicKey { key, algorithm })
            .is_some()
        {
            return Err(format!("key id `{kid}` appears twice"));
        }
    }
    if keys.is_empty() {
        return Err("no RS256 or ES256 signing key with a kid".to_owned());
    }
    Ok(keys)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const RSA: &str = r#"{"kty":"RSA","kid":"r1","n":"sXchDaQe","e":"AQAB"}"#;

    #[test]
    fn usable_keys_are_kept_by_kid_others_skipped() {
        let text = format!(
            r#"{{"keys":[{RSA},
                {{"kty":"RSA","n":"AQAB","e":"AQAB"}},
                {{"kty":"RSA","kid":"enc","use":"enc","n":"AQAB","e":"AQAB"}},
                {{"kty":"RSA","kid":"ps","alg":"PS256","n":"AQAB","e":"AQAB"}},
                {{"kty":"oct","kid":"h","k":"c2VjcmV0"}}]}}"#
        );
        let keys = parse_keys(&text).unwrap();
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert_eq!(keys["r1"].algorithm, Algorithm::RS256);
    }

    #[test]
    fn empty_duplicate_and_garbage_sets_are_errors() {
        assert!(
            parse_keys(r#"{"keys":[]}"#)
                .unwrap_err()
                .contains("no RS256")
        );
        let twice = format!(r#"{{"keys":[{RSA},{RSA}]}}"#);
        assert!(parse_keys(&twice).unwrap_err().contains("twice"));
        assert!(parse_keys("not json").unwrap_err().contains("not a JWKS"));
    }

    #[test]
    fn unknown_kid_reloads_at_most_once_per_interval() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        fs::write(&path, format!(r#"{{"keys":[{RSA}]}}"#)).unwrap();
        let jwks = JwksFile::open(&path, Duration::from_secs(3600)).unwrap();
        assert!(jwks.key("r1").is_ok());
        assert_eq!(jwks.key("r2").unwrap_err(), TokenRejection::UnknownKeyId);
        // The file gains r2, but the miss just now used up the reload allowance.
        let both = RSA.replace("\"r1\"", "\"r2\"");
        fs::write(&path, format!(r#"{{"keys":[{RSA},{both}]}}"#)).unwrap();
        assert_eq!(jwks.key("r2").unwrap_err(), TokenRejection::UnknownKeyId);
        jwks.state.lock().unwrap().miss_reload = Some(Instant::now() - MISS_RELOAD_INTERVAL);
        assert!(jwks.key("r2").is_ok());
    }

    #[test]
    fn a_broken_rewrite_keeps_the_old_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        fs::write(&path, format!(r#"{{"keys":[{RSA}]}}"#)).unwrap();
        let jwks = JwksFile::open(&path, Duration::ZERO).unwrap();
        fs::write(&path, "{\"keys\":[").unwrap();
        assert!(jwks.key("r1").is_ok());
        assert!(JwksFile::open(&path, Duration::ZERO).is_err());
        assert!(JwksFile::open(&dir.path().join("missing"), Duration::ZERO).is_err());
    }
}
