//! Verifying a bearer token: header, key, signature, then claims.
//!
//! The order matters: everything a client can learn from a refusal before the
//! signature is checked (too large, malformed, algorithm, key id) it already knew from
//! its own token; the claim rules of [`super::claims`] are only reported for tokens
//! the issuer really signed.
//!
//! Algorithms: HS256 verifies with the shared secret only, never with a JWKS key, and
//! RS256/ES256 only with a JWKS key of that algorithm named by the token's `kid`. So
//! `alg: none` and the HS256-signed-with-the-public-key confusion have no key to
//! verify with and are refused as "algorithm not allowed".

use super::claims::{self, ClaimPolicy, Claims, TokenRejection};
use super::jwks::JwksFile;
use super::{AuthConfig, AuthError, Secret, TokenAlgorithm};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest bearer token looked at, in bytes. Real tokens, even with an identity
/// provider's group claims, stay far below; anything longer is refused before any
/// decoding work.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Checks bearer tokens against the configured keys and rules. Cheap to clone.
///
/// ```
/// use keelson_ui_gateway::{AuthConfig, Secret, TokenVerifier, issue_token};
/// use std::time::Duration;
///
/// let secret = Secret::new("dev-secret").unwrap();
/// let verifier = TokenVerifier::hs256(secret.clone(), &AuthConfig::default());
/// let token = issue_token(&secret, "alice", Duration::from_secs(60)).unwrap();
/// assert_eq!(verifier.verify(&token).unwrap(), "alice");
/// ```
#[derive(Clone)]
pub struct TokenVerifier {
    inner: Arc<Inner>,
}

struct Inner {
    /// `Some` when HS256 is allowed.
    secret: Option<Secret>,
    /// `Some` when `auth.jwks_file` is set.
    jwks: Option<JwksFile>,
    /// RS256 / ES256 allowed (with `jwks`).
    rs256: bool,
    es256: bool,
    policy: ClaimPolicy,
}

impl fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("hs256", &self.inner.secret.is_some())
            .field("jwks", &self.inner.jwks)
            .field("rs256", &self.inner.rs256)
            .field("es256", &self.inner.es256)
            .field("policy", &self.inner.policy)
            .finish()
    }
}

fn policy(config: &AuthConfig) -> ClaimPolicy {
    ClaimPolicy {
        leeway_s: config.leeway_s,
        max_lifetime_s: config.max_token_lifetime_s,
        issuer: config.issuer.clone(),
        audience: config.audience.clone(),
    }
}

impl TokenVerifier {
    /// A verifier of HS256 tokens signed with `secret` only, with the claim rules of
    /// `config` (its key settings are ignored).
    pub fn hs256(secret: Secret, config: &AuthConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                secret: Some(secret),
                jwks: None,
                rs256: false,
                es256: false,
                policy: policy(config),
            }),
        }
    }

    /// The verifier `config` describes: the secret is loaded when HS256 is among
    /// `auth.algorithms`, the JWKS file read when `auth.jwks_file` is set.
    ///
    /// Errors when the configuration is invalid (see [`AuthConfig::validate`]), when
    /// the secret or the JWKS file cannot be loaded, and when no algorithm has a key.
    pub fn from_config(config: &AuthConfig) -> Result<Self, AuthError> {
        config.validate()?;
        let allows = |a| config.algorithms.contains(&a);
        let secret = if allows(TokenAlgorithm::HS256) {
            Some(config.load_secret()?)
        } else {
            None
        };
        let jwks = match &config.jwks_file {
            Some(path) => Some(JwksFile::open(
                path,
                Duration::from_secs(config.jwks_refresh_s),
            )?),
            None => None,
        };
        let has_jwks = jwks.is_some();
        Ok(Self {
            inner: Arc::new(Inner {
                secret,
                jwks,
                rs256: has_jwks && allows(TokenAlgorithm::RS256),
                es256: has_jwks && allows(TokenAlgorithm::ES256),
                policy: policy(config),
            }),
        })
    }

    /// The user id (`sub`) of `token` if it is acceptable, else the rule it broke.
    pub fn verify(&self, token: &str) -> Result<String, AuthError> {
        self.check(token, now_s()).map_err(AuthError::Rejected)
    }

    fn check(&self, token: &str, now_s: u64) -> Result<String, TokenRejection> {
        use TokenRejection as R;
        if token.len() > MAX_TOKEN_BYTES {
            return Err(R::TooLarge);
        }
        let header = header(token)?;
        let inner = &self.inner;
        let (algorithm, key) = match header.alg.as_str() {
            "HS256" => {
                let secret = inner.secret.as_ref().ok_or(R::AlgorithmNotAllowed)?;
                (
                    Algorithm::HS256,
                    DecodingKey::from_secret(secret.as_bytes()),
                )
            }
            alg @ ("RS256" | "ES256") => {
                let (algorithm, allowed) = if alg == "RS256" {
                    (Algorithm::RS256, inner.rs256)
                } else {
                    (Algorithm::ES256, inner.es256)
                };
                let jwks = inner.jwks.as_ref().filter(|_| allowed);
                let jwks = jwks.ok_or(R::AlgorithmNotAllowed)?;
                let kid = header.kid.as_deref().ok_or(R::MissingKeyId)?;
                let key = jwks.key(kid)?;
                if key.algorithm != algorithm {
                    return Err(R::AlgorithmKeyMismatch);
                }
                (algorithm, key.key)
            }
            _ => return Err(R::AlgorithmNotAllowed),
        };
        // The library checks the signature and the algorithm only; the claims are
        // ours, so that each broken rule has its own answer.
        let mut validation = Validation::new(algorithm);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::InvalidSignature => R::BadSignature,
                K::InvalidAlgorithm => R::AlgorithmNotAllowed,
                _ => R::Malformed,
            }
        })?;
        claims::check(data.claims, &inner.policy, now_s)
    }
}

