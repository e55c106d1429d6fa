//! Issuing HS256 tokens, and reading bearer tokens from requests.
//!
//! A token this module issues carries `sub` (the user id), `iat` and `exp` (seconds
//! since the Unix epoch), and `iss`/`aud` when `auth.issuer`/`auth.audience` are set,
//! so that the gateway configured the same way accepts it. Verification is
//! [`TokenVerifier`]'s.

use super::claims::check_subject;
use super::verifier::now_s;
use super::{AuthConfig, AuthError, Secret, TokenVerifier};
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;
use std::time::Duration;

#[derive(Debug, Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// A token for `user`, valid for `ttl` from now, signed HS256 with `secret`, without
/// issuer or audience (see [`issue_token_for`]).
///
/// ```
/// use keelson_ui_gateway::{Secret, issue_token, verify_token};
/// use std::time::Duration;
///
/// let secret = Secret::new("dev-secret").unwrap();
/// let token = issue_token(&secret, "alice", Duration::from_secs(60)).unwrap();
/// assert_eq!(verify_token(&secret, &token).unwrap(), "alice");
/// ```
pub fn issue_token(secret: &Secret, user: &str, ttl: Duration) -> Result<String, AuthError> {
    issue(secret, user, ttl, None, None)
}

/// A token for `user` that a gateway with `config` accepts: valid for `ttl`, signed
/// HS256 with `secret`, with `iss` and `aud` from `auth.issuer` and `auth.audience`.
///
/// Errors when `ttl` exceeds `auth.max_token_lifetime_s`, or `user` is not an
/// acceptable subject (empty, too long, control characters).
pub fn issue_token_for(
    config: &AuthConfig,
    secret: &Secret,
    user: &str,
    ttl: Duration,
) -> Result<String, AuthError> {
    if ttl.as_secs() > config.max_token_lifetime_s {
        return Err(AuthError::Config(format!(
            "a token lifetime of {} s exceeds auth.max_token_lifetime_s ({} s); the gateway \
             would refuse the token",
            ttl.as_secs(),
            config.max_token_lifetime_s
        )));
    }
    issue(
        secret,
        user,
        ttl,
        config.issuer.as_deref(),
        config.audience.as_deref(),
    )
}