/// The part of a JOSE header looked at before choosing a key. Parsed here rather than
/// with `jsonwebtoken::decode_header` so that `alg: none` or an unknown algorithm is
/// "algorithm not allowed", not "malformed".
#[derive(Deserialize)]
struct JoseHeader {
    alg: String,
    kid: Option<String>,
}

fn header(token: &str) -> Result<JoseHeader, TokenRejection> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenRejection::Malformed);
    };
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| TokenRejection::Malformed)?;
    serde_json::from_slice(&json).map_err(|_| TokenRejection::Malformed)
}

pub(super) fn now_s() -> u64 {
    // A clock before 1970 is a broken host; 0 then makes every token look expired
    // rather than panicking.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use TokenRejection as R;
    use jsonwebtoken::{EncodingKey, Header};

    fn verifier() -> TokenVerifier {
        TokenVerifier::hs256(Secret::new("k").unwrap(), &AuthConfig::default())
    }

    fn hs(claims: &serde_json::Value) -> String {
        let key = EncodingKey::from_secret(b"k");
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key).unwrap()
    }

    fn b64(json: &str) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    #[test]
    fn header_rules_come_before_the_signature() {
        let v = verifier();
        let now = now_s();
        let claims = b64(&format!(r#"{{"sub":"a","exp":{}}}"#, now + 60));
        let none = format!("{}.{claims}.", b64(r#"{"alg":"none"}"#));
        assert_eq!(v.check(&none, now), Err(R::AlgorithmNotAllowed));
        let rs = format!("{}.{claims}.c2ln", b64(r#"{"alg":"RS256","kid":"x"}"#));
        assert_eq!(v.check(&rs, now), Err(R::AlgorithmNotAllowed));
        let hs512 = format!("{}.{claims}.c2ln", b64(r#"{"alg":"HS512"}"#));
        assert_eq!(v.check(&hs512, now), Err(R::AlgorithmNotAllowed));
        for bad in [
            "",
            "a.b",
            "a.b.c.d",
            "!!.a.b",
            &format!("{}.a.b", b64("[]")),
        ] {
            assert_eq!(v.check(bad, now), Err(R::Malformed), "{bad}");
        }
        let forged = format!("{}.{claims}.c2ln", b64(r#"{"alg":"HS256"}"#));
        assert_eq!(v.check(&forged, now), Err(R::BadSignature));
        let huge = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(v.check(&huge, now), Err(R::TooLarge));
    }

    #[test]
    fn claims_are_checked_after_a_good_signature() {
        let v = verifier();
        let now = now_s();
        let ok = hs(&serde_json::json!({"sub": "a", "exp": now + 60}));
        assert_eq!(v.check(&ok, now).unwrap(), "a");
        let long = hs(&serde_json::json!({"sub": "a", "exp": now + 10 * 86_400}));
        assert_eq!(v.check(&long, now), Err(R::LifetimeTooLong));
        let stringly = hs(&serde_json::json!({"sub": "a", "exp": "tomorrow"}));
        assert_eq!(v.check(&stringly, now), Err(R::Malformed));
    }
}