fn issue(
    secret: &Secret,
    user: &str,
    ttl: Duration,
    iss: Option<&str>,
    aud: Option<&str>,
) -> Result<String, AuthError> {
    check_subject(user).map_err(AuthError::Rejected)?;
    let iat = now_s();
    let claims = Claims {
        sub: user,
        iat,
        exp: iat.saturating_add(ttl.as_secs()),
        iss,
        aud,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(AuthError::Sign)
}

/// The user id (`sub`) of `token` if it is an HS256 token signed with `secret` that
/// meets the default claim rules of [`AuthConfig::default`].
pub fn verify_token(secret: &Secret, token: &str) -> Result<String, AuthError> {
    TokenVerifier::hs256(secret.clone(), &AuthConfig::default()).verify(token)
}

/// The verified user of a request: `None` without an `Authorization` header, the
/// token's subject with a valid `Bearer` token, an error for anything else.
pub(crate) fn user_from_headers(
    verifier: &TokenVerifier,
    headers: &HeaderMap,
) -> Result<Option<String>, AuthError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(AuthError::MalformedHeader(
            "more than one Authorization header",
        ));
    }
    let value = value
        .to_str()
        .map_err(|_| AuthError::MalformedHeader("not visible ASCII"))?;
    let (scheme, token) = value
        .trim()
        .split_once(' ')
        .ok_or(AuthError::MalformedHeader("expected `Bearer <token>`"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::MalformedHeader("not a Bearer token"));
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::MalformedHeader("empty bearer token"));
    }
    verifier.verify(token).map(Some)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::auth::TokenRejection;
    use axum::http::HeaderValue;

    fn secret(s: &str) -> Secret {
        Secret::new(s).unwrap()
    }

    fn signed(secret: &str, claims: &serde_json::Value, alg: Algorithm) -> String {
        jsonwebtoken::encode(
            &Header::new(alg),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn round_trip() {
        let s = secret("k");
        let token = issue_token(&s, "alice", Duration::from_secs(60)).unwrap();
        assert_eq!(verify_token(&s, &token).unwrap(), "alice");
    }

    #[test]
    fn other_secret_is_refused() {
        let token = issue_token(&secret("a"), "alice", Duration::from_secs(60)).unwrap();
        assert!(matches!(
            verify_token(&secret("b"), &token),
            Err(AuthError::Rejected(TokenRejection::BadSignature))
        ));
    }

    #[test]
    fn expired_beyond_leeway_is_refused_within_is_accepted() {
        let now = now_s();
        let old = serde_json::json!({"sub": "alice", "iat": now - 100, "exp": now - 60});
        let token = signed("k", &old, Algorithm::HS256);
        assert!(verify_token(&secret("k"), &token).is_err());
        let skewed = serde_json::json!({"sub": "alice", "iat": now - 100, "exp": now - 1});
        let token = signed("k", &skewed, Algorithm::HS256);
        assert_eq!(verify_token(&secret("k"), &token).unwrap(), "alice");
    }

    #[test]
    fn missing_exp_or_sub_and_empty_sub_are_refused() {
        let now = now_s();
        let no_exp = signed("k", &serde_json::json!({"sub": "a"}), Algorithm::HS256);
        assert!(verify_token(&secret("k"), &no_exp).is_err());
        let no_sub = signed("k", &serde_json::json!({"exp": now + 60}), Algorithm::HS256);
        assert!(verify_token(&secret("k"), &no_sub).is_err());
        let empty = serde_json::json!({"sub": "", "iat": now, "exp": now + 60});
        let empty = signed("k", &empty, Algorithm::HS256);
        assert!(verify_token(&secret("k"), &empty).is_err());
        assert!(issue_token(&secret("k"), "", Duration::from_secs(1)).is_err());
    }

    #[test]
    fn other_algorithm_is_refused() {
        let claims = serde_json::json!({"sub": "a", "exp": now_s() + 60});
        let token = signed("k", &claims, Algorithm::HS512);
        assert!(verify_token(&secret("k"), &token).is_err());
        assert!(verify_token(&secret("k"), "not.a.jwt").is_err());
        assert!(verify_token(&secret("k"), "").is_err());
    }

    #[test]
    fn issued_for_a_config_carries_its_issuer_and_audience_and_respects_its_bounds() {
        let config = AuthConfig {
            issuer: Some("keelson".into()),
            audience: Some("ui".into()),
            max_token_lifetime_s: 600,
            ..AuthConfig::default()
        };
        let s = secret("k");
        let token = issue_token_for(&config, &s, "alice", Duration::from_secs(600)).unwrap();
        let verifier = TokenVerifier::hs256(s.clone(), &config);
        assert_eq!(verifier.verify(&token).unwrap(), "alice");
        // A plain token lacks them, and the configured gateway says so.
        let plain = issue_token(&s, "alice", Duration::from_secs(60)).unwrap();
        assert!(matches!(
            verifier.verify(&plain),
            Err(AuthError::Rejected(TokenRejection::WrongIssuer))
        ));
        let err = issue_token_for(&config, &s, "alice", Duration::from_secs(601)).unwrap_err();
        assert!(
            err.to_string().contains("auth.max_token_lifetime_s"),
            "{err}"
        );
        assert!(issue_token(&s, "a\u{202E}b", Duration::from_secs(60)).is_err());
    }

    #[test]
    fn headers() {
        let s = secret("k");
        let v = TokenVerifier::hs256(s.clone(), &AuthConfig::default());
        let token = issue_token(&s, "bob", Duration::from_secs(60)).unwrap();
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            h
        };
        assert_eq!(user_from_headers(&v, &HeaderMap::new()).unwrap(), None);
        let bearer = with(&format!("Bearer {token}"));
        assert_eq!(
            user_from_headers(&v, &bearer).unwrap().as_deref(),
            Some("bob")
        );
        let lower = with(&format!("bearer {token}"));
        assert_eq!(
            user_from_headers(&v, &lower).unwrap().as_deref(),
            Some("bob")
        );
        for bad in [
            "Basic Ym9iOnB3",
            "Bearer",
            "Bearer   ",
            &token,
            "Bearer garbage",
        ] {
            assert!(user_from_headers(&v, &with(bad)).is_err(), "{bad}");
        }
        let mut twice = bearer.clone();
        twice.append(AUTHORIZATION, HeaderValue::from_str(&token).unwrap());
        assert!(user_from_headers(&v, &twice).is_err());
    }
}
